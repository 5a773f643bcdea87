"""Condition images for mask-/edge-guided synthesis (EMIT-Diff / DiffBoost, SegGuidedDiff) and the
random deformation that makes new mask shapes from the labelled ones.

Condition types (``control.condition.type``):

* ``edges`` — one channel: the image's edges (a classical detector, since HED weights cannot
  be had offline) plus the magnitude of a Scharr filter on the label map (the mask boundaries),
  clipped to [0, 1], as DiffBoost builds its condition; a colour image's edges are those of its
  luminance (:func:`luminance`), so the condition has one channel for grey and colour alike;
* ``mask`` — the label map one-hot, one channel per foreground class;
* ``edges+mask`` — both, edges first.

Mask ablation (SegGuidedDiff, MICCAI 2024): while fitting, each foreground class is removed
from the condition (its pixels become background: no channel, no boundary) with probability
``ablate_prob``, so a model learns to fix some structures and leave the rest free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.feature import canny
from skimage.filters import scharr, sobel

__all__ = ["CONDITION_TYPES", "ConditionBuilder", "Deformation", "luminance"]

CONDITION_TYPES = ("edges", "mask", "edges+mask")
EDGE_METHODS = ("canny", "sobel")
# ITU-R BT.601 luma weights, as PIL's convert("L")
LUMA = np.array([0.299, 0.587, 0.114])


def luminance(image: np.ndarray) -> np.ndarray:
    """(S, S) float64 of an (S, S) grey image (unchanged) or an (S, S, 3) RGB one (BT.601 luma)."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[-1] == 3:
        return image @ LUMA
    raise ValueError(f"image: expected (S, S) grey or (S, S, 3) RGB, got shape {image.shape}")


