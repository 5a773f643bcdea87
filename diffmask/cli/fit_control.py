r"""ControlNet stage (EMIT-Diff): fit a ControlNet beside a diffusion model on the labelled real images.

    diffmask-fit-control input_dir=artifacts/diffusion/cpu64 data.real_fraction=0.1 \
        control.condition.type=mask name=mask
    diffmask-fit-control input_dir=/models/sd-v1-5 data.size=256 trainer=gpu

Writes a diffusers ``ControlNetModel`` folder (``config.json`` + weights), ``control.json`` (the
base model and its fingerprint, the condition settings) and ``stage.json`` to
``${paths.artifact_dir}/control/<name>``; ``metrics.json`` into the run dir. Resumable.
The stage itself is :mod:`diffmask.control.stage`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.config import CONFIG_PATH
from diffmask.control.stage import fit_control
from diffmask.stages import seed_run, skip_complete_stage, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the ControlNet described by ``cfg`` and export it (:func:`~diffmask.control.stage.fit_control`).

    Args:
        cfg: the ``fit_control`` config.

    Returns:
        The final metrics (``{}`` when the stage is complete already).
    """
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    return fit_control(cfg, stage)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_control")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-fit-control`` entry point.

    Args:
        cfg: the composed ``fit_control`` config.
    """
    run(cfg)


if __name__ == "__main__":
    main()
