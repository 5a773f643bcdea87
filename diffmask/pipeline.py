"""diffmask-pipeline: (autoencoder fit -> codebook ->) diffusion fit (-> ControlNet fit) -> synthetic
generation with masks (DiffMask's attention-mask pairs and/or EMIT-Diff's controlled pairs) ->
segmentation (-> fine-tuning on the real images) -> a paired comparison with a real-data baseline,
over several training seeds.

Each stage runs as its own process (``python -m diffmask.cli.<stage>``), so DDP trainer configs,
Hydra overrides, launchers and resumability work exactly as when the stage is run alone; the command
of each stage is logged so it can be rerun by hand. Before the first one starts (and in a dry run),
every stage's config is composed with its overrides, so a misspelt key or group option in the last
stage fails in seconds, not when that stage starts.

:func:`stage_commands` wires the stages (which overrides each gets, the order they need, the runs a
resumed invocation skips), :func:`check_stage_configs` composes them, :func:`run` runs them; the
``diffmask-pipeline`` entry point is :mod:`diffmask.cli.pipeline`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from diffmask.config import CONFIG_PATH
from diffmask.evaluation.wandb_logging import GROUP_ENV, JOB_TYPE_ENV, folder_label

log = logging.getLogger("diffmask.pipeline")

STAGES = ("fit_autoencoder", "fit_codebook", "fit_diffusion", "fit_control", "generate", "generate_control",
          "evaluate_masks", "baseline", "train", "finetune", "compare")
# the CLI module each stage runs: generate_control is a controlled (ControlNet) generation; baseline is a
# segmentation run on the real images alone, finetune one that starts from train's weights
MODULES = {"generate_control": "generate", "baseline": "train", "finetune": "train"}
# the stages that train a segmentation model: run once per seed of `seeds` when it is given
SEGMENTATION = ("baseline", "train", "finetune")


@dataclass(frozen=True)
class _Folders:
    """Where an invocation's stages read and write (see :func:`stage_commands`)."""

    artifacts: Path
    log_dir: Path
    seg_dir: Path  # <log_dir>/pipeline/<name>/<stamp>: the segmentation stages' runs


def _folders(cfg: DictConfig, stamp: str | None) -> _Folders:
    """The invocation's folders; ``stamp`` (else ``cfg.stamp``, else the time now) names its segmentation
    folder."""
    log_dir = Path(cfg.paths.log_dir)
    stamp = str(stamp or cfg.get("stamp") or time.strftime("%Y-%m-%d_%H-%M-%S"))
    return _Folders(Path(cfg.paths.artifact_dir), log_dir, log_dir / "pipeline" / str(cfg.name) / stamp)


def _checked_stages(cfg: DictConfig) -> tuple[list[str], list[int]]:
    """The stages (known, in an order that can be wired) and the training seeds ([] without ``seeds``)."""
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages: unknown stage(s) {unknown}; expected a subset of {list(STAGES)}")
    stages = list(cfg.stages)
    _check_order(stages, cfg)
    seeds = _seeds(cfg)
    if cfg.get("launcher") and not seeds:
        raise ValueError(f"launcher={cfg.launcher} runs the seeds of the segmentation stages; set seeds, "
                         "e.g. seeds=[0,1,2]")
    return stages, seeds


def _synthetic_overrides(cfg: DictConfig, stages: list[str], artifacts: Path) -> list[str]:
    """``data.synthetic_dir=`` for the segmentation stages: the sets made by this invocation or by an earlier
    one."""
    synth_dirs = {"generate": artifacts / "synthesis" / cfg.name,
                  "generate_control": artifacts / "synthesis" / f"{cfg.name}_control"}
    sets = [str(d) for s, d in synth_dirs.items() if s in stages or d.exists()]
    if not sets:
        return []
    return [f"data.synthetic_dir={sets[0]}" if len(sets) == 1 else f"data.synthetic_dir=[{','.join(sets)}]"]


