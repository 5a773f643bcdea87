"""Scores that count false positives: an image without a class scores 1 when the prediction is
empty too and 0 when it paints the class; a class a whole set never labels is not scored; per-image
means beside dataset-level aggregates. Hand-made tensors only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

from diffmask.evaluation import SegmentationScores, compute_dice, compute_iou
from diffmask.evaluation.metrics import class_counts, labelled_classes
from diffmask.evaluation.paired import compare_recipes, paired_bootstrap, read_per_image, write_per_image
from diffmask.segmentation.module import SegmentationLitModule

LESION = ["background", "lesion"]
CHEST = ["background", "left_lung", "right_lung", "heart"]


def _old_iou(pred, target, num_classes, ignore_index=255):
    """The former rule, verbatim: NaN where the ground truth lacks the class."""
    inter, p, t = class_counts(pred, target, num_classes, ignore_index)
    iou = inter / (p + t - inter).clamp_min(1)
    return torch.where(t > 0, iou, torch.full_like(iou, float("nan")))


def _old_dice(pred, target, num_classes, ignore_index=255):
    inter, p, t = class_counts(pred, target, num_classes, ignore_index)
    dice = 2 * inter / (p + t).clamp_min(1)
    return torch.where(t > 0, dice, torch.full_like(dice, float("nan")))


def _old_scores(batches, class_names):
    """The former SegmentationScores, verbatim: mean over the images whose ground truth holds the class."""
    c = len(class_names)
    sums = {p: torch.zeros(c, dtype=torch.float64) for p in ("iou", "dice")}
    counts = {p: torch.zeros(c, dtype=torch.float64) for p in ("iou", "dice")}
    for pred, target in batches:
        for prefix, fn in (("iou", _old_iou), ("dice", _old_dice)):
            scores = fn(pred, target, c).double()
            present = ~torch.isnan(scores)
            sums[prefix].add_(torch.where(present, scores, 0).sum(0))
            counts[prefix].add_(present.sum(0).double())
    out = {}
    for prefix in ("iou", "dice"):
        means = []
        for i, name in enumerate(class_names):
            if i == 0 or counts[prefix][i] == 0:
                continue
            value = (sums[prefix][i] / counts[prefix][i]).float()
            out[f"{prefix}_{name}"] = value
            means.append(value)
        out["miou" if prefix == "iou" else "mdice"] = torch.stack(means).mean()
    return out


def _lesion_images():
    """Three 4x4 ultrasound-like images (class 1 = lesion), by hand.

    image 0: lesion 4 px, prediction 2 px inside         -> I 2, P 2, T 4, U 4: IoU 1/2, Dice 2/3
    image 1: lesion 1 px, prediction 3 px covering it    -> I 1, P 3, T 1, U 3: IoU 1/3, Dice 1/2
    image 2: no lesion, no prediction                    -> IoU 1, Dice 1
    """
    target = torch.zeros(3, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    target[0, :2, :2] = 1
    pred[0, :2, 0] = 1
    target[1, 3, 3] = 1
    pred[1, 3, 1:] = 1
    return pred, target


def test_empty_truth_and_empty_prediction_score_one():
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target)
    assert compute_iou(pred, target, 2)[:, 1].tolist() == [1.0, 1.0]
    assert compute_dice(pred, target, 2)[:, 1].tolist() == [1.0, 1.0]
    # an ignored pixel is in neither: a prediction under it does not count
    target[0, 0, 0], pred[0, 0, 0] = 255, 1
    assert compute_iou(pred, target, 2)[0, 1].item() == compute_dice(pred, target, 2)[0, 1].item() == 1.0


@pytest.mark.parametrize("painted", [1, 5, 16])
def test_empty_truth_and_any_predicted_pixel_score_zero(painted):
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    pred = torch.zeros_like(target).flatten()
    pred[:painted] = 1
    pred = pred.reshape(1, 4, 4)
    assert compute_iou(pred, target, 2)[0, 1].item() == 0.0
    assert compute_dice(pred, target, 2)[0, 1].item() == 0.0
    counts = class_counts(pred, target, 2)
    assert counts.present[0].tolist() == [True, False] and counts.predicted[0, 1].item() == painted


def test_a_lesion_painted_on_a_lesion_free_image_lowers_the_mean():
    pred, target = _lesion_images()
    clean = SegmentationScores(LESION)
    clean.update(pred, target)
    assert clean.compute()["dice_lesion"].item() == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    pred[2, 0, 0] = 1  # one false-positive pixel on the lesion-free image
    painted = SegmentationScores(LESION)
    painted.update(pred, target)
    out = painted.compute()
    assert out["dice_lesion"].item() == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert out["iou_lesion"].item() == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert out["agg_iou_lesion"].item() == pytest.approx(3 / 8)  # the stray pixel adds to the union
    assert out["mdice"] == out["dice_lesion"] and out["miou"] == out["iou_lesion"]


def test_aggregate_iou_and_dice_on_two_images_by_hand():
    pred, target = _lesion_images()
    scores = SegmentationScores(LESION)
    scores.update(pred[:1], target[:1])  # two batches, as a test loop gives them
    scores.update(pred[1:2], target[1:2])
    out = scores.compute()
    # sum of intersections / sum of unions: (2 + 1) / (4 + 3); Dice: 2 (2 + 1) / ((2 + 4) + (3 + 1))
    assert out["agg_iou_lesion"].item() == pytest.approx(3 / 7)
    assert out["agg_dice_lesion"].item() == pytest.approx(6 / 10)
    # per-image means: (1/2 + 1/3) / 2 and (2/3 + 1/2) / 2
    assert out["iou_lesion"].item() == pytest.approx(5 / 12)
    assert out["dice_lesion"].item() == pytest.approx(7 / 12)
    assert out["agg_miou"] == out["agg_iou_lesion"] and out["agg_mdice"] == out["agg_dice_lesion"]


def test_a_class_the_set_never_labels_is_left_out_of_keys_and_means():
    """A lungs-only set scored by a 4-class model: the heart is not scored, even where it is predicted."""
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, :, :2], target[:, :, 2:] = 1, 2
    pred = target.clone()
    pred[0, 0, 0] = 3  # a stray heart pixel: still no heart score for this set
    pred[1, :, 3] = 0  # image 1's right lung: 4 of 8 px found
    scores = SegmentationScores(CHEST)
    scores.update(pred, target)
    out = scores.compute()
    assert not any(k.endswith("heart") for k in out)
    per_class = [f"{p}_{c}" for p in ("iou", "dice", "agg_iou", "agg_dice")
                 for c in ("left_lung", "right_lung")]
    assert sorted(out) == sorted([*per_class, "agg_mdice", "agg_miou", "mdice", "miou"])
    left, right = (1 + 7 / 8) / 2, (1 + 1 / 2) / 2
    assert out["iou_left_lung"].item() == pytest.approx(left)
    assert out["iou_right_lung"].item() == pytest.approx(right)
    assert out["miou"].item() == pytest.approx((left + right) / 2)
    assert out["agg_miou"].item() == pytest.approx((15 / 16 + 12 / 16) / 2)
    # the rule as a function of the present masks
    # (no background pixel in these images either)
    assert labelled_classes(class_counts(pred, target, 4).present).tolist() == [False, True, True, False]
    with pytest.raises(ValueError, match="present"):
        labelled_classes(torch.ones(3, dtype=torch.bool))
    # nothing labelled at all: no class keys, NaN means
    empty = SegmentationScores(CHEST)
    empty.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    out = empty.compute()
    assert sorted(out) == ["agg_mdice", "agg_miou", "mdice", "miou"]
    assert all(math.isnan(v) for v in out.values())


def test_when_every_image_holds_every_class_the_scores_equal_the_former_ones_exactly():
    """Chest X-rays: both lungs and the heart in every image, so the chest figures do not move."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        target = torch.randint(0, 4, (5, 16, 16), generator=gen)
        target[:, 0, :4] = torch.arange(4)  # every class in every image
        target[:, 1, :3] = 255  # and a few ignored pixels
        noise = torch.randint(0, 4, target.shape, generator=gen)
        pred = torch.where(torch.rand(target.shape, generator=gen) < 0.7, target.clamp_max(3), noise)
        batches.append((pred, target))
    for pred, target in batches:
        assert torch.equal(compute_iou(pred, target, 4), _old_iou(pred, target, 4))
        assert torch.equal(compute_dice(pred, target, 4), _old_dice(pred, target, 4))
    scores = SegmentationScores(CHEST)
    for pred, target in batches:
        scores.update(pred, target)
    new, old = scores.compute(), _old_scores(batches, CHEST)
    assert set(old) <= set(new)
    for key, value in old.items():
        assert torch.equal(new[key], value), key


