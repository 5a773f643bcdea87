"""IoU/Dice conventions and the sweep report."""

from __future__ import annotations

import json

import pytest
import torch

from diffmask.cli.report import main
from diffmask.evaluation import SegmentationScores, compute_dice, compute_iou
from diffmask.evaluation.report import collect_runs, summarise, write_report


def test_iou_known_values_and_absent_class_scores_one_or_zero():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1  # 4 px of class 1, no class 2 or 3
    pred = torch.zeros_like(target)
    pred[0, :2, :1] = 1  # 2 px, all inside
    pred[0, 3, 3] = 3  # class 3 predicted but absent from ground truth
    iou = compute_iou(pred, target, 4)
    assert iou[0, 1].item() == pytest.approx(0.5)
    # absent from the ground truth: 1 when not predicted either, 0 when predicted (formerly NaN for both)
    assert iou[0, 2].item() == 1.0 and iou[0, 3].item() == 0.0
    dice = compute_dice(pred, target, 4)
    assert dice[0, 1].item() == pytest.approx(2 * 2 / 6)
    assert dice[0, 2].item() == 1.0 and dice[0, 3].item() == 0.0
    assert not torch.isnan(iou).any() and not torch.isnan(dice).any()


def test_scores_skip_classes_missing_from_the_test_set():
    """A lungs-only test set (labels 0/1/2) is scored on the lungs; heart is not a zero."""
    scores = SegmentationScores(["background", "left_lung", "right_lung", "heart"])
    target = torch.zeros(2, 8, 8, dtype=torch.long)
    target[:, :, :4] = 2
    target[:, :, 4:] = 1
    scores.update(target.clone(), target)
    out = scores.compute()
    assert out["iou_left_lung"] == 1.0 and out["iou_right_lung"] == 1.0
    assert "iou_heart" not in out and out["miou"] == 1.0


def _fake_run(folder, backbone, frac, seed, miou, extra=(), real="jsrt"):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "metrics": {"test/jsrt/miou": miou, "test/jsrt/iou_heart": miou - 0.05},
        "data": {"real": real, "real_fraction": frac, "n_real_train": int(173 * frac),
                 "n_synthetic_train": 0},
        "backbone": f"x.{backbone}", "seed": seed,
        "overrides": [f"segmentation={backbone.lower()}", f"data.real_fraction={frac}", f"seed={seed}",
                      *extra],
    }))


def test_report_mean_std_over_seeds(tmp_path):
    for i, (b, f, s, m) in enumerate([("UNet", 1.0, 0, 0.90), ("UNet", 1.0, 1, 0.92), ("UNet", 0.1, 0, 0.85),
                                      ("TransUNet", 1.0, 0, 0.88)]):
        _fake_run(tmp_path / "sweep" / str(i), b, f, s, m)
    names, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    unet_full = next(r for r in rows if r["backbone"] == "UNet" and r["real_fraction"] == 1.0)
    assert unet_full["n_runs"] == 2
    assert unet_full["test/jsrt/miou"] == pytest.approx(0.91)
    assert unet_full["test/jsrt/miou_std"] == pytest.approx(0.0141421, rel=1e-4)
    written = write_report(tmp_path / "sweep", tmp_path / "out")
    md = written["markdown"].read_text()
    assert "0.9100 ± 0.0141" in md and len(rows) == 3
    assert written["iou_vs_real_fraction_jsrt"].stat().st_size > 1000 and "backbones_jsrt" in written
    assert "test/jsrt/miou_std" in written["csv"].read_text().splitlines()[0]


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no readable metrics.json"):
        collect_runs(tmp_path)


