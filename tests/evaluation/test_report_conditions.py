"""diffmask-report groups runs by their effective settings (``.hydra/config.yaml``), not by how
their command lines were written; copies count once; n is shown; plots say what they show."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import shutil

import pytest
import yaml

from diffmask.cli.report import main
from diffmask.evaluation.report import collect_runs, plot_figures, summarise, write_report

UNET = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2]}
TRANSUNET = {"_target_": "diffmask.segmentation.nets.TransUNet", "img_size": "${data.size}", "patch_size": 16}


def _config(seed: int, real_fraction: float = 0.1, net: dict | None = None, logger: str | None = "csv",
            num_workers: int = 2, max_epochs: int = 20, progress_bar: bool = True) -> dict:
    """A trimmed diffmask-train composed config, as Hydra saves it (interpolations unresolved)."""
    return {
        "task_name": "train", "tags": ["segmentation"], "seed": seed, "train": True, "test": True,
        "ckpt_path": None, "optimized_metric": "val/miou",
        "paths": {"log_dir": "${oc.env:DIFFMASK_LOGS,logs}", "output_dir": "${hydra:runtime.output_dir}"},
        "data": {"_target_": "diffmask.data.SegmentationDataModule", "size": 64, "batch_size": 8,
                 "real_fraction": real_fraction, "synthetic_dir": None, "num_workers": num_workers, "seed": 0,
                 "augment": {"_target_": "diffmask.data.transforms.build_augmentation",
                             "size": "${data.size}"}},
        "segmentation": {"_target_": "diffmask.segmentation.SegmentationLitModule",
                         "net": copy.deepcopy(net or UNET),
                         "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.002},
                         "init_weights": None},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "default_root_dir": "${paths.output_dir}",
                    "max_epochs": max_epochs, "accelerator": "cpu", "enable_progress_bar": progress_bar,
                    "log_every_n_steps": 10},
        "logger": {} if logger is None else {logger: {"_target_": f"pytorch_lightning.loggers.{logger}",
                                                      "save_dir": "${paths.output_dir}"}},
        "callbacks": {"model_checkpoint": {"_target_": "pytorch_lightning.callbacks.ModelCheckpoint",
                                           "dirpath": "${paths.output_dir}/checkpoints",
                                           "monitor": "val/miou"},
                      "lr_monitor": {"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"}},
    }


def _run(folder, config: dict | None, overrides: list[str], miou: float, backbone: str = "UNet",
         real_fraction: float = 0.1, seed: int = 0, extra: dict | None = None):
    """A finished run folder: ``metrics.json`` and (unless ``config`` is None) ``.hydra/config.yaml``."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "metrics.json").write_text(json.dumps({
        "metrics": {"test/jsrt/miou": miou, "test/jsrt/iou_heart": miou - 0.05,
                    "test/jsrt/dice_heart": miou + 0.03},
        "data": {"real": "jsrt", "real_fraction": real_fraction, "n_real_train": int(173 * real_fraction),
                 "n_synthetic_train": 0, "synthetic_dir": None},
        "backbone": f"x.{backbone}", "seed": seed, "overrides": [*overrides, f"seed={seed}"], **(extra or {}),
    }))
    return folder


