"""ControlNet stage (EMIT-Diff): fit a ControlNet beside a diffusion model on the labelled real images.

    diffmask-fit-control input_dir=artifacts/diffusion/cpu64 data.real_fraction=0.1 control.condition.type=mask name=mask
    diffmask-fit-control input_dir=/models/sd-v1-5 data.size=256 trainer=gpu

Writes a diffusers ``ControlNetModel`` folder (``config.json`` + weights), ``control.json`` (the
base model and its fingerprint, the condition settings) and ``stage.json`` to
``${paths.artifact_dir}/control/<name>``; ``metrics.json`` into the run dir. Resumable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.cli.common import commit_fit_stage, resumable_fit, seed_run, skip_complete_stage, stage_task
from diffmask.config import CONFIG_PATH
from diffmask.control.module import build_controlnet
from diffmask.diffusion.components import load_components
from diffmask.prompts.builder import prompt_builder_from_dict

log = logging.getLogger("diffmask.fit_control")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the ControlNet described by ``cfg`` and export it; returns the final metrics."""
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    base_dir = Path(cfg.input_dir)
    if (base_dir / "stage.json").is_file():
        StageDir(base_dir).info()  # a clear error when the diffusion stage has not finished
    # the base model must generate the data's kind of image (grey or colour): a named error otherwise
    components = load_components(base_dir, channels=int(cfg.data.channels))
    meta = components.metadata
    datamodule = hydra.utils.instantiate(cfg.data)
    if meta and datamodule.intensity != components.intensity:
        raise ValueError(
            f"data.intensity={datamodule.intensity}, but the diffusion model in {base_dir} was fitted on "
            f"data.intensity={components.intensity} images; give both stages the same setting"
        )
    if components.clues is not None:
        raise ValueError(
            f"input_dir: {base_dir} was fitted with diffusion.clues=codebook; a ControlNet on a model with visual "
            "clue tokens is not supported (fit the base model with clues=none)"
        )
    class_names = list(datamodule.class_names)
    if meta.get("class_names") and list(meta["class_names"]) != class_names:
        raise ValueError(f"data.class_names {class_names} differ from the diffusion model's {meta['class_names']}")
    builder = prompt_builder_from_dict(meta["prompt_builder"]) if "prompt_builder" in meta else None

    node = OmegaConf.to_container(cfg.control, resolve=True)
    embedding = node.pop("conditioning_embedding_out_channels", None)
    condition = hydra.utils.instantiate(node.pop("condition"))
    controlnet = build_controlnet(components.unet, condition.channels, components.vae_scale_factor, embedding)
    model = hydra.utils.instantiate(node, components=components, controlnet=controlnet, condition=condition,
                                    prompt_builder=builder)

    work = stage.begin(resume=True)
    trainer, metrics, fit_seconds = resumable_fit(cfg, model, datamodule, work)
    if not trainer.is_global_zero:
        return metrics
    labelled = sorted(datamodule.real_train_ids)
    model.export(work, base_dir, extra={"labelled_ids": labelled, "intensity": datamodule.intensity,
                                        "class_names": class_names})
    counts = {"n_labelled": len(labelled), "condition": condition.type, "resolution": model.resolution,
              "channels": model.channels}
    info = commit_fit_stage(cfg, stage, work, trainer, metrics, fit_seconds, datamodule, "control_dir", counts,
                            inputs={"diffusion": str(base_dir)})
    log.info("ControlNet (%s) written to %s (%d steps on %d labelled images)", condition.type, stage.path,
             info["steps"], len(labelled))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_control")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
