"""Evaluation: metrics as functions and accumulators."""

from diffmask.evaluation.metrics import SegmentationScores, compute_dice, compute_iou

__all__ = ["SegmentationScores", "compute_dice", "compute_iou"]