class ConditionBuilder:
    """Makes the (C, S, S) float32 condition of an image and its label map.

    Args:
        type: ``edges``, ``mask`` or ``edges+mask``.
        num_classes: label classes, background included (``mask`` has ``num_classes - 1`` channels).
        edge_method: ``canny`` (binary edges, skimage) or ``sobel`` (soft gradient magnitude,
            divided by its 99th percentile; closer to HED's soft maps).
        edge_sigma: Gaussian smoothing of the Canny detector (px at the working size).
        edge_low, edge_high: Canny hysteresis thresholds, as quantiles of the gradient magnitude
            (so they do not depend on the image's contrast).
        boundary_gain: the Scharr magnitude of the one-hot label map is multiplied by this
            before clipping (a label step gives about 0.8, so 2 makes boundaries 1).
        ablate_prob: probability of removing each foreground class from a condition while fitting.

    Raises:
        ValueError: an unknown type or edge method, or a setting out of range (named).
    """

    def __init__(
        self,
        type: str = "edges",
        num_classes: int = 4,
        edge_method: str = "canny",
        edge_sigma: float = 1.5,
        edge_low: float = 0.8,
        edge_high: float = 0.9,
        boundary_gain: float = 2.0,
        ablate_prob: float = 0.0,
    ):
        if type not in CONDITION_TYPES:
            raise ValueError(f"control.condition.type: expected one of {list(CONDITION_TYPES)}, got {type!r}")
        if edge_method not in EDGE_METHODS:
            raise ValueError(
                f"control.condition.edge_method: expected one of {list(EDGE_METHODS)}, got {edge_method!r}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes: expected background + at least one class, got {num_classes}")
        if not 0.0 <= edge_low <= edge_high <= 1.0:
            raise ValueError(
                "control.condition.edge_low/edge_high: expected quantiles 0 <= low <= high <= 1, "
                f"got {edge_low}, {edge_high}"
            )
        if not 0.0 <= ablate_prob < 1.0:
            raise ValueError(
                f"control.condition.ablate_prob: expected a probability in [0, 1), got {ablate_prob}"
            )
        self.type = type
        self.num_classes = int(num_classes)
        self.edge_method = edge_method
        self.edge_sigma = float(edge_sigma)
        self.edge_low, self.edge_high = float(edge_low), float(edge_high)
        self.boundary_gain = float(boundary_gain)
        self.ablate_prob = float(ablate_prob)

    @property
    def channels(self) -> int:
        """Channels of a condition: 1 for edges, K - 1 for masks, K for edges+mask (K = ``num_classes``)."""
        return {"edges": 1, "mask": self.num_classes - 1, "edges+mask": self.num_classes}[self.type]

    @property
    def uses_image(self) -> bool:
        """Whether a condition needs the image as well as the label map (the edge types)."""
        return "edges" in self.type

    def to_dict(self) -> dict:
        """The constructor's arguments (``ConditionBuilder(**d)`` rebuilds it; kept in ``control.json``)."""
        return {"type": self.type, "num_classes": self.num_classes, "edge_method": self.edge_method,
                "edge_sigma": self.edge_sigma, "edge_low": self.edge_low, "edge_high": self.edge_high,
                "boundary_gain": self.boundary_gain, "ablate_prob": self.ablate_prob}

    # ---- parts -----------------------------------------------------------------------------
    def image_edges(self, image: np.ndarray) -> np.ndarray:
        """(S, S) float32 edges in [0, 1] of an (S, S) grey or (S, S, 3) RGB image in [0, 1].

        The edges of an RGB image are its luminance's.
        """
        image = luminance(image)
        if self.edge_method == "canny":
            return canny(
                image, sigma=self.edge_sigma, low_threshold=self.edge_low, high_threshold=self.edge_high,
                use_quantiles=True,
            ).astype(np.float32)
        mag = sobel(ndimage.gaussian_filter(image, self.edge_sigma) if self.edge_sigma > 0 else image)
        scale = float(np.percentile(mag, 99)) or 1.0
        return np.clip(mag / scale, 0.0, 1.0).astype(np.float32)

    def boundaries(self, label: np.ndarray) -> np.ndarray:
        """(S, S) float32: the Scharr magnitude of the one-hot label map (max over classes).

        Scaled by ``boundary_gain`` and clipped to [0, 1].
        """
        out = np.zeros(label.shape, np.float32)
        for c in range(1, self.num_classes):
            if (label == c).any():
                out = np.maximum(out, scharr((label == c).astype(np.float64)).astype(np.float32))
        return np.clip(out * self.boundary_gain, 0.0, 1.0)

    def one_hot(self, label: np.ndarray) -> np.ndarray:
        """(K - 1, S, S) float32, one channel per foreground class."""
        return np.stack([(label == c) for c in range(1, self.num_classes)]).astype(np.float32)

    def check_label(self, label: np.ndarray, where: str = "label") -> np.ndarray:
        """The label map as an array, checked to be (S, S) with values in the classes 0..K-1.

        Args:
            label: an (S, S) label map.
            where: what it is, named in the error (an item's id).

        Raises:
            ValueError: another shape, or values outside the classes.
        """
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"{where}: expected an (S, S) label map, got shape {label.shape}")
        bad = np.unique(label[(label < 0) | (label >= self.num_classes)])
        if bad.size:
            raise ValueError(
                f"{where}: label values {bad.tolist()} are outside the classes 0..{self.num_classes - 1}"
            )
        return label

    def ablate(self, label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The label map with each foreground class set to background with probability ``ablate_prob``."""
        if self.ablate_prob <= 0:
            return label
        drop = [c for c in range(1, self.num_classes) if rng.random() < self.ablate_prob]
        return np.where(np.isin(label, drop), 0, label) if drop else label

    def __call__(
        self, image: np.ndarray | None, label: np.ndarray, rng: np.random.Generator | None = None,
        where: str = "condition",
    ) -> np.ndarray:
        """The condition of one sample.

        Args:
            image: (S, S) grey or (S, S, 3) RGB in [0, 1] (needed by the edge types; None for ``mask``).
            label: (S, S) integer label map, values 0..K-1.
            rng: when given, the mask ablation is drawn (fitting); None = the whole mask.
            where: the sample's name for errors.

        Raises:
            ValueError: image and label sizes differ, labels out of range, or no image for edges.
        """
        label = self.check_label(label, f"{where}: label")
        if rng is not None:
            label = self.ablate(label, rng)
        parts = []
        if self.uses_image:
            if image is None:
                raise ValueError(f"{where}: condition type {self.type!r} needs the image (its edges)")
            image = np.asarray(image)
            if image.shape[:2] != label.shape or image.ndim not in (2, 3):
                raise ValueError(
                    f"{where}: image {image.shape} and label map {label.shape} differ in size; a condition "
                    "needs both at the same size"
                )
            parts.append(np.clip(self.image_edges(image) + self.boundaries(label), 0.0, 1.0)[None])
        if "mask" in self.type:
            parts.append(self.one_hot(label))
        return np.concatenate(parts).astype(np.float32)

    def batch(self, images, labels, rng: np.random.Generator | None = None, ids: Sequence[str] | None = None):
        """(B, C, S, S) float32 conditions of a batch of (B, S, S) (grey) or (B, S, S, 3) (RGB) images and
        (B, S, S) label maps (numpy)."""
        ids = ids or [f"item {i}" for i in range(len(labels))]
        return np.stack([
            self(None if images is None else images[i], labels[i], rng, where=str(ids[i]))
            for i in range(len(labels))
        ])


@dataclass
class Deformation:
    """A random elastic + affine warp applied alike to an image and its label map, so that shapes
    beyond the labelled ones appear with images (and edges) that still agree with them.

    Args:
        elastic_alpha: displacement amplitude in pixels (at the working size) of the elastic field.
        elastic_sigma: Gaussian smoothing of the field (pixels): larger = smoother, larger-scale bends.
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]).
        scale: maximum relative zoom (uniform in [1 - scale, 1 + scale], per axis).
        translate: maximum shift as a share of the side.
    """

    elastic_alpha: float = 4.0
    elastic_sigma: float = 6.0
    rotate: float = 8.0
    scale: float = 0.08
    translate: float = 0.04

    def __post_init__(self):
        for name in ("elastic_alpha", "elastic_sigma", "rotate", "scale", "translate"):
            if getattr(self, name) < 0:
                raise ValueError(f"synthesis.deform.{name}: expected >= 0, got {getattr(self, name)}")
        if self.scale >= 1:
            raise ValueError(f"synthesis.deform.scale: expected < 1, got {self.scale}")

    def coordinates(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """(2, S, S) input coordinates each output pixel samples (row, col)."""
        axis = np.arange(size, dtype=np.float64)
        yy, xx = np.meshgrid(axis, axis, indexing="ij")
        c = (size - 1) / 2.0
        angle = math.radians(rng.uniform(-self.rotate, self.rotate))
        sy, sx = rng.uniform(1 - self.scale, 1 + self.scale, size=2)
        ty, tx = rng.uniform(-self.translate, self.translate, size=2) * size
        cos, sin = math.cos(angle), math.sin(angle)
        # inverse map: output (y, x) -> input; rotate and scale about the centre, then shift
        y0, x0 = yy - c - ty, xx - c - tx
        src_y = (cos * y0 - sin * x0) / sy + c
        src_x = (sin * y0 + cos * x0) / sx + c
        if self.elastic_alpha > 0:
            dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), self.elastic_sigma, mode="reflect")
            dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), self.elastic_sigma, mode="reflect")
            # normalise the smoothed field so elastic_alpha is its largest displacement in pixels
            norm = max(np.abs(dy).max(), np.abs(dx).max(), 1e-8)
            src_y = src_y + dy / norm * self.elastic_alpha
            src_x = src_x + dx / norm * self.elastic_alpha
        return np.stack([src_y, src_x])

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Warp an (S, S) grey or (S, S, C) colour image (linear; outside = edge value) and label map
        (nearest; outside = background); every channel of a colour image by the same warp."""
        image = np.asarray(image)
        if (image.shape[:2] != label.shape or image.ndim not in (2, 3) or image.shape[0] != image.shape[1]):
            raise ValueError(
                f"deform: expected a square image and label map of one size, got {image.shape}, {label.shape}"
            )
        coords = self.coordinates(image.shape[0], rng)
        pixels = np.asarray(image, np.float64)
        if pixels.ndim == 2:
            warped = ndimage.map_coordinates(pixels, coords, order=1, mode="nearest")
        else:
            warped = np.stack([ndimage.map_coordinates(pixels[..., c], coords, order=1, mode="nearest")
                               for c in range(pixels.shape[-1])], -1)
        warped_label = ndimage.map_coordinates(np.asarray(label), coords, order=0, mode="constant", cval=0)
        dtype = np.asarray(image).dtype
        if dtype.kind in "ui":  # e.g. uint8 pixels stay uint8
            warped = np.clip(np.round(warped), np.iinfo(dtype).min, np.iinfo(dtype).max)
        return warped.astype(dtype), warped_label.astype(np.asarray(label).dtype)
