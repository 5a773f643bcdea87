"""Label fidelity of a generated set: a model trained on real images scores how well each image follows
its mask."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffmask.cli.fidelity import main
from diffmask.data import ManifestRow, write_manifest
from diffmask.evaluation import compute_iou
from diffmask.evaluation.fidelity import (
    label_fidelity,
    per_image_iou,
    record_label_fidelity,
    served_intensity,
)
from diffmask.evaluation.report import collect_runs, summarise, write_report
from tests.conftest import compose_config, write_phantom_folder, write_synthetic_folder

FOREGROUND = ["left_lung", "right_lung", "heart"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny UNet fitted on a small phantom folder at 32 px, as a CLI train run leaves it (with
    ``.hydra/config.yaml``), and a generated set whose masks are the true masks of its images."""
    from diffmask.cli.train import run

    root = tmp_path_factory.mktemp("fidelity")
    real = write_phantom_folder(root / "real", size=64, splits={"train": 16, "val": 4, "test": 4})
    cfg = compose_config("train", [
        "data=jsrt", f"paths.jsrt_dir={real}", "data.size=32", "data.batch_size=4", "data.num_workers=0",
        "trainer.max_epochs=30", "segmentation=unet", "segmentation.net.channels=[8,16]",
        "segmentation.net.strides=[2]", "segmentation.net.num_res_units=1", "segmentation.optimizer.lr=1e-2",
        "callbacks.model_checkpoint.save_last=false",
    ], root / "run")
    run(cfg)
    (root / "run" / ".hydra").mkdir()
    OmegaConf.save(cfg, root / "run" / ".hydra" / "config.yaml")  # what Hydra writes for a CLI run
    return root / "run", write_synthetic_folder(root / "true_masks", n=12, size=64)


def _rewrite_masks(src, dst, change):
    shutil.copytree(src, dst)
    masks = sorted((dst / "masks").glob("*.png"))
    arrays = [np.asarray(Image.open(m)) for m in masks]
    for i, m in enumerate(masks):
        Image.fromarray(change(arrays, i)).save(m)
    return dst


def test_true_masks_score_far_above_swapped_or_shifted_ones(trained, tmp_path):
    model, true_set = trained
    true = label_fidelity(true_set, model, None)
    assert true["n_images"] == 12 and true["size"] == 32 and true["intensity"] == "equalize"
    assert sorted(true["iou"]) == sorted(FOREGROUND) and true["checkpoint"].endswith(".ckpt")
    assert true["miou"] == pytest.approx(sum(true["iou"].values()) / 3)
    assert true["miou"] > 0.6, true
    swapped_set = _rewrite_masks(true_set, tmp_path / "swapped", lambda a, i: a[(i + 1) % len(a)])
    swapped = label_fidelity(swapped_set, model, None)
    shifted_set = _rewrite_masks(true_set, tmp_path / "shifted", lambda a, i: np.roll(a[i], (12, 12), (0, 1)))
    shifted = label_fidelity(shifted_set, model, None)
    assert true["miou"] > swapped["miou"] + 0.05, (true["miou"], swapped["miou"])
    assert true["miou"] > shifted["miou"] + 0.4, (true["miou"], shifted["miou"])
    # the same model from its checkpoint file, or from a run folder without .hydra (the CSV logger's config)
    by_file = label_fidelity(true_set, true["checkpoint"], None)
    bare = shutil.copytree(model, tmp_path / "bare_run", ignore=shutil.ignore_patterns(".hydra"))
    assert by_file["iou"] == true["iou"] == label_fidelity(true_set, bare, None)["iou"]
    chosen = label_fidelity(true_set, model, None, ids=["train0000", "train0003"], batch_size=1)
    assert chosen["n_images"] == 2


