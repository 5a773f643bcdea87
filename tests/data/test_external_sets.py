"""Other hospitals' test sets in every run; normalisation the same at every stage; burnt-in marks
(issue 14)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from diffmask.cli.train import run as train
from diffmask.data import SegmentationDataModule
from diffmask.data.dataset import normalize_intensity
from diffmask.data.transforms import build_augmentation
from diffmask.domains.chest import PhantomSource, RandBurnInd
from tests.conftest import compose_config, write_synthetic_folder

TINY = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0", "data.real.num_train=8",
    "data.real.num_val=4", "data.real.num_test=4", "segmentation=unet", "segmentation.net.channels=[8,16,32]",
    "segmentation.net.strides=[2,2]", "segmentation.net.num_res_units=1", "trainer.max_epochs=1",
    "trainer.limit_val_batches=1",
]


def _phantom(**kw):
    return PhantomSource(size=32, num_train=8, num_val=4, num_test=4, **kw)


def _lungs_only(root, n=4):
    """An external set like Montgomery: images/ + masks/ with labels 0, 1, 2 only (no heart)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    src = PhantomSource(size=48, num_test=n, seed=11)
    for sid in src.ids("test"):
        s = src.load(sid)
        Image.fromarray(s.image).save(root / "images" / f"{sid}.png")
        lungs = np.where(s.label == 3, 0, s.label).astype(np.uint8)
        Image.fromarray(lungs).save(root / "masks" / f"{sid}.png")
    return root


def test_external_set_without_a_heart_label_is_scored_on_the_lungs_and_says_so(tmp_path, caplog):
    ext = _lungs_only(tmp_path / "hospital_b")
    with caplog.at_level(logging.INFO, logger="diffmask.data.datamodule"):
        dm = SegmentationDataModule(_phantom(), size=32, external_sets=[str(ext)])
        dm.setup("fit")  # the test sets are opened and checked here, not at construction
    assert dm.test_set_names == ["phantom", "hospital_b"]
    assert dm.test_set_classes == {
        "phantom": ["left_lung", "right_lung", "heart"], "hospital_b": ["left_lung", "right_lung"]
    }
    assert "test set 'hospital_b' has no heart label: scored on left_lung, right_lung only" in caplog.text
    train(compose_config("train", [*TINY, f"paths.external_sets=[{ext}]"], tmp_path / "run"))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    keys = written["metrics"]
    hospital_b = {"test/hospital_b/iou_left_lung", "test/hospital_b/iou_right_lung", "test/hospital_b/miou"}
    assert hospital_b <= set(keys)
    assert "test/hospital_b/iou_heart" not in keys and "test/phantom/iou_heart" in keys
    assert written["test_sets"]["hospital_b"] == {
        "path": str(ext), "n_images": 4, "classes": ["left_lung", "right_lung"]
    }
    assert written["missing_test_sets"] == {}


def test_a_missing_external_folder_is_a_note_not_a_crash(tmp_path, caplog):
    gone = tmp_path / "montgomery"
    with caplog.at_level(logging.WARNING):
        train(compose_config("train", [*TINY, f"paths.external_sets=[{gone}]"], tmp_path / "run"))
    assert "external test set 'montgomery' not found" in caplog.text
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["missing_test_sets"] == {"montgomery": f"{gone}: folder not found"}
    assert list(written["test_sets"]) == ["phantom"] and "test/phantom/miou" in written["metrics"]
    # scoring the validation split (tuning): other hospitals stay unseen
    external = [str(_lungs_only(tmp_path / "c"))]
    dm = SegmentationDataModule(_phantom(), size=32, external_sets=external, test_split="val")
    assert dm.test_set_names == ["phantom"] and "data.test_split=val" in dm.missing_test_sets["c"]
    # asked for by name (data.test_sets), a missing folder stays an error
    with pytest.raises(FileNotFoundError, match="montgomery"):
        SegmentationDataModule(_phantom(), size=32, test_sets={"other": str(gone)}).setup("fit")
    ext = _lungs_only(tmp_path / "b")
    with pytest.raises(ValueError, match="the name 'b' is taken"):
        SegmentationDataModule(_phantom(), size=32, external_sets=[str(ext)], test_sets={"b": str(ext)})
    with pytest.raises(ValueError, match="two test sets named 'b'"):
        SegmentationDataModule(_phantom(), size=32, external_sets=[str(ext), str(ext)])


