"""Generation: sample a trained diffusion model into a synthetic dataset folder.

    diffmask-generate input_dir=artifacts/diffusion/px128 num_samples=1000 trainer=gpu
    diffmask-generate input_dir=artifacts/diffusion/px128 trainer=ddp trainer.devices=4
    diffmask-generate input_dir=artifacts/diffusion/px128 init_images=train strength=0.5   # SDEdit variations

Writes ``images/<id>.png`` + ``manifest.jsonl`` + ``stage.json`` to
``${paths.artifact_dir}/synthesis/<name>``; a rerun resumes where it stopped, and a rerun of a
complete stage with a larger ``num_samples`` (nothing else changed) adds the missing samples. With
``synthesis=attention_masks`` also ``masks/<id>.png`` (threshold/CRF), ``attn/<id>.npz`` (class
maps) and, when ``affinity`` is in ``synthesis.refine``, a second pass that fits AffinityNet on
the written images + masks and writes ``masks_affinity/`` (see
:mod:`diffmask.synthesis.affinity_pass`). ``init_images=train`` starts each sample from a real
training image noised to ``strength`` of the schedule instead of pure noise
(:mod:`diffmask.synthesis.variations`).

``data.channels`` must be the channels the model (and a ControlNet) was fitted on (a named error
otherwise); a colour model writes RGB PNGs, and ``stage.json`` records ``channels``.

``logger=wandb`` logs the finished set to W&B: a grid of
its first pairs (image with its mask as an overlay) and its counts, in the run's group
(:mod:`diffmask.evaluation.wandb_logging`).

This module only opens the stage (skip, resume or grow it); what is sampled is planned by
:mod:`diffmask.synthesis.kinds` (one function per kind: prompts, variations, controlled) and run
into the stage by :func:`diffmask.synthesis.stage.run_generation`.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.config import CONFIG_PATH, RUN_ONLY_SETTINGS
from diffmask.data.manifest import read_manifest
from diffmask.stages import seed_run, skip_complete_stage, stage_task
from diffmask.synthesis import read_done_rows, read_dropped
from diffmask.synthesis.kinds import generation_kind, plan_generation
from diffmask.synthesis.labels import affinity_device, build_synthesis
from diffmask.synthesis.stage import run_generation
from diffmask.synthesis.writer import set_channels

__all__ = ["run", "main", "affinity_device", "build_synthesis"]  # the last two: for diffmask.cli.remask

log = logging.getLogger("diffmask.generate")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate the samples described by ``cfg``; returns counts.

    Args:
        cfg: the composed ``generate`` config.
    """
    seed_run(cfg)  # requests and the affinity pass draw from it
    kind = generation_kind(cfg)
    stage = StageDir(cfg.output_dir)
    if not _open_stage(stage, cfg, extendable=kind != "controlled"):
        return {}
    model_stage = StageDir(cfg.input_dir)
    model_stage.info()  # a clear error when the diffusion stage has not finished
    plan = plan_generation(cfg, model_stage.path, kind)
    return run_generation(cfg, stage, plan, hydra.utils.instantiate(cfg.trainer, _partial_=True))


def _open_stage(stage: StageDir, cfg: DictConfig, extendable: bool) -> bool:
    """Whether to generate: False for a complete stage to skip; reopens one that only grows."""
    if not cfg.get("force") and extendable and stage.is_complete() and _only_more_samples(stage, cfg):
        # requests are prefix-stable: the first num_samples of a larger run are the same samples
        log.info("%s: extending from %d to %d samples (the ones on disk are kept; the set stays readable "
                 "until done)", stage.path, stage.info()["config"]["num_samples"], cfg.num_samples)
        _reopen(stage)
        return True
    return not skip_complete_stage(stage, cfg)


def _reopen(stage: StageDir) -> None:
    """Reopen a complete stage to add samples, or resume an interrupted extension of it."""
    if not stage.tmp_path.exists():
        stage.reopen()
        return
    # an interrupted extension, resumed by the run, if it holds the complete set's samples
    have = {*read_done_rows(stage.tmp_path), *read_dropped(stage.tmp_path)}
    lost = [r.id for r in read_manifest(stage.path) if r.id not in have]
    if lost:
        raise ValueError(
            f"{stage.tmp_path}: this work folder lacks {len(lost)} samples of the complete set "
            f"(e.g. {lost[:3]}), so it is not an interrupted extension; delete it to grow {stage.path}"
        )


def _only_more_samples(stage: StageDir, cfg: DictConfig) -> bool:
    """True when ``cfg`` asks a complete stage for more samples and changes nothing else."""
    old = stage.info().get("config", {}).get("num_samples")
    if cfg.prompt_list or not isinstance(old, int) or cfg.num_samples <= old:
        return False
    current = OmegaConf.to_container(cfg, resolve=True)
    ignore = (*RUN_ONLY_SETTINGS, "num_samples")
    changed = [c.split(":", 1)[0] for c in stage.changed_settings(current, ignore=ignore)]
    # a set from before channels were recorded is grey
    if set_channels(stage.path) != int(cfg.data.get("channels", 1)):
        return False
    # of the data group, generation reads only the real source (prompt metadata) and the class names
    read = ("data.real.", "data.class_names")
    return not [k for k in changed if not k.startswith("data.") or k.startswith(read)]


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="generate")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-generate`` entry point.

    Args:
        cfg: the composed ``generate`` config (Hydra).
    """
    run(cfg)


if __name__ == "__main__":
    main()