def _wiring(cfg: DictConfig, stages: list[str], seeds: list[int], folders: _Folders) -> dict[str, list[str]]:
    """The overrides that wire each stage to the folders the stages before it write."""
    artifacts, seg_dir = folders.artifacts, folders.seg_dir
    model_dir = artifacts / "diffusion" / cfg.name
    autoencoder_dir = artifacts / "autoencoder" / cfg.name
    latent = [f"diffusion.components.autoencoder_dir={autoencoder_dir}"] if _latent(cfg) else []
    clued = [f"diffusion.codebook_dir={artifacts / 'codebook' / cfg.name}"] if _clued(cfg) else []
    synthetic = _synthetic_overrides(cfg, stages, artifacts)
    per_seed = "/seed${seed}" if seeds else ""
    return {
        "fit_autoencoder": [f"name={cfg.name}"],
        # the visual codebook of the pipeline's autoencoder's patch features
        "fit_codebook": [f"name={cfg.name}", f"codebook.autoencoder_dir={autoencoder_dir}"],
        # a latent diffusion model (diffusion=latent in its overrides) on the pipeline's autoencoder
        "fit_diffusion": [f"name={cfg.name}", *latent, *clued],
        "fit_control": [f"name={cfg.name}", f"input_dir={model_dir}"],
        "generate": [f"name={cfg.name}", f"input_dir={model_dir}"],
        # EMIT-Diff: the pipeline's ControlNet steers the pipeline's diffusion model
        "generate_control": [f"name={cfg.name}_control", f"input_dir={model_dir}", "synthesis=controlled",
                             f"synthesis.control_dir={artifacts / 'control' / cfg.name}"],
        "evaluate_masks": [f"input_dir={model_dir}"],
        "baseline": [],
        "train": [*synthetic],
        "finetune": [*synthetic, f"segmentation.init_weights={seg_dir}/train{per_seed}"],
    }


def _compare_command(stages: list[str], seg_dir: Path) -> list[str]:
    """The ``compare`` stage's command: the fine-tuned (else trained) runs against the baseline's."""
    tuned = next((s for s in ("finetune", "train") if s in stages), None)
    return [sys.executable, "-m", "diffmask.cli.compare", "--a", f"{seg_dir}/{tuned}",
            "--b", f"{seg_dir}/baseline", "--name-a", tuned, "--name-b", "baseline",
            "--out", f"{seg_dir}/compare.md"]


def _segmentation_flags(cfg: DictConfig, stage: str, seeds: list[int],
                        seg_dir: Path) -> tuple[list[str], list[str]] | None:
    """A segmentation stage's (flags, overrides added last); None when its runs have all finished.

    An invocation resumed (``stamp=<its folder>``) runs only what it has not finished; with seeds, one run per
    training seed not finished (last, so that it wins), the labelled subset staying the one the generator was
    fitted with.
    """
    todo = [s for s in seeds if not _finished(seg_dir / stage / f"seed{s}")] if seeds else []
    if _finished(seg_dir / stage) or (seeds and not todo):
        log.info("stage %s: %s holds finished runs; skipping", stage, seg_dir / stage)
        return None
    if not seeds:
        return [], []
    return ["--multirun"], [f"seed={','.join(map(str, todo))}", f"data.seed={_data_seed(cfg)}",
                            *([f"hydra/launcher={cfg.launcher}"] if cfg.get("launcher") else [])]


def _stage_command(cfg: DictConfig, stage: str, wiring: list[str], seeds: list[int],
                   folders: _Folders) -> list[str] | None:
    """One Hydra stage's command line (None: a segmentation stage whose runs have all finished)."""
    segmentation = stage in SEGMENTATION
    overrides = [
        f"paths.artifact_dir={folders.artifacts}",
        f"paths.log_dir={folders.log_dir}",
        *wiring,
        *(_run_dirs(folders.seg_dir / stage, seeds) if segmentation else []),
        *[str(o) for o in cfg.common],
        *[str(o) for o in cfg.get(stage, [])],
    ]
    flags: list[str] = []
    if segmentation:
        extra = _segmentation_flags(cfg, stage, seeds, folders.seg_dir)
        if extra is None:
            return None
        flags, added = extra
        overrides += added
    return [sys.executable, "-m", f"diffmask.cli.{MODULES.get(stage, stage)}", *flags, *overrides]