def _mixed_sweep(root):
    """12 runs, 4 real conditions; the command lines differ in logger, data.num_workers, progress bar
    and in writing the default 'segmentation=unet' out (the override-based grouping gave 9 rows)."""
    # UNet at 10 % real: csv logger, W&B logger, num_workers=0 with segmentation=unet written out
    _run(root / "a0", _config(0), ["data.real_fraction=0.1"], 0.70, seed=0)
    _run(root / "a1", _config(1, logger="wandb"), ["data.real_fraction=0.1", "logger=wandb"], 0.72, seed=1)
    _run(root / "a2", _config(2, num_workers=0),
         ["segmentation=unet", "data.real_fraction=0.1", "data.num_workers=0"], 0.74, seed=2)
    # UNet at 100 % real: no logger, progress bar off, both
    _run(root / "b0", _config(0, 1.0, logger=None), ["data.real_fraction=1.0", "logger=null"], 0.90,
         real_fraction=1.0)
    _run(root / "b1", _config(1, 1.0, progress_bar=False),
         ["data.real_fraction=1.0", "trainer.enable_progress_bar=false"], 0.92, real_fraction=1.0, seed=1)
    _run(root / "b2", _config(2, 1.0, logger=None, progress_bar=False),
         ["logger=null", "data.real_fraction=1.0", "trainer.enable_progress_bar=false"], 0.94,
         real_fraction=1.0, seed=2)
    # TransUNet at 100 % real, 3 seeds, one with num_workers=0
    for seed, miou in [(0, 0.86), (1, 0.88)]:
        _run(root / f"t{seed}", _config(seed, 1.0, TRANSUNET),
             ["segmentation=transunet", "data.real_fraction=1.0"], miou, "TransUNet", 1.0, seed)
    _run(root / "t2", _config(2, 1.0, TRANSUNET, num_workers=0),
         ["segmentation=transunet", "data.real_fraction=1.0", "data.num_workers=0"], 0.90, "TransUNet",
         1.0, 2)
    # UNet at 100 % real trained for 40 epochs: the trainer's settings are a result's, not run-only
    for seed, miou in [(0, 0.93), (1, 0.95)]:
        _run(root / f"e{seed}", _config(seed, 1.0, max_epochs=40, logger="wandb"),
             ["data.real_fraction=1.0", "trainer.max_epochs=40", "logger=wandb"], miou, real_fraction=1.0,
             seed=seed)
    _run(root / "e2", _config(2, 1.0, max_epochs=40, num_workers=0),
         ["data.real_fraction=1.0", "trainer.max_epochs=40", "data.num_workers=0"], 0.97, real_fraction=1.0,
         seed=2)


