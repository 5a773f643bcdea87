"""The segmentation stage end to end on a few real images (JSRT, or the phantom folder in its layout
without it): fit, best checkpoint, metrics.json."""

from __future__ import annotations

import csv
import json

import pytest

from diffmask.cli.train import run
from diffmask.domains.chest import JSRTSource
from tests.conftest import compose_config

TINY = [
    "data=jsrt",
    "data.size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.max_epochs=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
]
NETS = {
    "unet": ["segmentation=unet", "segmentation.net.channels=[8,16,32]", "segmentation.net.strides=[2,2]",
             "segmentation.net.num_res_units=1"],
    "transunet": ["segmentation=transunet", "segmentation.net.base_channels=8",
                  "segmentation.net.hidden_size=32", "segmentation.net.num_layers=1",
                  "segmentation.net.num_heads=2", "segmentation.net.mlp_dim=64",
                  "segmentation.optimizer.lr=3e-3"],
}


def _tiny(real_dir):
    """TINY on ``real_dir`` with 9 real training images (5 % of JSRT's 173, the same 9 of a phantom
    folder)."""
    nine = 9 / len(JSRTSource(real_dir).ids("train"))
    return [*TINY, f"paths.jsrt_dir={real_dir}", f"data.real_fraction={nine}"]


def _epoch_losses(output_dir):
    rows = list(csv.DictReader(open(next(output_dir.glob("csv/version_*/metrics.csv")))))
    return [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]


@pytest.mark.parametrize("net", sorted(NETS))
def test_fit_decreases_loss_and_writes_metrics(real_dir, tmp_path, net):
    cfg = compose_config("train", [*_tiny(real_dir), *NETS[net]], tmp_path)
    metrics = run(cfg)
    losses = _epoch_losses(tmp_path)
    assert len(losses) == 6
    assert losses[-1] < losses[0] * 0.9, losses
    out = json.loads((tmp_path / "metrics.json").read_text())
    keys = out["metrics"]
    for cls in ("left_lung", "right_lung", "heart"):
        assert 0.0 <= keys[f"test/jsrt/iou_{cls}"] <= 1.0
    assert keys["test/jsrt/miou"] == pytest.approx(float(metrics["test/jsrt/miou"]))
    assert out["data"]["n_real_train"] == 9 and out["best_checkpoint"].endswith(".ckpt")
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))


def test_fine_tune_starts_from_the_checkpoint_weights(real_dir, tmp_path):
    """``segmentation.init_weights``: a second run starts where the first one's best weights are."""
    common = [*_tiny(real_dir), *NETS["unet"], "trainer.limit_train_batches=2"]
    first = tmp_path / "pretrain"
    run(compose_config("train", [*common, "trainer.max_epochs=8"], first))
    best = json.loads((first / "metrics.json").read_text())["best_checkpoint"]
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    run(compose_config("train", [*common, "trainer.max_epochs=1"], scratch))
    run(compose_config("train", [*common, "trainer.max_epochs=1", f"segmentation.init_weights={best}"],
                       tuned))
    pre, start, fresh = _epoch_losses(first), _epoch_losses(tuned)[0], _epoch_losses(scratch)[0]
    assert fresh - start > 0.5 * (pre[0] - pre[-1]) > 0


def test_trained_model_scored_on_an_external_folder_without_training(real_dir, tmp_path):
    """``train=false segmentation.init_weights=<run>``: a lungs-only images/+masks/ folder is scored on
    the lungs."""
    import numpy as np
    from PIL import Image

    ext = tmp_path / "hospital_b"
    (ext / "images").mkdir(parents=True)
    (ext / "masks").mkdir()
    for i in JSRTSource(real_dir).ids("test")[:3]:
        label = np.asarray(Image.open(real_dir / "masks" / f"{i}.png"))
        Image.fromarray(np.where(label == 3, 0, label).astype(np.uint8)).save(ext / "masks" / f"{i}.png")
        # a 16-bit export of the same X-ray
        image = np.asarray(Image.open(real_dir / "images" / f"{i}.png").convert("L")).astype(np.uint16) * 16
        Image.fromarray(image).save(ext / "images" / f"{i}.png")
    common = [*_tiny(real_dir), *NETS["unet"], "trainer.limit_train_batches=2",
              f"data.test_sets={{hospital_b: {ext}}}", "trainer.limit_test_batches=null"]
    fitted = tmp_path / "fit"
    run(compose_config("train", [*common, "trainer.max_epochs=4"], fitted))
    before = json.loads((fitted / "metrics.json").read_text())["metrics"]
    scored = tmp_path / "scored"
    run(compose_config("train", [*common, "train=false", f"segmentation.init_weights={fitted}"], scored))
    out = json.loads((scored / "metrics.json").read_text())
    keys = out["metrics"]
    assert out["best_checkpoint"] is None and out["epochs"] == 0
    assert "test/hospital_b/iou_heart" not in keys and 0 < keys["test/hospital_b/iou_left_lung"] <= 1
    assert keys["test/hospital_b/miou"] == pytest.approx(
        (keys["test/hospital_b/iou_left_lung"] + keys["test/hospital_b/iou_right_lung"]) / 2, abs=1e-6)
    # the same weights score the same on the same images
    for key in ("test/jsrt/miou", "test/hospital_b/miou"):
        assert keys[key] == pytest.approx(before[key], abs=1e-5)