def stage_commands(cfg: DictConfig, stamp: str | None = None) -> list[tuple[str, list[str]]]:
    """The command line of each configured stage, with the artifact folders wired between them.

    The segmentation stages of one invocation write to ``<log_dir>/pipeline/<name>/<stamp>/``
    (``baseline/``, ``train/``, ``finetune/``; with ``seeds``, one ``seed<k>/`` run below each), so
    ``finetune`` finds the model ``train`` just made, ``compare`` the runs of both sides, and
    ``diffmask-report <log_dir>/pipeline/<name>`` tables every invocation. ``stamp`` (the argument,
    else ``cfg.stamp``, else the time now) names that folder: given an interrupted invocation's, the
    runs that finished (their ``metrics.json`` written) are not run again.

    Args:
        cfg: the pipeline config.
        stamp: the invocation's folder name (None: ``cfg.stamp``, else the time now).

    Returns:
        ``(stage, command)`` per stage to run, in order.

    Raises:
        ValueError: an unknown stage, stages in an order that cannot be wired, ``generate`` asked
            for controlled samples, a ``seeds`` list that is empty or not of integers, or a
            ``launcher`` without seeds.
    """
    stages, seeds = _checked_stages(cfg)
    folders = _folders(cfg, stamp)
    wiring = _wiring(cfg, stages, seeds, folders)
    commands = []
    for stage in stages:
        if stage == "compare":
            commands.append((stage, _compare_command(stages, folders.seg_dir)))
            continue
        cmd = _stage_command(cfg, stage, wiring[stage], seeds, folders)
        if cmd is not None:
            commands.append((stage, cmd))
    return commands


