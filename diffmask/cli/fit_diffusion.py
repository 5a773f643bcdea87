"""Diffusion stage: train a text-conditioned diffusion model on real images and their prompts.

    diffmask-fit-diffusion data=jsrt data.size=128 trainer=gpu name=px128
    diffmask-fit-diffusion diffusion=pretrained diffusion.components.model_path=/models/sd-v1-5 data.size=256

Writes the model in diffusers format (+ ``diffmask.json``, ``stage.json``) to
``${paths.artifact_dir}/diffusion/<name>`` and ``metrics.json`` into the run dir.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.cli.common import commit_fit_stage, resumable_fit, seed_run, skip_complete_stage, stage_task
from diffmask.config import CONFIG_PATH
from diffmask.domains.chest.anatomy import MASK_FIELDS, AnatomyPathologyPrompts, FindingsSource
from diffmask.prompts.builder import PromptBuilder
from diffmask.prompts.tokenizer import prompt_vocabulary

log = logging.getLogger("diffmask.fit_diffusion")


def _train_metas(datamodule) -> list[dict[str, str]]:
    """Metadata of the real training images (their words join the scratch tokenizer's vocabulary)."""
    return [datamodule.real.load(sid).meta for sid in datamodule.real_train_ids]


def add_mask_findings(builder: AnatomyPathologyPrompts, datamodule, model) -> None:
    """Put the mask-derived findings of the images the fit may use into their metadata.

    ``prompts.mask_findings``: ``labelled`` = the alignment's labelled images (none when alignment
    is off), ``all`` = every real training image, ``none`` = no image.
    """
    if builder.mask_findings == "all":
        ids = list(datamodule.real_train_ids)
    elif builder.mask_findings == "labelled":
        ids = model.draw_labelled_ids(datamodule)
    else:
        ids = []
    findings = {}
    for sid in ids:
        sample = datamodule.real.load(sid)
        derived = builder.derive(sample.meta, sample.label)
        findings[sid] = {k: v for k, v in derived.items() if k in MASK_FIELDS}
    datamodule.real = FindingsSource(datamodule.real, findings)
    log.info("prompts: mask findings (%s) of %d training images", builder.mask_findings, len(findings))


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
    components_target = hydra.utils.get_method(cfg.diffusion.components._target_)
    extra: dict[str, Any] = {}
    if "vocabulary" in inspect.signature(components_target).parameters:
        extra["vocabulary"] = prompt_vocabulary(
            [*prompt_builder.words(), *cfg.diffusion.components.get("vocabulary", [])], _train_metas(datamodule)
        )
    components = hydra.utils.instantiate(cfg.diffusion.components, **extra)
    model = hydra.utils.instantiate(cfg.diffusion, components=components, prompt_builder=prompt_builder)
    if isinstance(prompt_builder, AnatomyPathologyPrompts):
        prompt_builder.check_length(components.tokenizer)
        add_mask_findings(prompt_builder, datamodule, model)
    # the metadata values the model is fitted with; others (another hospital's) get neutral words
    prompt_builder.learn_values(_train_metas(datamodule))

    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, model, datamodule, work)

    if not trainer.is_global_zero:
        return metrics
    # the input normalisation the model learnt; evaluate-masks feeds real images the same way
    autoencoder_dir = cfg.diffusion.components.get("autoencoder_dir")
    model.export(work, extra={"labelled_ids": sorted(model.labelled_ids or []), "intensity": datamodule.intensity,
                              **({"autoencoder_dir": str(autoencoder_dir)} if autoencoder_dir else {})})
    counts = {
        "n_real_train": len(datamodule.real_train_ids),
        "n_labelled": len(model.labelled_ids or []),
        "space": "latent" if components.latent else "pixel",
        "resolution": model.resolution,
        "channels": components.channels,
    }
    info = commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule, "model_dir", counts,
                            inputs={"autoencoder": str(autoencoder_dir)} if autoencoder_dir else None)
    log.info("diffusion model written to %s (%d steps, %s images/s)", stage.path, info["steps"],
             "n/a" if info["images_per_s"] is None else f"{info['images_per_s']:.1f}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_diffusion")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