def test_report_skip_bad_lists_corrupt_files_and_carries_on(tmp_path, capsys):
    for seed, miou in [(0, 0.90), (1, 0.92)]:
        _fake_run(tmp_path / "sweep" / f"ok{seed}", "UNet", 1.0, seed, miou)
    (tmp_path / "sweep" / "torn").mkdir()
    (tmp_path / "sweep" / "torn" / "metrics.json").write_text('{"metrics": {"test/jsrt/mi')
    (tmp_path / "sweep" / "foreign").mkdir()
    (tmp_path / "sweep" / "foreign" / "metrics.json").write_text('{"loss": 0.1}')
    # by default the first bad file stops the report, naming it and the way out
    with pytest.raises(ValueError, match=r"foreign/metrics.json: no 'metrics' mapping.*--skip-bad"):
        collect_runs(tmp_path / "sweep")
    runs, bad = collect_runs(tmp_path / "sweep", skip_bad=True)
    assert len(runs) == 2 and sorted(p.parent.name for p in bad) == ["foreign", "torn"]
    assert "not valid JSON" in bad[tmp_path / "sweep" / "torn" / "metrics.json"]
    main([str(tmp_path / "sweep"), "--skip-bad", "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "0.9100 ± 0.0141" in md
    assert "2 metrics.json file(s) left out" in md and "`torn/metrics.json`: not valid JSON" in md
    assert "report.md" in capsys.readouterr().out


def test_report_says_which_runs_saw_the_phantom_and_never_averages_them_with_jsrt(tmp_path):
    _fake_run(tmp_path / "sweep" / "a", "UNet", 1.0, 0, 0.90)
    # same condition, data=auto fell back
    _fake_run(tmp_path / "sweep" / "b", "UNet", 1.0, 1, 0.60, real="phantom")
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    summary = sorted((r["real"], r["n_runs"], r["test/jsrt/miou"]) for r in rows)
    assert summary == [("jsrt", 1, 0.90), ("phantom", 1, 0.60)]
    written = write_report(tmp_path / "sweep")
    assert "**phantom** (not real X-rays)" in written["markdown"].read_text()
    assert written["csv"].read_text().splitlines()[0].startswith("condition,real,")


def test_report_groups_fine_tuning_runs_by_their_source_condition(tmp_path):
    """Each seed fine-tunes from its own checkpoint; the rows group by what the checkpoints came from."""
    for seed, miou in [(0, 0.88), (1, 0.90)]:
        _fake_run(tmp_path / "pre" / str(seed), "UNet", 0.0, seed, 0.8, extra=["data.synthetic_count=346"])
        ckpt = tmp_path / "pre" / str(seed) / "checkpoints" / "best.ckpt"
        _fake_run(tmp_path / "sweep" / f"ft{seed}", "UNet", 0.1, seed, miou,
                  extra=[f"segmentation.init_weights={ckpt}"])
    _fake_run(tmp_path / "sweep" / "lost", "UNet", 0.1, 0, 0.5,
              extra=[f"segmentation.init_weights={tmp_path}/gone.ckpt"])
    # a multirun fine-tuning each seed from its run folder: 'segmentation.init_weights=<sweep>/${seed}',
    # which Hydra records escaped
    for seed, miou in [(0, 0.87), (1, 0.89)]:
        _fake_run(tmp_path / "sweep" / f"multi{seed}", "UNet", 0.1, seed, miou,
                  extra=["segmentation.init_weights=" + str(tmp_path / "pre") + "/$\\{seed\\}",
                         "trainer.max_epochs=9"])
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    multi = next(r for r in rows if "max_epochs=9" in r["condition"])
    assert multi["n_runs"] == 2 and "init_weights=[data.real_fraction=0.0" in multi["condition"]
    rows = [r for r in rows if r is not multi]
    assert len(rows) == 2
    tuned = next(r for r in rows if r["n_runs"] == 2)
    assert tuned["test/jsrt/miou"] == pytest.approx(0.89)
    assert ("segmentation.init_weights=[data.real_fraction=0.0 data.synthetic_count=346 segmentation=unet]"
            in tuned["condition"])
    assert "gone.ckpt" in next(r for r in rows if r["n_runs"] == 1)["condition"]


def test_report_has_a_column_per_test_set_and_class_and_plots_per_set(tmp_path):
    for seed, (j, m) in enumerate([(0.91, 0.70), (0.92, 0.80)]):
        run = tmp_path / "sweep" / str(seed)
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "metrics": {"test/jsrt/miou": j, "test/jsrt/iou_heart": j - 0.05, "test/jsrt/dice_heart": j,
                        "test/montgomery/miou": m, "test/montgomery/iou_left_lung": m},
            "data": {"real": "jsrt", "real_fraction": 1.0}, "seed": seed, "overrides": [f"seed={seed}"]}))
    written = write_report(tmp_path / "sweep")
    header = written["markdown"].read_text().split("\n")[4]
    assert "jsrt/iou_heart" in header and "montgomery/iou_left_lung" in header and "montgomery/miou" in header
    assert "dice" not in header and "test/jsrt/dice_heart" in written["csv"].read_text()  # Dice: CSV only
    assert "0.7500 ± 0.0707" in written["markdown"].read_text()
    plots = {"iou_vs_real_fraction_jsrt", "iou_vs_real_fraction_montgomery", "backbones_montgomery"}
    assert plots <= set(written)