def _check_order(stages: list[str], cfg: DictConfig) -> None:
    def _before(first: str, then: str) -> bool:
        return first in stages and stages.index(first) < stages.index(then)

    if "finetune" in stages and not _before("train", "finetune"):
        raise ValueError(
            f"stages: finetune starts from the train stage's model; put train before it, got {stages}"
        )
    if "compare" in stages:
        trained_before = any(_before(s, "compare") for s in ("train", "finetune"))
        if not _before("baseline", "compare") or not trained_before:
            raise ValueError(
                "stages: compare sets this invocation's fine-tuned (or trained) model against its "
                f"baseline; put baseline and train (and finetune) before it, got {stages}"
            )
    if _chooses(cfg, "generate", "synthesis=controlled"):
        raise ValueError(
            "generate: synthesis=controlled is the generate_control stage (it reads the pipeline's "
            "ControlNet and writes <name>_control beside generate's attention-mask set); use "
            "stages=[..., fit_control, generate_control, ...] and give its settings as generate_control=[...]"
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
    def _integer(s: object) -> bool:
        return isinstance(s, int) and not isinstance(s, bool)

    if isinstance(seeds, int | str) or not len(seeds) or not all(map(_integer, seeds)):
        raise ValueError(f"seeds: expected null or a non-empty list of integer training seeds, e.g. [0,1,2]; "
                         f"got {seeds}")
    return [int(s) for s in seeds]


def _data_seed(cfg: DictConfig) -> str:
    """The data seed of the common overrides (``data.seed=``, else ``seed=``, else 0): the labelled subset.

    Raises:
        ValueError: the common overrides sweep it (``data.seed=0,1``): the labelled subset is one.
    """
    values = _override_values(cfg)
    chosen = values.get("data.seed", values.get("seed"))
    if chosen is None:
        return "0"
    if chosen.is_sweep_override():
        raise ValueError(f"common: {chosen.input_line!r}: the labelled subset (data.seed) is one seed; the "
                         "training seeds are given as seeds=[...]")
    return chosen.get_value_element_as_str()


@functools.cache
def _parser() -> OverridesParser:
    return OverridesParser.create()


def _parse(override: str, where: str) -> Override:
    """``override`` read by Hydra's own override grammar.

    Args:
        override: one command-line override, e.g. ``+data.new_key=1`` or ``~data.seed``.
        where: the list it came from (``common``, a stage), for the error.

    Returns:
        The parsed override.

    Raises:
        ValueError: Hydra's grammar rejects it; names ``where`` and the override.
    """
    try:
        (parsed,) = _parser().parse_overrides([override])
    except HydraException as e:
        raise ValueError(f"{where}: override {override!r} is not a Hydra override: {_reason(e)}") from e
    return parsed


def _override_values(cfg: DictConfig, stage: str | None = None) -> dict[str, Override]:
    """The override in force for each key after the common overrides (and ``stage``'s after them), as Hydra
    reads them.

    ``key=v``, ``+key=v`` and ``++key=v`` set ``key`` (the last one wins); ``~key`` and ``~key=v`` delete it
    and everything below it (``key.x``, ``key/x``), so a deleted key has no value.

    Args:
        cfg: the pipeline config.
        stage: the stage whose overrides follow the common ones; None for the common ones alone.

    Returns:
        ``key -> Override`` (``key`` without its ``+``/``++`` prefix, ``group@package`` for a package
        override).

    Raises:
        ValueError: an override Hydra's grammar rejects, naming its list.
    """
    values: dict[str, Override] = {}
    for where, overrides in (("common", cfg.common), *([(stage, cfg.get(stage, []))] if stage else [])):
        for o in overrides:
            parsed = _parse(str(o), where)
            key = parsed.get_key_element().lstrip("~+")
            if parsed.is_delete():
                below = (f"{key}.", f"{key}/")
                values = {k: v for k, v in values.items() if k != key and not k.startswith(below)}
            else:
                values[key] = parsed
    return values


def _chooses(cfg: DictConfig, stage: str, choice: str) -> bool:
    """True when ``stage``'s overrides (or the common ones) end up with ``choice``, e.g.
    ``synthesis=controlled``."""
    wanted = _parse(choice, "pipeline")
    got = _override_values(cfg, stage).get(wanted.get_key_element())
    return got is not None and not got.is_sweep_override() and got.value() == wanted.value()


def _latent(cfg: DictConfig) -> bool:
    """True when the diffusion fit is a latent model on the pipeline's autoencoder."""
    return _chooses(cfg, "fit_diffusion", "diffusion=latent")


def _clued(cfg: DictConfig) -> bool:
    """True when the diffusion fit takes visual clues from the pipeline's codebook."""
    return _chooses(cfg, "fit_diffusion", "diffusion.clues=codebook")


# stages that are not Hydra apps: nothing to compose
NOT_HYDRA = ("compare",)
# the errors a composition raises for a bad override (a key, a group option, a value, the grammar)
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)


def check_stage_configs(cfg: DictConfig, commands: list[tuple[str, list[str]]]) -> None:
    """Compose every stage's config with exactly the overrides its command gives, before any stage runs.

    A misspelt key, a group option that does not exist or a value the grammar rejects fails here, in
    seconds, rather than when that stage's process starts (maybe an hour into the run). Nothing is
    resolved or instantiated, so folders that earlier stages have yet to write are no problem. A
    multirun stage (``--multirun``) is composed once per value of the sweeps in its override lists
    (``segmentation=unet,transunet``: twice), the pipeline's own ``seed=`` sweep with its first value.

    Args:
        cfg: the pipeline config (to tell where a bad override came from).
        commands: ``stage_commands(cfg)``.

    Raises:
        ValueError: one line per problem, naming the stage(s), the override that breaks their config
            (and its list when it is not the stage's own) and Hydra's reason.
    """
    problems: dict[str, list[str]] = {}  # the problem -> the stages that have it (a bad common override: all)
    with _composing():
        for stage, cmd in commands:
            problem = None if stage in NOT_HYDRA else _stage_problem(stage, cmd, cfg)
            if problem:
                problems.setdefault(problem, []).append(stage)
    if problems:
        lines = [f"stage{'s' if len(st) > 1 else ''} {', '.join(st)}: {p}" for p, st in problems.items()]
        raise ValueError(f"pipeline: {sum(map(len, problems.values()))} stage config(s) do not compose; "
                         "no stage "
                         "was run:\n  " + "\n  ".join(lines))


