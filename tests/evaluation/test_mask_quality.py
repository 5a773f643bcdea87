"""Mask quality on real images: tiny model, 2 phantom / JSRT test images, every refinement step."""

from __future__ import annotations

import functools
import json
import math

import pytest
import pytorch_lightning as pl
import torch

from diffmask.attention import CrossAttentionStore
from diffmask.data import SegmentationDataModule
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import PhantomSource, chest_prompt_builder
from diffmask.evaluation.mask_quality import MaskQualityLitModule
from diffmask.refine import AffinityBackbone, AffinityRefiner, DenseCRFRefiner, ThresholdRefiner
from diffmask.refine.raw import RawAttentionRefiner, raw_attention_labels

from ..conftest import compose_config, small_mask_run

STEP_NAMES = ["raw", "threshold", "densecrf", "affinity"]
CLASSES = ["left_lung", "right_lung", "heart"]


def tiny_affinity() -> AffinityRefiner:
    return AffinityRefiner(AffinityBackbone(channels=(8, 16), feature_dim=8), radius=3, t=4)


def test_raw_refiner_step_matches_the_function():
    maps = torch.tensor([[[0.9, 0.1]], [[0.2, 0.2]]])
    out = RawAttentionRefiner(threshold=0.3)({"class_maps": maps.numpy()})
    assert out["label"].tolist() == [[1, 0]] and out["confidence"][0] > 0


def test_raw_attention_labels():
    maps = torch.tensor([[[[0.9, 0.1]], [[0.2, 0.2]]]])  # (1, 2, 1, 2)
    assert raw_attention_labels(maps, 0.3).tolist() == [[[1, 0]]]


def test_module_scores_every_step_on_two_phantom_images():
    dm = SegmentationDataModule(PhantomSource(size=32, num_train=2, num_val=1, num_test=2), size=32,
                                batch_size=2, num_workers=0)
    module = MaskQualityLitModule(
        tiny_scratch_components(32, seed=1),
        chest_prompt_builder(),
        functools.partial(CrossAttentionStore, upsample="bilinear"),
        {
            "threshold": ThresholdRefiner(ignore_band=0.1),
            "densecrf": DenseCRFRefiner(iterations=2, reference_size=512),
        },
        affinity=tiny_affinity(),
        timesteps=[100, 300],
        affinity_steps=2,
        affinity_batch_size=2,
    )
    pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).test(module, datamodule=dm)
    res = module.results
    for step in STEP_NAMES:
        for name in CLASSES:
            assert 0 <= res[f"masks/phantom/{step}/iou_{name}"] <= 1, (step, name)
        assert math.isfinite(res[f"masks/phantom/{step}/miou"])
        assert res[f"masks/phantom/{step}/seconds_per_image"] > 0
    assert res["masks/phantom/affinity/train_seconds"] > 0
    # one row per image and step, whose IoUs average to the step's per-image mean
    rows = [r for r in module.per_image if r["step"] == "threshold"]
    assert sorted(r["id"] for r in rows) == ["test0000", "test0001"] and len(module.per_image) == 2 * len(
        STEP_NAMES
    )
    for name in CLASSES:
        assert sum(r[f"iou_{name}"] for r in rows) / 2 == pytest.approx(
            res[f"masks/phantom/threshold/iou_{name}"], abs=1e-6
        )
        assert all(r[f"true_{name}"] > 0 for r in rows)
    with pytest.raises(ValueError, match="timesteps"):
        MaskQualityLitModule(
            tiny_scratch_components(32), chest_prompt_builder(), CrossAttentionStore, timesteps=[1000]
        )


def test_evaluate_masks_cli_on_two_jsrt_test_images_writes_metrics(tmp_path, model_dir, real_dir):
    from diffmask.cli.evaluate_masks import run

    # JSRT's own test split (or the phantom folder's) only, limited to 1 batch of 2 images; no other
    # hospital's folder, whether or not ../shared/data/montgomery is on this machine
    cfg = compose_config(
        "evaluate_masks",
        [
            *small_mask_run(model_dir, real_dir),
            "model.affinity_steps=2",
            "model.affinity_batch_size=2",
            "model.refiners.densecrf.iterations=2",
            "model.affinity.t=4",
            "model.affinity.radius=3",
            "model.affinity.backbone.channels=[8,16]",
            "model.affinity.backbone.feature_dim=8",
            "model.store.upsample=bilinear",
            "data.intensity=equalize",
        ],
        tmp_path / "run",
    )
    metrics = run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # size and intensity normalisation are the model's, whatever data.* says
    trained_on = json.loads((model_dir / "diffmask.json").read_text()).get(
        "intensity", "raw"
    )  # older exports: raw
    assert (
        written["size"] == 32
        and written["test_sets"] == ["jsrt"]
        and written["intensity"] == trained_on == "raw"
    )
    per_image = (tmp_path / "run" / "per_image_masks.csv").read_text().splitlines()
    assert per_image[0].startswith("set,id,step,iou_") and len(per_image) == 1 + 2 * len(STEP_NAMES)
    for step in STEP_NAMES:
        for name in CLASSES:
            assert 0 <= metrics[f"masks/jsrt/{step}/iou_{name}"] <= 1
            assert written["metrics"][f"masks/jsrt/{step}/iou_{name}"] == pytest.approx(
                metrics[f"masks/jsrt/{step}/iou_{name}"]
            )


def test_affinity_variants_walk_the_one_fitted_net_and_score_each_walk():
    dm = SegmentationDataModule(PhantomSource(size=32, num_train=2, num_val=1, num_test=2), size=32,
                                batch_size=2, num_workers=0)
    module = MaskQualityLitModule(
        tiny_scratch_components(32, seed=1), chest_prompt_builder(), CrossAttentionStore,
        {"threshold": ThresholdRefiner()}, affinity=tiny_affinity(), affinity_steps=2, affinity_batch_size=2,
        affinity_variants=[{"t": 1}, {"t": 2, "walk_background": False}],
    )
    assert module.step_names == ["raw", "threshold", "affinity", "affinity_t1", "affinity_t2_fg"]
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
               enable_model_summary=False).test(module, datamodule=dm)
    res = module.results
    assert all(math.isfinite(res[f"masks/phantom/{s}/miou"]) for s in module.step_names)
    assert "masks/phantom/affinity_t1/train_seconds" not in res  # one fit, several walks
    rows = {(r["step"], r["id"]): r for r in module.per_image}
    assert {s for s, _ in rows} == set(module.step_names)
    with pytest.raises(ValueError, match="affinity_variants"):
        MaskQualityLitModule(tiny_scratch_components(32), chest_prompt_builder(), CrossAttentionStore,
                             affinity_variants=[{"t": 2}])
    with pytest.raises(ValueError, match="affinity_variants"):
        MaskQualityLitModule(tiny_scratch_components(32), chest_prompt_builder(), CrossAttentionStore,
                             affinity=tiny_affinity(), affinity_variants=[{"t": 0}])
