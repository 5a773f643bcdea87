"""The ControlNet stage (EMIT-Diff): fit a ControlNet beside a diffusion model on the labelled real images.

:func:`fit_control` is what ``diffmask-fit-control`` runs (:mod:`diffmask.cli.fit_control`, which skips
a complete stage and seeds the run first): :func:`load_base_model` loads the diffusion model of
``input_dir`` and checks it against the data; :func:`build_control` makes the condition, the
ControlNet and the Lightning module; the fit resumes from the stage's checkpoints; the export is a
diffusers ``ControlNetModel`` folder, ``control.json`` and ``stage.json`` in the stage folder, and
``metrics.json`` in the run dir.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.control.module import ControlLitModule, build_controlnet
from diffmask.data.datamodule import SegmentationDataModule
from diffmask.diffusion.components import DiffusionComponents, load_components
from diffmask.domains.recorded import prompt_builder_from_dict
from diffmask.stages import commit_fit_stage, resumable_fit

__all__ = ["build_control", "check_base_model", "fit_control", "load_base_model"]

# the stage's messages keep the logger name of diffmask-fit-control
log = logging.getLogger("diffmask.fit_control")


def load_base_model(base_dir: Path, channels: int) -> DiffusionComponents:
    """The diffusion model in ``base_dir`` (a finished stage, or a model folder such as Stable Diffusion's).

    Args:
        base_dir: the ``input_dir`` folder.
        channels: ``data.channels``; the base model must generate that kind of image (a named error).
    """
    if (base_dir / "stage.json").is_file():
        StageDir(base_dir).info()  # a clear error when the diffusion stage has not finished
    return load_components(base_dir, channels=channels)


def check_base_model(
    components: DiffusionComponents, datamodule: SegmentationDataModule, base_dir: Path
) -> None:
    """A ValueError when the base model was fitted on other data settings, or with visual clues.

    Args:
        components: the base model.
        datamodule: the fit's data.
        base_dir: the base model's folder (for the messages).
    """
    meta = components.metadata
    if meta and datamodule.intensity != components.intensity:
        raise ValueError(
            f"data.intensity={datamodule.intensity}, but the diffusion model in {base_dir} was fitted on "
            f"data.intensity={components.intensity} images; give both stages the same setting"
        )
    if components.clues is not None:
        raise ValueError(
            f"input_dir: {base_dir} was fitted with diffusion.clues=codebook; a ControlNet on a model "
            "with visual clue tokens is not supported (fit the base model with clues=none)"
        )
    class_names = list(datamodule.class_names)
    if meta.get("class_names") and list(meta["class_names"]) != class_names:
        raise ValueError(
            f"data.class_names {class_names} differ from the diffusion model's {meta['class_names']}"
        )


def build_control(cfg: DictConfig, components: DiffusionComponents) -> ControlLitModule:
    """The condition, the ControlNet (copied from the base UNet) and the module of ``cfg.control``.

    Args:
        cfg: the ``fit_control`` config.
        components: the base model (its prompt builder, from ``diffmask.json``, makes the prompts).
    """
    meta = components.metadata
    builder = prompt_builder_from_dict(meta["prompt_builder"]) if "prompt_builder" in meta else None
    node = OmegaConf.to_container(cfg.control, resolve=True)
    embedding = node.pop("conditioning_embedding_out_channels", None)
    condition = hydra.utils.instantiate(node.pop("condition"))
    controlnet = build_controlnet(components.unet, condition.channels, components.vae_scale_factor, embedding)
    return hydra.utils.instantiate(
        node, components=components, controlnet=controlnet, condition=condition, prompt_builder=builder
    )


def fit_control(cfg: DictConfig, stage: StageDir) -> dict[str, Any]:
    """Fit the ControlNet described by ``cfg`` and export it into ``stage``.

    Args:
        cfg: the ``fit_control`` config (seeded already).
        stage: the stage folder (of ``cfg.output_dir``).

    Returns:
        The final ``train/*`` and ``val/*`` metrics.
    """
    base_dir = Path(cfg.input_dir)
    components = load_base_model(base_dir, int(cfg.data.channels))
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("fit")  # bad data fails before the ControlNet is built
    check_base_model(components, datamodule, base_dir)
    model = build_control(cfg, components)
    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, model, datamodule, work)
    if not trainer.is_global_zero:
        return metrics
    labelled = sorted(datamodule.real_train_ids)
    model.export(
        work,
        base_dir,
        extra={
            "labelled_ids": labelled,
            "intensity": datamodule.intensity,
            "class_names": list(datamodule.class_names),
        },
    )
    counts = {
        "n_labelled": len(labelled),
        "condition": model.condition.type,
        "resolution": model.resolution,
        "channels": model.channels,
    }
    info = commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule,
                            "control_dir", counts,
                            inputs={"diffusion": str(base_dir)})
    log.info(
        "ControlNet (%s) written to %s (%d steps on %d labelled images)",
        model.condition.type,
        stage.path,
        info["steps"],
        len(labelled),
    )
    return metrics
