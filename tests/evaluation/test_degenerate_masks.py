"""A degenerate refinement step is reported as a failure (metrics, metrics.json, log), not as a figure."""

from __future__ import annotations

import json
import logging

import torch

from diffmask.evaluation.mask_quality import degenerate_steps
from diffmask.evaluation.mask_stage import summary_lines

from ..conftest import compose_config, small_mask_run

CLASSES = ("background", "left_lung", "right_lung", "heart")


def test_a_vanished_class_and_a_halved_miou_are_degenerate():
    target = torch.tensor([0.0, 10, 10, 5])
    steps = ["raw", "threshold", "affinity"]
    pred = {
        "raw": torch.tensor([5.0, 8, 9, 4]),
        "threshold": torch.tensor([5.0, 8, 9, 4]),
        "affinity": torch.tensor([9.0, 12, 11, 0]),
    }
    miou = {"raw": 0.5, "threshold": 0.6, "affinity": 0.25}
    found = degenerate_steps(steps, miou, pred, dict.fromkeys(steps, target), CLASSES)
    assert list(found) == ["affinity"]
    assert found["affinity"][0] == "heart absent from every mask"
    assert "below half of its input step threshold's 0.6000" in found["affinity"][1]
    # a class no real mask holds may be absent; NaN and a zero input are not compared
    no_heart = torch.tensor([0.0, 10, 10, 0])
    assert (
        degenerate_steps(
            ["raw", "x"],
            {"raw": 0.0, "x": float("nan")},
            {"raw": no_heart, "x": no_heart},
            {"raw": no_heart, "x": no_heart},
            CLASSES,
        )
        == {}
    )


def test_the_summary_marks_a_degenerate_row():
    lines = summary_lines(
        {"masks/jsrt/affinity/miou": 0.0, "masks/jsrt/raw/miou": 0.41, "masks/jsrt/raw/iou_heart": 0.3},
        {"masks/jsrt/affinity": ["heart absent from every mask"]},
    )
    assert lines == [
        (logging.WARNING, "masks/jsrt/affinity/miou = 0.0000  DEGENERATE: heart absent from every mask"),
        (logging.INFO, "masks/jsrt/raw/miou = 0.4100"),
    ]


def test_evaluate_masks_flags_a_step_that_empties_every_mask(tmp_path, model_dir, real_dir, caplog):
    from diffmask.cli.evaluate_masks import run

    # a threshold no class map reaches (mean + 1000 sd): every mask is background
    cfg = compose_config(
        "evaluate_masks",
        [
            *small_mask_run(model_dir, real_dir),
            "model.affinity=null",
            "model.refiners.densecrf=null",
            "+refine@model.refiners.empty=threshold",
            "model.refiners.empty.method=mean_std",
            "model.refiners.empty.k=1000",
            "model.store.upsample=bilinear",
        ],
        tmp_path / "run",
    )
    with caplog.at_level(logging.INFO):
        metrics = run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        metrics["masks/jsrt/empty/degenerate"] == 1.0
        and written["metrics"]["masks/jsrt/empty/degenerate"] == 1.0
    )
    reasons = written["degenerate_steps"]["masks/jsrt/empty"]
    assert "left_lung absent from every mask" in reasons and "heart absent from every mask" in reasons
    assert written["metrics"]["masks/jsrt/raw/degenerate"] in (0.0, 1.0)  # every step carries the flag
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("masks/jsrt/empty is DEGENERATE" in m for m in warned)
    assert any(m.startswith("masks/jsrt/empty/miou = 0.0000  DEGENERATE: left_lung absent") for m in warned)
    assert not any(
        m.startswith("masks/jsrt/empty/miou")
        for m in (r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    )