def test_cli_write_records_fidelity_and_keeps_the_other_stage_keys(trained, tmp_path, capsys):
    model, true_set = trained
    folder = shutil.copytree(true_set, tmp_path / "set")
    stage = {"status": "complete", "intensity": "raw", "class_presence": {"heart": 1.0}, "warnings": [],
             "counts": {"n": 12}}
    (folder / "stage.json").write_text(json.dumps(stage))
    main([str(folder), "--model", str(model), "--write"])
    out = capsys.readouterr().out
    assert all(name in out for name in [*FOREGROUND, "mIoU"]) and "stage.json" in out
    info = json.loads((folder / "stage.json").read_text())
    assert {k: info[k] for k in stage} == stage
    record = info["label_fidelity"]
    assert record["miou"] == pytest.approx(label_fidelity(folder, model, None)["miou"])
    assert set(record["iou"]) == set(FOREGROUND) and record["model"] == str(model) and record["measured_at"]
    # a second measurement replaces the first; a set made by hand gets a stage.json of its own
    record_label_fidelity(folder, {"miou": 0.5})
    assert json.loads((folder / "stage.json").read_text())["label_fidelity"]["miou"] == 0.5
    (folder / "stage.json").unlink()
    record_label_fidelity(folder, {"miou": 0.25})
    assert list(json.loads((folder / "stage.json").read_text())) == ["label_fidelity"]
    main([str(folder), "--model", str(model), "--json", "--size", "64"])
    assert json.loads(capsys.readouterr().out)["size"] == 64


def test_errors_name_what_is_missing(trained, tmp_path):
    model, true_set = trained
    no_ckpt = tmp_path / "scored_only"
    no_ckpt.mkdir()
    (no_ckpt / "metrics.json").write_text(json.dumps({"metrics": {}, "best_checkpoint": None}))
    with pytest.raises(FileNotFoundError, match="scored_only: no checkpoint"):
        label_fidelity(true_set, no_ckpt, None)
    with pytest.raises(ValueError, match=r"manifest.jsonl: ids not in the manifest: \['nope'\]"):
        label_fidelity(true_set, model, None, ids=["nope"])
    with pytest.raises(ValueError, match=r"outputs 4 classes but class_names has 2"):
        label_fidelity(true_set, model, ["background", "lung"])
    unlabelled = shutil.copytree(true_set, tmp_path / "unlabelled")
    write_manifest(unlabelled, [ManifestRow("a", "images/train0000.png", None, source="synthetic")])
    with pytest.raises(ValueError,
                       match=r"unlabelled: 1 of 1 rows have no mask \(manifest field sem_seg_file_name"):
        label_fidelity(unlabelled, model, None)
    # a set made by a generator trained on other normalised images than the model saw
    clahe = shutil.copytree(true_set, tmp_path / "clahe_set")
    (clahe / "stage.json").write_text(json.dumps({"status": "complete", "intensity": "clahe"}))
    with pytest.raises(ValueError, match=r"clahe_set: .*data.intensity=clahe"):
        label_fidelity(clahe, model, None)


def test_intensity_rule_and_iou_where_a_class_is_in_either():
    assert served_intensity("equalize", "equalize") == "raw"  # already normalised: used as is
    assert served_intensity("raw", "equalize") == "equalize"
    with pytest.raises(ValueError, match="data.intensity=percentile"):
        served_intensity("percentile", "clahe")
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2, :2] = 1
    pred = target.clone()
    pred[0, 0, 0] = 0
    pred[0, 3, 3] = 2  # class 2 predicted but not in the mask: the image shows what the mask lacks
    iou = per_image_iou(pred, target, 4)[0]
    # class 3 in neither: 1, the test metric's rule (formerly NaN, not scored)
    assert iou[1].item() == pytest.approx(0.75) and iou[2].item() == 0.0 and iou[3].item() == 1.0
    assert torch.equal(per_image_iou(pred, target, 4), compute_iou(pred, target, 4))  # one rule, not a copy


def _fake_run(folder, miou, synthetic_dir=None, n_synthetic=0, seed=0):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "metrics": {"test/jsrt/miou": miou},
        "data": {"real": "jsrt", "real_fraction": 0.1, "n_real_train": 17, "n_synthetic_train": n_synthetic,
                 "synthetic_dir": None if synthetic_dir is None else str(synthetic_dir)},
        "backbone": "x.UNet", "seed": seed,
        "overrides": [f"seed={seed}", *([f"data.synthetic_dir={synthetic_dir}"] if synthetic_dir else [])],
    }))


