"""Diffusion stage: train a text-conditioned diffusion model on real X-rays and their prompts.

    diffmask-fit-diffusion data=jsrt data.size=128 trainer=gpu name=px128
    diffmask-fit-diffusion diffusion=pretrained diffusion.components.model_path=/models/sd-v1-5 data.size=256

Writes the model in diffusers format (+ ``diffmask.json``, ``stage.json``) to
``${paths.artifact_dir}/diffusion/<name>`` and ``metrics.json`` into the run dir.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from diffmask.artifacts import StageDir
from diffmask.cli.common import (
    CONFIG_PATH,
    instantiate_loggers,
    log_config,
    require_training,
    seed_run,
    skip_complete_stage,
    stage_task,
    write_metrics,
)
from diffmask.diffusion.throughput import TrainingThroughput
from diffmask.prompts.builder import PromptBuilder
from diffmask.prompts.tokenizer import prompt_vocabulary

log = logging.getLogger("diffmask.fit_diffusion")


def _train_metas(datamodule) -> list[dict[str, str]]:
    """Metadata of the real training images (their words join the scratch tokenizer's vocabulary)."""
    return [datamodule.real.load(sid).meta for sid in datamodule.real_train_ids]


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the diffusion model described by ``cfg`` and export it; returns the final metrics."""
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    if not issubclass(hydra.utils.get_class(cfg.prompts._target_), PromptBuilder):
        raise ValueError(
            f"prompts: the diffusion fit needs a prompt builder (prompts=default), got {cfg.prompts._target_}; "
            "prompts=retrieval is for diffmask-generate"
        )
    prompt_builder = hydra.utils.instantiate(cfg.prompts, class_names=list(datamodule.class_names))
    # the metadata values the model is fitted with; others (another hospital's) get neutral words
    prompt_builder.learn_values(_train_metas(datamodule))
    components_target = hydra.utils.get_method(cfg.diffusion.components._target_)
    extra: dict[str, Any] = {}
    if "vocabulary" in inspect.signature(components_target).parameters:
        extra["vocabulary"] = prompt_vocabulary(
            [*prompt_builder.words(), *cfg.diffusion.components.get("vocabulary", [])], _train_metas(datamodule)
        )
    components = hydra.utils.instantiate(cfg.diffusion.components, **extra)
    model = hydra.utils.instantiate(cfg.diffusion, components=components, prompt_builder=prompt_builder)

    work = stage.begin(resume=True)
    ckpt_dir = work / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False, save_last=True,
        every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1, monitor="step", mode="max",
    )
    throughput = TrainingThroughput()
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[checkpoint, throughput], logger=loggers or False)
    require_training(trainer)
    log_config(cfg, loggers)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None and (ckpt_dir / "last.ckpt").is_file():
        ckpt_path = str(ckpt_dir / "last.ckpt")
        log.info("resuming from %s", ckpt_path)
    start = time.time()
    # our own checkpoint (holds config objects), so full unpickling is safe
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
    fit_seconds = time.time() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
    if throughput.images_per_s is not None:
        metrics["train/images_per_s"] = throughput.images_per_s

    if not trainer.is_global_zero:
        return metrics
    # the input normalisation the model learnt; evaluate-masks feeds real images the same way
    model.export(work, extra={"labelled_ids": sorted(model.labelled_ids or []), "intensity": datamodule.intensity})
    if not cfg.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    info = {
        "steps": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 1),
        "images_per_s": throughput.images_per_s,
        "n_real_train": len(datamodule.real_train_ids),
        "n_labelled": len(model.labelled_ids or []),
        "space": "latent" if components.latent else "pixel",
        "resolution": model.resolution,
    }
    data = {"real": datamodule.real.name}  # "phantom" when data=auto found no JSRT folder
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs={}, counts=info, extra={"data": data})
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics,
                  extra={"model_dir": str(stage.path), "data": data, **info})
    log.info("diffusion model written to %s (%d steps, %s images/s)", stage.path, info["steps"],
             "n/a" if throughput.images_per_s is None else f"{throughput.images_per_s:.1f}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_diffusion")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
