"""Shared fixtures: the JSRT folder, config composition for the stage entry points."""

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

REPO = Path(__file__).resolve().parents[1]
JSRT_DIR = Path(os.environ.get("DIFFMASK_JSRT_DIR", REPO.parent / "shared" / "data" / "jsrt_scr"))


@pytest.fixture(scope="session")
def jsrt_dir() -> Path:
    """The JSRT/SCR folder; the suite needs it (CI has ../shared beside the checkout)."""
    if not (JSRT_DIR / "metadata.csv").is_file():
        raise FileNotFoundError(f"{JSRT_DIR}: JSRT/SCR data not found; set DIFFMASK_JSRT_DIR")
    return JSRT_DIR


def compose_config(config_name: str, overrides: list[str], output_dir: Path, quiet_trainer: bool = True):
    """Compose a stage config as the CLI would, with outputs under ``output_dir``."""
    from hydra import compose, initialize_config_dir

    from diffmask.cli.common import CONFIG_PATH

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
    from diffmask.prompts import PromptBuilder

    stage = StageDir(tmp_path / "artifacts" / "diffusion" / "tiny")
    module = DiffusionLitModule(tiny_scratch_components(32), PromptBuilder(), optimizer=None, resolution=32, ema_decay=0)
    module.export(stage.begin())
    stage.commit(config={"test": True})
    return stage.path
