"""The package is a package: a wheel built from the checkout carries its configs and runs outside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import REPO


def test_wheel_runs_a_stage_without_the_checkout(tmp_path):
    source, dist, site, work = (tmp_path / d for d in ("source", "dist", "site", "work"))
    work.mkdir()
    source.mkdir()
    # built from a copy: setuptools writes build/ into the tree it builds
    for name in ("pyproject.toml", "README.md", "conf", "diffmask"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        kwargs = (
            {"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
            if copy is shutil.copytree
            else {}
        )
        copy(REPO / name, source / name, **kwargs)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("diffmask-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = {n for n in names if n.startswith("diffmask/conf/") and n.endswith(".yaml")}
    assert {"diffmask/conf/train.yaml", "diffmask/conf/data/phantom.yaml",
            "diffmask/conf/experiment/pipeline_demo.yaml"} <= configs
    assert len(configs) == len(list((REPO / "conf").rglob("*.yaml")))

    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # the wheel's copy comes first on the path; the checkout is neither the working folder nor on the path
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import diffmask.config as c; print(c.CONFIG_PATH)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve())

    res = subprocess.run(
        [str(site / "bin" / "diffmask-train"), "data=phantom", "data.size=32", "data.batch_size=4",
         "data.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         "segmentation.net.channels=[8,16,32]", "segmentation.net.strides=[2,2]",
         f"paths.log_dir={work}/logs", f"paths.artifact_dir={work}/artifacts"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (metrics,) = (work / "logs").glob("train/runs/*/metrics.json")
    assert "test/phantom/miou" in json.loads(metrics.read_text())["metrics"]
    out = res.stdout + res.stderr
    assert f"{REPO}/diffmask/" not in out and f"{REPO}/conf" not in out
