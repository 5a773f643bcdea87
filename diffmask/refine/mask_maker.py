"""The mask stage's hook into generation: attention store per batch -> refiner chain -> label maps.

Implements the ``MaskMaker`` protocol of :class:`diffmask.synthesis.module.SynthesisLitModule`:
:meth:`AttentionMaskMaker.new_sink` gives the sampler a fresh :class:`CrossAttentionStore` for a
batch, and calling the maker turns the recorded attention into masks and per-class scores. When
the refiner chain runs a ``self_affinity`` step (:mod:`diffmask.refine.self_affinity`), the store
carries a :class:`~diffmask.attention.self_attention.SelfAttentionStore` that the same capture
fills, and each sample gets its image's self-attention; the capture's and the walk's time are
logged (per batch at debug level, the first batch and the totals at :meth:`close` at info level).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffmask.attention.store import CrossAttentionStore
from diffmask.labels import validate_class_names
from diffmask.refine.densecrf import ParallelRefiner
from diffmask.refine.images import to_uint8_images
from diffmask.refine.self_affinity import SELF_ATTENTION_KEY, self_attention_step
from diffmask.refine.threshold import IGNORE_INDEX, ThresholdRefiner, mask_confidence

log = logging.getLogger(__name__)
__all__ = ["AttentionMaskMaker"]


class AttentionMaskMaker:
    """Class maps from cross-attention, refined in config order, as uint8 label maps.

    Args:
        store: builds the per-batch store; called as ``store(output_size=resolution)`` (a
            ``functools.partial`` of :class:`CrossAttentionStore`, i.e. ``conf/attention`` with
            ``_partial_: true``).
        refiner: a sample refiner (``dict -> dict``, e.g. a :class:`RefinementChain` of
            threshold -> DenseCRF); it reads ``image`` (H, W) uint8 grey or (H, W, 3) uint8 RGB
            (the generated image as it is written: DenseCRF's appearance term sees the colour) and
            ``class_maps`` (K, H, W), and must write ``label``. Default: Otsu threshold.
        class_names: background first; their count fixes K.
        num_workers: worker processes for the refiner (0: in process); see :class:`ParallelRefiner`.
        ignore_to_background: ignore-band pixels (``ignore_index``) become background in the
            written masks (a dataset mask has no "unsure" label).
        ignore_index: the refiners' label of uncertain pixels.

    Examples::

        maker = AttentionMaskMaker(
            functools.partial(CrossAttentionStore, resolutions=[16, 32]),
            RefinementChain({"threshold": ThresholdRefiner(), "densecrf": DenseCRFRefiner()}),
            class_names=["background", "left_lung", "right_lung", "heart"],
        )
    """

    def __init__(
        self,
        store: Callable[..., CrossAttentionStore],
        refiner: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        class_names: Sequence[str],
        num_workers: int = 0,
        ignore_to_background: bool = True,
        ignore_index: int = IGNORE_INDEX,
    ):
        self.class_names = validate_class_names(class_names)
        self.store = store
        self.refiner = refiner if refiner is not None else ThresholdRefiner()
        self.pool = ParallelRefiner(self.refiner, num_workers=num_workers)
        self.ignore_to_background = bool(ignore_to_background)
        self.ignore_index = int(ignore_index)
        self.self_affinity = self_attention_step(self.refiner)
        # self-attention cost, summed over batches: capture, sampling (with the capture), walk, images
        self.timing = {"capture_seconds": 0.0, "sampling_seconds": 0.0, "walk_seconds": 0.0, "images": 0}

    def new_sink(
        self, prompts: list[str], token_positions: list[list[list[int]]], resolution: int
    ) -> CrossAttentionStore:
        """A fresh store for one batch; ``token_positions[i][k]`` are the tokens of class k + 1 in prompt i.

        With a ``self_affinity`` step in the refiner, the store's ``self_attention`` is a fresh
        self-attention store (opened with the cross-attention capture).

        Args:
            prompts: the batch's prompts.
            token_positions: per prompt, per class, its token positions.
            resolution: the image side.
        """
        k = len(self.class_names) - 1
        for i, classes in enumerate(token_positions):
            if len(classes) != k:
                raise ValueError(
                    f"token_positions: prompt {i} ({prompts[i]!r}) has {len(classes)} class phrases, "
                    f"expected {k} ({list(self.class_names[1:])})"
                )
        store = self.store(output_size=int(resolution))
        store.set_tokens(token_positions)
        if self.self_affinity is not None:
            store.self_attention = self.self_affinity.new_self_attention_store(batch_size=len(prompts))
        return store

    def __call__(
        self, images: torch.Tensor, sink: CrossAttentionStore, token_positions: list[list[list[int]]]
    ) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Masks (B, S, S) uint8 (0 background) and per-image ``{class_name: score in [0, 1]}``.

        Args:
            images: (B, C, S, S) generated images in [0, 1] (C = 1 grey, 3 RGB).
            sink: the store returned by :meth:`new_sink`, after sampling.
            token_positions: as given to :meth:`new_sink` (unused: the store holds them).
        """
        maps = sink.result().float().cpu().numpy()  # (B, K, S, S)
        pixels = to_uint8_images(images)  # (B, S, S) grey or (B, S, S, 3) RGB
        if maps.shape[0] != pixels.shape[0] or maps.shape[-2:] != pixels.shape[1:3]:
            raise ValueError(f"class maps {maps.shape} do not match the images {tuple(images.shape)}")
        self_store = getattr(sink, "self_attention", None)
        if self.self_affinity is None or self_store is None:
            return self.from_maps(pixels, maps)
        sampling = time.perf_counter() - self_store.created  # new_sink -> now: the batch's sampling
        affinity = self_store.result().cpu().numpy()  # (B, N, N)
        masks, scores, walk = self._refine(pixels, maps, affinity)
        self._log_timing(len(pixels), self_store.seconds, sampling, walk, self_store.kept_layers)
        return masks, scores

    def _log_timing(
        self, images: int, capture: float, sampling: float, walk: float, layers: list[str]
    ) -> None:
        first = self.timing["images"] == 0
        self.timing["capture_seconds"] += capture
        self.timing["sampling_seconds"] += sampling
        self.timing["walk_seconds"] += walk
        self.timing["images"] += images
        log.log(
            logging.INFO if first else logging.DEBUG,
            "self_affinity: self-attention capture %.3f s of %.3f s sampling (%.1f%%), walk %.3f s, "
            "for %d images; layers %s", capture, sampling, 100 * capture / max(sampling, 1e-9), walk, images,
            layers,
        )

    def from_maps(
        self, images: np.ndarray, maps: np.ndarray, self_attention: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Masks and scores from recorded class maps: ``images`` (B, S, S) uint8 grey or (B, S, S, 3)
        uint8 RGB, ``maps`` (B, K, S, S).

        The same refinement as during sampling, so saved class maps (``attn/<id>.npz``) can be
        re-refined offline (``diffmask-remask``), but for a ``self_affinity`` step, which needs
        the self-attention captured while sampling.

        Args:
            images: the images.
            maps: their class maps.
            self_attention: (B, N, N) self-attention of each image, for a ``self_affinity`` step.
        """
        masks, scores, _ = self._refine(images, maps, self_attention)
        return masks, scores

    def _refine(
        self, images: np.ndarray, maps: np.ndarray, self_attention: np.ndarray | None
    ) -> tuple[np.ndarray, list[dict[str, float]], float]:
        k = len(self.class_names) - 1
        images = np.asarray(images)
        if (maps.ndim != 4 or maps.shape[1] != k or images.shape[:3] != (maps.shape[0], *maps.shape[-2:])
                or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3)):
            raise ValueError(
                f"class maps {maps.shape} and images {images.shape}: expected (B, {k}, S, S) maps for the "
                "classes "
                f"{list(self.class_names[1:])} and (B, S, S) grey or (B, S, S, 3) RGB images"
            )
        samples = [{"image": g, "class_maps": m} for g, m in zip(images, maps, strict=True)]
        if self_attention is not None:
            if len(self_attention) != len(samples):
                raise ValueError(f"self_attention: {len(self_attention)} maps for {len(samples)} images")
            for sample, a in zip(samples, self_attention, strict=True):
                sample[SELF_ATTENTION_KEY] = a
        masks, scores, walk = [], [], 0.0
        for sample, out in zip(samples, self.pool.map(samples), strict=True):
            walk += float(out.get("self_affinity_seconds", 0.0))
            if "label" not in out:
                raise KeyError(f"refiner wrote no 'label' (keys: {sorted(out)})")
            label = np.asarray(out["label"], dtype=np.uint8).copy()
            confidence = mask_confidence(sample["class_maps"], label, self.ignore_index)
            if self.ignore_to_background:
                label[label == self.ignore_index] = 0
            masks.append(label)
            scores.append({name: float(c) for name, c in zip(self.class_names[1:], confidence, strict=True)})
        return np.stack(masks), scores, walk

    def close(self) -> None:
        """Stop the refiner's worker processes; log the self-attention totals (``self_affinity`` step)."""
        t = self.timing
        if t["images"]:
            log.info(
                "self_affinity: self-attention capture %.2f s of %.2f s sampling (%.1f%%), walk %.2f s, "
                "over %d images (%.4f s/image capture + walk)", t["capture_seconds"], t["sampling_seconds"],
                100 * t["capture_seconds"] / max(t["sampling_seconds"], 1e-9), t["walk_seconds"], t["images"],
                (t["capture_seconds"] + t["walk_seconds"]) / t["images"],
            )
        self.pool.close()
