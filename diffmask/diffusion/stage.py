"""The diffusion stage: fit a text-conditioned diffusion model on the real images and their prompts.

:func:`fit_diffusion` is what ``diffmask-fit-diffusion`` runs (:mod:`diffmask.cli.fit_diffusion`,
which skips a complete stage and seeds the run first): :func:`build_diffusion` instantiates the
data, the prompt builder, the model's components and the Lightning module;
:func:`prepare_prompts` readies the prompt builder for the fit (its ``prepare_fit``: the metadata
values seen, and a domain builder's own steps); the fit resumes from the stage's checkpoints; the export is
the model in diffusers format (+ ``diffmask.json``) and ``stage.json`` in the stage folder, and
``metrics.json`` in the run dir.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.data.datamodule import SegmentationDataModule
from diffmask.diffusion.components import DiffusionComponents
from diffmask.diffusion.module import DiffusionLitModule
from diffmask.prompts.builder import PromptBuilder
from diffmask.prompts.tokenizer import prompt_vocabulary
from diffmask.stages import commit_fit_stage, resumable_fit

__all__ = [
    "DiffusionRun",
    "build_diffusion",
    "check_prompt_builder",
    "fit_diffusion",
    "prepare_prompts",
]

# the stage's messages keep the logger name of diffmask-fit-diffusion
log = logging.getLogger("diffmask.fit_diffusion")


@dataclass
class DiffusionRun:
    """One diffusion fit's objects, as :func:`build_diffusion` made them.

    Args:
        datamodule: the real data (set up: its training ids are drawn).
        prompt_builder: makes the prompts from each image's metadata.
        components: the model's UNet, text encoder, tokenizer, scheduler (and VAE).
        model: the :class:`~diffmask.diffusion.module.DiffusionLitModule`.
    """

    datamodule: SegmentationDataModule
    prompt_builder: PromptBuilder
    components: DiffusionComponents
    model: DiffusionLitModule


def check_prompt_builder(target: str) -> None:
    """A ValueError unless ``prompts._target_`` is a :class:`~diffmask.prompts.builder.PromptBuilder`.

    Args:
        target: the ``prompts`` config's ``_target_``.
    """
    if not issubclass(hydra.utils.get_class(target), PromptBuilder):
        raise ValueError(
            f"prompts: the diffusion fit needs a prompt builder (prompts=default), got {target}; "
            "prompts=retrieval is for diffmask-generate"
        )


def build_diffusion(cfg: DictConfig) -> DiffusionRun:
    """Instantiate the data (and set it up, so bad data fails first), the prompt builder, the
    components (a scratch tokenizer learns the prompts' words) and the module.

    Args:
        cfg: the ``fit_diffusion`` config.
    """
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")
    check_prompt_builder(cfg.prompts._target_)
    prompt_builder = hydra.utils.instantiate(cfg.prompts, class_names=list(datamodule.class_names))
    components_target = hydra.utils.get_method(cfg.diffusion.components._target_)
    extra: dict[str, Any] = {}
    if "vocabulary" in inspect.signature(components_target).parameters:
        extra["vocabulary"] = prompt_vocabulary(
            [*prompt_builder.words(), *cfg.diffusion.components.get("vocabulary", [])],
            datamodule.train_metas(),
        )
    components = hydra.utils.instantiate(cfg.diffusion.components, **extra)
    model = hydra.utils.instantiate(cfg.diffusion, components=components, prompt_builder=prompt_builder)
    return DiffusionRun(datamodule, prompt_builder, components, model)


def prepare_prompts(run: DiffusionRun) -> None:
    """Ready the prompt builder for the fit (:meth:`~diffmask.prompts.builder.PromptBuilder.prepare_fit`:
    every builder learns the training metadata values; a domain's builder may add more, e.g. the
    chest report builder's mask-derived findings).

    Args:
        run: the fit's objects.
    """
    run.prompt_builder.prepare_fit(run.components.tokenizer, run.datamodule,
                                   lambda: run.model.draw_labelled_ids(run.datamodule))


def fit_diffusion(cfg: DictConfig, stage) -> dict[str, Any]:
    """Fit the diffusion model described by ``cfg`` and export it into ``stage``.

    Args:
        cfg: the ``fit_diffusion`` config (seeded already).
        stage: the stage folder (:class:`~diffmask.artifacts.StageDir` of ``cfg.output_dir``).

    Returns:
        The final ``train/*`` and ``val/*`` metrics.
    """
    run = build_diffusion(cfg)
    prepare_prompts(run)
    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, run.model, run.datamodule, work)
    if not trainer.is_global_zero:
        return metrics
    model, datamodule = run.model, run.datamodule
    # the input normalisation the model learnt; evaluate-masks feeds real images the same way
    autoencoder_dir = cfg.diffusion.components.get("autoencoder_dir")
    model.export(
        work,
        extra={
            "labelled_ids": sorted(model.labelled_ids or []),
            "intensity": datamodule.intensity,
            **({"autoencoder_dir": str(autoencoder_dir)} if autoencoder_dir else {}),
        },
    )
    counts = {
        "n_real_train": len(datamodule.real_train_ids),
        "n_labelled": len(model.labelled_ids or []),
        "space": "latent" if run.components.latent else "pixel",
        "resolution": model.resolution,
        "channels": run.components.channels,
    }
    info = commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule,
                            "model_dir", counts,
                            inputs={"autoencoder": str(autoencoder_dir)} if autoencoder_dir else None)
    log.info(
        "diffusion model written to %s (%d steps, %s images/s)",
        stage.path,
        info["steps"],
        "n/a" if info["images_per_s"] is None else f"{info['images_per_s']:.1f}",
    )
    return metrics
