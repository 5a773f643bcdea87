"""Shared fixtures: the JSRT folder (or a phantom one in its layout), config composition for the stage
entry points."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# tests run as 2 xdist workers on 2 cores: one thread each (tiny models run ~5x faster on one
# thread than on two contended ones); subprocesses inherit it through OMP_NUM_THREADS
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# other hospitals' test sets (paths.external_sets, default ../shared/data/montgomery) are scored
# only where a test names one: the suite behaves the same with and without that folder
os.environ["DIFFMASK_MONTGOMERY_DIR"] = "/nonexistent/external/montgomery"

REPO = Path(__file__).resolve().parents[1]
JSRT_DIR = Path(os.environ.get("DIFFMASK_JSRT_DIR", REPO.parent / "shared" / "data" / "jsrt_scr"))
JSRT_MISSING = "JSRT/SCR not found (set DIFFMASK_JSRT_DIR)"
# CI has the data: there a test that would skip for want of it fails instead, so coverage cannot drop
REQUIRE_JSRT = os.environ.get("DIFFMASK_REQUIRE_JSRT", "") not in ("", "0")
# the phantom folder that stands in for JSRT: split sizes of a small JSRT-like study
PHANTOM_SPLITS = {"train": 40, "val": 8, "test": 8}


def require_jsrt() -> Path:
    """The JSRT/SCR folder; skips the test without it (fails instead with DIFFMASK_REQUIRE_JSRT=1)."""
    if (JSRT_DIR / "metadata.csv").is_file():
        return JSRT_DIR
    if REQUIRE_JSRT:
        pytest.fail(
            f"{JSRT_DIR}: {JSRT_MISSING}; DIFFMASK_REQUIRE_JSRT=1 forbids skipping for it", pytrace=False
        )
    pytest.skip(JSRT_MISSING)  # "JSRT/SCR not found (set DIFFMASK_JSRT_DIR)"


@pytest.fixture(scope="session")
def jsrt_dir() -> Path:
    """The JSRT/SCR folder, for tests whose behaviour depends on JSRT itself (its splits, its images)."""
    return require_jsrt()


def write_phantom_folder(root: Path, size: int = 256, splits: dict[str, int] = PHANTOM_SPLITS) -> Path:
    """Phantom images written in JSRT's layout: ``images/``, ``masks/``, ``metadata.csv`` with splits."""
    from PIL import Image

    from diffmask.domains.chest import PhantomSource

    source = PhantomSource(
        size=size, num_train=splits["train"], num_val=splits["val"], num_test=splits["test"]
    )
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    columns = ["id", "split", *source.load(source.ids("train")[0]).meta]
    lines = [",".join(columns)]
    for split in splits:
        for sid in source.ids(split):
            sample = source.load(sid)
            Image.fromarray(sample.image).save(root / "images" / f"{sid}.png")
            Image.fromarray(sample.label).save(root / "masks" / f"{sid}.png")
            lines.append(",".join([sid, split, *(sample.meta[c] for c in columns[2:])]))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def write_synthetic_folder(
    root: Path, n: int = 12, size: int = 32, background_only: bool = False, made_with: str | None = None
) -> Path:
    """A synthetic set as generation writes it (``manifest.jsonl``, ``images/``, ``masks/``), drawn from
    the phantom; all-background masks with ``background_only`` (an undertrained generator's), and a
    ``stage.json`` recording the generator's ``data.intensity`` with ``made_with``."""
    import json

    from PIL import Image

    from diffmask.data import ManifestRow, write_manifest
    from diffmask.domains.chest import PhantomSource

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    src = PhantomSource(size=size, num_train=n, seed=7)
    for i, sid in enumerate(src.ids("train")):
        s = src.load(sid)
        Image.fromarray(s.image).save(root / "images" / f"{sid}.png")
        Image.fromarray(s.label * (not background_only)).save(root / "masks" / f"{sid}.png")
        rows.append(ManifestRow(sid, f"images/{sid}.png", f"masks/{sid}.png", "p", "synthetic", seed=i))
    write_manifest(root, rows)
    if made_with:
        (root / "stage.json").write_text(json.dumps({"status": "complete", "intensity": made_with}))
    return root


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory) -> Path:
    """A real-data folder in JSRT's layout, for tests whose behaviour does not depend on JSRT:
    the JSRT folder when it is there, else phantom images written in its layout (256 px;
    40 / 8 / 8 images in train / val / test), so an outside user's ``make test`` runs them too."""
    if (JSRT_DIR / "metadata.csv").is_file():
        return JSRT_DIR
    return write_phantom_folder(tmp_path_factory.mktemp("phantom_jsrt"))


def compose_config(config_name: str, overrides: list[str], output_dir: Path, quiet_trainer: bool = True):
    """Compose a stage config as the CLI would, with outputs under ``output_dir``."""
    from hydra import compose, initialize_config_dir

    from diffmask.config import CONFIG_PATH

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(
            config_name=config_name,
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.artifact_dir={output_dir}/artifacts",
                *(["trainer.enable_progress_bar=false"] if quiet_trainer else []),
                *overrides,
            ],
        )
    return cfg


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A complete diffusion stage folder holding a tiny random scratch model (32 px), as
    ``diffmask-fit-diffusion`` would export it."""
    from diffmask.artifacts import StageDir
    from diffmask.diffusion import DiffusionLitModule
    from diffmask.diffusion.tiny_models import tiny_scratch_components
    from diffmask.domains.chest import chest_prompt_builder

    stage = StageDir(tmp_path / "artifacts" / "diffusion" / "tiny")
    module = DiffusionLitModule(
        tiny_scratch_components(32), chest_prompt_builder(), optimizer=None, resolution=32, ema_decay=0
    )
    module.export(stage.begin())
    stage.commit(config={"test": True})
    return stage.path


def small_mask_run(model_dir, real_dir) -> list[str]:
    """``evaluate_masks`` overrides for a quick run: one batch of 2 JSRT (or phantom) test images at
    t = 200, no other hospital's set."""
    return [f"input_dir={model_dir}", f"paths.jsrt_dir={real_dir}", "paths.external_sets=[]",
            "data.batch_size=2", "data.num_workers=0", "+trainer.limit_test_batches=1",
            "model.timesteps=[200]"]


def quiet_trainer(steps: int, **kw):
    """A CPU Lightning trainer for ``steps`` steps with no logger, checkpoints, progress bar or validation."""
    import pytorch_lightning as pl  # noqa: PLC0415

    return pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, **kw)
