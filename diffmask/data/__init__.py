"""Data: sample sources (JSRT, manifest folders, phantom), datasets, augmentation, datamodule."""

from diffmask.data.datamodule import SegmentationDataModule, collate_samples, select_fraction
from diffmask.data.dataset import SegmentationDataset
from diffmask.data.manifest import ManifestRow, read_manifest, write_manifest
from diffmask.data.shapes import ShapesSource
from diffmask.data.sources import (
    FolderSource,
    JSRTSource,
    ManifestSource,
    PhantomSource,
    Sample,
    SampleSource,
    auto_source,
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
    "JSRTSource",
    "ManifestSource",
    "PhantomSource",
    "ShapesSource",
    "Sample",
    "SampleSource",
    "auto_source",
    "open_test_set",
]
