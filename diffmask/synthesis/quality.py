"""Quality filter for generated image/mask pairs: drop samples whose mask is implausible.

A sample is dropped when a class is missing from its mask, when a class's confidence score is
below ``min_score``, or when a class is fragmented: its largest 4-connected component holds
less than ``min_largest_fraction`` of the class's pixels, or it has more than
``max_components`` components. Dropped samples are recorded by the writer (``dropped.rank*.jsonl``
with the reason) and counted in ``stage.json``, so a resumed run does not redo them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from diffmask.data.sources import ManifestSource

__all__ = ["MaskQualityFilter", "class_presence_record"]

log = logging.getLogger(__name__)


def class_presence_record(
    folder: str | os.PathLike, class_names: Sequence[str], min_presence: float | None,
    optional_classes: Sequence[str] = (),
) -> dict[str, Any]:
    """What a synthetic set's ``stage.json`` records of its masks: ``class_presence`` (for each
    foreground class, the share of masks holding it) and ``warnings``.

    A class in fewer than ``min_presence`` of the masks (an undertrained generator's attention
    masks are mostly background) gets a loud log warning and a line in ``warnings``; the set is
    still written, and the segmentation datamodule refuses it unless told otherwise
    (``data.synthetic_min_class_presence``). A class in ``optional_classes`` (a lesion, absent
    from normal images) is recorded but never warned about. ``{}`` when the set has no masks.
    """
    presence = ManifestSource(folder, class_names).class_presence()
    if not presence:
        return {}
    warnings = [
        f"class {name!r} is in {share:.0%} of the masks (synthesis.min_class_presence={min_presence:g}): "
        "the generator may be undertrained; segmentation refuses this set unless "
        "data.synthetic_min_class_presence=null"
        for name, share in presence.items()
        if min_presence is not None and share < min_presence and name not in optional_classes
    ]
    for line in warnings:
        log.warning("\n%s\n%s: %s\n%s", "!" * 100, folder, line, "!" * 100)
    return {"class_presence": presence, "warnings": warnings}


class MaskQualityFilter:
    """Decides whether a generated mask is kept.

    Args:
        class_names: label names, background first (label k is ``class_names[k]``).
        require_all_classes: drop a mask that lacks any foreground class but the optional ones.
        min_score: drop when a class's score (the mask maker's confidence) is below this
            (None: no score check).
        min_largest_fraction: drop when a class's largest connected component holds less than
            this fraction of its pixels (None: no check). 0.9 suits lungs and heart.
        max_components: drop when a class has more connected components than this (None: no check).
        min_component_pixels: components smaller than this many pixels are not counted (specks).
        optional_classes: classes a mask may lack (``data.optional_classes``: a lesion).

    Examples::

        keep = MaskQualityFilter(["background", "left_lung", "right_lung", "heart"], min_score=0.2,
                                 min_largest_fraction=0.8, max_components=3)
        reason = keep.reason(mask, {"left_lung": 0.6, "right_lung": 0.5, "heart": 0.3})  # None = keep
    """

    def __init__(
        self,
        class_names: Sequence[str],
        require_all_classes: bool = True,
        min_score: float | None = None,
        min_largest_fraction: float | None = None,
        max_components: int | None = None,
        min_component_pixels: int = 1,
        optional_classes: Sequence[str] = (),
    ):
        if len(class_names) < 2:
            raise ValueError(
                f"class_names: expected background plus at least one class, got {list(class_names)}"
            )
        if min_score is not None and not 0 <= min_score <= 1:
            raise ValueError(f"min_score: expected None or a score in [0, 1], got {min_score}")
        if min_largest_fraction is not None and not 0 < min_largest_fraction <= 1:
            raise ValueError(
                f"min_largest_fraction: expected None or a fraction in (0, 1], got {min_largest_fraction}"
            )
        if max_components is not None and max_components < 1:
            raise ValueError(f"max_components: expected None or >= 1, got {max_components}")
        if min_component_pixels < 1:
            raise ValueError(f"min_component_pixels: expected >= 1, got {min_component_pixels}")
        self.class_names = tuple(class_names)
        self.require_all_classes = bool(require_all_classes)
        unknown = [c for c in optional_classes if c not in self.class_names[1:]]
        if unknown:
            raise ValueError(
                f"optional_classes: {unknown} are not foreground classes of {list(self.class_names)}"
            )
        self.optional_classes = tuple(optional_classes)
        self.min_score = min_score
        self.min_largest_fraction = min_largest_fraction
        self.max_components = max_components
        self.min_component_pixels = int(min_component_pixels)

    def reason(self, mask: np.ndarray, scores: Mapping[str, float] | None = None) -> str | None:
        """Why ``mask`` (H, W) uint8 is dropped, or None to keep it."""
        from scipy import ndimage  # noqa: PLC0415 - only the filter needs scipy

        mask = np.asarray(mask)
        scores = dict(scores or {})
        for label, name in enumerate(self.class_names[1:], start=1):
            region = mask == label
            total = int(region.sum())
            if total == 0:
                if self.require_all_classes and name not in self.optional_classes:
                    return f"missing class {name}"
                continue
            if self.min_score is not None and name in scores and scores[name] < self.min_score:
                return f"{name}: score {scores[name]:.3f} < min_score {self.min_score}"
            if self.min_largest_fraction is None and self.max_components is None:
                continue
            components, n = ndimage.label(region)
            sizes = np.bincount(components.ravel())[1:]
            counted = int((sizes >= self.min_component_pixels).sum())
            if self.max_components is not None and counted > self.max_components:
                return f"{name}: {counted} components > max_components {self.max_components}"
            largest = float(sizes.max()) / total
            if self.min_largest_fraction is not None and largest < self.min_largest_fraction:
                return (
                    f"{name}: largest component holds {largest:.2f} < min_largest_fraction "
                    f"{self.min_largest_fraction}"
                )
        return None

    def __call__(self, mask: np.ndarray, scores: Mapping[str, float] | None = None) -> bool:
        """True to keep the sample."""
        return self.reason(mask, scores) is None
