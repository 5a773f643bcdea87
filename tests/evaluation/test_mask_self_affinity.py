"""evaluate-masks with the self-attention affinity step on a tiny model (module and CLI)."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import pytorch_lightning as pl

from diffmask.attention import CrossAttentionStore, SelfAttentionStore
from diffmask.data import SegmentationDataModule
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import PhantomSource, chest_prompt_builder
from diffmask.evaluation.mask_quality import MaskQualityLitModule, attention_uniformity
from diffmask.refine import SelfAffinityRefiner, ThresholdRefiner

from ..conftest import compose_config, small_mask_run

CLASSES = ["left_lung", "right_lung", "heart"]


def test_module_scores_the_self_affinity_step():
    dm = SegmentationDataModule(
        PhantomSource(size=32, num_train=2, num_val=1, num_test=2), size=32, batch_size=2, num_workers=0
    )
    step = SelfAffinityRefiner(power=2, capture=functools.partial(SelfAttentionStore, grid=16))
    module = MaskQualityLitModule(
        tiny_scratch_components(32, seed=1),
        chest_prompt_builder(),
        functools.partial(CrossAttentionStore, upsample="bilinear"),
        {"threshold": ThresholdRefiner(), "self_affinity": step},
        timesteps=[100, 300],
    )
    pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    ).test(module, datamodule=dm)
    res = module.results
    for name in CLASSES:
        assert 0 <= res[f"masks/phantom/self_affinity/iou_{name}"] <= 1
    assert math.isfinite(res["masks/phantom/self_affinity/miou"])
    assert res["masks/phantom/self_affinity/capture_seconds_per_image"] > 0
    assert (
        res["masks/phantom/self_affinity/seconds_per_image"]
        > res["masks/phantom/self_affinity/capture_seconds_per_image"]
    )
    assert res["masks/phantom/self_affinity/degenerate"] in (0.0, 1.0)
    assert "masks/phantom/threshold/capture_seconds_per_image" not in res
    assert 0 < res["masks/phantom/self_affinity/attention_uniformity"] <= 1


def test_attention_uniformity_tells_local_from_uniform_attention():
    n = 16
    uniform = np.full((1, n, n), 1.0 / n)
    local = np.eye(n)[None] * 0.9 + 0.1 / n
    scores = attention_uniformity(np.concatenate([uniform, local]))
    assert scores[0] == pytest.approx(1.0) and scores[1] < 0.3


def test_evaluate_masks_cli_with_the_self_affinity_step(tmp_path, model_dir, real_dir):
    from diffmask.cli.evaluate_masks import run

    cfg = compose_config(
        "evaluate_masks",
        [
            *small_mask_run(model_dir, real_dir),
            "model.affinity=null",
            "model.refiners.densecrf.iterations=2",
            "model.store.upsample=bilinear",
            "+refine@model.refiners.self_affinity=self_affinity",
            "model.refiners.self_affinity.power=3",
            "model.refiners.self_affinity.capture.grid=8",
        ],
        tmp_path / "run",
    )
    metrics = run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in CLASSES:
        assert written["metrics"][f"masks/jsrt/self_affinity/iou_{name}"] == pytest.approx(
            metrics[f"masks/jsrt/self_affinity/iou_{name}"]
        )
    rows = (tmp_path / "run" / "per_image_masks.csv").read_text().splitlines()
    assert sum(",self_affinity," in r for r in rows) == 2
    assert isinstance(written["degenerate_steps"], dict)
