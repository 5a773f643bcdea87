"""diffmask-check-data: a clean folder passes, each broken file is named, the CLI's exit code, BUSI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmask.data.check import CheckReport, check_folder, positional_folder

REPO = Path(__file__).resolve().parents[2]
BUSI = Path(__file__).resolve().parents[3] / "shared/data/busi"
CLASSES = ["background", "organ", "lesion"]
SPLITS = {"a0": "train", "a1": "train", "a2": "train", "b0": "val", "c0": "test", "c1": "test"}
SIZE = 24


def _image(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _mask(lesion: bool, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    m = np.zeros(size, np.uint8)
    m[4:16, 4:16] = 1  # organ in every mask
    if lesion:
        m[6:9, 6:9] = 2
    return m


def _write_folder(root: Path, splits: dict[str, str] = SPLITS) -> Path:
    """A clean folder: grey 24x24 images, every mask with the organ, a lesion in half of them."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, sid in enumerate(splits):
        Image.fromarray(_image(i)).save(root / "images" / f"{sid}.png")
        Image.fromarray(_mask(lesion=i % 2 == 0)).save(root / "masks" / f"{sid}.png")
    lines = ["id,split"] + [f"{sid},{split}" for sid, split in splits.items()]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def _check(root: Path, **kwargs) -> CheckReport:
    kwargs = {"class_names": CLASSES, "optional_classes": ["lesion"], **kwargs}
    return check_folder(root, **kwargs)


def _errors_about(report: CheckReport, name: str) -> list[str]:
    return [p.message for p in report.errors if Path(p.file).name == name]


def test_clean_folder_passes_with_counts(tmp_path):
    report = _check(_write_folder(tmp_path / "ds"))
    assert report.ok and report.problems == [], report.summary()
    assert report.splits == {"train": 3, "val": 1, "test": 2} and report.num_images == 6
    assert report.sizes == {"min_h": SIZE, "max_h": SIZE, "min_w": SIZE, "max_w": SIZE, "non_square": 0}
    assert report.channels_found == {"grey": 6, "colour": 0, "rgb_equal": 0}
    assert report.label_values == [0, 1, 2]
    assert report.absent == {"organ": 0, "lesion": 3}
    assert report.presence["all"] == {"organ": 1.0, "lesion": 0.5}
    assert report.presence["train"]["lesion"] == pytest.approx(2 / 3)
    text = report.summary()
    assert "train 3, val 1, test 2" in text and "errors: 0, warnings: 0" in text
    assert "lesion 3 (optional)" in text


def _wrong_labels(root):
    m = _mask(True)
    m[0, 0] = 7
    Image.fromarray(m).save(root / "masks" / "a1.png")


def _size_mismatch(root):
    Image.fromarray(_mask(True, (16, 16))).save(root / "masks" / "b0.png")


def _missing_mask(root):
    (root / "masks" / "c0.png").unlink()


def _garbage_image(root):
    (root / "images" / "a2.png").write_bytes(b"this is not a png at all" * 8)


def _colour_image(root):
    rgb = np.stack([_image(1), _image(2), _image(3)], axis=-1)
    Image.fromarray(rgb).save(root / "images" / "c1.png")


@pytest.mark.parametrize(
    "breaks, file, expected",
    [
        (_wrong_labels, "a1.png", "label values [7] outside 0..2"),
        (_size_mismatch, "b0.png", "mask size 16x16"),
        (_missing_mask, "c0.png", "no mask; expected"),
        (_garbage_image, "a2.png", "unreadable image"),
        (_colour_image, "c1.png", "colour image"),
    ],
    ids=["wrong_labels", "size_mismatch", "missing_mask", "unreadable_image", "colour_in_grey"],
)
def test_each_problem_is_an_error_naming_its_file(tmp_path, breaks, file, expected):
    root = _write_folder(tmp_path / "ds")
    breaks(root)
    report = _check(root)
    assert not report.ok
    messages = _errors_about(report, file)
    assert any(expected in m for m in messages), report.summary()
    assert len(report.errors) == 1, report.summary()  # nothing else is blamed


def test_rgb_with_equal_channels_counts_as_grey(tmp_path):
    root = _write_folder(tmp_path / "ds")
    grey = _image(0)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(root / "images" / "a0.png")
    report = _check(root)
    assert report.ok and report.channels_found == {"grey": 5, "colour": 0, "rgb_equal": 1}
    colour = _check(root, channels=3)  # a colour dataset: every image is grey
    assert len(colour.errors) == 6
    assert any("three equal channels (counts as grey)" in m for m in _errors_about(colour, "a0.png"))


