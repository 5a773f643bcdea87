"""Entry points as a user runs them: --cfg job, bad config, multirun, 2-process CPU DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    "data.size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
]


def _train(args, tmp_path, timeout=600):
    cmd = [sys.executable, "-m", "diffmask.cli.train", *args, f"paths.log_dir={tmp_path}/logs"]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_cfg_job_prints_resolved_config(tmp_path):
    res = _train(["--cfg", "job", "--resolve", "data=phantom", "segmentation=transunet"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "diffmask.segmentation.transunet.TransUNet" in res.stdout
    assert "out_channels: 4" in res.stdout and "img_size: 128" in res.stdout


def test_wrong_group_option_fails_clearly(tmp_path):
    res = _train(["segmentation=nosuchnet"], tmp_path)
    assert res.returncode != 0
    assert "Could not find 'segmentation/nosuchnet'" in res.stderr
    assert "transunet" in res.stderr  # Hydra lists the available options


def test_missing_required_field_fails_clearly(tmp_path):
    res = _train(["data=phantom", "~data.real", *TINY], tmp_path)
    assert res.returncode != 0
    assert "real" in res.stderr and "missing" in res.stderr.lower()


@pytest.mark.slow
def test_multirun_gives_one_metrics_file_per_job(real_dir, tmp_path):
    from diffmask.domains.chest import JSRTSource

    # 9 and 17 real training images: 5 % and 10 % of JSRT's 173 (the same counts of a phantom folder)
    n = len(JSRTSource(real_dir).ids("train"))
    res = _train(
        ["-m", "segmentation=unet,transunet", f"data.real_fraction={9 / n},{17 / n}",
         f"paths.jsrt_dir={real_dir}", *TINY],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted((tmp_path / "logs").glob("train/multiruns/*/*/metrics.json"))
    assert len(files) == 4, files
    metrics = [json.loads(f.read_text()) for f in files]
    seen = {(m["backbone"].rsplit(".", 1)[-1], m["data"]["n_real_train"]) for m in metrics}
    assert seen == {("UNet", 9), ("UNet", 17), ("TransUNet", 9), ("TransUNet", 17)}


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    res = _train(
        ["data=phantom", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "segmentation.net.channels=[8,16,32]", "segmentation.net.strides=[2,2]", *TINY],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "GLOBAL_RANK: 1" in out or "distributed_backend=gloo" in out
    files = list((tmp_path / "logs").glob("train/runs/*/metrics.json"))
    assert len(files) == 1
    assert "test/phantom/miou" in json.loads(files[0].read_text())["metrics"]
