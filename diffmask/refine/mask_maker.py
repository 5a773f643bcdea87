"""The mask stage's hook into generation: attention store per batch -> refiner chain -> label maps.

Implements the ``MaskMaker`` protocol of :class:`diffmask.synthesis.module.SynthesisLitModule`:
:meth:`AttentionMaskMaker.new_sink` gives the sampler a fresh :class:`CrossAttentionStore` for a
batch, and calling the maker turns the recorded attention into masks and per-class scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from diffmask.attention.store import CrossAttentionStore
from diffmask.labels import validate_class_names
from diffmask.refine.densecrf import ParallelRefiner
from diffmask.refine.images import to_uint8_images
from diffmask.refine.threshold import IGNORE_INDEX, ThresholdRefiner, mask_confidence

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

    Examples::

        maker = AttentionMaskMaker(functools.partial(CrossAttentionStore, resolutions=[16, 32]),
                                   RefinementChain({"threshold": ThresholdRefiner(), "densecrf": DenseCRFRefiner()}),
                                   class_names=["background", "left_lung", "right_lung", "heart"])
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

    def new_sink(
        self, prompts: list[str], token_positions: list[list[list[int]]], resolution: int
    ) -> CrossAttentionStore:
        """A fresh store for one batch; ``token_positions[i][k]`` are the tokens of class k + 1 in prompt i."""
        k = len(self.class_names) - 1
        for i, classes in enumerate(token_positions):
            if len(classes) != k:
                raise ValueError(
                    f"token_positions: prompt {i} ({prompts[i]!r}) has {len(classes)} class phrases, "
                    f"expected {k} ({list(self.class_names[1:])})"
                )
        store = self.store(output_size=int(resolution))
        store.set_tokens(token_positions)
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
        return self.from_maps(pixels, maps)

    def from_maps(self, images: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Masks and scores from recorded class maps: ``images`` (B, S, S) uint8 grey or (B, S, S, 3)
        uint8 RGB, ``maps`` (B, K, S, S).

        The same refinement as during sampling, so saved class maps (``attn/<id>.npz``) can be
        re-refined offline (``diffmask-remask``).
        """
        k = len(self.class_names) - 1
        images = np.asarray(images)
        if (maps.ndim != 4 or maps.shape[1] != k or images.shape[:3] != (maps.shape[0], *maps.shape[-2:])
                or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3)):
            raise ValueError(
                f"class maps {maps.shape} and images {images.shape}: expected (B, {k}, S, S) maps for the classes "
                f"{list(self.class_names[1:])} and (B, S, S) grey or (B, S, S, 3) RGB images"
            )
        samples = [{"image": g, "class_maps": m} for g, m in zip(images, maps, strict=True)]
        masks, scores = [], []
        for sample, out in zip(samples, self.pool.map(samples), strict=True):
            if "label" not in out:
                raise KeyError(f"refiner wrote no 'label' (keys: {sorted(out)})")
            label = np.asarray(out["label"], dtype=np.uint8).copy()
            confidence = mask_confidence(sample["class_maps"], label, self.ignore_index)
            if self.ignore_to_background:
                label[label == self.ignore_index] = 0
            masks.append(label)
            scores.append({name: float(c) for name, c in zip(self.class_names[1:], confidence, strict=True)})
        return np.stack(masks), scores

    def close(self) -> None:
        """Stop the refiner's worker processes."""
        self.pool.close()
