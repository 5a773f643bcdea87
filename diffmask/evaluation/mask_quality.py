"""Mask quality on real images: the mask stage's key figure.

For each real test image: build its prompt from its metadata (the model's
:class:`~diffmask.prompts.PromptBuilder`), noise it to timestep ``t``, run the UNet once with
the prompt while a :class:`~diffmask.attention.CrossAttentionStore` records the class maps
(several ``t`` are averaged), then score the masks of each refinement step against the real
mask with :class:`~diffmask.evaluation.metrics.SegmentationScores` (the test metric's rule: an
image whose mask lacks a class scores 1 on it when the step's mask lacks it too, 0 when it paints
it; a class no real mask of the set holds is not scored):

* ``raw``: argmax of the class maps, background where the max is below ``raw_threshold``;
* each refiner in order, cumulatively (``threshold``, then ``densecrf`` on top, ...);
* ``affinity``: an :class:`~diffmask.refine.AffinityRefiner` fitted at the end of the epoch on
  the test images' *own* seeds (the last refiner's masks with an ignore band; no real labels),
  then random-walk refinement of each image's class maps.

A refiner that needs the generator's self-attention (a
:class:`~diffmask.refine.self_affinity.SelfAffinityRefiner`, ``self_affinity``) gets each image's
self-attention, captured during the same UNet calls as the class maps (averaged over the
``timesteps``); its ``seconds_per_image`` include that capture, also given alone as
``masks/<set>/<step>/capture_seconds_per_image``.

A step is *degenerate* when a class that the set's real masks hold is absent from every one of its
masks, or when its mIoU is below half of its input step's (the step before it in order: ``raw``
-> each refiner -> ``affinity``). Such a step gets ``masks/<set>/<step>/degenerate`` = 1 (0
otherwise), a warning in the log, and its reasons in :attr:`MaskQualityLitModule.degenerate`
(``metrics.json``'s ``degenerate_steps``); its figures are not results.

Metrics (flat keys, ``<set>`` = test-set name): ``masks/<set>/<step>/iou_<class>`` and
``masks/<set>/<step>/miou`` (per-image means), ``masks/<set>/<step>/agg_iou_<class>`` and
``masks/<set>/<step>/agg_miou`` (dataset-level aggregates: summed intersections over summed
unions), and ``masks/<set>/<step>/seconds_per_image``. :func:`write_mask_rows` writes the
per-image rows (``per_image_masks.csv``: set, id, step, ``iou_<class>``, ``pred_<class>`` and
``true_<class>`` pixel counts), so lesion images and lesion-free ones can be told apart. Under DDP
the IoU accumulators are synced; AffinityNet is fitted per rank on that rank's share of the
images.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from diffmask.attention.extract import extract_class_maps
from diffmask.attention.store import CrossAttentionStore
from diffmask.autoencoder.channels import to_autoencoder_channels
from diffmask.diffusion.components import DiffusionComponents
from diffmask.diffusion.module import encode_conditioning
from diffmask.evaluation.metrics import SegmentationScores, class_counts, iou_from_counts
from diffmask.evaluation.paired import write_rows_csv
from diffmask.labels import validate_class_names
from diffmask.prompts.builder import PromptBuilder, class_token_positions
from diffmask.refine.images import channels_first, to_uint8_images
from diffmask.refine.raw import raw_attention_labels
from diffmask.refine.threshold import IGNORE_INDEX

__all__ = ["MASK_ROWS_FILE", "MaskQualityLitModule", "degenerate_steps", "write_mask_rows"]

log = logging.getLogger(__name__)

MASK_ROWS_FILE = "per_image_masks.csv"

Refiner = Callable[[dict[str, Any]], dict[str, Any]]


class MaskQualityLitModule(pl.LightningModule):
    """Per-class IoU of attention masks on real test images, per refinement step (``trainer.test``).

    Test batches come from :class:`~diffmask.data.SegmentationDataModule`: ``image`` (B, 1, S, S)
    in [0, 1], ``label`` (B, 1, S, S), ``meta`` (list of dicts). S must be the model's resolution.

    Args:
        components: the diffusion model (UNet, text encoder, tokenizer, noise scheduler, VAE?).
        prompt_builder: the model's prompt builder (makes each image's prompt from its metadata).
        store: builds a store, called as ``store(output_size=S)`` (``conf/attention`` with
            ``_partial_: true``).
        refiners: ``name -> sample refiner`` applied cumulatively in order (None drops one);
            each reads ``image`` (S, S) uint8 + ``class_maps`` (K, S, S) and writes ``label``.
        affinity: an untrained :class:`~diffmask.refine.AffinityRefiner` (copied per test set),
            or None to skip the ``affinity`` step.
        timesteps: noise levels t; the class maps of each are averaged.
        raw_threshold: background threshold of the ``raw`` step.
        affinity_steps, affinity_batch_size: AffinityNet training on the seeds.
        affinity_ignore_margin: ignore band (px) around seed region borders.
        class_names: background first; None = the prompt builder's (they must agree).
        seed: seed of the noise.
        set_names: names of the test dataloaders (default: the datamodule's ``test_set_names``).
        use_metadata: prompts from each image's metadata; False = the neutral prompt for every
            image (what an image folder without ``metadata.csv`` gets).
        affinity_variants: more walks of the same fitted AffinityNet, each scored as its own step
            ``affinity_t<t>`` (``_fg`` appended when ``walk_background`` is false), e.g.
            ``[{t: 4}, {t: 16, walk_background: false}]``: retuning the walk costs one fit.

    Examples::

        module = MaskQualityLitModule(
            comps,
            builder,
            functools.partial(CrossAttentionStore),
            {"threshold": ThresholdRefiner(), "densecrf": DenseCRFRefiner()},
            affinity=AffinityRefiner(AffinityBackbone()),
            timesteps=[200],
        )
        pl.Trainer(accelerator="gpu", devices=1).test(module, datamodule=dm)
        module.results["masks/jsrt/densecrf/miou"]
    """

    def __init__(
        self,
        components: DiffusionComponents,
        prompt_builder: PromptBuilder,
        store: Callable[..., CrossAttentionStore],
        refiners: Mapping[str, Refiner | None] | None = None,
        affinity: Any | None = None,
        timesteps: Sequence[int] = (200,),
        raw_threshold: float = 0.3,
        affinity_steps: int = 300,
        affinity_batch_size: int = 8,
        affinity_ignore_margin: int = 3,
        class_names: Sequence[str] | None = None,
        seed: int = 0,
        set_names: Sequence[str] | None = None,
        use_metadata: bool = True,
        affinity_variants: Sequence[Mapping[str, Any]] | None = None,
    ):
        super().__init__()
        timesteps = [int(t) for t in timesteps]
        steps = int(components.noise_scheduler.config.num_train_timesteps)
        if not timesteps or any(not 0 <= t < steps for t in timesteps):
            raise ValueError(f"timesteps: expected a non-empty list in [0, {steps}), got {timesteps}")
        if not 0 <= raw_threshold < 1:
            raise ValueError(f"raw_threshold: expected in [0, 1), got {raw_threshold}")
        if affinity_steps < 1 or affinity_batch_size < 1 or affinity_ignore_margin < 0:
            raise ValueError(
                "affinity_steps/affinity_batch_size/affinity_ignore_margin: expected >= 1, >= 1, >= 0, "
                f"got {affinity_steps}, {affinity_batch_size}, {affinity_ignore_margin}"
            )
        self.class_names = validate_class_names(
            prompt_builder.class_names if class_names is None else class_names
        )
        if tuple(prompt_builder.class_names) != self.class_names:
            raise ValueError(
                f"class_names {list(self.class_names)} differ from the prompt builder's "
                f"{list(prompt_builder.class_names)}"
            )
        refiners = dict(refiners or {})
        reserved = {"raw", "affinity"} & set(refiners)
        if reserved:
            raise ValueError(f"refiners: the names {sorted(reserved)} are reserved for built-in steps")
        self.refiners = [(name, r) for name, r in refiners.items() if r is not None]
        for name, r in self.refiners:
            if not callable(r):
                raise ValueError(
                    f"refiners.{name}: expected a callable refiner (dict -> dict), got {type(r).__name__}"
                )
        self.components = components
        self.unet = components.unet.eval().requires_grad_(False)
        self.text_encoder = components.text_encoder.eval().requires_grad_(False)
        self.vae = None if components.vae is None else components.vae.eval().requires_grad_(False)
        self.tokenizer = components.tokenizer
        self.scheduler = components.noise_scheduler
        self.prompt_builder = prompt_builder
        self.use_metadata = bool(use_metadata)
        self.store_factory = store
        self.affinity_template = affinity
        self.affinity_variants = [_affinity_variant(v) for v in (affinity_variants or [])]
        if self.affinity_variants and affinity is None:
            raise ValueError("affinity_variants: they walk the fitted AffinityNet; set model.affinity too")
        self.timesteps = timesteps
        self.raw_threshold = float(raw_threshold)
        self.affinity_steps = int(affinity_steps)
        self.affinity_batch_size = int(affinity_batch_size)
        self.affinity_ignore_margin = int(affinity_ignore_margin)
        self.seed = int(seed)
        self.set_names = None if set_names is None else list(set_names)
        self.results: dict[str, float] = {}
        # after a test: one row per (set, image, step): iou_<class> (the test rule) and the predicted
        # and true pixel counts of each class (pred_<class>, true_<class>), e.g. to tell lesion and
        # normal images apart
        self.per_image: list[dict[str, Any]] = []
        # after a test: "masks/<set>/<step>" -> the reasons it is degenerate (only degenerate steps)
        self.degenerate: dict[str, list[str]] = {}
        self._self_step = next((r for _, r in self.refiners if hasattr(r, "new_self_attention_store")), None)

    @property
    def step_names(self) -> list[str]:
        """The scored steps in order: ``raw``, each refiner, then ``affinity`` when it is on."""
        affinity = ["affinity"] if self.affinity_template is not None else []
        variants = [name for name, _, _ in self.affinity_variants]
        return ["raw", *(n for n, _ in self.refiners), *affinity, *variants]

    # ------------------------------------------------------------------ setup
    def _set_name(self, dataloader_idx: int) -> str:
        names = self.set_names
        if names is None:
            dm = getattr(self.trainer, "datamodule", None)
            names = list(getattr(dm, "test_set_names", []) or [])
        return names[dataloader_idx] if dataloader_idx < len(names) else f"set{dataloader_idx}"

    def _all_set_names(self) -> list[str]:
        loaders = self.trainer.test_dataloaders
        n = len(loaders) if isinstance(loaders, (list, tuple)) else 1
        return [self._set_name(i) for i in range(n)]

    def on_test_epoch_start(self) -> None:
        """Reset the per-image rows and build one IoU accumulator per (test set, step)."""
        self.per_image = []
        # every rank builds the same accumulators in the same order, so the DDP sync lines up
        self._scores = {
            (s, step): SegmentationScores(self.class_names).to(self.device)
            for s in self._all_set_names()
            for step in self.step_names
        }
        self._seconds = {key: 0.0 for key in self._scores}
        self._capture_seconds = {key: 0.0 for key in self._scores}
        self._counts = {key: 0 for key in self._scores}
        self._kept: dict[str, list[dict[str, Any]]] = {s: [] for s in self._all_set_names()}
        self._uniformity: dict[str, list[float]] = {s: [] for s in self._all_set_names()}

    # ------------------------------------------------------------------ maps
    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> clean UNet inputs: [-1, 1] pixels, or scaled VAE latent means."""
        x = image * 2.0 - 1.0
        if self.vae is None:
            return x.to(self.unet.dtype)
        x = to_autoencoder_channels(x, int(self.vae.config.in_channels)).to(self.vae.dtype)
        return (self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor).to(self.unet.dtype)

    @torch.no_grad()
    def class_maps(
        self,
        image: torch.Tensor,
        metas: Sequence[Mapping[str, Any]],
        batch_seed: int,
        self_attention: Any | None = None,
    ) -> torch.Tensor:
        """(B, K, S, S) class maps in [0, 1] of real images, averaged over ``timesteps``.

        Args:
            image: (B, C, S, S) real images in [0, 1].
            metas: each image's metadata (its prompt's findings; ignored without ``use_metadata``).
            batch_seed: mixed into the noise seed so that each batch gets its own noise.
            self_attention: optional :class:`~diffmask.attention.self_attention.SelfAttentionStore`
                that records the self-attention of the same UNet calls (over every timestep).
        """
        built = [self.prompt_builder.build(m if self.use_metadata else {}) for m in metas]
        positions = [class_token_positions(self.tokenizer, b) for b in built]
        states = encode_conditioning(self.components, [b.text for b in built], self.device)
        latents = self.encode_images(image)
        total = None
        for t in self.timesteps:
            gen = torch.Generator(device=self.device).manual_seed(self.seed + 1000 * batch_seed + t)
            store = self.store_factory(output_size=int(image.shape[-1]))
            store.self_attention = self_attention
            maps = extract_class_maps(
                self.unet, self.scheduler, latents, states, positions, t, store, generator=gen
            )
            total = maps if total is None else total + maps
        return total / len(self.timesteps)

    # ------------------------------------------------------------------ test
    def _score(
        self,
        key: tuple[str, str],
        pred: np.ndarray | torch.Tensor,
        target: torch.Tensor,
        seconds: float,
        sample_id: str = "",
        capture_seconds: float = 0.0,
    ) -> None:
        if not isinstance(pred, torch.Tensor):
            pred = np.asarray(pred, dtype=np.int64)
        pred = torch.as_tensor(pred).to(self.device).long().clone()
        # a mask has no "unsure" label: uncertain pixels count as background
        pred[pred == IGNORE_INDEX] = 0
        target = target.to(self.device)
        self._scores[key].update(pred[None], target[None])
        counts = class_counts(pred[None], target[None], len(self.class_names), IGNORE_INDEX)
        iou = iou_from_counts(counts)[0].tolist()
        row: dict[str, Any] = {"set": key[0], "id": str(sample_id), "step": key[1]}
        names = list(enumerate(self.class_names[1:], start=1))
        row.update({f"iou_{n}": float(iou[c]) for c, n in names})
        row.update({f"pred_{n}": int(counts.predicted[0, c]) for c, n in names})
        row.update({f"true_{n}": int(counts.target[0, c]) for c, n in names})
        self.per_image.append(row)
        self._seconds[key] += seconds
        self._capture_seconds[key] += capture_seconds
        self._counts[key] += 1

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the raw masks and each refiner's of one batch; keep the seeds for ``affinity``.

        Args:
            batch: ``image`` (B, C, S, S) in [0, 1], ``label`` (B, 1, S, S), ``meta``, ``id``.
            batch_idx: index of the batch (seeds its noise).
            dataloader_idx: which test set the batch belongs to.
        """
        set_name = self._set_name(dataloader_idx)
        image, target = batch["image"], batch["label"][:, 0]
        ids = [str(i) for i in batch.get("id", [""] * len(image))]
        self_store = None
        if self._self_step is not None:
            self_store = self._self_step.new_self_attention_store(batch_size=len(image))
        start = time.perf_counter()
        maps = self.class_maps(image, batch["meta"], batch_seed=batch_idx + 7919 * dataloader_idx,
                               self_attention=self_store)
        raw = raw_attention_labels(maps, self.raw_threshold)
        capture = 0.0 if self_store is None else self_store.seconds / len(image)
        per_image = (time.perf_counter() - start) / len(image) - capture  # raw attention without the capture
        affinity = None if self_store is None else self_store.result().cpu().numpy()  # (B, N, N)
        if affinity is not None:
            self._uniformity[set_name].extend(attention_uniformity(affinity).tolist())
        pixels = to_uint8_images(image)  # (B, S, S) grey or (B, S, S, 3) colour, as the refiners take them
        maps_np = maps.float().cpu().numpy()
        for i in range(len(image)):
            self._score((set_name, "raw"), raw[i], target[i], per_image, ids[i])
            sample: dict[str, Any] = {"image": pixels[i], "class_maps": maps_np[i]}
            if affinity is not None:
                sample["self_attention"] = affinity[i]
            for name, refiner in self.refiners:
                start = time.perf_counter()
                sample = refiner(sample)
                seconds = time.perf_counter() - start
                # a self-attention step's cost includes its share of the capture
                own = capture if refiner is self._self_step else 0.0
                self._score((set_name, name), sample["label"], target[i], seconds + own, ids[i], own)
            if self.affinity_template is not None:
                if self.refiners:
                    seed = np.asarray(sample["label"])
                else:
                    seed = raw[i].cpu().numpy().astype(np.uint8)
                self._kept[set_name].append(
                    {
                        "image": pixels[i],
                        "class_maps": maps_np[i].astype(np.float16),
                        "seed": seed,
                        "target": target[i].cpu(),
                        "id": ids[i],
                    }
                )

    def _affinity(self, set_name: str) -> float:
        """Fit a fresh AffinityNet on this set's seeds, refine and score each image.

        Returns the training seconds.
        """
        from diffmask.refine.affinity import ignore_boundaries  # noqa: PLC0415 - optional step

        kept = self._kept[set_name]
        if not kept:
            return 0.0
        with torch.inference_mode(False):  # the test loop runs in inference mode; this copy must train
            refiner = copy.deepcopy(self.affinity_template).to(self.device)
        images = torch.stack([channels_first(k["image"]) for k in kept])
        margin = self.affinity_ignore_margin
        seeds = np.stack([ignore_boundaries(k["seed"], margin) for k in kept])
        seeds = torch.from_numpy(seeds.astype(np.int64))
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(self.seed))
        batches = [
            {refiner.image_key: images[order[i : i + self.affinity_batch_size]],
             refiner.seed_key: seeds[order[i : i + self.affinity_batch_size]]}
            for i in range(0, len(kept), self.affinity_batch_size)
        ]
        start = time.perf_counter()
        refiner.fit_seeds(batches, self.affinity_steps)
        train_seconds = time.perf_counter() - start
        refiner.eval()
        walks = [("affinity", refiner.t, refiner.walk_background), *self.affinity_variants]
        for step, t, walk_background in walks:
            refiner.t, refiner.walk_background = t, walk_background
            for k, img in zip(kept, images, strict=True):
                start = time.perf_counter()
                label, _ = refiner.refine(img, torch.from_numpy(k["class_maps"].astype(np.float32)))
                seconds = time.perf_counter() - start
                self._score((set_name, step), label, k["target"], seconds, k["id"])
        return train_seconds

    def on_test_epoch_end(self) -> None:
        """Run the ``affinity`` step, compute :attr:`results`, gather the per-image rows and log.

        Under DDP the per-image rows of every rank are gathered (the repeats of the distributed
        sampler's padding dropped); only finite results are logged.
        """
        results: dict[str, float] = {}
        train_seconds = {}
        if self.affinity_template is not None:
            train_seconds = {s: self._affinity(s) for s in self._kept}
        for (set_name, step), metric in self._scores.items():
            prefix = f"masks/{set_name}/{step}"
            for key, value in metric.compute().items():
                if key.startswith(("iou_", "agg_iou_")) or key in ("miou", "agg_miou"):
                    results[f"{prefix}/{key}"] = float(value)
            n = self._counts[(set_name, step)]
            total = self._seconds[(set_name, step)]
            results[f"{prefix}/seconds_per_image"] = total / n if n else float("nan")
            if self._self_step is not None and step == self._self_step_name():
                results[f"{prefix}/capture_seconds_per_image"] = (
                    self._capture_seconds[(set_name, step)] / n if n else float("nan"))
        for set_name, seconds in train_seconds.items():
            results[f"masks/{set_name}/affinity/train_seconds"] = seconds
        for set_name, values in self._uniformity.items():
            if values:
                # 1 = every pixel attends to all pixels alike: the walk then averages the class maps away
                key = f"masks/{set_name}/{self._self_step_name()}/attention_uniformity"
                results[key] = float(np.mean(values))
        self._flag_degenerate(results)
        self.results = results
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, self.per_image)
            # the distributed sampler pads with repeats: one row per (set, id, step)
            unique = {(r["set"], r["id"], r["step"]): r for rows in gathered for r in rows}
            self.per_image = list(unique.values())
        for key, value in results.items():
            if np.isfinite(value):
                self.log(key, value, sync_dist=False)


    def _self_step_name(self) -> str | None:
        return next((n for n, r in self.refiners if r is self._self_step), None)

    def _flag_degenerate(self, results: dict[str, float]) -> None:
        """Add ``<prefix>/degenerate`` (1/0) for every scored step, fill :attr:`degenerate`, warn."""
        self.degenerate = {}
        for set_name in dict.fromkeys(s for s, _ in self._scores):
            miou, pred, target = {}, {}, {}
            for step in self.step_names:
                metric = self._scores[(set_name, step)]
                if not self._counts[(set_name, step)]:
                    continue
                with metric.sync_context():  # every rank's pixel counts (a no-op on one device)
                    pred[step] = metric.pred_pixels.detach().cpu().clone()
                    target[step] = metric.target_pixels.detach().cpu().clone()
                miou[step] = results.get(f"masks/{set_name}/{step}/miou", float("nan"))
            names = self.step_names
            # every AffinityNet walk starts from the same masks: the step before ``affinity``
            inputs = {v: names[names.index("affinity") - 1] for v, _, _ in self.affinity_variants}
            found = degenerate_steps([s for s in names if s in miou], miou, pred, target,
                                     self.class_names, inputs)
            for step in miou:
                key = f"masks/{set_name}/{step}"
                results[f"{key}/degenerate"] = 1.0 if step in found else 0.0
                if step in found:
                    self.degenerate[key] = found[step]
                    log.warning("%s is DEGENERATE (its figures are not a result): %s", key,
                                "; ".join(found[step]))


def degenerate_steps(
    steps: Sequence[str],
    miou: Mapping[str, float],
    pred_pixels: Mapping[str, torch.Tensor],
    target_pixels: Mapping[str, torch.Tensor],
    class_names: Sequence[str],
    inputs: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """The degenerate refinement steps of one test set, with their reasons.

    A step is degenerate when a class that the real masks hold (``target_pixels > 0``) is absent
    from every one of its masks (``pred_pixels == 0``), or when its mIoU is below half of its input
    step's (the step before it in ``steps``, or the one ``inputs`` names; not checked where either
    mIoU is not finite or the input's is 0).

    Args:
        steps: the steps in order (the first has no input step).
        miou: step -> mIoU on the set.
        pred_pixels: step -> (C,) predicted pixels per class summed over the set (background first).
        target_pixels: step -> (C,) real-mask pixels per class summed over the set.
        class_names: background first.
        inputs: step -> its input step, where that is not the step before it (e.g. the AffinityNet
            walk variants, which all start from the chain's last masks).

    Returns:
        step -> reasons (e.g. ``"heart absent from every mask"``), only for degenerate steps.
    """
    out: dict[str, list[str]] = {}
    for i, step in enumerate(steps):
        reasons = []
        pred, target = pred_pixels[step], target_pixels[step]
        for c in range(1, len(class_names)):
            if float(target[c]) > 0 and float(pred[c]) == 0:
                reasons.append(f"{class_names[c]} absent from every mask")
        source = (inputs or {}).get(step, steps[i - 1] if i > 0 else None)
        if source is not None:
            before, now = float(miou.get(source, math.nan)), float(miou.get(step, math.nan))
            if math.isfinite(before) and math.isfinite(now) and before > 0 and now < 0.5 * before:
                reasons.append(
                    f"mIoU {now:.4f} is below half of its input step {source}'s {before:.4f}"
                )
        if reasons:
            out[step] = reasons
    return out


def write_mask_rows(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write :attr:`MaskQualityLitModule.per_image` rows as CSV.

    The columns are ``set, id, step``, then the class columns (``iou_<class>``, ``pred_<class>``,
    ``true_<class>``) in the order the rows first hold them.

    Args:
        path: the CSV file (written atomically).
        rows: the per-image rows.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    columns = ["set", "id", "step"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return write_rows_csv(path, rows, columns)


def _affinity_variant(spec: Mapping[str, Any]) -> tuple[str, int, bool]:
    """(step name, t, walk_background) of one ``affinity_variants`` entry."""
    unknown = set(spec) - {"t", "walk_background"}
    if unknown or "t" not in spec or int(spec["t"]) < 1:
        raise ValueError(
            f"affinity_variants: expected {{t: int >= 1, walk_background: bool}}, got {dict(spec)}"
        )
    t, walk_background = int(spec["t"]), bool(spec.get("walk_background", True))
    return f"affinity_t{t}" + ("" if walk_background else "_fg"), t, walk_background


def attention_uniformity(affinity: np.ndarray) -> np.ndarray:
    """How close each image's self-attention is to uniform: mean row entropy / log(N), in [0, 1].

    1 means every pixel attends to every pixel alike (a walk through it averages the class maps
    over the image); a local, edge-following attention scores far lower.

    Args:
        affinity: (B, N, N) row-stochastic self-attention maps.

    Returns:
        (B,) float64.
    """
    a = np.clip(np.asarray(affinity, dtype=np.float64), 1e-12, None)
    a = a / a.sum(axis=-1, keepdims=True)
    entropy = -(a * np.log(a)).sum(axis=-1).mean(axis=-1)
    return entropy / np.log(a.shape[-1])