@contextlib.contextmanager
def _composing() -> Iterator[None]:
    """Hydra set up on conf/ for ``compose``, inside ``hydra.main`` or not.

    ``initialize_config_dir`` refuses while an app's GlobalHydra is set (the pipeline's own, under
    ``hydra.main``): that one is set aside and put back after.
    """
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3", job_name="pipeline_check"):
            yield
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def _stage_problem(stage: str, cmd: list[str], cfg: DictConfig) -> str | None:
    """Why ``stage``'s command would fail to compose its config (None: it composes)."""
    config_name = cmd[2].rsplit(".", 1)[-1]  # each stage module's hydra.main config_name is its module name
    overrides = [a for a in cmd[3:] if not a.startswith("--")]
    # the pipeline's own sweep (seed=0,1,2, checked by _seeds) is composed with its first value; the user's
    # with each
    origins = [_origin(o, stage, cfg) for o in overrides]
    own = [origin == "pipeline" for origin in origins]
    for job in _sweep_jobs(overrides, multirun="--multirun" in cmd, first_only=own):
        error = _compose_error(config_name, job)
        if error is None:
            continue
        culprit, error = _first_breaking(config_name, job, error)
        if culprit is None:
            return f"its config {config_name}.yaml does not compose: {_reason(error)}"
        wheres = {stage: "", "common": " (from common)", "pipeline": " (set by the pipeline)"}
        where = wheres[origins[culprit]]
        return f"override {overrides[culprit]!r}{where}: {_reason(error)}"
    return None


def _sweep_jobs(overrides: list[str], multirun: bool, first_only: list[bool]) -> list[list[str]]:
    """The override lists to compose for a command: itself, or for a multirun job ``i`` the ``i``-th value of
    every sweep (so each value is composed once, not their whole product); override ``k`` stays at place
    ``k``.

    Args:
        overrides: the command's overrides.
        multirun: whether the command runs them as a multirun (``--multirun``).
        first_only: per override, True to compose a sweep with its first value alone.

    Returns:
        One override list per composition.
    """
    if not multirun:
        return [overrides]
    values = [_sweep_values(o)[:1] if first else _sweep_values(o)
              for o, first in zip(overrides, first_only, strict=True)]
    n = max((len(v) for v in values), default=1)
    return [[v[i % len(v)] for v in values] for i in range(n)]


def _sweep_values(override: str) -> list[str]:
    """A sweep as one override per value (``seed=0,1`` -> ``seed=0``, ``seed=1``; ``interval(a,b)`` -> its
    start);
    anything else as it is (an unparsable one too, for composition to report)."""
    try:
        (parsed,) = _parser().parse_overrides([override])
    except HydraException:
        return [override]
    if isinstance(parsed.value(), IntervalSweep):
        return [f"{parsed.get_key_element()}={parsed.value().start}"]
    if parsed.is_sweep_override():
        return [f"{parsed.get_key_element()}={v}" for v in parsed.sweep_string_iterator()]
    return [override]


def _compose_error(config_name: str, overrides: list[str]) -> Exception | None:
    try:
        compose(config_name=config_name, overrides=overrides)
    except COMPOSE_ERRORS as e:
        return e
    return None


