"""MONAI augmentation for 2-D image/label dicts (``image`` (1,H,W) float, ``label`` (1,H,W)).

No horizontal flip: SCR labels are patient-sided, so a flip would swap left and right lungs.
"""

from __future__ import annotations

import math

from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
)

__all__ = ["build_augmentation"]


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

    Returns:
        A MONAI ``Compose`` acting on dicts with keys ``image`` and ``label``.
    """
    if not 0 <= prob <= 1 or not 0 <= affine_prob <= 1:
        raise ValueError(f"prob/affine_prob: expected probabilities in [0, 1], got {prob}, {affine_prob}")
    shift = translate * size if size else 0.0
    transforms = []
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
    if noise_std:
        transforms.append(RandGaussianNoised(keys="image", std=noise_std, prob=prob))
    return Compose(transforms)
