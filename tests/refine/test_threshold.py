"""threshold_masks / ThresholdRefiner on known maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blob_images import iou, make_blob

from diffmask.refine import IGNORE_INDEX, ThresholdRefiner, class_levels, threshold_masks


def test_otsu_splits_a_bimodal_map():
    p = np.full((32, 32), 0.2, np.float32)
    p[8:20, 8:20] = 0.8
    low, high = class_levels(p, "otsu")
    assert low == high and 0.2 < low <= 0.8
    label, conf = threshold_masks(p[None])
    assert label.dtype == np.uint8 and label.shape == (32, 32)
    assert (label[8:20, 8:20] == 1).all() and label.sum() == 144
    assert conf[0] == pytest.approx(0.6, abs=1e-6)  # 0.8 inside minus 0.2 outside


@pytest.mark.parametrize("method", ["otsu", "mean_std", "peak_band"])
def test_blob_recovered_up_to_the_attention_offset(method):
    """Thresholding sees only the attention map, so it can recover the disk the map was blurred
    from (IoU >= 0.85: the blur only rounds the edge) but not undo the offset: against the true
    disk the bound is the overlap of the two disks (~0.54 here) minus a margin."""
    s = make_blob(0)
    label, conf = threshold_masks(torch.from_numpy(s["class_maps"]), method)
    ceiling = iou(s["attention_disk"], s["disk"])
    assert iou(label == 1, s["attention_disk"]) >= 0.85
    assert iou(label == 1, s["disk"]) >= ceiling - 0.1
    assert 0.3 < conf[0] <= 1


def test_ignore_band_marks_the_uncertain_ring():
    s = make_blob(1)
    label = ThresholdRefiner(method="otsu", ignore_band=0.2)({"class_maps": s["class_maps"]})["label"]
    ring = label == IGNORE_INDEX
    assert 0.05 < ring.mean() < 0.3
    core = s["class_maps"][0] > 0.9
    assert (label[core] == 1).all()
    assert (label[s["class_maps"][0] < 0.05] == 0).all()


def test_peak_band_keeps_min_fraction_on_each_side():
    p = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(1, 64, 64) ** 4  # mostly low values
    label, _ = threshold_masks(p, "peak_band", ignore_band=0.3, min_fraction=0.1)
    assert (label == 1).mean() >= 0.1 - 1e-3
    assert (label == 0).mean() >= 0.1 - 1e-3


def test_two_classes_take_the_stronger_map():
    p = np.zeros((2, 16, 16), np.float32)
    p[0, :, :8] = 1.0
    p[1, :, 6:] = 0.9
    label, conf = threshold_masks(p, "otsu")
    assert (label[:, :8] == 1).all() and (label[:, 8:] == 2).all()
    assert conf.shape == (2,) and (conf > 0).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="probs"):
        threshold_masks(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="probs"):
        threshold_masks(np.full((1, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="method"):
        ThresholdRefiner(method="kmeans")
    with pytest.raises(KeyError, match="class_maps"):
        ThresholdRefiner()({"image": np.zeros((8, 8))})