def test_every_state_is_summed_across_ranks():
    """DDP: each rank's states are summed; two halves summed give the scores of the whole."""
    pred, target = _lesion_images()
    whole, first, second = SegmentationScores(LESION), SegmentationScores(LESION), SegmentationScores(LESION)
    whole.update(pred, target)
    first.update(pred[:1], target[:1])
    second.update(pred[1:], target[1:])
    assert whole._reductions and all(fx is dim_zero_sum for fx in whole._reductions.values())
    merged = SegmentationScores(LESION)
    for name in merged._defaults:
        setattr(merged, name, getattr(first, name) + getattr(second, name))
    expected = whole.compute()
    assert {k: v.item() for k, v in merged.compute().items()} == {k: v.item() for k, v in expected.items()}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="pred: shape"):
        compute_iou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 5), 2)
    with pytest.raises(ValueError, match="num_classes"):
        compute_dice(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), 0)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationScores([])


class _Oracle(torch.nn.Module):
    """Logits whose argmax is the "image" itself (images carry the predicted labels)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(image[:, 0].long(), 4).permute(0, 3, 1, 2).float()


def test_module_per_image_rows_carry_both_scores_and_the_set_level_rule():
    module = SegmentationLitModule(_Oracle(), CHEST, optimizer=None)
    module.test_set_names = ["chest", "lungs_only"]
    module.test_scores = torch.nn.ModuleList(SegmentationScores(CHEST) for _ in range(2))
    module.on_test_epoch_start()
    chest = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    chest[:, 0, 0, :3] = torch.tensor([1, 2, 3])
    chest[1, 0, 3, 3] = 3  # the heart is bigger in image 1's truth
    pred = chest.clone()
    pred[1, 0, 3, 3] = 0
    module.test_step({"image": pred.float(), "label": chest, "id": ["a", "b"]}, 0, 0)
    lungs = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    lungs[:, 0, 0, :2] = torch.tensor([1, 2])
    lungs[1, 0, 0, 1] = 0  # image 1 has no right lung...
    pred = lungs.clone()
    pred[1, 0, 0, 1] = 2  # ...but one is predicted: 0, not NaN
    pred[0, 0, 3, 3] = 3  # a heart in a set that never labels one: not scored
    module.test_step({"image": pred.float(), "label": lungs, "id": ["c", "d"]}, 0, 1)
    module.on_test_epoch_end()
    rows = {r["id"]: r for r in module.per_image}
    assert rows["a"]["set"] == "chest" and rows["c"]["set"] == "lungs_only"
    scored = {k for k in rows["a"] if k not in ("set", "id")}
    assert scored == {f"{m}_{c}" for m in ("iou", "dice") for c in CHEST[1:]}
    assert rows["a"]["iou_heart"] == rows["a"]["dice_heart"] == 1.0
    assert rows["b"]["iou_heart"] == 0.5 and rows["b"]["dice_heart"] == pytest.approx(2 / 3)
    assert rows["d"]["iou_right_lung"] == rows["d"]["dice_right_lung"] == 0.0
    assert rows["c"]["iou_right_lung"] == 1.0 and rows["d"]["iou_left_lung"] == 1.0
    for sid in "cd":
        assert math.isnan(rows[sid]["iou_heart"]) and math.isnan(rows[sid]["dice_heart"])


def test_per_image_csv_round_trip_with_dice_and_files_from_before(tmp_path):
    rows = [{"set": "busi", "id": "n1", "iou_lesion": 1.0, "dice_lesion": 1.0},
            {"set": "busi", "id": "m1", "iou_lesion": 0.5, "dice_lesion": 2 / 3},
            {"set": "lungs", "id": "x", "iou_lesion": float("nan"), "dice_lesion": float("nan")}]
    path = write_per_image(tmp_path / "per_image.csv", rows, LESION)
    assert path.read_text().splitlines()[0] == "set,id,iou_lesion,dice_lesion"
    assert read_per_image(path) == {
        "busi": {"n1": {"lesion": 1.0}, "m1": {"lesion": 0.5}}, "lungs": {"x": {}}
    }
    assert read_per_image(path, "dice")["busi"]["m1"]["lesion"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="metric: expected one of"):
        read_per_image(path, "hd95")
    # a file from before: IoU only, an empty cell where the image lacked the class
    old = tmp_path / "old" / "per_image.csv"
    old.parent.mkdir()
    old.write_text("set,id,iou_left_lung,iou_heart\njsrt,a,0.9,0.8\njsrt,b,0.7,\n")
    assert read_per_image(old) == {"jsrt": {"a": {"left_lung": 0.9, "heart": 0.8}, "b": {"left_lung": 0.7}}}
    with pytest.raises(ValueError, match="metric: .* no dice_<class> columns"):
        read_per_image(old, "dice")
    # the bootstrap compares old and new files alike: a class counts where both score it
    new = tmp_path / "new" / "per_image.csv"
    write_per_image(new, [{"set": "jsrt", "id": "a", "iou_left_lung": 0.8, "iou_heart": 0.8},
                          {"set": "jsrt", "id": "b", "iou_left_lung": 0.6, "iou_heart": 1.0}], CHEST)
    (result,) = compare_recipes([old], [new], n_boot=200)
    assert result.n_images == 2 and result.miou_a == pytest.approx((0.8 + 0.8) / 2)
    assert result.miou_b == pytest.approx((0.7 + 0.8) / 2) and result.diff == pytest.approx(0.05)


def test_paired_bootstrap_on_dice_columns(tmp_path):
    ids = [f"{i:03d}" for i in range(20)]
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, size=20)
    base[::4] = 1.0  # lesion-free images left lesion-free
    for recipe, shift in (("a", 0.05), ("b", 0.0)):
        write_per_image(tmp_path / recipe / "per_image.csv",
                        [{"set": "busi", "id": sid, "iou_lesion": v, "dice_lesion": min(1.0, v + shift)}
                         for sid, v in zip(ids, base, strict=True)], LESION)
    (by_dice,) = compare_recipes([tmp_path / "a"], [tmp_path / "b"], n_boot=500, metric="dice")
    (by_iou,) = compare_recipes([tmp_path / "a"], [tmp_path / "b"], n_boot=500)
    assert by_dice.diff > 0.03 and by_dice.real and by_iou.diff == 0.0
    assert paired_bootstrap(base[:, None], base[:, None], n_boot=100)["miou_a"] == pytest.approx(base.mean())
    with pytest.raises(ValueError, match="metric"):
        compare_recipes([tmp_path / "a"], [tmp_path / "b"], metric="f1")
