"""MONAI augmentation for 2-D image/label dicts (``image`` (1,H,W) float, ``label`` (1,H,W)).

Horizontal flips are off by default: SCR labels are patient-sided, so a flip must swap the left
and right lung labels (``flip_swap=[[1, 2]]``); a dataset whose classes have no side (a lesion)
turns them on with ``hflip_prob`` alone.
The augmentation acts on the image as acquired, before the per-image intensity normalisation
(``data.intensity``), as another hospital's acquisition would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
)

__all__ = ["SwapLabelsOnFlipd", "build_augmentation"]


def _flip_width(x):
    """A tensor or array mirrored along its last (width) axis; an array is copied contiguous."""
    return x.flip(-1) if isinstance(x, torch.Tensor) else np.flip(x, -1).copy()


class SwapLabelsOnFlipd(RandomizableTransform, MapTransform):
    """A horizontal flip that swaps sided labels: with probability ``prob`` the image and label are
    mirrored left-right and each label pair in ``swap`` is exchanged (SCR: left lung 1 <-> right
    lung 2, since a mirrored left lung lies where a right lung would).

    Args:
        prob: probability of the flip.
        swap: pairs of label values exchanged by the flip; ``[]`` for a plain flip.
    """

    def __init__(self, prob: float = 0.5, swap: list[list[int]] | tuple = ()):
        MapTransform.__init__(self, ("image", "label"))
        RandomizableTransform.__init__(self, prob)
        pairs = [tuple(int(v) for v in p) for p in swap]
        overlapping = len({v for p in pairs for v in p}) != 2 * len(pairs)
        if any(len(p) != 2 or p[0] == p[1] for p in pairs) or overlapping:
            raise ValueError(f"flip_swap: expected disjoint pairs of two label values, got {list(swap)}")
        self.pairs = pairs

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        d["image"] = _flip_width(d["image"])
        label = _flip_width(d["label"])
        out = label.clone() if isinstance(label, torch.Tensor) else label.copy()
        for a, b in self.pairs:
            out[label == a], out[label == b] = b, a
        d["label"] = out
        return d


def build_augmentation(
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.05,
    affine_prob: float = 0.8,
    intensity_scale: float = 0.1,
    gamma: tuple[float, float] | list[float] | None = (0.8, 1.25),
    noise_std: float = 0.02,
    blur_sigma: tuple[float, float] | list[float] | None = None,
    prob: float = 0.3,
    size: int | None = None,
    histogram_shift: int | None = None,
    bias_field: float | None = None,
    extra: Sequence[Callable] | None = None,
    hflip_prob: float = 0.0,
    flip_swap: list[list[int]] | None = None,
) -> Compose:
    """Build the augmentation used on training data (real or synthetic).

    Args:
        rotate_deg: max rotation in degrees (uniform in ±rotate_deg).
        scale: max relative zoom (±scale).
        translate: max shift as a fraction of the image side.
        affine_prob: probability of the affine transform.
        intensity_scale: max relative intensity scaling.
        gamma: contrast gamma range, or None to disable.
        noise_std: Gaussian noise std (images in [0, 1]); 0 disables.
        blur_sigma: Gaussian blur sigma range, or None to disable (narrows synthetic/real gaps).
        prob: probability of each intensity transform.
        size: image side, used to turn ``translate`` into pixels (None = 0 translation in pixels).
        histogram_shift: control points of a random non-linear grey-level curve (MONAI
            ``RandHistogramShiftd``), or None to disable: another detector's response.
        bias_field: largest coefficient of a smooth multiplicative bias field (``RandBiasFieldd``),
            or None to disable: uneven exposure across the film.
        extra: more dict transforms (built by Hydra from ``_target_`` nodes), played after the others and
            before the noise: a domain's own, e.g. chest films' burnt-in markers
            (:class:`diffmask.domains.chest.transforms.RandBurnInd`, in ``data/augment=strong``).
        hflip_prob: probability of a horizontal flip (0: never; chest X-rays with patient-sided
            labels flip only with ``flip_swap``).
        flip_swap: label-value pairs a flip exchanges (:class:`SwapLabelsOnFlipd`), e.g.
            ``[[1, 2]]`` for SCR's left and right lungs; None or ``[]`` = a plain flip.

    Returns:
        A MONAI ``Compose`` acting on dicts with keys ``image`` and ``label``.
    """
    if not 0 <= prob <= 1 or not 0 <= affine_prob <= 1:
        raise ValueError(f"prob/affine_prob: expected probabilities in [0, 1], got {prob}, {affine_prob}")
    shift = translate * size if size else 0.0
    if not 0 <= hflip_prob <= 1:
        raise ValueError(f"hflip_prob: expected a probability in [0, 1], got {hflip_prob}")
    transforms = []
    if hflip_prob:
        transforms.append(SwapLabelsOnFlipd(hflip_prob, flip_swap or []))
    if rotate_deg or scale or shift:
        transforms.append(
            RandAffined(
                keys=("image", "label"),
                prob=affine_prob,
                rotate_range=(math.radians(rotate_deg),),
                scale_range=(scale, scale),
                translate_range=(shift, shift),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    if intensity_scale:
        transforms.append(RandScaleIntensityd(keys="image", factors=intensity_scale, prob=prob))
    if gamma:
        transforms.append(RandAdjustContrastd(keys="image", gamma=tuple(gamma), prob=prob))
    if blur_sigma:
        s = tuple(blur_sigma)
        transforms.append(RandGaussianSmoothd(keys="image", sigma_x=s, sigma_y=s, prob=prob))
    if histogram_shift:
        transforms.append(
            RandHistogramShiftd(keys="image", num_control_points=(4, int(histogram_shift)), prob=prob)
        )
    if bias_field:
        transforms.append(
            RandBiasFieldd(keys="image", degree=3, coeff_range=(0.0, float(bias_field)), prob=prob)
        )
    transforms.extend(extra or [])
    if noise_std:
        transforms.append(RandGaussianNoised(keys="image", std=noise_std, prob=prob))
    return Compose(transforms)
