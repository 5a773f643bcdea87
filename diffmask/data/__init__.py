"""Data: sample sources (image folders, manifest folders, the shapes phantom), datasets, augmentation,
datamodule. The chest X-ray sources (JSRT, the chest phantom) are in :mod:`diffmask.domains.chest`."""

from diffmask.data.datamodule import SegmentationDataModule, collate_samples, select_fraction
from diffmask.data.dataset import SegmentationDataset
from diffmask.data.manifest import ManifestRow, read_manifest, write_manifest
from diffmask.data.shapes import ShapesSource
from diffmask.data.sources import (
    FolderSource,
    ManifestSource,
    Sample,
    SampleSource,
    open_test_set,
)

__all__ = [
    "SegmentationDataModule",
    "SegmentationDataset",
    "collate_samples",
    "select_fraction",
    "ManifestRow",
    "read_manifest",
    "write_manifest",
    "FolderSource",
    "ManifestSource",
    "ShapesSource",
    "Sample",
    "SampleSource",
    "open_test_set",
]
