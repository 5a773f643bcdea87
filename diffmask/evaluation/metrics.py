"""Segmentation metrics: per-image IoU/Dice as plain functions, plus a DDP-safe accumulator.

The scoring rule (every caller in :mod:`diffmask` scores masks through this module):

* **Per image and class.** When the image's ground truth holds the class, IoU and Dice are the
  usual ``|P∩T| / |P∪T|`` and ``2|P∩T| / (|P| + |T|)``. When the ground truth lacks it, the score
  is **1** if the prediction lacks it too and **0** if the prediction paints any pixel of it: a
  model that draws a lesion on a lesion-free image is penalised. Pixels labelled
  ``ignore_index`` count in neither the prediction nor the ground truth.
* **Per test set.** A class that the ground truth of *no* image of the set holds (zero labelled
  pixels over every image the accumulator saw, e.g. the heart in a lungs-only set scored by a
  4-class model) is not scored at all: it is left out of the set's keys and of its means.
* **Two summaries** of a set, per foreground class (background is never scored):

  - per-image mean (as the ultrasound literature reports it): the mean over images of the
    per-image scores above: ``iou_<class>``, ``dice_<class>``, their means over classes
    ``miou``, ``mdice``;
  - dataset-level aggregate: the sums over images of intersections and unions (for Dice, of
    ``2|P∩T|`` and ``|P| + |T|``), divided once: ``agg_iou_<class>``, ``agg_dice_<class>``,
    ``agg_miou``, ``agg_mdice``.

Where every image holds every class (chest X-rays: both lungs and the heart in each image) the
per-image scores are exactly those of the former rule (NaN where the ground truth lacked a
class), so figures computed before this rule stay valid.

:func:`class_counts` returns the per-image counts with a ``present`` mask (the class is in the
image's ground truth), for callers that apply the set-level rule themselves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchmetrics import Metric

__all__ = [
    "ClassCounts",
    "SegmentationScores",
    "class_counts",
    "compute_dice",
    "compute_iou",
    "dice_from_counts",
    "iou_from_counts",
    "labelled_classes",
]


class ClassCounts(NamedTuple):
    """Per-image, per-class pixel counts of a batch, each (B, C) float32.

    Attributes:
        intersection: pixels of the class in both the prediction and the ground truth.
        predicted: pixels of the class in the prediction.
        target: pixels of the class in the ground truth.
    """

    intersection: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        """(B, C) bool: the class is in the image's ground truth."""
        return self.target > 0

    @property
    def union(self) -> torch.Tensor:
        """(B, C) pixels of the class in the prediction or the ground truth."""
        return self.predicted + self.target - self.intersection


