"""diffmask-pipeline: (autoencoder fit -> codebook ->) diffusion fit (-> ControlNet fit) -> synthetic generation with masks -> segmentation
-> evaluation (-> optional fine-tuning of the segmentation model, e.g. synthetic pre-training then real data).

Each stage runs as its own process (``python -m diffmask.cli.<stage>``), so DDP trainer configs,
Hydra overrides and resumability work exactly as when the stage is run alone; the command of each
stage is logged so it can be rerun by hand.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.cli.common import CONFIG_PATH

log = logging.getLogger("diffmask.pipeline")

STAGES = ("fit_autoencoder", "fit_codebook", "fit_diffusion", "fit_control", "generate", "evaluate_masks", "train", "finetune")
# the CLI module each stage runs (finetune is a segmentation run that starts from train's weights)
MODULES = {"finetune": "train"}


def stage_commands(cfg: DictConfig, stamp: str | None = None) -> list[tuple[str, list[str]]]:
    """The command line of each configured stage, with the artifact folders wired between them.

    The segmentation stages of one invocation write to ``<log_dir>/pipeline/<name>/<stamp>/``
    (``train/``, ``finetune/``), so ``finetune`` finds the model ``train`` just made and
    ``diffmask-report <log_dir>/pipeline/<name>`` tables every invocation.
    """
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    stages = list(cfg.stages)
    if "finetune" in stages and ("train" not in stages or stages.index("train") > stages.index("finetune")):
        raise ValueError(f"stages: finetune starts from the train stage's model; put train before it, got {stages}")
    artifacts = Path(cfg.paths.artifact_dir)
    model_dir = artifacts / "diffusion" / cfg.name
    autoencoder_dir = artifacts / "autoencoder" / cfg.name
    codebook_dir = artifacts / "codebook" / cfg.name
    synth_dir = artifacts / "synthesis" / cfg.name
    control_dir = artifacts / "control" / cfg.name
    log_dir = Path(cfg.paths.log_dir)
    seg_dir = log_dir / "pipeline" / str(cfg.name) / (stamp or time.strftime("%Y-%m-%d_%H-%M-%S"))
    synthetic = [f"data.synthetic_dir={synth_dir}"] if "generate" in stages or synth_dir.exists() else []
    wiring = {
        "fit_autoencoder": [f"name={cfg.name}"],
        # a latent diffusion model (diffusion=latent in its overrides) on the pipeline's autoencoder
        # the visual codebook of the pipeline's autoencoder's patch features
        "fit_codebook": [f"name={cfg.name}", f"codebook.autoencoder_dir={autoencoder_dir}"],
        "fit_diffusion": [f"name={cfg.name}",
                          *([f"diffusion.components.autoencoder_dir={autoencoder_dir}"] if _latent(cfg) else []),
                          *([f"diffusion.codebook_dir={codebook_dir}"] if _clued(cfg) else [])],
        "fit_control": [f"name={cfg.name}", f"input_dir={model_dir}"],
        # controlled generation (synthesis=controlled in its overrides) reads the pipeline's ControlNet
        "generate": [f"name={cfg.name}", f"input_dir={model_dir}",
                     *([f"synthesis.control_dir={control_dir}"] if _controlled(cfg) else [])],
        "evaluate_masks": [f"input_dir={model_dir}"],
        "train": [*synthetic, f"hydra.run.dir={seg_dir}/train"],
        "finetune": [*synthetic, f"hydra.run.dir={seg_dir}/finetune", f"segmentation.init_weights={seg_dir}/train"],
    }
    commands = []
    for stage in stages:
        overrides = [
            f"paths.artifact_dir={artifacts}",
            f"paths.log_dir={log_dir}",
            *wiring[stage],
            *[str(o) for o in cfg.common],
            *[str(o) for o in cfg.get(stage, [])],
        ]
        commands.append((stage, [sys.executable, "-m", f"diffmask.cli.{MODULES.get(stage, stage)}", *overrides]))
    return commands


def _chooses(cfg: DictConfig, stage: str, choice: str) -> bool:
    """True when ``stage``'s overrides (or the common ones) hold ``choice``, e.g. ``synthesis=controlled``."""
    overrides = [str(o) for o in [*cfg.common, *cfg.get(stage, [])]]
    return any(o.replace(" ", "") == choice for o in overrides)


def _controlled(cfg: DictConfig) -> bool:
    """True when the generate stage makes controlled (ControlNet) samples."""
    return _chooses(cfg, "generate", "synthesis=controlled")


def _latent(cfg: DictConfig) -> bool:
    """True when the diffusion fit is a latent model on the pipeline's autoencoder."""
    return _chooses(cfg, "fit_diffusion", "diffusion=latent")


def _clued(cfg: DictConfig) -> bool:
    """True when the diffusion fit takes visual clues from the pipeline's codebook."""
    return _chooses(cfg, "fit_diffusion", "diffusion.clues=codebook")


def run(cfg: DictConfig) -> None:
    for stage, cmd in stage_commands(cfg):
        printable = " ".join(shlex.quote(c) for c in [f"diffmask-{cmd[2].rsplit('.', 1)[-1].replace('_', '-')}", *cmd[3:]])
        log.info("stage %s: %s", stage, printable)
        if cfg.dry_run:
            continue
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise SystemExit(f"pipeline: stage {stage} failed (exit {result.returncode}); rerun it with:\n  {printable}")
    log.info("pipeline %s finished", cfg.name)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    log.debug(OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
