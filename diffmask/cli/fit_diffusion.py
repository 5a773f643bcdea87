"""Diffusion stage: train a text-conditioned diffusion model on real images and their prompts.

    diffmask-fit-diffusion data=jsrt data.size=128 trainer=gpu name=px128
    diffmask-fit-diffusion diffusion=pretrained diffusion.components.model_path=/models/sd-v1-5 data.size=256

Writes the model in diffusers format (+ ``diffmask.json``, ``stage.json``) to
``${paths.artifact_dir}/diffusion/<name>`` and ``metrics.json`` into the run dir.
The stage itself is :mod:`diffmask.diffusion.stage`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.config import CONFIG_PATH
from diffmask.diffusion.stage import fit_diffusion
from diffmask.stages import seed_run, skip_complete_stage, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the diffusion model described by ``cfg`` and export it
    (:func:`~diffmask.diffusion.stage.fit_diffusion`).

    Args:
        cfg: the ``fit_diffusion`` config.

    Returns:
        The final metrics (``{}`` when the stage is complete already).
    """
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    return fit_diffusion(cfg, stage)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_diffusion")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-fit-diffusion`` entry point.

    Args:
        cfg: the composed ``fit_diffusion`` config.
    """
    run(cfg)


if __name__ == "__main__":
    main()
