"""Synthetic images with a known blob and a blurry, offset 'attention' map of it."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

BLOB_SIZE = 64
# attention disk: centre shifted by 9 % of the image, radius 0.9x, Gaussian blur sigma 4 px
OFFSET, SHRINK, SIGMA = 0.09, 0.9, 4.0


def make_blob(seed: int, size: int = BLOB_SIZE) -> dict[str, np.ndarray]:
    """A bright disk on noise: image (H, W) uint8, class_maps (1, H, W) in [0, 1], disk (H, W) bool,
    attention_disk (H, W) bool (the disk the attention map was blurred from)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size * rng.uniform(0.4, 0.6, 2)
    r = size * 0.22
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    image = np.clip(0.25 + 0.5 * disk + rng.normal(0, 0.08, disk.shape), 0, 1)
    angle = rng.uniform(0, 2 * np.pi)
    oy, ox = size * OFFSET * np.sin(angle), size * OFFSET * np.cos(angle)
    att_disk = (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 < (r * SHRINK) ** 2
    att = gaussian_filter(att_disk.astype(np.float64), SIGMA)
    return {
        "image": np.round(image * 255).astype(np.uint8),
        "class_maps": (att / att.max())[None].astype(np.float32),
        "disk": disk,
        "attention_disk": att_disk,
    }


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# an iso-luminant pair (BT.601 luma 107 for both): a red disk on green, invisible in grey
GREEN, RED = (60, 140, 60), (255, 45, 38)


def make_colour_blob(seed: int, size: int = BLOB_SIZE) -> dict[str, np.ndarray]:
    """:func:`make_blob` in colour: a red disk on a green background of the same luminance (noise
    std ~5 levels per channel), ``image`` (H, W, 3) uint8; ``luminance`` (H, W) uint8 its grey version."""
    blob = make_blob(seed, size)
    rng = np.random.default_rng(seed + 1000)
    rgb = np.where(blob["disk"][..., None], np.array(RED, float), np.array(GREEN, float))
    rgb = np.clip(np.round(rgb + rng.normal(0, 5, rgb.shape)), 0, 255).astype(np.uint8)
    luma = np.round(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    return {**blob, "image": rgb, "luminance": luma}
