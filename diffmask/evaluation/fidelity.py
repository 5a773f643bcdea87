"""Label fidelity of a generated set: do its images show what its masks say?

A segmentation model trained on REAL images (a ``diffmask-train`` run) segments every generated
image; its prediction is compared with the mask the image was generated from (mask-conditioned
synthesis) or made with (DiffMask attention masks). The per-class IoU, averaged over images,
is the set's label fidelity, as controllable-generation papers report it: a set whose images
follow their masks scores near the model's own test mIoU, one whose masks belong to other
images (or are shifted) scores far below it.

    diffmask-fidelity artifacts/synthesis/default --model logs/train/runs/<real-only run> --write

``--write`` records the result in the set's ``stage.json`` under ``label_fidelity``
(:func:`record_label_fidelity`), where ``diffmask-report`` shows it beside the runs trained on
the set.

Conventions: the scoring rule of :mod:`diffmask.evaluation.metrics`, as the test metric. Per
image and class: the usual IoU where the mask holds the class; where it lacks it, 1 when the
prediction lacks it too and 0 when the model finds it in the image (the image shows what the
mask lacks: a fidelity failure). A class that no mask of the set holds is not scored; background
is not scored; ``miou`` is the mean over the scored foreground classes of their mean over images
(:class:`~diffmask.evaluation.metrics.SegmentationScores`), ``agg_miou`` the same for the
dataset-level aggregate IoU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir, atomic_write_json
from diffmask.data.dataset import SegmentationDataset, check_intensity
from diffmask.data.sources import ManifestSource
from diffmask.evaluation.metrics import SegmentationScores, compute_iou
from diffmask.evaluation.synthesis_quality import check_feature_channels
from diffmask.labels import IGNORE_INDEX, validate_class_names
from diffmask.segmentation.module import resolve_checkpoint
from diffmask.synthesis.writer import set_channels

__all__ = [
    "FIDELITY_KEY",
    "label_fidelity",
    "load_run_config",
    "load_segmentation_model",
    "per_image_iou",
    "record_label_fidelity",
    "served_intensity",
    "set_intensity",
    "format_fidelity",
]

log = logging.getLogger(__name__)

# the key of a synthetic set's stage.json that holds its label fidelity
FIDELITY_KEY = "label_fidelity"


def set_intensity(synthetic_dir: str | Path) -> str:
    """The ``data.intensity`` a synthetic set's images were made with: its ``stage.json``
    ``intensity``, ``raw`` for a set without one (made before it was recorded, or by hand)."""
    folder = Path(synthetic_dir)
    stage_file = (folder if folder.is_dir() else folder.parent) / StageDir.STAGE_FILE
    if not stage_file.is_file():
        return "raw"
    return str(json.loads(stage_file.read_text()).get("intensity", "raw"))


def served_intensity(made_from: str, intensity: str, where: str | Path = "synthetic set") -> str:
    """The normalisation to apply to synthetic images made with ``made_from`` for a model that
    works on ``intensity`` images (the rule of the segmentation datamodule).

    A generator trained on X-normalised images makes X-normalised images: with X = ``intensity``
    they are used as they are (``raw``: normalising twice is not the same normalisation), with X
    = ``raw`` they are normalised with ``intensity``.

    Raises:
        ValueError: naming ``where`` when X is another normalisation: the model would see images
            unlike any it was trained on.
    """
    check_intensity(intensity)
    if made_from == intensity:
        return "raw"
    if made_from == "raw":
        return intensity
    raise ValueError(
        f"{where}: its images come from a diffusion model trained on data.intensity={made_from} images "
        f"(stage.json 'intensity'), but the segmentation model works on data.intensity={intensity} images; "
        "expected the same setting, or raw images"
    )


def _run_dir(model: Path) -> Path:
    """The run folder of a model path: the folder itself, or a checkpoint's ``<run>/checkpoints/..``."""
    if model.is_dir():
        return model
    return model.parent.parent if model.parent.name == "checkpoints" else model.parent