def test_a_class_no_mask_contains_is_an_error(tmp_path):
    report = _check(_write_folder(tmp_path / "ds"), class_names=[*CLASSES, "heart"])
    assert [(p.file, "'heart'" in p.message) for p in report.errors] == [("data.class_names[3]", True)]


def test_duplicate_straddling_train_and_test_is_a_leak(tmp_path):
    root = _write_folder(tmp_path / "ds")
    Image.fromarray(_image(0)).save(root / "images" / "c0.png")  # a0 (train) again, in test
    report = _check(root)
    assert report.duplicates == [["a0", "c0"]]
    [error] = report.errors
    assert Path(error.file).name == "a0.png"
    assert "leak" in error.message and "a0.png (train)" in error.message and "c0.png (test)" in error.message


def test_duplicate_within_one_split_is_a_warning(tmp_path):
    root = _write_folder(tmp_path / "ds")
    Image.fromarray(_image(0)).save(root / "images" / "a1.png")
    report = _check(root)
    assert report.ok and report.duplicates == [["a0", "a1"]]
    assert any("masks differ" in p.message for p in report.warnings)  # a0 has a lesion, a1 none


def test_metadata_and_class_presence_problems(tmp_path):
    splits = {**SPLITS, "c1": "testing"}
    root = _write_folder(tmp_path / "ds", splits)
    (root / "metadata.csv").write_text((root / "metadata.csv").read_text() + "ghost,train\n")
    Image.fromarray(_image(9)).save(root / "images" / "extra.png")
    Image.fromarray(_mask(False)).save(root / "masks" / "extra.png")
    Image.fromarray(_mask(False)).save(root / "masks" / "orphan.png")
    report = _check(root, optional_classes=[])
    errors = [p.message for p in report.errors]
    assert any("'ghost' has no image" in m for m in errors)
    assert any("unknown split 'testing'" in m for m in errors)
    warnings = [(Path(p.file).name, p.message) for p in report.warnings]
    assert any(f == "metadata.csv" and "extra.png" in m for f, m in warnings)  # image without a row
    assert any(f == "orphan.png" and "mask without an image" in m for f, m in warnings)
    assert any(
        "'lesion' is absent from 4 of 7 masks" in m and "data.optional_classes" in m for _, m in warnings
    )


def test_empty_split_is_an_error_and_no_split_column_a_warning(tmp_path):
    root = _write_folder(tmp_path / "ds", {k: v for k, v in SPLITS.items() if v != "val"})
    report = _check(root)
    assert [p.message.split(" (")[0] for p in report.errors] == ["split 'val' is empty"]
    assert _check(root, splits=["train", "test"]).ok
    (root / "metadata.csv").write_text("id\n" + "\n".join(["a0", "a1", "a2", "c0", "c1"]) + "\n")
    report = _check(root)
    assert report.ok and report.splits == {"test": 5}
    assert any("no split column" in p.message for p in report.warnings)
    (root / "metadata.csv").write_text("name\na0\n")
    assert any("missing column 'id'" in p.message for p in _check(root).errors)


def test_positional_folder():
    assert positional_folder(["/data/x", "a=b"]) == ["folder=/data/x", "a=b"]
    assert positional_folder(["data=busi"]) == ["data=busi"]
    assert positional_folder(["--cfg", "job"]) == ["--cfg", "job"]
    assert positional_folder([]) == []


def test_cli_with_a_positional_folder(tmp_path):
    root = _write_folder(tmp_path / "ds")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cli(*args):
        cmd = [sys.executable, "-m", "diffmask.cli.check_data", *args, f"hydra.run.dir={tmp_path}/run"]
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    res = cli(str(root), "data.class_names=[background,organ,lesion]", "data.optional_classes=[lesion]",
              f"out={tmp_path}/report.json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "errors: 0, warnings: 0" in res.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["splits"] == {"train": 3, "val": 1, "test": 2}
    (root / "masks" / "c0.png").unlink()
    res = cli(str(root), "data.class_names=[background,organ,lesion]")  # lesion not optional: a warning
    assert res.returncode == 1, res.stdout + res.stderr
    assert "errors: 1, warnings: 1" in res.stdout and "c0.png: no mask" in res.stdout


def test_busi_checks_clean():
    if not (BUSI / "metadata.csv").is_file():
        pytest.skip(f"{BUSI}: BUSI folder not found")
    report = check_folder(BUSI, ["background", "lesion"], optional_classes=["lesion"])
    assert report.ok, report.summary()
    assert report.num_images == 780 and report.splits == {"train": 548, "val": 77, "test": 155}
    assert report.absent == {"lesion": 133}  # the normal images
