"""Mask quality on real images: per-class IoU of attention masks per refinement step.

    diffmask-evaluate-masks input_dir=artifacts/diffusion/px256 trainer=gpu
    diffmask-evaluate-masks input_dir=... 'model.timesteps=[100,200,300]' trainer=ddp trainer.devices=4

Loads the diffusion stage's model and prompt builder, runs :class:`MaskQualityLitModule` with
``trainer.test`` on the real test split (``data.size`` and ``data.intensity`` are set to the
model's) and writes ``metrics.json`` and ``per_image_masks.csv`` (IoU and pixel counts per image,
class and step) to the run dir (``paths.output_dir``). ``data.channels`` must be
the channels the model was fitted on (a ValueError naming both and the model folder otherwise).
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.config import CONFIG_PATH
from diffmask.evaluation.mask_stage import evaluate_masks
from diffmask.stages import optimized_value, seed_run, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Score the attention masks of the model in ``cfg.input_dir`` on real test images
    (:func:`~diffmask.evaluation.mask_stage.evaluate_masks`).

    Args:
        cfg: the ``evaluate_masks`` config.

    Returns:
        The metrics.
    """
    seed_run(cfg)
    return evaluate_masks(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate_masks")
def main(cfg: DictConfig) -> float | None:
    """The ``diffmask-evaluate-masks`` entry point; returns the sweeper's ``optimized_metric``.

    Args:
        cfg: the composed ``evaluate_masks`` config.
    """
    return optimized_value(cfg, run(cfg))


if __name__ == "__main__":
    main()