@pytest.mark.parametrize("mode", ["equalize", "clahe"])
def test_synthetic_images_are_normalised_once_and_a_mismatch_is_refused(tmp_path, mode):
    # made by a generator trained on normalised images: served as they are (normalised once)
    same = write_synthetic_folder(tmp_path / "same", n=4, made_with=mode)
    dm = SegmentationDataModule(
        _phantom(),
        size=32,
        real_fraction=0.0,
        synthetic_dir=str(same),
        intensity=mode,
        augment=None,
        synthetic_augment=None,
    )
    raw_image = np.asarray(Image.open(same / "images" / "train0000.png"), dtype=np.float32) / 255
    assert torch.allclose(dm.train_dataset()[0]["image"][0], torch.from_numpy(raw_image))
    # made by a raw generator: normalised like the real images
    raw = write_synthetic_folder(tmp_path / "raw", n=4, made_with="raw")
    dm = SegmentationDataModule(
        _phantom(), size=32, real_fraction=0.0, synthetic_dir=str(raw), intensity=mode
    )
    expected = normalize_intensity(np.asarray(Image.open(raw / "images" / "train0000.png")), mode)
    expected = torch.from_numpy(expected.astype(np.float32) / 255)
    assert torch.allclose(dm.train_dataset()[0]["image"][0], expected)
    # made on another normalisation: refused
    other = write_synthetic_folder(tmp_path / "other", n=4, made_with="percentile")
    refused = rf"data.intensity={mode}, but the synthetic images .* data.intensity=percentile"
    with pytest.raises(ValueError, match=refused):
        SegmentationDataModule(
            _phantom(), size=32, real_fraction=0.0, synthetic_dir=str(other), intensity=mode
        ).setup("fit")


def _burn(img):
    """White markers in the upper corners ("R", "PA ERECT") and black bands at the bottom and left."""
    out = img.copy()
    h, w = out.shape
    out[10:30, 10:28] = 255
    out[12:26, w - 60:w - 12] = 250
    out[h - 20:, :] = 0
    out[:, :12] = 0
    return out


def test_burnt_in_markers_and_black_borders_barely_move_the_normalised_lungs():
    sample = PhantomSource(size=256).load("test0000")
    lungs = (sample.label == 1) | (sample.label == 2)
    moved = {
        mode: float(np.abs(normalize_intensity(sample.image, mode).astype(float)
                           - normalize_intensity(_burn(sample.image), mode).astype(float))[lungs].mean())
        for mode in ("percentile", "equalize", "clahe")
    }
    # grey levels (0..255): the central histogram ignores the film's edges; CLAHE keeps changes local
    assert moved["equalize"] <= 1.0 and moved["clahe"] <= 10.0
    assert moved["percentile"] > moved["equalize"] + 5  # a whole-image statistic is what they would break


def test_burn_in_augmentation_draws_markers_and_borders_and_keeps_labels():
    item = {"image": torch.full((1, 64, 64), 0.5), "label": torch.ones((1, 64, 64))}
    burn = RandBurnInd(keys=("image",), prob=1.0)
    burn.set_random_state(seed=0)
    outs = [burn(dict(item)) for _ in range(8)]
    assert all(torch.equal(o["label"], item["label"]) for o in outs)
    assert all(o["image"].max() >= 0.85 for o in outs)  # a marker every time
    assert any(o["image"].min() == 0.0 for o in outs)   # black bands about half the time
    assert all(o["image"][0, 24:40, 24:40].eq(0.5).all() for o in outs)  # the chest's centre is left alone
    burn.set_random_state(seed=0)
    assert torch.equal(burn(dict(item))["image"], outs[0]["image"])  # seeded: runs repeat
    strong = build_augmentation(scale=0.25, histogram_shift=6, bias_field=0.2, size=64,
                                extra=[RandBurnInd(keys=("image",), prob=0.3)])
    names = [type(t).__name__ for t in strong.transforms]
    assert {"RandHistogramShiftd", "RandBiasFieldd", "RandBurnInd"} <= set(names)


def test_strong_augment_config_adds_the_chest_film_markers_as_an_extra_transform():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from diffmask.config import CONFIG_PATH

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        strong = instantiate(compose("train", overrides=["data=phantom", "data/augment=strong"]).data.augment)
        plain = instantiate(compose("train", overrides=["data=phantom"]).data.augment)
    assert [type(t).__name__ for t in strong.transforms][-2:] == ["RandBurnInd", "RandGaussianNoised"]
    assert "RandBurnInd" not in [type(t).__name__ for t in plain.transforms]