def _table(markdown: str) -> list[list[str]]:
    """The cells of report.md's results table (header first)."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")]
            for line in rows if not line.startswith("| ---")]


def test_runs_differing_only_in_run_only_overrides_make_one_row_per_condition(tmp_path):
    _mixed_sweep(tmp_path / "sweep")
    # grouped by their overrides less the seed, as before, the 12 runs made 10 "conditions"
    overrides = [json.loads(p.read_text())["overrides"] for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert len({" ".join(sorted(o for o in run if not o.startswith("seed="))) for run in overrides}) == 10
    runs, _ = collect_runs(tmp_path / "sweep")
    names, rows = summarise(runs)
    assert len(rows) == 4 and sorted(r["n_runs"] for r in rows) == [3, 3, 3, 3]
    by_label = {r["condition"]: r for r in rows}
    # named by the settings that vary only; a backbone by its class, not by each of its net's keys
    assert set(by_label) == {
        "data.real_fraction=0.1, segmentation.net=UNet, trainer.max_epochs=20",
        "data.real_fraction=1.0, segmentation.net=UNet, trainer.max_epochs=20",
        "data.real_fraction=1.0, segmentation.net=TransUNet, trainer.max_epochs=20",
        "data.real_fraction=1.0, segmentation.net=UNet, trainer.max_epochs=40",
    }
    low = by_label["data.real_fraction=0.1, segmentation.net=UNet, trainer.max_epochs=20"]
    assert low["test/jsrt/miou"] == pytest.approx(0.72) and low["test/jsrt/miou_std"] == pytest.approx(0.02)
    assert low["condition_from"] == "config" and low["duplicates"] == {} and low["unset"] == []
    # the CSV has a column per varying setting (the net's own keys included), none for run-only ones
    written = write_report(tmp_path / "sweep", tmp_path / "out")
    header = next(csv.reader(io.StringIO(written["csv"].read_text())))
    assert {"data.real_fraction", "segmentation.net._target_", "segmentation.net.channels",
            "trainer.max_epochs"} <= set(header)
    run_only = ("logger", "data.num_workers", "trainer.enable_progress_bar", "seed")
    assert not [h for h in header if h.startswith(run_only)]
    md = written["markdown"].read_text()
    table = _table(md)
    assert len(table) == 5 and [row[table[0].index("n")] for row in table[1:]] == ["3"] * 4
    assert "12 runs, 4 conditions" in md
    assert "`data.real_fraction`, `segmentation.net._target_`, `segmentation.net.channels`" in md


def test_a_run_without_a_hydra_config_falls_back_to_its_overrides_with_a_warning(tmp_path, caplog):
    _run(tmp_path / "sweep" / "cfg0", _config(0), ["data.real_fraction=0.1"], 0.70)
    _run(tmp_path / "sweep" / "cfg1", _config(1, logger="wandb"), ["data.real_fraction=0.1", "logger=wandb"],
         0.72, seed=1)
    _run(tmp_path / "sweep" / "old", None, ["data.real_fraction=0.1", "logger=wandb", "data.num_workers=0"],
         0.74, seed=2)
    with caplog.at_level(logging.WARNING, logger="diffmask.evaluation.report"):
        runs, _ = collect_runs(tmp_path / "sweep")
    assert "1 run folder(s) without .hydra/config.yaml" in caplog.text and "old" in caplog.text
    _, rows = summarise(runs)
    fallback = next(r for r in rows if r["condition_from"] == "overrides")
    # the old condition less run-only overrides: the logger and the worker count no longer split it
    assert fallback["condition"] == "data.real_fraction=0.1" and fallback["n_runs"] == 1
    assert next(r for r in rows if r["condition_from"] == "config")["n_runs"] == 2
    md = write_report(tmp_path / "sweep")["markdown"].read_text()
    assert "1 run(s) without `.hydra/config.yaml` are grouped by their command-line overrides" in md


def test_a_sweep_copied_twice_into_the_folder_counts_once_with_a_warning(tmp_path, caplog):
    for seed, miou in [(0, 0.80), (1, 0.84)]:
        _run(tmp_path / "sweep" / "first" / f"seed{seed}", _config(seed), ["data.real_fraction=0.1"], miou,
             seed=seed)
    shutil.copytree(tmp_path / "sweep" / "first", tmp_path / "sweep" / "second")
    # the copy of seed 1 is a rerun with another score, written later: the newest metrics.json is kept
    rerun = tmp_path / "sweep" / "second" / "seed1" / "metrics.json"
    rerun.write_text(rerun.read_text().replace("0.84", "0.86"))
    os.utime(rerun, (1e9 + 100, 1e9 + 100))
    os.utime(tmp_path / "sweep" / "first" / "seed1" / "metrics.json", (1e9, 1e9))
    with caplog.at_level(logging.WARNING, logger="diffmask.evaluation.report"):
        runs, _ = collect_runs(tmp_path / "sweep")
    assert len(runs) == 2
    assert "2 runs of one condition with the same seeds (seed=1, data.seed=0)" in caplog.text
    assert "first/seed1, second/seed1" in caplog.text and "keeping second/seed1" in caplog.text
    _, rows = summarise(runs)
    assert len(rows) == 1 and rows[0]["n_runs"] == 2  # not 4
    assert rows[0]["test/jsrt/miou"] == pytest.approx(0.83)  # 0.80 and the rerun's 0.86
    md = write_report(tmp_path / "sweep")["markdown"].read_text()
    assert "2 runs, 1 conditions (2 duplicate run(s) counted once, listed below)" in md
    assert "## 2 duplicate run(s) counted once" in md
    # on a tie (copytree keeps the times) the first in path order is kept
    assert "- `first/seed1` (kept: `second/seed1`)" in md and "- `second/seed0` (kept: `first/seed0`)" in md


def test_a_single_run_shows_its_value_and_n_1_without_a_spread(tmp_path):
    _run(tmp_path / "sweep" / "only", _config(0), ["data.real_fraction=0.1"], 0.912)
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    assert rows[0]["test/jsrt/miou_std"] is None and rows[0]["test/jsrt/miou_n"] == 1
    written = write_report(tmp_path / "sweep")
    header, row = _table(written["markdown"].read_text())
    assert row[header.index("jsrt/miou")] == "0.9120 (n=1)" and row[header.index("n")] == "1"
    assert "±" not in "".join(row) and row[-1] == "`(one condition)`"
    line = next(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert line["test/jsrt/miou_std"] == "" and line["test/jsrt/miou_n"] == "1"


def test_a_metric_fewer_runs_have_says_its_own_n(tmp_path):
    for seed in range(3):
        _run(tmp_path / "sweep" / str(seed), _config(seed), [], 0.8 + seed / 100, seed=seed)
    # one run has no score on the second test set
    for seed, value in [(0, 0.6), (1, 0.7)]:
        path = tmp_path / "sweep" / str(seed) / "metrics.json"
        data = json.loads(path.read_text())
        data["metrics"]["test/other/miou"] = value
        path.write_text(json.dumps(data))
    header, row = _table(write_report(tmp_path / "sweep")["markdown"].read_text())
    assert row[header.index("jsrt/miou")] == "0.8100 ± 0.0100"
    assert row[header.index("other/miou")] == "0.6500 ± 0.0707 (n=2)"


def test_plots_say_what_they_show_start_at_zero_and_label_each_bar_once(tmp_path):
    _mixed_sweep(tmp_path / "sweep")
    _run(tmp_path / "sweep" / "single", _config(0, 0.5), ["data.real_fraction=0.5"], 0.88, real_fraction=0.5)
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    figures = plot_figures(rows, "test/jsrt/miou")
    bars = figures["backbones"].axes[0]
    assert bars.get_title() == "jsrt/miou per condition: mean ± 1 sd over seeds, n = 1–3 runs per bar"
    assert "mean ± 1 sd over seeds" in bars.get_xlabel() and "no error bar where n = 1" in bars.get_xlabel()
    assert bars.get_xlim()[0] == 0.0
    labels = [t.get_text() for t in bars.get_yticklabels()]
    assert len(labels) == len(rows) == 5 and len(set(labels)) == 5
    assert all(label.endswith(("(n=3)", "(n=1)")) for label in labels)
    assert any("net=TransUNet" in label and "max_epochs=20" in label for label in labels)
    line = figures["iou_vs_real_fraction"].axes[0]
    assert "mean ± 1 sd over seeds" in line.get_title() and "n = 1–3 runs per point" in line.get_title()
    assert "mean ± 1 sd over seeds" in line.get_ylabel()
    legend = [t.get_text() for t in line.get_legend().get_texts()]
    # a line per condition apart from the real fraction: UNet 20 and 40 epochs, TransUNet
    assert len(legend) == len(set(legend)) == 3 and not any("real_fraction" in t for t in legend)
    import matplotlib.pyplot as plt

    for fig in figures.values():
        plt.close(fig)
    written = write_report(tmp_path / "sweep", tmp_path / "out")
    for name in ("backbones_jsrt", "iou_vs_real_fraction_jsrt"):
        assert written[name] == tmp_path / "out" / f"{name}.png" and written[name].stat().st_size > 1000


def test_fine_tuning_runs_from_per_seed_checkpoints_make_one_condition(tmp_path):
    for seed in (0, 1):
        _run(tmp_path / "pre" / f"seed{seed}", _config(seed, 0.0),
             ["data.real_fraction=0.0", "data.synthetic_count=346"], 0.6, real_fraction=0.0, seed=seed)
        config = _config(seed)
        # a path per seed, written out in each run's config
        config["segmentation"]["init_weights"] = str(tmp_path / "pre" / f"seed{seed}")
        _run(tmp_path / "sweep" / f"ft{seed}", config, ["data.real_fraction=0.1"], 0.8 + seed / 50, seed=seed,
             extra={"init_weights": str(tmp_path / "pre" / f"seed{seed}")})
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    assert len(rows) == 1 and rows[0]["n_runs"] == 2


def test_a_setting_missing_from_older_configs_is_named_and_can_be_ignored(tmp_path, capsys):
    for seed in (0, 1):
        config = _config(seed)
        if seed:  # added to conf/ between the two runs
            config["data"]["prompt"] = {"none_phrase": "normal tissue"}
        _run(tmp_path / "sweep" / str(seed), config, [], 0.8, seed=seed)
    md = write_report(tmp_path / "sweep")["markdown"].read_text()
    assert "2 runs, 2 conditions" in md
    assert "Missing from some runs' config files" in md and "`data.prompt.none_phrase`" in md
    main([str(tmp_path / "sweep"), "--ignore", "data.prompt", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "2 runs, 1 conditions" in md and "left out on request (`data.prompt`)" in md
    assert "report.md" in capsys.readouterr().out
