"""Codebook stage: the visual codebook of the real images' patches (issue 17).

    diffmask-fit-codebook codebook.autoencoder_dir=artifacts/autoencoder/ae64 data.size=64 name=cb64

K-means (``codebook.size`` codes) over the patch features (``codebook.patch`` px windows) of the
project autoencoder's posterior mean, on every real training image (no labels). Writes
``codebook.json`` (size, patch, grid, usage: counts, dead codes, perplexity on the training and test
images), ``codebook.pt`` (codes and feature standardisation), ``codes.json`` (each training
image's code grid) and ``stage.json`` to ``${paths.artifact_dir}/codebook/<name>``. Then
``diffmask-fit-diffusion diffusion.clues=codebook diffusion.codebook_dir=<that folder>``.

The stage itself is :mod:`diffmask.codebook.stage`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.codebook.stage import fit_codebook
from diffmask.config import CONFIG_PATH
from diffmask.stages import seed_run, skip_complete_stage, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the codebook described by ``cfg`` (:func:`~diffmask.codebook.stage.fit_codebook`).

    Args:
        cfg: the ``fit_codebook`` config.

    Returns:
        Its usage figures (``{}`` when the stage is complete already).
    """
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    return fit_codebook(cfg, stage)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_codebook")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-fit-codebook`` entry point.

    Args:
        cfg: the composed ``fit_codebook`` config.
    """
    run(cfg)


if __name__ == "__main__":
    main()