def class_counts(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> ClassCounts:
    """Per-image, per-class intersection, prediction and ground-truth pixel counts.

    Args:
        pred: (B, H, W) or (B, 1, H, W) predicted class indices.
        target: same shape, ground-truth class indices; ``ignore_index`` pixels are counted in
            neither ``pred`` nor ``target``.
        num_classes: number of classes including background.
        ignore_index: label value of unlabelled pixels (None: every pixel counts).

    Returns:
        :class:`ClassCounts` of (B, num_classes) float32 tensors, with the ``present`` mask.

    Raises:
        ValueError: naming ``pred``/``target`` when their shapes differ, ``num_classes`` when < 1.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {tuple(pred.shape)} differs from target's {tuple(target.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
    b = pred.shape[0]
    pred = pred.reshape(b, -1).long()
    target = target.reshape(b, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    classes = torch.arange(num_classes, device=pred.device)[None, :, None]  # (1, C, 1)
    p = (pred[:, None] == classes) & valid[:, None]  # (B, C, N)
    t = (target[:, None] == classes) & valid[:, None]
    inter = (p & t).sum(-1).float()
    return ClassCounts(inter, p.sum(-1).float(), t.sum(-1).float())


def iou_from_counts(counts: ClassCounts) -> torch.Tensor:
    """Per-image IoU under the module's rule: (B, C) float32, never NaN.

    ``|P∩T| / |P∪T|`` where the union is not empty; 1 where the class is in neither the
    prediction nor the ground truth. A class absent from the ground truth but predicted has an
    empty intersection, hence 0.
    """
    union = counts.union
    iou = counts.intersection / union.clamp_min(1)
    return torch.where(union > 0, iou, torch.ones_like(iou))


def dice_from_counts(counts: ClassCounts) -> torch.Tensor:
    """Per-image Dice under the module's rule: (B, C) float32, never NaN (see :func:`iou_from_counts`)."""
    total = counts.predicted + counts.target
    dice = 2 * counts.intersection / total.clamp_min(1)
    return torch.where(total > 0, dice, torch.ones_like(dice))


def compute_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Per-image, per-class IoU.

    Args:
        pred: (B, H, W) or (B, 1, H, W) predicted class indices.
        target: same shape, ground-truth class indices; ``ignore_index`` pixels are skipped.
        num_classes: number of classes including background.
        ignore_index: label value of unlabelled pixels (None: every pixel counts).

    Returns:
        (B, num_classes) float32 IoU: as usual where the ground truth holds the class; where it
        lacks it, 1 when the prediction lacks it too and 0 when it paints any pixel of it.
    """
    return iou_from_counts(class_counts(pred, target, num_classes, ignore_index))


def compute_dice(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Per-image, per-class Dice; same arguments and conventions as :func:`compute_iou`.

    Returns:
        (B, num_classes) float32 Dice; 1 / 0 where the ground truth lacks the class, as IoU.
    """
    return dice_from_counts(class_counts(pred, target, num_classes, ignore_index))


def labelled_classes(present: torch.Tensor) -> torch.Tensor:
    """The set-level rule: which classes a set labels at all.

    Args:
        present: (N, C) bool, ``ClassCounts.present`` of every image of the set.

    Returns:
        (C,) bool: the class is in the ground truth of at least one image. Classes that are not
        are left out of the set's scores and means.
    """
    if present.dim() != 2:
        raise ValueError(f"present: expected an (N, C) mask, got shape {tuple(present.shape)}")
    return present.any(0)


class SegmentationScores(Metric):
    """Per-image mean and dataset-level aggregate IoU and Dice per class, over batches and DDP ranks.

    Every state is a per-class sum (``dist_reduce_fx="sum"``), so the result is the same on one
    device or many. ``compute()`` returns a flat dict of 0-d float32 tensors for every foreground
    class that the ground truth of at least one image seen holds (the module's set-level rule):
    ``iou_<class>``, ``dice_<class>`` (mean over images of the per-image scores), ``agg_iou_<class>``,
    ``agg_dice_<class>`` (sums over images, divided once), and their means over those classes,
    ``miou``, ``mdice``, ``agg_miou``, ``agg_mdice`` (NaN when no class is scored).

    Args:
        class_names: class names, background (not scored) first.
        ignore_index: label value of unlabelled pixels (None: every pixel counts).
    """

    full_state_update = False

    def __init__(self, class_names: list[str] | tuple[str, ...], ignore_index: int | None = 255):
        super().__init__()
        self.class_names = tuple(class_names)
        if not self.class_names:
            raise ValueError("class_names: expected at least one class (background first)")
        self.ignore_index = ignore_index
        c = len(self.class_names)
        # per-image scores summed over images; pixel counts summed over images
        for name in ("iou_sum", "dice_sum", "inter_pixels", "pred_pixels", "target_pixels"):
            self.add_state(name, default=torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            pred: (B, H, W) or (B, 1, H, W) predicted class indices.
            target: same shape, ground-truth class indices.
        """
        counts = class_counts(pred, target, len(self.class_names), self.ignore_index)
        self.iou_sum.add_(iou_from_counts(counts).double().sum(0))
        self.dice_sum.add_(dice_from_counts(counts).double().sum(0))
        self.inter_pixels.add_(counts.intersection.double().sum(0))
        self.pred_pixels.add_(counts.predicted.double().sum(0))
        self.target_pixels.add_(counts.target.double().sum(0))
        self.n_images.add_(pred.shape[0])

    def compute(self) -> dict[str, torch.Tensor]:
        """The scores of the images seen (see the class docstring for the keys)."""
        inter, pred, target = self.inter_pixels, self.pred_pixels, self.target_pixels
        per_class = {
            "iou": self.iou_sum / self.n_images.clamp_min(1),
            "dice": self.dice_sum / self.n_images.clamp_min(1),
            "agg_iou": inter / (pred + target - inter).clamp_min(1),
            "agg_dice": 2 * inter / (pred + target).clamp_min(1),
        }
        kept = [i for i in range(1, len(self.class_names)) if target[i] > 0]  # background is never scored
        out: dict[str, torch.Tensor] = {}
        for prefix, values in per_class.items():
            means = []
            for i in kept:
                value = values[i].float()
                out[f"{prefix}_{self.class_names[i]}"] = value
                means.append(value)
            key = prefix.replace("iou", "miou").replace("dice", "mdice")
            out[key] = torch.stack(means).mean() if means else torch.tensor(float("nan"))
        return out
