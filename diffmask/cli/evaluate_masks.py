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

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from diffmask.artifacts import StageDir
from diffmask.cli.common import job_overrides, optimized_value, seed_run, stage_task, write_metrics
from diffmask.config import CONFIG_PATH
from diffmask.diffusion.components import load_components
from diffmask.evaluation.mask_quality import MASK_ROWS_FILE, write_mask_rows
from diffmask.prompts.builder import prompt_builder_from_dict

log = logging.getLogger("diffmask.evaluate_masks")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Score the attention masks of the model in ``cfg.input_dir`` on real test images."""
    seed_run(cfg)
    model_stage = StageDir(cfg.input_dir)
    model_stage.info()  # a clear error when the diffusion stage has not finished
    # the test images are served with data.channels: the model must have been fitted on that kind of image
    components = load_components(model_stage.path, channels=int(cfg.data.channels))
    meta = components.metadata or {}
    if "prompt_builder" not in meta or "resolution" not in meta:
        raise ValueError(
            f"input_dir: {model_stage.path}/diffmask.json lacks prompt_builder/resolution; export it with the fit stage"
        )
    with open_dict(cfg):
        # attention maps and masks are compared at the resolution the model was trained at, on
        # real images normalised as its training images were (models from before: raw)
        cfg.data.size = int(meta["resolution"])
        if cfg.data.get("intensity", "raw") != components.intensity:
            log.info("data.intensity=%s: the model at %s was trained on it", components.intensity, model_stage.path)
        cfg.data.intensity = components.intensity
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, components=components, prompt_builder=prompt_builder_from_dict(meta["prompt_builder"]))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer)
    trainer.test(model, datamodule=datamodule)
    metrics = dict(model.results)
    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir) / "metrics.json"
        write_mask_rows(Path(cfg.paths.output_dir) / MASK_ROWS_FILE, model.per_image)
        write_metrics(out, metrics, extra={
            "model_dir": str(model_stage.path),
            "data": {"real": datamodule.real.name},  # "phantom" when data=auto found no JSRT folder
            "test_sets": datamodule.test_set_names,
            "test_set_info": datamodule.test_set_info(),
            "missing_test_sets": datamodule.missing_test_sets,
            "timesteps": list(cfg.model.timesteps),
            "size": int(meta["resolution"]),
            "intensity": cfg.data.intensity,
            "channels": int(cfg.data.channels),
            "overrides": job_overrides(),
            "seed": cfg.seed,
        })
        log.info("metrics written to %s", out)
        for key in sorted(k for k in metrics if k.endswith("miou")):
            log.info("%s = %.4f", key, metrics[key])
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate_masks")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, run(cfg))


if __name__ == "__main__":
    main()
