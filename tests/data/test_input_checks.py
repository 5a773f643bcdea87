"""Bad input becomes a clear error or an explicit result, before any work is spent on it (issue 13)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from hydra.errors import InstantiationException
from PIL import Image

from diffmask.cli.train import run as train
from diffmask.data import ManifestRow, SegmentationDataModule, write_manifest
from diffmask.data.dataset import SegmentationDataset, resize_sample
from diffmask.data.sources import FolderSource, Sample
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import PhantomSource, auto_source
from diffmask.seeds import check_seed
from diffmask.synthesis.quality import class_presence_record
from tests.conftest import compose_config, write_synthetic_folder

TINY = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0", "data.real.num_train=8",
    "data.real.num_val=4", "data.real.num_test=4", "segmentation=unet", "segmentation.net.channels=[8,16,32]",
    "segmentation.net.strides=[2,2]", "segmentation.net.num_res_units=1", "trainer.max_epochs=1",
    "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
]


def _phantom(**kw):
    return PhantomSource(size=32, num_train=8, num_val=4, num_test=4, **kw)


def _folder(root, n=4, size=32, seed=3):
    """An ``images/`` + ``masks/`` test set drawn from the phantom."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    src = PhantomSource(size=size, num_test=n, seed=seed)
    for sid in src.ids("test"):
        s = src.load(sid)
        Image.fromarray(s.image).save(root / "images" / f"{sid}.png")
        Image.fromarray(s.label).save(root / "masks" / f"{sid}.png")
    return root


# 4. seeds -----------------------------------------------------------------------------------------

def test_seeds_are_checked_where_they_are_read(tmp_path):
    assert check_seed(0) == 0 and check_seed(2**32 - 1, "x") == 2**32 - 1
    for bad in (-5, 2**32, 1.5, "3", True, None):
        with pytest.raises(ValueError, match=r"data.seed: expected an integer in 0\.\.4294967295"):
            check_seed(bad, "data.seed")
    with pytest.raises(ValueError, match="data.seed: expected an integer"):
        SegmentationDataModule(_phantom(), size=32, seed=-5)
    with pytest.raises(ValueError, match=r"seed \(phantom\): expected an integer"):
        PhantomSource(size=32, seed=-1)
    # the run's own seed: Lightning would silently draw a random one instead
    with pytest.raises(ValueError, match="^seed: expected an integer in 0..4294967295, got -5"):
        train(compose_config("train", [*TINY, "seed=-5"], tmp_path))


# 1. a fit that trains nothing ---------------------------------------------------------------------

