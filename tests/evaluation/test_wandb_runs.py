"""W&B runs that compare: a tiny 2-run Hydra multirun logged offline, decoded from wandb's own run files.

wandb 0.31 writes no ``wandb-summary.json`` / ``config.yaml`` offline: everything is in the run's
``run-<id>.wandb`` transaction log (LevelDB log blocks of ``wandb.proto`` ``Record`` messages),
which :func:`read_offline_run` decodes.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from diffmask.evaluation.wandb_logging import name_overrides

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("left_lung", "right_lung", "heart")
# two runs differing in the labelled fraction; the seed is given (not swept) and must not name them
SWEEP = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0",
    "segmentation=unet", "segmentation.net.channels=[8,16]", "segmentation.net.strides=[2]",
    "segmentation.net.num_res_units=1",
    "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
    "logger=[csv,wandb]", "seed=5", "data.real_fraction=0.25,1.0",
]


def _records(path: Path) -> list[Any]:
    """The ``Record`` messages of a ``.wandb`` file: a 7-byte header, then 32 KiB blocks of chunks
    (crc32 4 bytes, length 2, type 1: full, first, middle, last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B transaction log"
    block, pos, parts, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            parts = chunk
        else:
            parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            out.append(record)
    return out


def _apply(target: dict, items, remove: bool = False) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if remove:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = json.loads(item.value_json)


def read_offline_run(save_dir: Path) -> dict[str, Any]:
    """The one offline W&B run under ``save_dir/wandb``: its run record fields, final config and
    summary, history rows and the files it logged (checked to exist)."""
    (log,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "files": []}
    for record in _records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(group=r.run_group, name=r.display_name, job_type=r.job_type, tags=list(r.tags))
            _apply(run["config"], r.config.update)
        elif kind == "config":
            _apply(run["config"], record.config.update)
            _apply(run["config"], record.config.remove, remove=True)
        elif kind == "summary":
            _apply(run["summary"], record.summary.update)
            _apply(run["summary"], record.summary.remove, remove=True)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item)
            run["history"].append(row)
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
    for name in run["files"]:
        assert (log.parent / "files" / name).is_file(), name
    return run


def test_name_keeps_what_varies_without_seeds_and_run_only_settings():
    given = ["seed=1", "data.seed=0", "data.real_fraction=0.5", "logger=[csv,wandb]", "data.num_workers=2",
             "segmentation=transunet", "trainer.max_epochs=40",
             "data.synthetic_dir=/x/artifacts/synthesis/px128"]
    assert name_overrides(given, {"seed", "data.real_fraction", "segmentation"}) == [
        "data.real_fraction=0.5", "segmentation=transunet"]
    # a single run: every override that changes the result, a path by its last two parts
    assert name_overrides(given) == ["data.real_fraction=0.5", "segmentation=transunet",
                                     "trainer.max_epochs=40", "data.synthetic_dir=synthesis/px128"]


