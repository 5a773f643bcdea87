"""Label conventions shared by every stage.

A label map's value is the index of its class in the dataset's ``class_names`` (background first,
label 0); :data:`IGNORE_INDEX` marks unlabelled pixels. The class names come from the dataset
config (``data.class_names``); a domain's own conventions live in its package (the chest's
patient-sided lung labels: :mod:`diffmask.domains.chest.labels`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "class_word",
    "ignore_boundaries",
    "drop_small_components",
    "keep_largest_components",
    "validate_class_names",
]

# label value of pixels without a label (uncertain borders, unlabelled images): skipped by losses and scores
IGNORE_INDEX = 255


def class_word(name: str) -> str:
    """The words used for a class in prompts: ``left_lung`` -> ``left lung``."""
    return name.replace("_", " ")


def validate_class_names(
    class_names: list[str] | tuple[str, ...], field: str = "class_names"
) -> tuple[str, ...]:
    """Check a class list: at least background + one class, background first, no duplicates."""
    names = tuple(str(n) for n in class_names)
    if len(names) < 2:
        raise ValueError(f"{field}: expected background plus at least one class, got {list(names)}")
    if names[0] != "background":
        raise ValueError(f"{field}: the first class must be 'background' (label 0), got {names[0]!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: duplicate class names in {list(names)}")
    return names


def ignore_boundaries(label: np.ndarray, margin: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Seeds from a hard mask: pixels within ``margin`` px of another label become ``ignore_index``.

    A written dataset mask has no "unsure" label, but the pixels where threshold/CRF are least
    sure lie at region borders: AffinityNet's seeds and the segmentation loss on synthetic masks
    (``data.synthetic_ignore_margin``) leave them out.

    Args:
        label: (H, W) uint8 label map (existing ``ignore_index`` pixels stay ignored).
        margin: half-width of the ignore band in pixels (0: the mask unchanged).
        ignore_index: label value of the ignored pixels (default 255).

    Returns:
        (H, W) uint8 seed labels.
    """
    from scipy import ndimage  # noqa: PLC0415 - only this function needs scipy

    if margin < 0:
        raise ValueError(f"margin: expected >= 0, got {margin}")
    label = np.asarray(label, dtype=np.uint8)
    if margin == 0:
        return label.copy()
    out = np.full_like(label, ignore_index)
    structure = np.ones((3, 3), bool)
    for value in np.unique(label):
        if value == ignore_index:
            continue
        core = ndimage.binary_erosion(label == value, structure, iterations=int(margin), border_value=1)
        out[core] = value
    return out


def keep_largest_components(label: np.ndarray, num_classes: int) -> np.ndarray:
    """Each foreground class keeps only its largest 8-connected region; the rest becomes background.

    An anatomical prior for chest X-rays: each lung and the heart is one region. It removes the
    fragments a model predicts along an external film's frame lines and borders.

    Args:
        label: (H, W) or (B, H, W) integer label map.
        num_classes: classes including background (0).
    """
    from scipy import ndimage  # noqa: PLC0415 - only this prior needs scipy

    label = np.asarray(label)
    if label.ndim == 3:
        return np.stack([keep_largest_components(x, num_classes) for x in label])
    out = label.copy()
    eight = np.ones((3, 3), bool)
    for c in range(1, num_classes):
        regions, n = ndimage.label(label == c, structure=eight)
        if n > 1:
            sizes = np.bincount(regions.ravel())[1:]
            out[(regions > 0) & (regions != 1 + int(np.argmax(sizes)))] = 0
    return out


def drop_small_components(label: np.ndarray, num_classes: int, min_pixels: int) -> np.ndarray:
    """Foreground regions (8-connected, per class) smaller than ``min_pixels`` become background.

    A prediction's stray specks: on an image without a lesion, one painted pixel scores the image 0
    (:mod:`diffmask.evaluation.metrics`).

    Args:
        label: (H, W) or (B, H, W) integer label map.
        num_classes: classes including background (0).
        min_pixels: the smallest region kept (0 or 1: every region).
    """
    from scipy import ndimage  # noqa: PLC0415 - only this post-process needs scipy

    label = np.asarray(label)
    if label.ndim == 3:
        return np.stack([drop_small_components(x, num_classes, min_pixels) for x in label])
    out = label.copy()
    eight = np.ones((3, 3), bool)
    for c in range(1, num_classes):
        regions, n = ndimage.label(label == c, structure=eight)
        if n:
            sizes = np.bincount(regions.ravel())
            small = np.flatnonzero(sizes < min_pixels)
            out[np.isin(regions, small[small > 0])] = 0
    return out
