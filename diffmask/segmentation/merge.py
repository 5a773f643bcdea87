"""Random merging masks (EMIT-Diff / DiffBoost, Zhang et al., IEEE TMI 2024).

A segmentation network is trained on pairs (a real image, one synthetic variant of it: made
from that image's mask, with ``pair_id`` naming it in the synthetic manifest). Each step both
images go through the network, a Bernoulli(``alpha``) grid of ``patch`` x ``patch`` pixel
blocks decides per block whether the real or the synthetic one counts, and the loss is taken
on the merged logits against the equally merged labels. Mixing happens in the loss, not in the
input: each image is seen whole by the network, and each block of the loss comes from one image
with its own label, so a synthetic image whose anatomy drifted from its source mask only
contributes where it is drawn.

``alpha`` is the probability of a block coming from the real image: ``alpha = 1`` gives
exactly the real-only loss, ``alpha = 0`` exactly the synthetic-only loss. The paper's default
is ``alpha = 0.6`` with 64 px blocks at 384 px, 1/6 of the side; the configs' ``patch = 16``
is 1/8 of the default 128 px.

Config (every ``conf/segmentation/*.yaml``)::

    merge:
      alpha: null   # on with e.g. 0.6; needs a synthetic set whose rows carry pair_id
      patch: 16
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

__all__ = ["MergeSettings", "merge_pair", "patch_merge_mask"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(
            f"segmentation.merge.alpha: expected a probability in [0, 1] "
            f"(the share of patches taken from the "
            f"real image; 0.6 in EMIT-Diff) or null for off, got {alpha!r}"
        )
    return float(alpha)


def _check_patch(patch: int) -> int:
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ValueError(f"segmentation.merge.patch: expected a patch side of >= 1 pixels, got {patch!r}")
    return patch


@dataclass(frozen=True)
class MergeSettings:
    """The ``segmentation.merge`` config node.

    Args:
        alpha: probability that a patch of the loss comes from the real image, in [0, 1];
            None = merging off (plain training on whatever the batches hold).
        patch: side of the square patches, in pixels at ``data.size``.

    Raises:
        ValueError: ``alpha`` outside [0, 1] or ``patch`` below 1.
    """

    alpha: float | None = None
    patch: int = 16

    def __post_init__(self) -> None:
        if self.alpha is not None:
            object.__setattr__(self, "alpha", _check_alpha(self.alpha))
        _check_patch(self.patch)

    @property
    def enabled(self) -> bool:
        """Whether merging is on (``alpha`` is not None)."""
        return self.alpha is not None

    @classmethod
    def from_config(cls, value: MergeSettings | Mapping | None) -> MergeSettings:
        """A :class:`MergeSettings` from itself, a mapping (dict, DictConfig) or None (off).

        Raises:
            ValueError: a key other than ``alpha`` and ``patch``, or a bad value.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"segmentation.merge: expected a mapping {{alpha, patch}} or null, got {value!r}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"segmentation.merge: unknown key(s) {unknown}; expected {sorted(known)}")
        return cls(**{k: value[k] for k in known if k in value})


def patch_merge_mask(
    shape: tuple[int, ...] | torch.Size,
    patch: int,
    alpha: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A random patch mask, True where the real image counts.

    Each ``patch`` x ``patch`` block of a grid anchored at the top-left corner is True with
    probability ``alpha``, independently per block and per image; when a side is not a multiple
    of ``patch`` the last row / column of blocks is cut short. ``alpha = 1`` gives all True and
    ``alpha = 0`` all False, whatever is drawn.

    Args:
        shape: (B, ..., H, W), e.g. the logits' shape: only the batch size and the last two
            sides are used.
        patch: block side in pixels.
        alpha: probability of True per block.
        generator: random source; None = torch's global RNG (seeded runs repeat). The draw is
            made on the generator's device (the CPU for the global RNG), then moved.
        device: device of the returned mask (default: the CPU).

    Returns:
        bool (B, 1, H, W).

    Raises:
        ValueError: ``alpha`` outside [0, 1], ``patch`` below 1, or ``shape`` with fewer than 3 sides.
    """
    alpha, patch = _check_alpha(alpha), _check_patch(patch)
    if len(shape) < 3:
        raise ValueError(f"shape: expected (B, ..., H, W), got {tuple(shape)}")
    b, h, w = int(shape[0]), int(shape[-2]), int(shape[-1])
    grid = (b, 1, math.ceil(h / patch), math.ceil(w / patch))
    draw_on = generator.device if generator is not None else torch.device("cpu")
    # rand is in [0, 1): alpha = 1 keeps every block real, alpha = 0 none
    blocks = torch.rand(grid, generator=generator, device=draw_on) < alpha
    mask = blocks.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[:, :, :h, :w]
    return mask.to(device) if device is not None else mask


def merge_pair(
    real_logits: torch.Tensor,
    syn_logits: torch.Tensor,
    real_label: torch.Tensor,
    syn_label: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a real and a synthetic prediction, and their labels, with one patch mask.

    Args:
        real_logits, syn_logits: (B, C, H, W) logits of the real and the paired synthetic images.
        real_label, syn_label: (B, 1, H, W) or (B, H, W) labels of each.
        mask: bool (B, 1, H, W), True where the real one counts (:func:`patch_merge_mask`).

    Returns:
        ``(logits, label)``: (B, C, H, W) and a label of the input labels' shape, taken from
        the real pair where ``mask`` is True and from the synthetic pair elsewhere.

    Raises:
        ValueError: shapes that differ between the pair, or a mask that does not fit them.
    """
    if real_logits.shape != syn_logits.shape or real_logits.dim() != 4:
        raise ValueError(
            f"merge: real and synthetic logits must be (B, C, H, W) of one shape, got "
            f"{tuple(real_logits.shape)} and {tuple(syn_logits.shape)}"
        )
    if real_label.shape != syn_label.shape:
        raise ValueError(
            f"merge: real and synthetic labels differ in shape: "
            f"{tuple(real_label.shape)} and {tuple(syn_label.shape)}"
        )
    b, _, h, w = real_logits.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(
            f"merge: expected a bool mask of shape {(b, 1, h, w)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    if real_label.shape not in ((b, 1, h, w), (b, h, w)):
        raise ValueError(
            f"merge: labels must be (B, 1, H, W) or (B, H, W) at {(b, h, w)}, got {tuple(real_label.shape)}"
        )
    mask = mask.to(real_logits.device)
    logits = torch.where(mask, real_logits, syn_logits)
    label_mask = mask if real_label.dim() == 4 else mask[:, 0]
    label = torch.where(label_mask, real_label, syn_label)
    return logits, label
