"""The whole pipeline on data that is not a chest X-ray: fit -> generate -> attention masks -> train -> score.

Two phantoms of ``data=shapes`` (diffmask.data.ShapesSource), no licensed data: a three-class grey one
(organ + a lesion absent from a quarter of the images) and a two-class colour one (a lesion on a
textured, coloured background). Tiny models at 32 px: the wiring is what is tested, not the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.cli.test_cli import ENV
from tests.conftest import REPO


def _hydra_list(key: str, items: list[str]) -> str:
    return f"{key}=[" + ",".join(f"'{i}'" for i in items) + "]"


def _run_pipeline(tmp_path, data: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "diffmask.cli.pipeline", "experiment=pipeline_demo", "name=shp",
        f"paths.artifact_dir={tmp_path}/artifacts", f"paths.log_dir={tmp_path}/logs",
        "stages=[fit_diffusion,generate,evaluate_masks,train]",
        _hydra_list("common", ["data=shapes", "data.size=32", "data.num_workers=0", "trainer=cpu",
                               "trainer.enable_progress_bar=false", *data]),
        _hydra_list("fit_diffusion", [
            "diffusion.components.block_out_channels=[16,32]", "diffusion.components.attention_heads=2",
            "diffusion.components.norm_num_groups=8", "diffusion.components.layers_per_block=1",
            "diffusion.components.cross_attention_dim=32", "diffusion.components.text_hidden_size=32",
            "diffusion.components.text_intermediate_size=64", "diffusion.align.label_fraction=0.25",
            "data.batch_size=8", "trainer.max_steps=6"]),
        _hydra_list("generate", ["num_samples=6", "steps=3", "batch_size=6", "synthesis=attention_masks",
                                 "synthesis.refine=[threshold]"]),
        _hydra_list("evaluate_masks", ["model.affinity=null"]),
        # a 6-step generator's masks miss classes: train on them anyway (the wiring is what is tested)
        _hydra_list("train", ["data.real_fraction=0.25", "data.synthetic_count=6",
                              "data.synthetic_min_class_presence=null", "segmentation.net.channels=[8,16]",
                              "segmentation.net.strides=[2]", "trainer.max_epochs=1"]),
    ]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)


def _check_run(tmp_path, classes: list[str], channels: int) -> None:
    synth = tmp_path / "artifacts" / "synthesis" / "shp"
    made = json.loads((synth / "stage.json").read_text())
    assert made["status"] == "complete" and made["channels"] == channels
    assert set(made["class_presence"]) == set(classes[1:])
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    lesion = len(classes) - 1
    normal = [r for r in rows if r["meta"]["finding"] == "normal"]
    assert normal, "the drawn prompts should include lesion-free images (a quarter of the real ones)"
    for r in rows:
        image = np.asarray(Image.open(synth / r["file_name"]))
        assert image.shape == ((32, 32) if channels == 1 else (32, 32, 3))
        mask = np.asarray(Image.open(synth / r["sem_seg_file_name"]))
        assert mask.shape == (32, 32) and mask.max() < len(classes)
        # a normal image's prompt names no lesion: no token, no attention, no lesion pixel
        if r["meta"]["finding"] == "normal":
            assert "lesion" not in r["prompt"] and not (mask == lesion).any()
        else:
            assert "lesion" in r["prompt"]
    (invocation,) = (tmp_path / "logs" / "pipeline" / "shp").iterdir()
    metrics = json.loads((invocation / "train" / "metrics.json").read_text())
    for name in classes[1:]:
        for key in (f"test/shapes/iou_{name}", f"test/shapes/dice_{name}", f"test/shapes/agg_iou_{name}"):
            assert 0.0 <= metrics["metrics"][key] <= 1.0, key
    assert metrics["data"]["n_synthetic_train"] == 6
    assert "montgomery" not in json.dumps(metrics["test_sets"])  # the chest sets are the chest configs' alone


@pytest.mark.slow
def test_grey_three_class_phantom_runs_the_whole_pipeline(tmp_path):
    res = _run_pipeline(tmp_path, [])
    assert res.returncode == 0, res.stderr[-4000:]
    _check_run(tmp_path, ["background", "organ", "lesion"], channels=1)
    assert "masks/shapes/threshold/miou" in res.stdout + res.stderr


@pytest.mark.slow
def test_colour_two_class_phantom_runs_the_whole_pipeline(tmp_path):
    res = _run_pipeline(tmp_path, ["data.channels=3", "data.class_names=[background,lesion]"])
    assert res.returncode == 0, res.stderr[-4000:]
    _check_run(tmp_path, ["background", "lesion"], channels=3)
