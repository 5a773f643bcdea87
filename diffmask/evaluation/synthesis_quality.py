"""Synthesis quality without hub weights: FID / KID on a real-trained segmenter's features, and
anatomical accuracy (does an image show the heart size its prompt asked for?).

Inception weights cannot be had offline, so the feature encoder is the project's own: the
encoder of a segmentation network trained on real JSRT images (a ``diffmask-train`` run), its
deepest (lowest-resolution) convolution output, averaged over space. FID / KID computed on these
features compare runs of this project with each other, not with published Inception figures.

Anatomical accuracy: the same real-trained segmenter segments each synthetic image, the
cardiothoracic ratio and lung fields of its prediction are measured (:func:`~diffmask.domains.
chest.anatomy.measure_mask`), and compared with the findings the image's prompt asked for (the
``heart_size`` word in the manifest row's ``meta``): the CTR error of an image is the distance of
its measured CTR from the asked word's interval (0 inside it; :func:`~diffmask.domains.chest.
anatomy.anatomy_report`). A mask without the chest classes is counted as unmeasurable.

Channels: the segmenter reads images of its run's ``data.channels`` (its net's ``in_channels``);
the set (its ``stage.json`` ``channels``) and the real images are read with those channels, and a
set of the other kind (grey for a colour segmenter, or the reverse) is a ValueError, never converted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from diffmask.domains.chest.anatomy import FindingRules, anatomy_report
from diffmask.domains.chest.prompt import SEX_WORDS

__all__ = [
    "attribute_accuracy",
    "check_feature_channels",
    "frechet_distance",
    "kernel_distance",
    "segmenter_features",
    "synthesis_quality",
]

log = logging.getLogger(__name__)


@torch.no_grad()
def segmenter_features(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """(N, C_in, S, S) -> (N, C) features: the lowest-resolution Conv2d output of ``net``, mean over space.

    ``net`` is run whole (its prediction is discarded); a forward hook on every ``Conv2d`` keeps
    the output with the smallest spatial size (the encoder's bottleneck).
    """
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ValueError("model: no Conv2d layers to take features from")
    feats, outs = [], []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in convs]
    try:
        for start in range(0, len(images), batch_size):
            outs.clear()
            net(images[start:start + batch_size])
            deepest = min(outs, key=lambda o: (o.shape[-1] * o.shape[-2], -o.shape[1]))
            feats.append(deepest.float().mean(dim=(-2, -1)).cpu())
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(feats).numpy().astype(np.float64)


def _sqrtm_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature sets (N, D) and (M, D) (the FID formula)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"features: FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = _sqrtm_psd(ca)
    cross = np.linalg.eigvalsh(root @ cb @ root)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * trace_root)


def kernel_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50, subset_size: int = 100, seed: int = 0
                    ) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean and std over random subsets."""
    n = min(subset_size, len(a), len(b))
    if n < 2:
        raise ValueError(f"features: KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), n, replace=False)]
        y = b[rng.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = ~np.eye(n, dtype=bool)
        vals.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))


def _attribute(meta: Mapping[str, object], field: str) -> str:
    value = str((meta or {}).get(field) or "").strip().lower()
    return SEX_WORDS.get(value, "") if field == "sex" else value


def small_classifier(num_classes: int, width: int = 16, in_channels: int = 1) -> torch.nn.Module:
    """A 4-block CNN with global average pooling (the attribute judge) of ``in_channels`` images."""
    layers, c = [], int(in_channels)
    for w in (width, width * 2, width * 4, width * 4):
        layers += [torch.nn.Conv2d(c, w, 3, stride=2, padding=1), torch.nn.GroupNorm(4, w), torch.nn.SiLU()]
        c = w
    return torch.nn.Sequential(
        *layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(c, num_classes)
    )


def attribute_accuracy(train: tuple[torch.Tensor, Sequence[Mapping]],
                       test: tuple[torch.Tensor, Sequence[Mapping]],
                       synthetic: tuple[torch.Tensor, Sequence[Mapping]], field: str = "sex",
                       epochs: int = 40, seed: int = 0) -> dict:
    """Train a small classifier of ``field`` on real images, report its real test accuracy and its
    accuracy on synthetic images against the value each was generated for.

    Each argument is (images (N, C, S, S), metas); images without a value of ``field`` are left out.
    """
    def keep(images, metas):
        values = [_attribute(m, field) for m in metas]
        idx = [i for i, v in enumerate(values) if v]
        return images[idx], [values[i] for i in idx]

    x, y = keep(*train)
    classes = sorted(set(y))
    if len(classes) < 2:
        raise ValueError(
            f"attribute {field!r}: the real training images have fewer than 2 values ({classes})"
        )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = small_classifier(len(classes), in_channels=int(x.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    target = torch.tensor([classes.index(v) for v in y])
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(32):
            loss = torch.nn.functional.cross_entropy(net(x[batch]), target[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def accuracy(images, metas) -> tuple[float, int, dict[str, float]]:
        xi, yi = keep(images, metas)
        yi_known = [(i, v) for i, v in enumerate(yi) if v in classes]
        if not yi_known:
            return float("nan"), 0, {}
        with torch.no_grad():
            pred = net(xi[[i for i, _ in yi_known]]).argmax(1).tolist()
        hits = [classes[p] == v for p, (_, v) in zip(pred, yi_known, strict=True)]
        per = {c: float(np.mean([h for h, (_, v) in zip(hits, yi_known, strict=True) if v == c]))
               for c in classes if any(v == c for _, v in yi_known)}
        return float(np.mean(hits)), len(hits), per

    real_acc, n_real, _ = accuracy(*test)
    syn_acc, n_syn, per = accuracy(*synthetic)
    return {"field": field, "classes": classes, "real_test_accuracy": real_acc, "n_real_test": n_real,
            "synthetic_accuracy": syn_acc, "n_synthetic": n_syn, "synthetic_accuracy_per_value": per}


def default_rules() -> FindingRules:
    """The finding rules of ``conf/prompts/anatomy_pathology.yaml``."""
    from omegaconf import OmegaConf  # noqa: PLC0415

    from diffmask.config import CONFIG_PATH  # noqa: PLC0415

    cfg = OmegaConf.load(f"{CONFIG_PATH}/prompts/anatomy_pathology.yaml")
    return FindingRules(**{k: dict(v) for k, v in OmegaConf.to_container(cfg.rules).items()})


def _images(dataset) -> torch.Tensor:
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def check_feature_channels(model, cfg, folder, set_channels: int) -> int:
    """The channels the segmenter of run ``model`` reads (its ``data.channels``; its net's
    ``in_channels`` must agree); a ValueError naming both when the set at ``folder`` holds images of
    ``set_channels`` other channels (features of grey images from a colour net, or the reverse)."""
    channels = int(cfg.data.get("channels", 1))
    net_in = int(cfg.segmentation.net.get("in_channels", channels))
    if net_in != channels:
        raise ValueError(
            f"model: {model} has a net with in_channels={net_in} but data.channels={channels}; its features "
            "cannot be trusted"
        )
    if int(set_channels) != channels:
        raise ValueError(
            f"{folder}: the set holds {set_channels}-channel images (its stage.json channels), "
            f"but the model {model} "
            f"reads {channels}-channel ones (its data.channels); "
            "grey and colour are never converted silently: "
            "score the set with a model trained on its kind of image"
        )
    return channels


def synthesis_quality(synthetic_dir, model, rules: FindingRules | None = None, batch_size: int = 16,
                      device: str = "cpu", kid_subsets: int = 50, attribute: str | None = "sex") -> dict:
    """FID / KID of a generated set against the real training images on a real-trained segmenter's
    features, and the anatomical accuracy of its images (see the module docstring).

    Args:
        synthetic_dir: a generated set (``manifest.jsonl`` + ``images/``).
        model: a ``diffmask-train`` run trained on real images (features and segmentations).
        rules: heart-size intervals (default: ``conf/prompts/anatomy_pathology.yaml``).
        batch_size: images per forward pass of the segmenter (features and segmentations).
        device: torch device the segmenter runs on.
        kid_subsets: number of random subsets the KID mean and std are taken over.
        attribute: a metadata field (e.g. ``sex``): a small classifier trained on the real training
            images judges whether each synthetic image shows the value it was generated for
            (:func:`attribute_accuracy`); None = skipped.
    """
    from pathlib import Path  # noqa: PLC0415

    import hydra  # noqa: PLC0415

    from diffmask.data.dataset import SegmentationDataset  # noqa: PLC0415
    from diffmask.data.sources import ManifestSource  # noqa: PLC0415
    from diffmask.evaluation.fidelity import (  # noqa: PLC0415
        load_segmentation_model,
        served_intensity,
        set_intensity,
    )
    from diffmask.synthesis.writer import set_channels  # noqa: PLC0415

    rules = rules or default_rules()
    module, cfg, checkpoint = load_segmentation_model(model, device)
    names = list(cfg.data.class_names)
    size, intensity = int(cfg.data.size), str(cfg.data.get("intensity", "raw"))
    folder = Path(synthetic_dir)
    channels = check_feature_channels(model, cfg, folder, set_channels(folder))
    source = ManifestSource(folder, names, default_split="train", channels=channels)
    rows = source.rows()
    if not rows:
        raise ValueError(f"{folder / 'manifest.jsonl'}: no rows to score")
    served = served_intensity(set_intensity(folder), intensity, folder)
    synthetic = _images(
        SegmentationDataset(source, [r.id for r in rows], size, intensity=served, channels=channels)
    )
    real_source = hydra.utils.instantiate(cfg.data.real)
    real_ds = SegmentationDataset(
        real_source, real_source.ids("train"), size, intensity=intensity, channels=channels
    )
    real = _images(real_ds)
    test_ds = SegmentationDataset(
        real_source, real_source.ids("test"), size, intensity=intensity, channels=channels
    )
    net = module.net
    with torch.inference_mode():
        f_syn = segmenter_features(net, synthetic.to(device), batch_size)
        f_real = segmenter_features(net, real.to(device), batch_size)
        preds = torch.cat([module.labels(module(synthetic[i:i + batch_size].to(device))).cpu()
                           for i in range(0, len(synthetic), batch_size)])
    kid, kid_std = kernel_distance(f_syn, f_real, subsets=kid_subsets)
    result = {
        "set": str(folder), "model": str(model), "checkpoint": str(checkpoint), "n_synthetic": len(rows),
        "n_real": len(real), "size": size, "channels": channels,
        "features": f"{type(net).__name__} bottleneck, dim {f_syn.shape[1]}",
        "fid": frechet_distance(f_syn, f_real), "kid": kid, "kid_std": kid_std,
        "anatomy": anatomy_report([p.numpy() for p in preds], [r.meta for r in rows], rules, names),
    }
    if attribute:
        metas = lambda ds: [ds[i]["meta"] for i in range(len(ds))]  # noqa: E731
        result["attribute"] = attribute_accuracy((real, metas(real_ds)), (_images(test_ds), metas(test_ds)),
                                                 (synthetic, [r.meta for r in rows]), field=attribute)
    log.info("synthesis quality of %s: FID %.3f, KID %.4f, CTR error median %.4f (%d asked)", folder,
             result["fid"], kid, result["anatomy"]["ctr_error_median"], result["anatomy"]["n_asked"])
    return result
