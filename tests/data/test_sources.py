"""Sources and bad input: each error names the file and the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from diffmask.data import ManifestRow, ManifestSource, read_manifest, write_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import JSRTSource, PhantomSource
from tests.conftest import PHANTOM_SPLITS, write_phantom_folder


def _copy_jsrt_subset(src, dst, drop_column=None, split="train"):
    """The first three training images of a JSRT-layout folder, all in ``split``; returns their ids."""
    ids = JSRTSource(src).ids("train")[:3]
    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    for i in ids:
        shutil.copy(src / "images" / f"{i}.png", dst / "images" / f"{i}.png")
        shutil.copy(src / "masks" / f"{i}.png", dst / "masks" / f"{i}.png")
    cols = ["id", "split", "sex", "age", "finding", "diagnosis", "reading"]
    if drop_column:
        cols.remove(drop_column)
    lines = [",".join(cols)] + [",".join({"id": i, "split": split}.get(c, "") for c in cols) for i in ids]
    (dst / "metadata.csv").write_text("\n".join(lines) + "\n")
    return ids


def test_jsrt_splits_and_sample(jsrt_dir):
    src = JSRTSource(jsrt_dir)
    assert [len(src.ids(s)) for s in ("train", "val", "test")] == [173, 37, 37]
    s = src.load(src.ids("train")[0])
    assert s.image.shape == s.label.shape == (256, 256)
    assert s.image.dtype == np.uint8 and set(np.unique(s.label)) == {0, 1, 2, 3}
    # patient's left lung (1) lies on the image's right half
    cols = np.nonzero(s.label == 1)[1]
    assert cols.mean() > 128 > np.nonzero(s.label == 2)[1].mean()
    assert s.meta["sex"] in ("M", "F")


def test_phantom_folder_stands_in_for_jsrt(tmp_path):
    """The phantom folder that ``real_dir`` falls back to without JSRT reads like JSRT (tested here,
    because with the data, as in CI, ``real_dir`` is JSRT and the phantom folder is never written)."""
    src = JSRTSource(write_phantom_folder(tmp_path / "phantom"))
    assert src.name == "jsrt"
    splits = ("train", "val", "test")
    assert [len(src.ids(s)) for s in splits] == [PHANTOM_SPLITS[s] for s in splits]
    assert not set(src.ids("train")) & set(src.ids("test"))
    for sid in (src.ids("train")[0], src.ids("test")[-1]):
        s = src.load(sid)
        assert s.image.shape == s.label.shape == (256, 256)
        assert s.image.dtype == np.uint8 and set(np.unique(s.label)) == {0, 1, 2, 3}
        # patient's left lung (1) lies on the image's right half
        assert np.nonzero(s.label == 1)[1].mean() > 128 > np.nonzero(s.label == 2)[1].mean()
        assert s.meta["sex"] in ("M", "F") and s.meta["age"].isdigit() and s.meta["finding"]


def test_missing_metadata_column(real_dir, tmp_path):
    _copy_jsrt_subset(real_dir, tmp_path, drop_column="split")
    with pytest.raises(ValueError, match=r"metadata.csv: missing column\(s\) \['split'\]"):
        JSRTSource(tmp_path)


def test_empty_split(real_dir, tmp_path):
    _copy_jsrt_subset(real_dir, tmp_path)
    with pytest.raises(ValueError, match="split 'test' is empty"):
        JSRTSource(tmp_path).ids("test")


def test_unreadable_image(real_dir, tmp_path):
    sid = _copy_jsrt_subset(real_dir, tmp_path)[1]
    (tmp_path / "images" / f"{sid}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=rf"{sid}\.png: unreadable image"):
        JSRTSource(tmp_path).load(sid)


def test_mask_labels_out_of_range(real_dir, tmp_path):
    sid = _copy_jsrt_subset(real_dir, tmp_path)[2]
    mask = np.array(Image.open(tmp_path / "masks" / f"{sid}.png"))
    mask[0, 0] = 7
    Image.fromarray(mask).save(tmp_path / "masks" / f"{sid}.png")
    with pytest.raises(ValueError, match=rf"masks/{sid}\.png: mask has labels \[7\] outside 0\.\.3"):
        JSRTSource(tmp_path).load(sid)


def test_mask_size_mismatch(real_dir, tmp_path):
    sid = _copy_jsrt_subset(real_dir, tmp_path)[0]
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "masks" / f"{sid}.png")
    with pytest.raises(
        ValueError, match=rf"{sid}\.png: mask size \(100, 100\) does not match its image size"
    ):
        JSRTSource(tmp_path).load(sid)


def test_missing_folder_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="DIFFMASK_JSRT_DIR"):
        JSRTSource(tmp_path / "nope")


def test_manifest_roundtrip_and_errors(tmp_path):
    img = np.full((32, 32), 100, np.uint8)
    lab = np.zeros((32, 32), np.uint8)
    lab[4:10, 4:10] = 3
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    Image.fromarray(lab).save(tmp_path / "masks" / "a.png")
    row = ManifestRow(
        "a", "images/a.png", "masks/a.png", prompt="x", source="synthetic", seed=3, scores={"heart": 0.9}
    )
    write_manifest(tmp_path, [row])
    back = read_manifest(tmp_path)[0]
    assert back == row
    s = ManifestSource(tmp_path, CHEST).load("a")
    assert s.label.max() == 3 and s.source == "synthetic" and s.prompt == "x"
    assert ManifestSource(tmp_path, CHEST, min_score=0.95).rows() == []

    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "b", "source": "synthetic"}) + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl, row 1: missing required field 'file_name'"):
        read_manifest(tmp_path)
    fake = {"id": "b", "file_name": "x.png", "source": "fake"}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(fake) + "\n")
    with pytest.raises(ValueError, match="field 'source' must be one of"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:1: not valid JSON"):
        read_manifest(tmp_path)


def test_phantom_is_deterministic_and_anatomical():
    a, b = PhantomSource(size=64, seed=1), PhantomSource(size=64, seed=1)
    s1, s2 = a.load("train0005"), b.load("train0005")
    assert np.array_equal(s1.image, s2.image) and np.array_equal(s1.label, s2.label)
    assert not np.array_equal(s1.image, a.load("train0006").image)
    assert set(np.unique(s1.label)) == {0, 1, 2, 3}
    assert np.nonzero(s1.label == 1)[1].mean() > 32 > np.nonzero(s1.label == 2)[1].mean()
    # lungs darker than heart
    assert s1.image[s1.label == 1].mean() < s1.image[s1.label == 3].mean()


def test_16bit_image_is_rescaled_not_clipped(tmp_path):
    from diffmask.data.sources import read_image

    ramp = np.linspace(1000, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12 bits in a 16-bit PNG
    Image.fromarray(ramp).save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        assert im.mode.startswith("I;16")
    img = read_image(tmp_path / "x.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    # monotone and spread over the range, not saturated
    assert (np.diff(img.ravel().astype(int)) >= 0).all() and 0.3 < (img > 127).mean() < 0.7

    Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match=r"nan\.tif: unreadable image .*NaN"):
        read_image(tmp_path / "nan.tif")


def test_folder_test_set_without_metadata(real_dir, tmp_path):
    """An external test set as images/ + masks/ only, lungs-only labels 0/1/2, a JPEG image."""
    from diffmask.data import FolderSource, open_test_set

    ext = tmp_path / "other_hospital"
    (ext / "images").mkdir(parents=True)
    (ext / "masks").mkdir()
    a, b = JSRTSource(real_dir).ids("test")[:2]
    for i in (a, b):
        label = np.asarray(Image.open(real_dir / "masks" / f"{i}.png"))
        lungs = np.where(label == 3, 0, label).astype(np.uint8)
        Image.fromarray(lungs).save(ext / "masks" / f"case_{i}.png")
        grey = Image.open(real_dir / "images" / f"{i}.png").convert("L")
        grey.save(ext / "images" / f"case_{i}.jpg", quality=95)
    src = open_test_set(ext, CHEST, name="hospital_b")
    assert isinstance(src, FolderSource) and src.name == "hospital_b"
    assert src.ids("test") == [f"case_{a}", f"case_{b}"]
    s = src.load(f"case_{a}")
    assert s.image.shape == s.label.shape == (256, 256) and set(np.unique(s.label)) == {0, 1, 2}

    # a metadata.csv without splits: every listed image is a test image
    (ext / "metadata.csv").write_text(f"id,sex\ncase_{a},F\ncase_{b},M\n")
    src = open_test_set(ext, CHEST)
    assert src.ids("test") == [f"case_{a}", f"case_{b}"] and src.load(f"case_{b}").meta["sex"] == "M"

    (ext / "masks" / f"case_{b}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"masks/case_{b}\.png: mask file not found"):
        src.load(f"case_{b}")
    with pytest.raises(FileNotFoundError, match="expected a manifest.jsonl, or images/ and masks/"):
        open_test_set(tmp_path / "nowhere", CHEST)


def test_a_folder_without_splits_is_divided_reproducibly_with_auto_split(tmp_path):
    from diffmask.data import FolderSource

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "images" / f"{i:02d}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / f"{i:02d}.png")
    src = FolderSource(tmp_path, ["background", "lesion"], auto_split=[0.7, 0.1, 0.2])
    sizes = {s: len(src.ids(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 14, "val": 2, "test": 4}
    again = FolderSource(tmp_path, ["background", "lesion"], auto_split=[0.7, 0.1, 0.2])
    assert again.ids("test") == src.ids("test") and not set(src.ids("test")) & set(src.ids("train"))
    unsplit = FolderSource(tmp_path, ["background", "lesion"])
    assert unsplit.ids("test") == sorted(f"{i:02d}" for i in range(20))
    with pytest.raises(ValueError, match="auto_split"):
        FolderSource(tmp_path, ["background", "lesion"], auto_split=[0.5, 0.5])


def test_grey_and_colour_images_are_never_converted_silently(tmp_path):
    from diffmask.data.sources import read_image

    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red: colour
    grey_as_rgb = np.repeat(np.arange(36, dtype=np.uint8).reshape(6, 6, 1), 3, axis=2)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(grey_as_rgb).save(tmp_path / "grey_rgb.png")
    Image.fromarray(grey_as_rgb[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match=r"colour.png: a colour image in a grey dataset \(data.channels=1\)"):
        read_image(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"grey.png: a grey image in a colour dataset \(data.channels=3\)"):
        read_image(tmp_path / "grey.png", channels=3)
    assert read_image(tmp_path / "colour.png", channels=3).shape == (6, 6, 3)
    # equal channels: grey
    np.testing.assert_array_equal(read_image(tmp_path / "grey_rgb.png"), grey_as_rgb[..., 0])
