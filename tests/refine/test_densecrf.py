"""densecrf_refine / DenseCRFRefiner / ParallelRefiner on a known blob."""

from __future__ import annotations

import numpy as np
import pytest
from blob_images import iou, make_blob

from diffmask.refine import (
    DenseCRFRefiner,
    ParallelRefiner,
    RefinementChain,
    ThresholdRefiner,
    densecrf_refine,
)


def test_crf_snaps_offset_attention_to_the_blob():
    """The disk differs from the background by 0.5 (127 grey levels) against noise of std 0.08
    (~20 levels), so the bilateral kernel (srgb 13) sees its edge clearly: the CRF should move
    the offset attention (IoU ~0.54 with the disk) onto the disk itself, IoU >= 0.9."""
    for seed in range(2):
        s = make_blob(seed)
        out = DenseCRFRefiner()(s)
        assert out["label"].dtype == np.uint8 and out["label"].shape == s["disk"].shape
        assert out["crf_posterior"].shape == (2, 64, 64)
        np.testing.assert_allclose(out["crf_posterior"].sum(axis=0), 1.0, atol=1e-4)
        raw = iou(s["class_maps"][0] >= 0.5, s["disk"])
        assert iou(out["label"] == 1, s["disk"]) >= 0.9 > raw + 0.2


def test_chain_threshold_then_crf():
    s = make_blob(2)
    chain = RefinementChain(
        {"threshold": ThresholdRefiner(ignore_band=0.1), "densecrf": DenseCRFRefiner(), "off": None}
    )
    out = chain(s)
    assert chain.names == ["threshold", "densecrf"]
    assert "confidence" in out and iou(out["label"] == 1, s["disk"]) >= 0.9


def test_parallel_workers_match_in_process_and_keep_order():
    samples = [make_blob(seed, size=48) for seed in range(4)]
    refiner = DenseCRFRefiner(iterations=5)
    expected = [refiner(s)["label"] for s in samples]
    with ParallelRefiner(refiner, num_workers=2, mp_context="spawn") as pool:
        got = [o["label"] for o in pool.map(samples)]
        again = [o["label"] for o in pool.map(samples[:2])]  # the pool is reused
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    np.testing.assert_array_equal(again[1], expected[1])
    inline = [o["label"] for o in ParallelRefiner(refiner, num_workers=0).map(samples)]
    np.testing.assert_array_equal(inline[3], expected[3])


def test_bad_input_is_rejected():
    img = np.zeros((16, 16), np.uint8)
    with pytest.raises(ValueError, match="differs from the image"):
        densecrf_refine(img, np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="background first"):
        densecrf_refine(img, np.ones((1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="background"):
        DenseCRFRefiner(background=1.5)
    with pytest.raises(ValueError, match="num_workers"):
        ParallelRefiner(DenseCRFRefiner(), num_workers=-1)


def test_reference_size_scales_the_spatial_kernels_with_the_image():
    """sxy given at reference_size is the same CRF as sxy * S / reference_size given in pixels."""
    s = make_blob(1)  # 64 px
    scores = np.concatenate([1 - s["class_maps"], s["class_maps"]])
    scaled = densecrf_refine(s["image"], scores, gaussian_sxy=12, bilateral_sxy=320, reference_size=256)
    plain = densecrf_refine(s["image"], scores, gaussian_sxy=3, bilateral_sxy=80)
    np.testing.assert_allclose(scaled, plain, atol=1e-5)
    # the blob is still recovered with the AffinityNet kernels read at 512 px (bilateral 10 px here)
    out = DenseCRFRefiner(reference_size=512)(s)
    assert iou(out["label"] == 1, s["disk"]) >= 0.85
    with pytest.raises(ValueError, match="reference_size"):
        DenseCRFRefiner(reference_size=0)


def test_prior_weight_refines_the_previous_steps_label_map():
    """On a flat image (no edges to snap to) and weak pairwise terms the CRF follows its unaries:
    with the attention alone it keeps the offset disk; with an earlier step's correct label map
    as prior it keeps that. (With the default compat 10 / 3 a flat image loses the disk
    altogether: the smoothness terms win, which is what low-contrast anatomy risks.)"""
    s = make_blob(0)
    s["image"] = np.full_like(s["image"], 128)
    s["label"] = s["disk"].astype(np.uint8)
    weak = dict(reference_size=512, gaussian_compat=1.0, bilateral_compat=1.0)
    alone = DenseCRFRefiner(**weak)(dict(s))
    guided = DenseCRFRefiner(prior_weight=0.8, **weak)(dict(s))
    assert iou(alone["label"] == 1, s["disk"]) < 0.6 < iou(alone["label"] == 1, s["attention_disk"])
    assert iou(guided["label"] == 1, s["disk"]) >= 0.95
    # unsure prior pixels (255) fall back to the attention
    unsure = dict(s, label=np.full_like(s["label"], 255))
    np.testing.assert_array_equal(DenseCRFRefiner(prior_weight=0.8, **weak)(unsure)["label"], alone["label"])
    # first in a chain (no earlier label map) it is the attention-only CRF
    first = DenseCRFRefiner(prior_weight=0.8, **weak)({"image": s["image"], "class_maps": s["class_maps"]})
    np.testing.assert_array_equal(first["label"], alone["label"])
    with pytest.raises(ValueError, match="prior_weight"):
        DenseCRFRefiner(prior_weight=1.0)
    with pytest.raises(ValueError, match="prior: expected an"):
        densecrf_refine(
            s["image"], np.ones((2, 64, 64), np.float32), prior=np.zeros((8, 8)), prior_weight=0.5
        )


def test_crf_on_an_rgb_image_uses_its_colours():
    """A red disk on green of the same luminance: the RGB appearance kernel sees the disk's edge,
    the grey (luminance) image does not, so only the colour CRF snaps the offset attention onto it."""
    from blob_images import make_colour_blob

    for seed in range(2):
        s = make_colour_blob(seed)
        colour = DenseCRFRefiner()(s)
        grey = DenseCRFRefiner()({**s, "image": s["luminance"]})
        assert colour["label"].shape == (64, 64) and colour["crf_posterior"].shape == (2, 64, 64)
        assert iou(colour["label"] == 1, s["disk"]) >= 0.9 > iou(grey["label"] == 1, s["disk"]) + 0.1
        # channel-first floats in [0, 1] are the same guidance
        chw = np.moveaxis(s["image"], -1, 0).astype(np.float32) / 255
        np.testing.assert_array_equal(
            densecrf_refine(chw, np.concatenate([1 - s["class_maps"], s["class_maps"]])),
            densecrf_refine(s["image"], np.concatenate([1 - s["class_maps"], s["class_maps"]])),
        )
