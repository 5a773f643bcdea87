"""Segmentation metrics: per-image IoU/Dice as plain functions, plus a DDP-safe accumulator.

A class absent from an image's ground truth gives NaN for that image (not 0), so test sets that
lack a class (e.g. lungs-only sets) are scored on the classes they have.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["compute_iou", "compute_dice", "SegmentationScores"]


def _per_class_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None):
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    b = pred.shape[0]
    pred = pred.reshape(b, -1).long()
    target = target.reshape(b, -1).long()
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    classes = torch.arange(num_classes, device=pred.device)[None, :, None]  # (1, C, 1)
    p = (pred[:, None] == classes) & valid[:, None]  # (B, C, N)
    t = (target[:, None] == classes) & valid[:, None]
    inter = (p & t).sum(-1).float()
    return inter, p.sum(-1).float(), t.sum(-1).float()


def compute_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Per-image, per-class IoU.

    Args:
        pred: (B, H, W) or (B, 1, H, W) predicted class indices.
        target: same shape, ground-truth class indices; ``ignore_index`` pixels are skipped.
        num_classes: number of classes including background.

    Returns:
        (B, num_classes) float IoU; NaN where the class is absent from the ground truth.
    """
    inter, p, t = _per_class_counts(pred, target, num_classes, ignore_index)
    iou = inter / (p + t - inter).clamp_min(1)
    return torch.where(t > 0, iou, torch.full_like(iou, float("nan")))


def compute_dice(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255
) -> torch.Tensor:
    """Per-image, per-class Dice; same conventions as :func:`compute_iou`."""
    inter, p, t = _per_class_counts(pred, target, num_classes, ignore_index)
    dice = 2 * inter / (p + t).clamp_min(1)
    return torch.where(t > 0, dice, torch.full_like(dice, float("nan")))


class SegmentationScores(Metric):
    """Mean per-image IoU and Dice per class, accumulated over batches (and DDP ranks).

    ``compute()`` returns a flat dict: ``iou_<class>``, ``dice_<class>`` for every foreground
    class present in the data seen, plus ``miou`` and ``mdice`` (mean over those classes).
    """

    full_state_update = False

    def __init__(self, class_names: list[str] | tuple[str, ...], ignore_index: int | None = 255):
        super().__init__()
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        c = len(self.class_names)
        for name in ("iou_sum", "iou_count", "dice_sum", "dice_count"):
            self.add_state(name, default=torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        c = len(self.class_names)
        for prefix, fn in (("iou", compute_iou), ("dice", compute_dice)):
            scores = fn(pred, target, c, self.ignore_index).double()
            present = ~torch.isnan(scores)
            getattr(self, f"{prefix}_sum").add_(torch.where(present, scores, 0).sum(0))
            getattr(self, f"{prefix}_count").add_(present.sum(0).double())

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix in ("iou", "dice"):
            total, count = getattr(self, f"{prefix}_sum"), getattr(self, f"{prefix}_count")
            means = []
            for i, name in enumerate(self.class_names):
                if i == 0 or count[i] == 0:  # background is not scored; absent classes are skipped
                    continue
                value = (total[i] / count[i]).float()
                out[f"{prefix}_{name}"] = value
                means.append(value)
            key = "miou" if prefix == "iou" else "mdice"
            out[key] = torch.stack(means).mean() if means else torch.tensor(float("nan"))
        return out
