"""Per-image scores and the paired bootstrap comparison of two recipes (diffmask-compare)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmask.cli.compare import main as compare_main
from diffmask.cli.train import run as train
from diffmask.evaluation import SegmentationScores
from diffmask.evaluation.paired import compare_recipes, paired_bootstrap, read_per_image, write_per_image
from tests.conftest import compose_config

CLASSES = ["background", "left_lung", "right_lung", "heart"]


def _scores(rng, n=40, level=0.85, spread=0.05):
    s = np.clip(level + spread * rng.standard_normal((n, 3)), 0, 1)
    s[::5, 2] = np.nan  # some images lack a heart label
    return s


def test_bootstrap_finds_a_real_difference_and_not_a_spurious_one():
    rng = np.random.default_rng(0)
    b = _scores(rng)
    same = paired_bootstrap(b, b.copy(), n_boot=2000)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p"] == 1.0
    better = paired_bootstrap(b + 0.02, b, n_boot=2000)  # every image 0.02 better: paired, so certain
    assert better["diff"] == pytest.approx(0.02) and better["ci_low"] > 0.019 and better["p"] == 0.0
    noise = paired_bootstrap(b + 0.05 * rng.standard_normal(b.shape), b, n_boot=2000)  # no true difference
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p"] > 0.05
    with pytest.raises(ValueError, match="two .N, C. arrays of one shape"):
        paired_bootstrap(b, b[:3])


def test_the_compared_miou_is_the_test_metric():
    """mean over classes of the mean over images (a heart-less image scores 1 or 0 on the heart), as
    SegmentationScores."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (6, 16, 16), generator=gen)
    target[:2][target[:2] == 3] = 0  # two images without a heart
    noise = torch.randint(0, 4, target.shape, generator=gen)
    pred = torch.where(torch.rand(target.shape, generator=gen) < 0.7, target, noise)
    from diffmask.evaluation import compute_iou

    per_image = compute_iou(pred, target, 4)[:, 1:].numpy()
    scores = SegmentationScores(CLASSES)
    scores.update(pred, target)
    expected = float(scores.compute()["miou"])
    assert paired_bootstrap(per_image, per_image, n_boot=100)["miou_a"] == pytest.approx(expected)


def test_a_training_run_writes_per_image_scores_that_agree_with_its_metrics(tmp_path):
    tiny = ["data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0",
            "data.real.num_train=8", "data.real.num_val=4", "data.real.num_test=6", "segmentation=unet",
            "segmentation.net.channels=[8,16,32]", "segmentation.net.strides=[2,2]",
            "segmentation.net.num_res_units=1", "trainer.max_epochs=1", "trainer.limit_val_batches=1"]
    train(compose_config("train", tiny, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for metric in ("iou", "dice"):  # per-image means; the aggregates are logged beside them
        rows = read_per_image(tmp_path / "per_image.csv", metric)
        assert sorted(rows) == ["phantom"] and len(rows["phantom"]) == 6
        for cls in CLASSES[1:]:
            mean = np.mean([r[cls] for r in rows["phantom"].values() if cls in r])
            assert mean == pytest.approx(metrics[f"test/phantom/{metric}_{cls}"], abs=1e-5)
            assert 0 <= metrics[f"test/phantom/agg_{metric}_{cls}"] <= 1


def test_compare_cli_over_seeds(tmp_path, capsys):
    rng = np.random.default_rng(1)
    base = _scores(rng, n=30)
    ids = [f"{i:04d}" for i in range(30)]
    for recipe, shift in (("mix", 0.03), ("real", 0.0)):
        for seed in range(3):
            rows = [{"set": "montgomery", "id": sid,
                     **{f"{m}_{c}": float(v) for m in ("iou", "dice") for c, v in zip(
                         CLASSES[1:], row + shift + 0.01 * rng.standard_normal(3), strict=True)}}
                    for sid, row in zip(ids, base, strict=True)]
            write_per_image(tmp_path / recipe / str(seed) / "per_image.csv", rows, CLASSES)
    (result,) = compare_recipes([tmp_path / "mix"], [tmp_path / "real"], n_boot=2000)
    assert result.n_runs_a == result.n_runs_b == 3 and result.n_images == 30
    assert result.diff == pytest.approx(0.03, abs=0.01) and result.real
    compare_main(["--a", str(tmp_path / "mix"), "--b", str(tmp_path / "real"), "--name-a", "17+syn",
                  "--name-b", "173", "--n-boot", "500", "--out", str(tmp_path / "cmp.md")])
    out = capsys.readouterr().out
    assert "| montgomery | 30 |" in out and "| yes |" in out
    assert json.loads((tmp_path / "cmp.json").read_text())["results"][0]["real"] is True
    compare_main(["--a", str(tmp_path / "mix"), "--b", str(tmp_path / "real"), "--metric", "dice",
                  "--n-boot", "500", "--out", str(tmp_path / "dice.md")])
    assert json.loads((tmp_path / "dice.json").read_text())["metric"] == "dice" and "per-image dice" in (
        tmp_path / "dice.md").read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no per_image.csv"):
        compare_recipes([tmp_path / "empty"], [tmp_path / "real"])
