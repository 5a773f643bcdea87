"""Segmentation stage: LightningModule and backbones (MONAI nets, TransUNet)."""

from diffmask.segmentation.module import SegmentationLitModule

__all__ = ["SegmentationLitModule"]