def test_report_shows_the_synthetic_sets_label_fidelity(tmp_path):
    measured, unmeasured = tmp_path / "sets" / "measured", tmp_path / "sets" / "unmeasured"
    measured.mkdir(parents=True)
    unmeasured.mkdir()
    measured_stage = {"status": "complete", "label_fidelity": {"miou": 0.7123}}
    (measured / "stage.json").write_text(json.dumps(measured_stage))
    (unmeasured / "stage.json").write_text(json.dumps({"status": "complete"}))
    for seed, miou in [(0, 0.80), (1, 0.82)]:
        _fake_run(tmp_path / "sweep" / f"mix{seed}", miou, measured, 34, seed)
    _fake_run(tmp_path / "sweep" / "other", 0.75, unmeasured, 34)
    _fake_run(tmp_path / "sweep" / "real", 0.78)
    _, rows = summarise(collect_runs(tmp_path / "sweep")[0])
    by_set = {r["n_synthetic"] and r["condition"].split("sets/")[-1]: r for r in rows}
    assert by_set["measured"]["label_fidelity"] == pytest.approx(0.7123) and by_set["measured"]["n_runs"] == 2
    assert "label_fidelity" not in by_set["unmeasured"] and "label_fidelity" not in by_set[0]
    written = write_report(tmp_path / "sweep")
    lines = written["markdown"].read_text().splitlines()
    header = lines[4].split(" | ")
    column = header.index("label fidelity")
    cells = {line.split(" | ")[-1]: line.split(" | ")[column] for line in lines[6:] if line.startswith("|")}
    assert sorted(cells.values()) == ["", "", "0.7123"]
    csv = written["csv"].read_text().splitlines()
    assert "label_fidelity" in csv[0].split(",")
    assert sum(",0.7123," in line for line in csv[1:]) == 1
    # a sweep without synthetic data has no such column in report.md
    _fake_run(tmp_path / "real_only" / "r", 0.78)
    assert "label fidelity" not in write_report(tmp_path / "real_only")["markdown"].read_text()


def test_fid_kid_and_ctr_error_formulas():
    from diffmask.domains.chest import ctr_error
    from diffmask.evaluation.synthesis_quality import default_rules, frechet_distance, kernel_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 2.0) == pytest.approx(16.0, rel=1e-6)  # |mean shift|^2 over 4 dims
    same, _ = kernel_distance(a[:200], a[200:], subsets=20)
    shifted, _ = kernel_distance(a[:200], a[200:] + 1.0, subsets=20)
    assert abs(same) < 0.05 < shifted
    rules = default_rules()
    assert ctr_error(0.45, "normal", rules) == 0.0 and ctr_error(0.52, "borderline", rules) == 0.0
    assert ctr_error(0.45, "enlarged", rules) == pytest.approx(0.10)
    assert ctr_error(0.60, "normal", rules) == pytest.approx(0.10)
    with pytest.raises(ValueError, match="heart_size: unknown word 'huge'"):
        ctr_error(0.5, "huge", rules)


def test_synthesis_quality_of_a_set_close_to_the_real_images_beats_noise(trained, tmp_path):
    from diffmask.cli.evaluate_synthesis import main as evaluate_synthesis
    from diffmask.data import read_manifest
    from diffmask.evaluation.synthesis_quality import segmenter_features, synthesis_quality

    run, true_masks = trained
    phantoms = tmp_path / "phantoms"
    shutil.copytree(true_masks, phantoms)
    rows = read_manifest(phantoms / "manifest.jsonl")
    write_manifest(phantoms, [ManifestRow(r.id, r.file_name, r.sem_seg_file_name, r.prompt, r.source,
                                          seed=r.seed, meta={"heart_size": "normal"}) for r in rows])
    noise = tmp_path / "noise"
    shutil.copytree(true_masks, noise)
    for i, f in enumerate(sorted((noise / "images").glob("*.png"))):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64), dtype=np.uint8)).save(f)
    good = synthesis_quality(phantoms, run, kid_subsets=10)
    bad = synthesis_quality(noise, run, kid_subsets=10)
    assert good["fid"] < bad["fid"] and good["kid"] < bad["kid"]
    assert good["anatomy"]["n_asked"] + good["anatomy"]["n_unmeasurable"] == 12
    assert bad["anatomy"]["n_asked"] == 0
    assert 0 <= good["anatomy"]["ctr_error_median"] < 0.2
    evaluate_synthesis([str(phantoms), "--model", str(run)])
    assert json.loads((phantoms / "synthesis_quality.json").read_text())["fid"] == pytest.approx(good["fid"])
    # the features are the deepest convolution's, averaged over space
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1),
                              torch.nn.Conv2d(3, 5, 3, stride=2, padding=1))
    assert segmenter_features(net, torch.rand(3, 1, 8, 8)).shape == (3, 5)