def load_run_config(model: str | Path) -> DictConfig:
    """The config of the ``diffmask-train`` run that made ``model`` (its folder or a checkpoint in
    ``<run>/checkpoints/``).

    Read from ``<run>/.hydra/config.yaml`` (every CLI run has it), else from the resolved config
    the CSV logger keeps in ``<run>/csv/version_*/hparams.yaml`` (runs driven in-process).

    Raises:
        FileNotFoundError: naming the run folder when neither file is there.
        ValueError: naming the file when it holds no ``segmentation.net`` or ``data`` node.
    """
    run = _run_dir(Path(model))
    hparams = sorted(run.glob("csv/version_*/hparams.yaml"), reverse=True)
    candidates = [run / ".hydra" / "config.yaml", *hparams]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"{run}: no .hydra/config.yaml (nor csv/version_*/hparams.yaml); "
            f"expected the folder of a diffmask-train "
            "run, whose config rebuilds the backbone"
        )
    cfg = OmegaConf.load(found)
    if not isinstance(cfg, DictConfig) or "net" not in (cfg.get("segmentation") or {}) or "data" not in cfg:
        raise ValueError(f"{found}: no segmentation.net or data node; expected a diffmask-train run's config")
    return cfg


def load_segmentation_model(model: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the backbone of a ``diffmask-train`` run from its config and load its best weights.

    Returns:
        (the :class:`~diffmask.segmentation.SegmentationLitModule` in eval mode on ``device``,
        the run's config, the checkpoint path).
    """
    from diffmask.config import register_resolvers  # noqa: PLC0415 - ${len:...} in the net config
    from diffmask.segmentation.module import SegmentationLitModule, load_net_weights  # noqa: PLC0415

    register_resolvers()
    checkpoint = resolve_checkpoint(model, field="fidelity_model")
    cfg = load_run_config(checkpoint if Path(model).is_file() else model)
    seg = cfg.segmentation
    # the optimizer is never used here; init_weights is not loaded (the checkpoint holds the weights)
    module = SegmentationLitModule(
        hydra.utils.instantiate(seg.net),
        class_names=list(seg.get("class_names") or cfg.data.class_names),
        optimizer=None,
        ignore_index=int(seg.get("ignore_index", IGNORE_INDEX)),
        postprocess=seg.get("postprocess"),
    )
    load_net_weights(module.net, checkpoint)
    return module.to(device).eval(), cfg, checkpoint


def per_image_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                  ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """Per-image, per-class IoU of :func:`~diffmask.evaluation.metrics.compute_iou` (the test rule).

    Args:
        pred: (B, H, W) predicted class indices.
        target: same shape; ``ignore_index`` pixels are skipped.
        num_classes: number of classes including background.
        ignore_index: label value of unlabelled pixels (None: every pixel counts).

    Returns:
        (B, num_classes) IoU: as usual where the class is in the target; where it is not, 0 when
        it is in the prediction and 1 when it is in neither.
    """
    return compute_iou(pred, target, num_classes, ignore_index)


def label_fidelity(
    synthetic_dir: str | Path,
    model: str | Path,
    class_names: Sequence[str] | None,
    size: int | None = None,
    intensity: str | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Score a generated set by a segmentation model trained on real data (see the module docstring).

    Args:
        synthetic_dir: the set's folder (``manifest.jsonl``, ``images/``, ``masks/``, ``stage.json``).
        model: a ``diffmask-train`` run folder (or a checkpoint in its ``checkpoints/``); its
            config rebuilds the backbone (:func:`load_run_config`).
        class_names: the set's class names, background first (None: the run's ``data.class_names``).
        size: working side in pixels (default: the run's ``data.size``).
        intensity: the model's input normalisation (default: the run's ``data.intensity``); the
            set's images are normalised with it unless already made so (:func:`served_intensity`).
        batch_size: images per forward pass.
        device: torch device of the model.
        ids: score only these manifest ids (default: every row).

    Returns:
        ``{"model", "checkpoint", "n_images", "size", "intensity", "iou": {class: mean IoU},
        "miou", "dice": {class: mean Dice}, "mdice", "agg_iou": {class: aggregate IoU},
        "agg_miou", "per_image_miou_mean"}``: ``iou`` holds every foreground class that at
        least one mask of the set holds (the rule of the module docstring); ``miou`` is their
        mean; ``per_image_miou_mean`` the mean over images of each image's mean IoU over those
        classes (NaN: nothing scored).

    Raises:
        FileNotFoundError: the model has no checkpoint or config, or the set no manifest.
        ValueError: rows without a mask (``sem_seg_file_name``), unknown ``ids``, an empty set,
            a set made with another normalisation, or a model whose number of outputs differs
            from ``len(class_names)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    folder = Path(synthetic_dir)
    module, cfg, checkpoint = load_segmentation_model(model, device)
    names = validate_class_names(list(class_names) if class_names is not None else list(cfg.data.class_names))
    size = int(size if size is not None else cfg.data.size)
    intensity = check_intensity(intensity if intensity is not None else str(cfg.data.get("intensity", "raw")))
    with torch.inference_mode():  # before any mask is read against class_names
        probe = torch.zeros(1, int(cfg.segmentation.net.get("in_channels", 1)), size, size, device=device)
        outputs = module(probe).shape[1]
    if outputs != len(names):
        raise ValueError(
            f"{model}: the model outputs {outputs} classes but class_names has {len(names)} ({list(names)}); "
            "expected the classes the model was trained on"
        )
    # the judge reads the set's kind of image
    channels = check_feature_channels(model, cfg, folder, set_channels(folder))
    source = ManifestSource(folder, names, default_split="train", channels=channels)
    rows = {r.id: r for r in source.rows()}
    chosen = list(rows) if ids is None else [str(i) for i in ids]
    unknown = [i for i in chosen if i not in rows]
    if unknown:
        raise ValueError(f"{source.root / 'manifest.jsonl'}: ids not in the manifest: {unknown[:5]}")
    if not chosen:
        raise ValueError(f"{source.root / 'manifest.jsonl'}: no rows to score")
    unlabelled = [i for i in chosen if not rows[i].sem_seg_file_name]
    if unlabelled:
        raise ValueError(
            f"{source.root}: {len(unlabelled)} of {len(chosen)} rows have no mask "
            f"(manifest field sem_seg_file_name, "
            f"e.g. {unlabelled[:3]}); label fidelity compares each image with its mask"
        )
    served = served_intensity(set_intensity(folder), intensity, source.root)
    dataset = SegmentationDataset(source, chosen, size, intensity=served,
                                  resize=str(cfg.data.get("resize", "stretch")), channels=channels)
    totals = SegmentationScores(names, module.ignore_index).to(device)
    scores = []
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            image = torch.stack([it["image"] for it in items]).to(device)
            target = torch.stack([it["label"][0] for it in items]).to(device)
            pred = module.labels(module(image))
            totals.update(pred, target)
            scores.append(per_image_iou(pred, target, len(names), module.ignore_index).cpu())
    values = {k: float(v) for k, v in totals.compute().items()}
    kept = [c for c, name in enumerate(names) if c > 0 and f"iou_{name}" in values]  # classes the set labels
    image_means = torch.cat(scores).double()[:, kept].mean(1) if kept else torch.empty(0)
    result = {
        "model": str(model),
        "checkpoint": str(checkpoint),
        "n_images": len(chosen),
        "size": size,
        "intensity": intensity,
        "iou": {names[c]: values[f"iou_{names[c]}"] for c in kept},
        "miou": values["miou"],
        "dice": {names[c]: values[f"dice_{names[c]}"] for c in kept},
        "mdice": values["mdice"],
        "agg_iou": {names[c]: values[f"agg_iou_{names[c]}"] for c in kept},
        "agg_miou": values["agg_miou"],
        "per_image_miou_mean": float(image_means.mean()) if len(image_means) else math.nan,
    }
    log.info("label fidelity of %s (model %s): mIoU %.4f on %d images",
             folder, model, result["miou"], len(chosen))
    return result


def record_label_fidelity(synthetic_dir: str | Path, result: dict[str, Any]) -> Path:
    """Record ``result`` (from :func:`label_fidelity`) in the set's ``stage.json`` under
    ``label_fidelity``, with the time it was measured; every other key is kept.

    The file is read, updated and replaced atomically; a set without ``stage.json`` (made by
    hand) gets one holding only this record. A second measurement replaces the first.

    Raises:
        FileNotFoundError: naming the folder when it does not exist.
        ValueError: naming ``stage.json`` when it is not a JSON object.
    """
    folder = Path(synthetic_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: synthetic set folder not found")
    stage_file = folder / StageDir.STAGE_FILE
    info: Any = {}
    if stage_file.is_file():
        try:
            info = json.loads(stage_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{stage_file}: not valid JSON ({e.msg}); expected a stage record") from e
        if not isinstance(info, dict):
            raise ValueError(f"{stage_file}: expected a JSON object, got {type(info).__name__}")
    info[FIDELITY_KEY] = {**result, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return atomic_write_json(stage_file, info)


def format_fidelity(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`label_fidelity` result: per-class IoU, then the means."""
    width = max([len("per-image mean"), *(len(n) for n in result["iou"])])
    lines = [f"label fidelity of {result['n_images']} images, model {result['model']} "
             f"({result['size']} px, intensity {result['intensity']})"]
    lines += [f"  {name:<{width}}  {value:.4f}" for name, value in result["iou"].items()]
    lines += [f"  {'mIoU':<{width}}  {result['miou']:.4f}",
              f"  {'per-image mean':<{width}}  {result['per_image_miou_mean']:.4f}"]
    return "\n".join(lines) + "\n"