def test_sweep_runs_share_a_group_and_log_best_val_test_scores_facts_and_media(tmp_path, monkeypatch):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    env.pop("DIFFMASK_WANDB_GROUP", None)
    cmd = [sys.executable, "-m", "diffmask.cli.train", "-m", *SWEEP, "hydra.sweep.dir=sweep",
           f"paths.log_dir={tmp_path / 'logs'}", f"paths.artifact_dir={tmp_path / 'artifacts'}"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = [read_offline_run(tmp_path / "sweep" / str(num)) for num in (0, 1)]

    # identity: one group (the sweep folder, relative to where it was launched), named by what varies
    assert {r["group"] for r in runs} == {"sweep"}
    assert [r["name"] for r in runs] == ["data.real_fraction=0.25", "data.real_fraction=1.0"]
    for num, r in enumerate(runs):
        assert r["job_type"] == "train"
        assert {"segmentation", "UNet", "phantom"} <= set(r["tags"])
        config = r["config"]
        assert config["job_num"] == num and config["run_group"] == "sweep"
        assert config["sweep_dir"] == str((tmp_path / "sweep").resolve())
        assert "seed=5" in config["overrides"] and config["data"]["size"] == 32  # the resolved Hydra config
        assert config["dataset"] == "phantom" and config["data_kind"] == "phantom"
        metrics = json.loads((tmp_path / "sweep" / str(num) / "metrics.json").read_text())
        assert metrics["run_group"] == "sweep"

        summary = r["summary"]
        # the best validation epoch, not the last
        val = [row["val/miou"] for row in r["history"] if "val/miou" in row]
        assert len(val) == 2 and summary["val/miou"] == {"max": pytest.approx(max(val))}
        val_heart = [row["val/iou_heart"] for row in r["history"] if "val/iou_heart" in row]
        assert summary["val/iou_heart"] == {"max": pytest.approx(max(val_heart))}
        # per test set and class, from the test metrics
        for cls in CLASSES:
            for m in ("iou", "dice"):
                key = f"test/phantom/{m}_{cls}"
                assert summary[key] == pytest.approx(metrics["metrics"][key])
        assert summary["data/real"] == "phantom"
        assert summary["data/n_real_train"] == metrics["data"]["n_real_train"] > 0
        assert summary["data/n_synthetic_train"] == 0
        assert summary["missing_test_sets"] == metrics["missing_test_sets"]
        assert "montgomery" in summary["missing_test_sets"]

        # media: prediction overlays (with both masks) and the per-image table
        images = summary["test/phantom/predictions"]
        assert images["_type"] == "images/separated" and images["count"] == 4
        assert set(images["all_masks"][0]) == {"prediction", "ground_truth"}
        table = summary["test/per_image"]
        assert table["_type"] == "table-file"
        files = next((tmp_path / "sweep" / str(num)).glob("wandb/offline-run-*/files"))
        with open(files / table["path"]) as f:
            logged = json.load(f)
        assert logged["columns"][:2] == ["set", "id"] and len(logged["data"]) == table["nrows"] > 0

    # diffmask-report --wandb-project: into the sweep's group, its path in the config, files under --out
    from diffmask.evaluation.report import write_report

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_report(tmp_path / "sweep", tmp_path / "report", wandb_project="diffmask-test")
    report = read_offline_run(tmp_path / "report")
    assert report["group"] == "sweep" and report["job_type"] == "report"
    assert report["config"]["sweep_dir"] == str((tmp_path / "sweep").resolve())
    assert report["config"]["n_runs"] == 2
    assert report["summary"]["results"]["_type"] == "table-file"


def test_generation_logs_a_grid_of_synthetic_pairs(tmp_path, model_dir, monkeypatch):
    """``diffmask-generate logger=wandb``: a generate run with the set's first pairs (mask overlays) and
    counts."""
    from diffmask.cli.generate import run
    from tests.conftest import compose_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    given = ["data=phantom", "data.size=32", f"input_dir={model_dir}", "steps=2", "batch_size=2",
             "num_samples=3", "synthesis.refine=[raw]"]
    assert run(compose_config("generate", [*given, "name=plain"], tmp_path / "plain"))["rows"] == 3
    assert not (tmp_path / "plain" / "wandb").exists()  # no logger: no W&B run
    logged_cfg = compose_config("generate", [*given, "name=px32", "logger=wandb"], tmp_path / "run")
    assert run(logged_cfg)["rows"] == 3
    logged = read_offline_run(tmp_path / "run")
    assert logged["job_type"] == "generate" and {"synthesis", "phantom"} <= set(logged["tags"])
    assert logged["config"]["output_dir"].endswith("synthesis/px32")
    pairs = logged["summary"]["synthesis/pairs"]
    assert pairs["count"] == 3 and set(pairs["all_masks"][0]) == {"ground_truth"}
    assert logged["summary"]["synthesis/rows"] == 3 and logged["summary"]["synthesis/made"] == 3
