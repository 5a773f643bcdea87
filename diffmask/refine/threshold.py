"""Adaptive per-image, per-class thresholding of attention class maps into a label map.

Each method gives every class k two levels ``low_k <= high_k``: pixels with ``p_k >= high_k``
are confident class-k candidates, pixels with ``p_k < low_k`` are confidently not k, and pixels
in between are uncertain. A pixel takes the candidate class with the highest probability; a
pixel with no candidate is background, unless some class is uncertain there, in which case it
gets ``ignore_index`` (the ignore band that AffinityNet's seeds need).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from diffmask.labels import IGNORE_INDEX
from diffmask.refine.chain import require_keys

__all__ = ["IGNORE_INDEX", "threshold_masks", "class_levels", "mask_confidence", "ThresholdRefiner"]

_METHODS = ("otsu", "mean_std", "peak_band")


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    # threshold sits at the upper edge of the last bin of the lower class
    return float(edges[int(np.argmax(between)) + 1])


def class_levels(
    prob: np.ndarray,
    method: str = "otsu",
    k: float = 1.0,
    ignore_band: float = 0.0,
    band: Sequence[float] = (0.45, 0.53),
    min_fraction: float = 0.06,
) -> tuple[float, float]:
    """The (low, high) levels of one class map; see the module docstring.

    Args:
        prob: (H, W) class map in [0, 1].
        method: ``"otsu"``; ``"mean_std"`` (mean + k * std); ``"peak_band"`` (DiffuMask-style:
            the most frequent value of the map inside ``band``, with confident levels kept so
            that each side holds at least ``min_fraction`` of the pixels).
        k: the std multiplier of ``mean_std``.
        ignore_band: half-width of the uncertain band around the threshold (0: none).
        band: (low, high) value range searched by ``peak_band``.
        min_fraction: ``peak_band``: least fraction of pixels on each confident side.

    An all-zero map (a class the image's prompt does not name: a lesion-free image) gets
    infinite levels, so it gives no pixel.
    """
    values = prob.ravel()
    if values.max() <= 0:  # no attention at all (a class the prompt does not name): no pixel, no uncertainty
        return float("inf"), float("inf")
    if method == "otsu":
        tau = _otsu(values)
    elif method == "mean_std":
        tau = float(values.mean() + k * values.std())
    elif method == "peak_band":
        inside = values[(values >= band[0]) & (values <= band[1])]
        if inside.size:
            hist, edges = np.histogram(inside, bins=16, range=(band[0], band[1]))
            i = int(np.argmax(hist))
            tau = float((edges[i] + edges[i + 1]) / 2)
        else:
            tau = float((band[0] + band[1]) / 2)
        low, high = tau - ignore_band, tau + ignore_band
        # keep each confident side to at least min_fraction of the pixels
        high = min(high, float(np.quantile(values, 1.0 - min_fraction)))
        low = max(low, float(np.quantile(values, min_fraction)))
        low = min(low, high)
        return low, high
    else:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    return tau - ignore_band, tau + ignore_band


def threshold_masks(
    probs: np.ndarray | torch.Tensor,
    method: str = "otsu",
    k: float = 1.0,
    ignore_band: float = 0.0,
    band: Sequence[float] = (0.45, 0.53),
    min_fraction: float = 0.06,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """Threshold K class maps into one label map.

    Args:
        probs: (K, H, W) class maps in [0, 1] (class k gets label k + 1; 0 is background).
        method, k, ignore_band, band, min_fraction: see :func:`class_levels`.
        ignore_index: label of uncertain pixels (only produced when there is an uncertain band).

    Returns:
        (label, confidence): label (H, W) uint8 with 0 = background, 1..K the classes and
        ``ignore_index`` at uncertain pixels; confidence (K,) float32 in [0, 1], the contrast of
        each class map: mean inside its mask minus mean over the confident rest (0 when absent).

    Raises:
        ValueError: wrong shape, values outside [0, 1] or NaN, or a bad argument.
    """
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    p = p.astype(np.float32, copy=False)
    if p.ndim != 3 or p.shape[0] < 1:
        raise ValueError(f"probs: expected (K, H, W) class maps, got shape {p.shape}")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("probs: expected finite values in [0, 1]")
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
    if ignore_band < 0:
        raise ValueError(f"ignore_band: expected >= 0, got {ignore_band}")
    if not 0 <= ignore_index <= 255 or 1 <= ignore_index <= p.shape[0]:
        raise ValueError(
            f"ignore_index: expected a uint8 value that is not a class label, got {ignore_index}"
        )
    if not 0 <= min_fraction < 0.5:
        raise ValueError(f"min_fraction: expected in [0, 0.5), got {min_fraction}")

    levels = np.array(
        [class_levels(m, method, k, ignore_band, band, min_fraction) for m in p], dtype=np.float32
    )
    low, high = levels[:, 0, None, None], levels[:, 1, None, None]
    candidate = p >= high
    uncertain = (p >= low) & ~candidate
    scored = np.where(candidate, p, -1.0)
    best = np.argmax(scored, axis=0)
    label = np.where(candidate.any(axis=0), best + 1, 0).astype(np.uint8)
    label[(label == 0) & uncertain.any(axis=0)] = ignore_index

    return label, mask_confidence(p, label, ignore_index)


def mask_confidence(probs: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per-class contrast of class maps under a label map.

    Args:
        probs: (K, H, W) class maps in [0, 1].
        label: (H, W) labels (class k is label k + 1; ``ignore_index`` pixels are left out).
        ignore_index: label of uncertain pixels.

    Returns:
        (K,) float32 in [0, 1]: mean of ``probs[k]`` inside label k + 1 minus its mean over the
        other known pixels (0 when the class is absent or fills the image).
    """
    confidence = np.zeros(probs.shape[0], dtype=np.float32)
    known = label != ignore_index
    for c in range(probs.shape[0]):
        inside = label == c + 1
        rest = known & ~inside
        if inside.any() and rest.any():
            confidence[c] = max(0.0, float(probs[c][inside].mean() - probs[c][rest].mean()))
    return confidence


class ThresholdRefiner:
    """Keyed wrapper of :func:`threshold_masks` for a sample dict (chainable).

    Reads ``sample[probs_key]`` (K, H, W) and writes ``sample[label_key]`` (H, W) uint8 and
    ``sample[confidence_key]`` (K,). Arguments as in :func:`threshold_masks`.

    Examples::

        refine = ThresholdRefiner(method="otsu", ignore_band=0.1)
        sample = refine({"class_maps": maps})   # adds "label", "confidence"
    """

    def __init__(
        self,
        method: str = "otsu",
        k: float = 1.0,
        ignore_band: float = 0.0,
        band: Sequence[float] = (0.45, 0.53),
        min_fraction: float = 0.06,
        ignore_index: int = IGNORE_INDEX,
        probs_key: str = "class_maps",
        label_key: str = "label",
        confidence_key: str = "confidence",
    ):
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
        if ignore_band < 0:
            raise ValueError(f"ignore_band: expected >= 0, got {ignore_band}")
        if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
            raise ValueError(f"band: expected (low, high) with 0 <= low < high <= 1, got {list(band)}")
        self.method = method
        self.k = float(k)
        self.ignore_band = float(ignore_band)
        self.band = (float(band[0]), float(band[1]))
        self.min_fraction = float(min_fraction)
        self.ignore_index = int(ignore_index)
        self.probs_key = probs_key
        self.label_key = label_key
        self.confidence_key = confidence_key

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        require_keys(sample, (self.probs_key,), "ThresholdRefiner")
        label, confidence = threshold_masks(
            sample[self.probs_key],
            self.method,
            self.k,
            self.ignore_band,
            self.band,
            self.min_fraction,
            self.ignore_index,
        )
        out = dict(sample)
        out[self.label_key] = label
        out[self.confidence_key] = confidence
        return out
