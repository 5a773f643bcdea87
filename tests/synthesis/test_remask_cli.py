"""diffmask-remask: one generate run, masks re-made offline from the saved class maps."""

import json
import os

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

from diffmask.artifacts import StageDir
from diffmask.cli import remask
from diffmask.cli.generate import run as generate
from diffmask.config import CONFIG_PATH
from diffmask.data import ManifestSource, read_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from tests.synthesis.test_generate_cli import compose_generate


def compose_remask(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("remask", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


@pytest.fixture
def source(tmp_path, model_dir):
    cfg = compose_generate(tmp_path, f"input_dir={model_dir}", "num_samples=4", "name=src",
                           "synthesis=attention_masks", "synthesis.refine=[threshold]")
    generate(cfg)
    return tmp_path / "artifacts" / "synthesis" / "src"


def _mask(folder, row):
    return np.asarray(Image.open(folder / row.sem_seg_file_name))


def test_remask_with_the_same_chain_reproduces_the_masks_and_links_the_images(tmp_path, source):
    info = remask.run(
        compose_remask(tmp_path, f"input_dir={source}", "name=same", "synthesis.refine=[threshold]")
    )
    out = tmp_path / "artifacts" / "synthesis" / "same"
    assert StageDir(out).is_complete() and info["rows"] == 4 and info["written"] == 4
    src_rows, rows = read_manifest(source), read_manifest(out)
    assert [r.id for r in rows] == [r.id for r in src_rows]
    for a, b in zip(src_rows, rows, strict=True):
        assert b.prompt == a.prompt and b.seed == a.seed and b.attn_file == f"attn/{b.id}.npz"
        assert os.path.samefile(out / b.file_name, source / a.file_name)  # a hard link, not a copy
        # the class maps are stored as float16: a few border pixels may flip
        assert (_mask(out, b) == _mask(source, a)).mean() > 0.98
        assert set(b.scores) == {"left_lung", "right_lung", "heart"}
    stage = json.loads((out / "stage.json").read_text())
    assert stage["inputs"]["synthesis"]["path"] == str(source)
    # the masks' class presence is recorded, as generate records it, with a warning per sparse class
    for made in (stage, json.loads((source / "stage.json").read_text())):
        assert set(made["class_presence"]) == {"left_lung", "right_lung", "heart"}
        assert all(0.0 <= v <= 1.0 for v in made["class_presence"].values())
        assert len(made["warnings"]) == sum(v < 0.5 for v in made["class_presence"].values())
    assert ManifestSource(out, CHEST).load(rows[0].id).label.shape == (32, 32)


def test_remask_other_chains_resume_and_filter(tmp_path, source):
    raw = tmp_path / "artifacts" / "synthesis" / "raw"
    # a crash after two masks: the work folder holds them, no manifest yet
    (raw.with_name("raw.tmp") / "masks").mkdir(parents=True)
    first = read_manifest(source)[:2]
    for r in first:
        marker = np.full((32, 32), 3, np.uint8)  # not what raw attention gives: must be kept as is
        Image.fromarray(marker).save(raw.with_name("raw.tmp") / f"masks/{r.id}.png")
    info = remask.run(compose_remask(tmp_path, f"input_dir={source}", "name=raw", "synthesis.refine=[raw]"))
    assert info["written"] == 2 and info["skipped"] == 2 and info["rows"] == 4
    rows = read_manifest(raw)
    assert all((_mask(raw, r) == 3).all() for r in rows[:2])
    assert not raw.with_name("raw.tmp").exists()
    crf = remask.run(compose_remask(
        tmp_path, f"input_dir={source}", "name=crf", "synthesis.refine=[threshold,densecrf]",
        "synthesis.mask_maker.refiner.steps.densecrf.iterations=2", "synthesis.filter_masks=true",
        "synthesis.quality_filter.min_score=1.0"))
    assert crf["rows"] == 0 and crf["dropped"] == 4  # no mask is perfectly confident
    assert not list((tmp_path / "artifacts" / "synthesis" / "crf" / "masks").glob("*.png"))


def test_remask_bad_input(tmp_path, source, model_dir):
    with pytest.raises(FileNotFoundError, match="not a complete stage folder"):
        remask.run(compose_remask(tmp_path, f"input_dir={tmp_path / 'nothing'}", "name=x"))
    with pytest.raises(ValueError, match="is the input_dir"):
        remask.run(compose_remask(tmp_path, f"input_dir={source}", "name=src"))
    plain = compose_generate(
        tmp_path, f"input_dir={model_dir}", "num_samples=2", "name=plain", "synthesis=none"
    )
    generate(plain)
    with pytest.raises(ValueError, match="no attn_file"):
        remask.run(compose_remask(tmp_path, f"input_dir={tmp_path / 'artifacts/synthesis/plain'}", "name=y"))