def _first_breaking(config_name: str, overrides: list[str], error: Exception) -> tuple[int | None, Exception]:
    """The override whose addition breaks the composition, found by bisection.

    Overrides are added in this order: top-level keys and group choices first (``segmentation=unet``
    decides which ``segmentation.*`` keys exist, wherever it stands), then the others in their order;
    each subset is composed in the command's order.

    Args:
        config_name: the stage's primary config.
        overrides: the overrides it fails to compose with.
        error: that failure.

    Returns:
        ``(index, error)``: the override whose addition makes the composition fail, and how it fails;
        ``(None, error)`` when the config fails with no override at all.
    """
    def _key(o: str) -> str:
        return o.lstrip("~+").split("=", 1)[0]

    # stable: order kept within each
    order = sorted(range(len(overrides)), key=lambda i: "." in _key(overrides[i]))
    good, bad = 0, len(order)  # the first `bad` fail together; the first `good` are taken to compose
    while bad - good > 1:
        mid = (good + bad) // 2
        e = _compose_error(config_name, [overrides[i] for i in sorted(order[:mid])])
        if e is None:
            good = mid
        else:
            bad, error = mid, e
    if good == 0 and (e := _compose_error(config_name, [])) is not None:
        return None, e
    return order[bad - 1], error


def _origin(override: str, stage: str, cfg: DictConfig) -> str:
    """Where ``override`` of ``stage``'s command comes from: ``stage`` (its own list), ``common`` or
    ``pipeline``."""
    if override in [str(o) for o in cfg.get(stage, []) or []]:
        return stage
    return "common" if override in [str(o) for o in cfg.common] else "pipeline"


def _reason(error: Exception) -> str:
    """Hydra's (or OmegaConf's) message on one line: the underlying cause when there is one, without the
    config search path, the grammar's help link or OmegaConf's full_key/object_type lines."""
    text = str(error.__cause__ or error) or str(error)
    text = re.split(r"\n(?:Config search path:|See https://hydra\.cc)", text)[0]
    text = re.sub(r":\n\t", ": ", text).replace("\n\t", ", ")
    lines = [line.strip() for line in text.splitlines()]
    noise = ("full_key:", "object_type=", "reference_type=")
    return "; ".join(line for line in lines if line and not line.startswith(noise))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, as it was after (for the stage processes started inside).

    Args:
        values: the variables to set.
    """
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(cfg: DictConfig) -> None:
    """Run (or with ``dry_run`` print) every stage's command, once every stage's config has composed.

    Each stage process gets ``DIFFMASK_WANDB_GROUP`` (the invocation's folder,
    ``<log_dir>/pipeline/<name>/<stamp>``) and ``DIFFMASK_WANDB_JOB_TYPE`` (the stage), so the W&B runs
    of one invocation (``logger=wandb`` in its stages) share a group and say their stage.

    Args:
        cfg: the pipeline config.

    Raises:
        ValueError: a stage's config does not compose (see ``check_stage_configs``); nothing has run.
        SystemExit: a stage's process failed; the message holds the command to rerun it.
    """
    stamp = str(cfg.get("stamp") or time.strftime("%Y-%m-%d_%H-%M-%S"))
    commands = stage_commands(cfg, stamp)
    # every stage's W&B run in one group, the invocation's folder (an outer DIFFMASK_WANDB_GROUP wins)
    group = os.environ.get(GROUP_ENV) or folder_label(
        Path(cfg.paths.log_dir) / "pipeline" / str(cfg.name) / stamp)
    started = time.perf_counter()
    check_stage_configs(cfg, commands)
    log.info("stage configs: all %d compose (%.1f s)", sum(s not in NOT_HYDRA for s, _ in commands),
             time.perf_counter() - started)
    for stage, cmd in commands:
        program = f"diffmask-{cmd[2].rsplit('.', 1)[-1].replace('_', '-')}"
        printable = " ".join(shlex.quote(c) for c in [program, *cmd[3:]])
        log.info("stage %s: %s", stage, printable)
        if cfg.dry_run:
            continue
        with _environment({GROUP_ENV: group, JOB_TYPE_ENV: stage}):  # the stage process inherits them
            result = subprocess.run(cmd)
        if result.returncode != 0:
            raise SystemExit(f"pipeline: stage {stage} failed (exit {result.returncode}); rerun it with:\n"
                             f"  {printable}")
    log.info("pipeline %s finished", cfg.name)
