"""diffmask-pipeline: (autoencoder fit -> codebook ->) diffusion fit (-> ControlNet fit) -> synthetic generation with masks
(DiffMask's attention-mask pairs and/or EMIT-Diff's controlled pairs) -> segmentation (-> fine-tuning on the real
images) -> a paired comparison with a real-data baseline, over several training seeds.

Each stage runs as its own process (``python -m diffmask.cli.<stage>``), so DDP trainer configs,
Hydra overrides, launchers and resumability work exactly as when the stage is run alone; the command
of each stage is logged so it can be rerun by hand.
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

STAGES = ("fit_autoencoder", "fit_codebook", "fit_diffusion", "fit_control", "generate", "generate_control",
          "evaluate_masks", "baseline", "train", "finetune", "compare")
# the CLI module each stage runs: generate_control is a controlled (ControlNet) generation; baseline is a
# segmentation run on the real images alone, finetune one that starts from train's weights
MODULES = {"generate_control": "generate", "baseline": "train", "finetune": "train"}
# the stages that train a segmentation model: run once per seed of `seeds` when it is given
SEGMENTATION = ("baseline", "train", "finetune")


def stage_commands(cfg: DictConfig, stamp: str | None = None) -> list[tuple[str, list[str]]]:
    """The command line of each configured stage, with the artifact folders wired between them.

    The segmentation stages of one invocation write to ``<log_dir>/pipeline/<name>/<stamp>/``
    (``baseline/``, ``train/``, ``finetune/``; with ``seeds``, one ``seed<k>/`` run below each), so
    ``finetune`` finds the model ``train`` just made, ``compare`` the runs of both sides, and
    ``diffmask-report <log_dir>/pipeline/<name>`` tables every invocation. ``stamp`` (the argument,
    else ``cfg.stamp``, else the time now) names that folder: given an interrupted invocation's, the
    runs that finished (their ``metrics.json`` written) are not run again.

    Raises:
        ValueError: an unknown stage, stages in an order that cannot be wired, ``generate`` asked
            for controlled samples, a ``seeds`` list that is empty or not of integers, or a
            ``launcher`` without seeds.
    """
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    stages = list(cfg.stages)
    _check_order(stages, cfg)
    seeds = _seeds(cfg)
    if cfg.get("launcher") and not seeds:
        raise ValueError(f"launcher={cfg.launcher} runs the seeds of the segmentation stages; set seeds, e.g. seeds=[0,1,2]")
    artifacts = Path(cfg.paths.artifact_dir)
    model_dir = artifacts / "diffusion" / cfg.name
    autoencoder_dir = artifacts / "autoencoder" / cfg.name
    codebook_dir = artifacts / "codebook" / cfg.name
    control_dir = artifacts / "control" / cfg.name
    synth_dirs = {"generate": artifacts / "synthesis" / cfg.name,
                  "generate_control": artifacts / "synthesis" / f"{cfg.name}_control"}
    log_dir = Path(cfg.paths.log_dir)
    seg_dir = log_dir / "pipeline" / str(cfg.name) / str(stamp or cfg.get("stamp") or time.strftime("%Y-%m-%d_%H-%M-%S"))
    # the sets the segmentation stages read: made by this invocation or by an earlier one
    sets = [str(d) for s, d in synth_dirs.items() if s in stages or d.exists()]
    synthetic = [] if not sets else [f"data.synthetic_dir={sets[0]}" if len(sets) == 1 else f"data.synthetic_dir=[{','.join(sets)}]"]
    per_seed = "/seed${seed}" if seeds else ""
    tuned = next((s for s in ("finetune", "train") if s in stages), None)
    wiring = {
        "fit_autoencoder": [f"name={cfg.name}"],
        # the visual codebook of the pipeline's autoencoder's patch features
        "fit_codebook": [f"name={cfg.name}", f"codebook.autoencoder_dir={autoencoder_dir}"],
        # a latent diffusion model (diffusion=latent in its overrides) on the pipeline's autoencoder
        "fit_diffusion": [f"name={cfg.name}",
                          *([f"diffusion.components.autoencoder_dir={autoencoder_dir}"] if _latent(cfg) else []),
                          *([f"diffusion.codebook_dir={codebook_dir}"] if _clued(cfg) else [])],
        "fit_control": [f"name={cfg.name}", f"input_dir={model_dir}"],
        "generate": [f"name={cfg.name}", f"input_dir={model_dir}"],
        # EMIT-Diff: the pipeline's ControlNet steers the pipeline's diffusion model
        "generate_control": [f"name={cfg.name}_control", f"input_dir={model_dir}", "synthesis=controlled",
                             f"synthesis.control_dir={control_dir}"],
        "evaluate_masks": [f"input_dir={model_dir}"],
        "baseline": [],
        "train": [*synthetic],
        "finetune": [*synthetic, f"segmentation.init_weights={seg_dir}/train{per_seed}"],
    }
    commands = []
    for stage in stages:
        if stage == "compare":
            commands.append((stage, [sys.executable, "-m", "diffmask.cli.compare",
                                     "--a", f"{seg_dir}/{tuned}", "--b", f"{seg_dir}/baseline",
                                     "--name-a", tuned, "--name-b", "baseline", "--out", f"{seg_dir}/compare.md"]))
            continue
        overrides = [
            f"paths.artifact_dir={artifacts}",
            f"paths.log_dir={log_dir}",
            *wiring[stage],
            *(_run_dirs(seg_dir / stage, seeds) if stage in SEGMENTATION else []),
            *[str(o) for o in cfg.common],
            *[str(o) for o in cfg.get(stage, [])],
        ]
        flags = []
        if stage in SEGMENTATION:
            # an invocation resumed (stamp=<its folder>) runs only what it has not finished
            todo = [s for s in seeds if not _finished(seg_dir / stage / f"seed{s}")] if seeds else []
            if _finished(seg_dir / stage) or (seeds and not todo):
                log.info("stage %s: %s holds finished runs; skipping", stage, seg_dir / stage)
                continue
            if seeds:
                # one run per training seed (last, so that it wins); the labelled subset stays the one the
                # generator was fitted with
                flags = ["--multirun"]
                overrides += [f"seed={','.join(map(str, todo))}", f"data.seed={_data_seed(cfg)}",
                              *([f"hydra/launcher={cfg.launcher}"] if cfg.get("launcher") else [])]
        commands.append((stage, [sys.executable, "-m", f"diffmask.cli.{MODULES.get(stage, stage)}", *flags, *overrides]))
    return commands


def _check_order(stages: list[str], cfg: DictConfig) -> None:
    def before(first: str, then: str) -> bool:
        return first in stages and stages.index(first) < stages.index(then)

    if "finetune" in stages and not before("train", "finetune"):
        raise ValueError(f"stages: finetune starts from the train stage's model; put train before it, got {stages}")
    if "compare" in stages:
        if not before("baseline", "compare") or not any(before(s, "compare") for s in ("train", "finetune")):
            raise ValueError(
                "stages: compare sets this invocation's fine-tuned (or trained) model against its baseline; put "
                f"baseline and train (and finetune) before it, got {stages}"
            )
    if _chooses(cfg, "generate", "synthesis=controlled"):
        raise ValueError(
            "generate: synthesis=controlled is the generate_control stage (it reads the pipeline's ControlNet and "
            "writes <name>_control beside generate's attention-mask set); use stages=[..., fit_control, "
            "generate_control, ...] and give its settings as generate_control=[...]"
        )


def _finished(run_dir: Path) -> bool:
    """True when a segmentation run has written its metrics.json (written last, atomically)."""
    return (run_dir / "metrics.json").is_file()


def _run_dirs(folder: Path, seeds: list[int]) -> list[str]:
    """Where a segmentation stage writes: its folder, or with seeds one ``seed<k>/`` run below it."""
    if seeds:
        return [f"hydra.sweep.dir={folder}", "hydra.sweep.subdir=seed${seed}"]
    return [f"hydra.run.dir={folder}"]


def _seeds(cfg: DictConfig) -> list[int]:
    seeds = cfg.get("seeds")
    if seeds is None:
        return []
    if isinstance(seeds, int | str) or not len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds: expected null or a non-empty list of integer training seeds, e.g. [0,1,2]; got {seeds}")
    return [int(s) for s in seeds]


def _data_seed(cfg: DictConfig) -> str:
    """The data seed of the common overrides (``data.seed=``, else ``seed=``, else 0): the labelled subset."""
    values = _override_values(cfg)
    return values.get("data.seed", values.get("seed", "0"))


def _override_values(cfg: DictConfig, stage: str | None = None) -> dict[str, str]:
    """``key -> value`` of the common overrides (and ``stage``'s after them); the last of a key wins, as in Hydra."""
    values = {}
    for o in [*cfg.common, *(cfg.get(stage, []) if stage else [])]:
        key, _, value = str(o).partition("=")
        values[key.strip()] = value.strip()
    return values


def _chooses(cfg: DictConfig, stage: str, choice: str) -> bool:
    """True when ``stage``'s overrides (or the common ones) end up with ``choice``, e.g. ``synthesis=controlled``."""
    key, _, value = choice.partition("=")
    return _override_values(cfg, stage).get(key) == value


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