def test_a_fit_that_trains_nothing_is_refused_unless_train_is_false(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.max_epochs=0: the fit would train nothing.*train=false"):
        train(compose_config("train", [*TINY, "trainer.max_epochs=0"], tmp_path / "a"))
    assert not (tmp_path / "a" / "metrics.json").exists()
    with pytest.raises(ValueError, match="trainer.limit_train_batches=0"):
        train(compose_config("train", [*TINY, "trainer.limit_train_batches=0"], tmp_path / "b"))
    # said explicitly: score the model as it is, without fitting
    train(compose_config("train", [*TINY, "trainer.max_epochs=0", "train=false"], tmp_path / "c"))
    written = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert written["epochs"] == 0 and "test/phantom/miou" in written["metrics"]


# 3. test sets are checked before the fit ----------------------------------------------------------

def test_every_test_set_is_opened_and_checked_before_the_fit(tmp_path):
    good = _folder(tmp_path / "good")
    dm = SegmentationDataModule(_phantom(), size=32, test_sets={"good": str(good)})
    assert dm.test_set_names == ["phantom", "good"]
    bad = _folder(tmp_path / "bad")
    ids = sorted(p.stem for p in (bad / "images").iterdir())
    (bad / "masks" / f"{ids[0]}.png").unlink()                         # missing mask
    (bad / "images" / f"{ids[1]}.png").write_bytes(b"not a png")      # unreadable image
    # labels out of range
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(bad / "masks" / f"{ids[2]}.png")
    test_sets = {"good": str(good), "other": str(bad)}
    with pytest.raises(ValueError) as err:
        SegmentationDataModule(_phantom(), size=32, test_sets=test_sets).setup("fit")
    text = str(err.value)
    assert "test set 'other'" in text and "3 of 4 test samples are bad (checked before the fit)" in text
    assert f"{ids[0]}.png: mask file not found" in text
    assert f"{ids[1]}.png: unreadable image" in text
    assert f"{ids[2]}.png: mask has labels [7] outside 0..3" in text


def test_a_bad_test_set_fails_the_run_before_fitting(tmp_path):
    bad = _folder(tmp_path / "bad")
    next((bad / "masks").iterdir()).unlink()
    cfg = compose_config("train", [*TINY, f"data.test_sets={{ext: {bad}}}"], tmp_path / "run")
    # Hydra wraps the datamodule's ValueError; the message is the datamodule's
    with pytest.raises(
        (ValueError, InstantiationException), match="test set 'ext'.*1 of 4 test samples are bad"
    ):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # no fit was spent on it


def test_a_manifest_test_set_without_masks_is_refused(tmp_path):
    syn = write_synthetic_folder(tmp_path / "m", n=6)
    ids = sorted(p.stem for p in (syn / "images").iterdir())
    rows = [ManifestRow(r, f"images/{r}.png", None, "p", "real") for r in ids]
    write_manifest(syn, rows)
    with pytest.raises(ValueError, match="no mask"):
        SegmentationDataModule(_phantom(), size=32, test_sets={"m": str(syn)}).setup("fit")


# 2. synthetic sets whose masks are mostly background ----------------------------------------------

def test_class_presence_recorded_and_a_background_only_set_refused(tmp_path, caplog):
    empty = write_synthetic_folder(tmp_path / "empty", n=6, background_only=True)
    with caplog.at_level(logging.WARNING):
        record = class_presence_record(empty, ["background", "left_lung", "right_lung", "heart"], 0.5)
    assert record["class_presence"] == {"left_lung": 0.0, "right_lung": 0.0, "heart": 0.0}
    assert len(record["warnings"]) == 3 and "class 'heart' is in 0% of the masks" in record["warnings"][2]
    assert "undertrained" in caplog.text
    # measured on the masks when the set has no stage.json ...
    with pytest.raises(ValueError, match=r"class\(es\) present in too few masks \(left_lung in 0%.*=null"):
        SegmentationDataModule(
            _phantom(), size=32, real_fraction=0.5, synthetic_dir=str(empty), synthetic_count=4
        ).setup("fit")
    # ... told otherwise, it trains on it
    dm = SegmentationDataModule(
        _phantom(),
        size=32,
        real_fraction=0.5,
        synthetic_dir=str(empty),
        synthetic_count=4,
        synthetic_min_class_presence=None,
    )
    assert len(dm.synthetic_ids) == 4
    # a healthy set passes; its recorded stage.json presence is what the datamodule reads
    good = write_synthetic_folder(tmp_path / "good", n=6)
    assert class_presence_record(good, ["background", "left_lung", "right_lung", "heart"], 0.5) == {
        "class_presence": {"left_lung": 1.0, "right_lung": 1.0, "heart": 1.0}, "warnings": []}
    SegmentationDataModule(_phantom(), size=32, synthetic_dir=str(good), real_fraction=0.0)
    (good / "stage.json").write_text(json.dumps({"status": "complete", "class_presence": {"heart": 0.2}}))
    with pytest.raises(ValueError, match="heart in 20%"):
        SegmentationDataModule(_phantom(), size=32, synthetic_dir=str(good), real_fraction=0.0).setup("fit")


# 6. data=auto that falls back to the phantom says so ----------------------------------------------

def test_auto_fallback_is_loud_and_recorded_in_metrics(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert auto_source(tmp_path / "no_jsrt", phantom_size=32).name == "phantom"
    assert "THIS RUN USES THE BUILT-IN PHANTOM" in caplog.text and "no_jsrt" in caplog.text
    tiny = [o for o in TINY if not o.startswith(("data=", "data.real."))]
    overrides = [*tiny, "data=auto", f"paths.jsrt_dir={tmp_path / 'no_jsrt'}"]
    cfg = compose_config("train", overrides, tmp_path / "run")
    train(cfg)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["real"] == "phantom"


# non-square images ----------------------------------------------------------------------------------

def test_non_square_images_are_stretched_or_letterboxed_and_logged(tmp_path, caplog):
    image = np.full((20, 40), 200, np.uint8)
    label = np.ones((20, 40), np.uint8)
    sample = Sample("wide", image, label)
    stretched, stretched_label = resize_sample(sample, 32)
    assert stretched.shape == (32, 32) and (stretched_label == 1).all()
    boxed, boxed_label = resize_sample(sample, 32, "letterbox")
    # padded to 40 x 40 first: 10 rows of black above and below, i.e. 8 of 32 after resizing
    assert (boxed_label[:8] == 0).all() and (boxed_label[-8:] == 0).all() and (boxed_label[8:24] == 1).all()
    assert boxed[:7].max() == 0 and boxed[9:23].min() == 200
    with pytest.raises(ValueError, match="resize: expected one of"):
        resize_sample(sample, 32, "crop")
    root = tmp_path / "wide"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(image).save(root / "images" / "wide.png")
    Image.fromarray(label).save(root / "masks" / "wide.png")
    with caplog.at_level(logging.INFO, logger="diffmask.data.dataset"):
        item = SegmentationDataset(FolderSource(root, CHEST), ["wide"], 32, resize="letterbox")[0]
    assert item["image"].shape == (1, 32, 32)
    assert "non-square images (e.g. wide, 20x40) are padded to a square and resized to 32x32" in caplog.text
