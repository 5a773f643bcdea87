"""What every stage's run shares: loggers and callbacks from the config, seeding, ``metrics.json``, the
skip check of a complete stage folder, the resumable fit of a generative stage, and the
:func:`stage_task` wrapper every entry point's ``run`` wears.

The entry points (:mod:`diffmask.cli`) and the stage packages (:mod:`diffmask.segmentation.stage`,
:mod:`diffmask.refine.remask_stage`, ...) import them from here.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import atomic_write_json
from diffmask.config import RUN_ONLY_SETTINGS
from diffmask.evaluation.wandb_logging import RunIdentity, fill_wandb_node, is_wandb_node, run_identity
from diffmask.seeds import check_seed

__all__ = [
    "optimized_value",
    "stage_task",
    "commit_fit_stage",
    "instantiate_callbacks",
    "instantiate_loggers",
    "job_overrides",
    "log_config",
    "require_training",
    "resumable_fit",
    "seed_run",
    "skip_complete_stage",
    "to_float",
    "write_metrics",
]

# the stages' messages are logged as 'diffmask'
log = logging.getLogger("diffmask")


def _instantiate_group(cfg: DictConfig | None, what: str,
                       prepare: Callable[[DictConfig], DictConfig] | None = None) -> list[Any]:
    objects = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(
            f"{what} config must be a mapping of name -> {{_target_: ...}}, got {type(cfg).__name__}"
        )
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", what, node._target_)
            objects.append(hydra.utils.instantiate(prepare(node) if prepare else node))
        elif node is not None:
            raise ValueError(
                f"{what}.{name}: expected a node with a _target_, got {OmegaConf.to_yaml(node)!r}"
            )
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[pl.Callback]:
    """Instantiate the ``callbacks`` group's callbacks.

    Args:
        cfg: the ``callbacks`` group (``{name: {_target_: ...}}``), or None for none.

    Returns:
        The callbacks, in the group's order.
    """
    return _instantiate_group(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None,
                        identity: RunIdentity | None = None) -> list[pl.loggers.Logger]:
    """Instantiate the ``logger`` group's loggers.

    Args:
        cfg: the ``logger`` group (``{name: {_target_: ...}}``), or None for none.
        identity: the run's W&B identity (:func:`~diffmask.evaluation.wandb_logging.run_identity`): a
            ``WandbLogger`` node's null ``group``, ``name`` and ``job_type`` are filled from it and its
            tags added (:func:`~diffmask.evaluation.wandb_logging.fill_wandb_node`); None leaves the
            nodes as they are.

    Returns:
        The loggers, in the group's order.
    """
    def _prepare(node: DictConfig) -> DictConfig:
        return fill_wandb_node(node, identity) if is_wandb_node(node) else node

    return _instantiate_group(cfg, "logger", None if identity is None else _prepare)


def log_config(cfg: DictConfig, loggers: list[pl.loggers.Logger],
               identity: RunIdentity | None = None) -> None:
    """Send the resolved config to every logger (W&B config, TensorBoard hparams, CSV hparams.yaml).

    W&B's config also gets ``overrides``, ``job_num``, ``run_group``, ``sweep_dir`` and ``dataset``
    (:meth:`~diffmask.evaluation.wandb_logging.RunIdentity.config`).

    Args:
        cfg: the stage's config.
        loggers: its loggers.
        identity: the run's W&B identity (None: worked out from ``cfg`` when a W&B logger is there).
    """
    from pytorch_lightning.loggers import WandbLogger  # noqa: PLC0415

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            identity = identity or run_identity(cfg)
            lg.log_hyperparams({**container, **identity.config()})
        else:
            lg.log_hyperparams(container)


def seed_run(cfg: DictConfig) -> int:
    """Check the run's ``seed`` and seed Python, numpy and torch (and the data workers) with it.

    Lightning's ``seed_everything`` draws a random seed, with a warning only, for a negative or
    too large one: a sweep would not repeat; here that is an error naming ``seed``.

    Args:
        cfg: the stage's config (its ``seed``).

    Returns:
        The seed.
    """
    seed = check_seed(cfg.get("seed"), "seed")
    pl.seed_everything(seed, workers=True)
    return seed


def require_training(trainer: pl.Trainer) -> None:
    """Refuse a fit that would train nothing: its scores would come from an untrained model.

    ``trainer.max_epochs=0``, ``trainer.max_steps=0`` or ``trainer.limit_train_batches=0``
    make ``fit`` return at once, and a run would write an untrained model's metrics, in the
    normal files, that a sweep could take for results. To score a model without training, say so:
    ``train=false`` with ``segmentation.init_weights=<run dir>``.

    Args:
        trainer: the trainer about to fit.

    Raises:
        ValueError: one of those settings is 0.
    """
    zero = [
        f"trainer.{name}={value}"
        for name, value in (
            ("max_epochs", trainer.max_epochs),
            ("max_steps", trainer.max_steps),
            ("limit_train_batches", trainer.limit_train_batches),
        )
        if value is not None and value == 0
    ]
    if zero:
        raise ValueError(
            f"{', '.join(zero)}: the fit would train nothing and score an untrained model; expected at least "
            "one training step (to score a trained model without fitting: train=false "
            "segmentation.init_weights=...)"
        )


def to_float(value: Any) -> float | None:
    """``value`` as a float; None for one that is not a number, or NaN.

    Args:
        value: a metric (a float, a tensor, ...).
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def write_metrics(path: str | Path, metrics: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Atomically write ``metrics.json``: flat float metrics plus run information.

    Args:
        path: the file.
        metrics: name -> value (:func:`to_float`: a NaN or non-number becomes null).
        extra: run information written beside ``metrics``.

    Returns:
        The path written.
    """
    flat = {k: to_float(v) for k, v in metrics.items()}
    payload = {"metrics": flat, **(extra or {})}
    return atomic_write_json(path, payload)


def skip_complete_stage(stage, cfg: DictConfig) -> bool:
    """True when ``stage`` is complete and ``force`` is off; warns if its recorded config differs.

    Args:
        stage: the stage's :class:`~diffmask.artifacts.StageDir`.
        cfg: the stage's config (compared with the recorded one, less :data:`RUN_ONLY_SETTINGS`).
    """
    if not stage.is_complete() or cfg.get("force"):
        return False
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = stage.changed_settings(current, ignore=RUN_ONLY_SETTINGS)
    if changed:
        log.warning(
            "%s is complete but was made with other settings; it is NOT redone (force=true to redo, or a new "
            "name):\n  %s", stage.path, "\n  ".join(changed[:20]),
        )
    else:
        log.info("%s is complete; skipping (force=true to redo)", stage.path)
    return True


def job_overrides() -> list[str]:
    """The command-line overrides of the running Hydra job ([] outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _fit_trainer(cfg: DictConfig, datamodule: pl.LightningDataModule,
                 callbacks: list[pl.Callback]) -> pl.Trainer:
    """The generative stage's trainer with its loggers (the config sent to them); refuses one that would not
    train."""
    dataset = getattr(getattr(datamodule, "real", None), "name", None)
    identity = run_identity(cfg, dataset=dataset)  # W&B group, name
    loggers = instantiate_loggers(cfg.get("logger"), identity)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    require_training(trainer)
    log_config(cfg, loggers, identity)
    return trainer


def resumable_fit(cfg: DictConfig, model: pl.LightningModule, datamodule: pl.LightningDataModule,
                  work: Path) -> tuple[pl.Trainer, dict[str, float], float]:
    """Fit a generative stage's model with step checkpoints in ``<work>/checkpoints``.

    Resumes from ``cfg.ckpt_path`` or, when null, from ``<work>/checkpoints/last.ckpt``; refuses a
    trainer that would not train (:func:`require_training`).

    Args:
        cfg: the stage's config (``trainer``, ``logger``, ``checkpoint_every_n_steps``, ``ckpt_path``).
        model: the model to fit.
        datamodule: its data.
        work: the stage's work folder.

    Returns:
        (trainer, the final ``train/*`` and ``val/*`` metrics with ``train/images_per_s``, fit seconds).
    """
    from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: PLC0415

    from diffmask.diffusion.throughput import TrainingThroughput  # noqa: PLC0415

    ckpt_dir = work / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False, save_last=True,
        every_n_train_steps=cfg.checkpoint_every_n_steps, save_top_k=1, monitor="step", mode="max",
    )
    throughput = TrainingThroughput()
    trainer = _fit_trainer(cfg, datamodule, [checkpoint, throughput])
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
    return trainer, metrics, fit_seconds


def commit_fit_stage(cfg: DictConfig, stage, work: Path, trainer: pl.Trainer, metrics: dict[str, float],
                     fit_seconds: float, datamodule, dir_key: str, counts: dict[str, Any],
                     inputs: dict[str, str] | None = None, extra: dict[str, Any] | None = None,
                     extra_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Finish a fitted generative stage whose export is in ``work``: drop its Lightning checkpoints
    (unless ``keep_checkpoints``), commit ``stage.json`` and write the run dir's ``metrics.json``.

    Args:
        cfg: the stage's config.
        stage: its :class:`~diffmask.artifacts.StageDir`.
        work: its work folder (``checkpoints/`` below it).
        trainer: the trainer that fitted (its ``global_step``).
        metrics: the fit's metrics (:func:`resumable_fit`).
        fit_seconds: how long the fit took.
        datamodule: its data (``real.name``).
        dir_key: the key naming the stage folder in ``metrics.json`` (e.g. ``model_dir``).
        counts: added to the common counts (steps, fit seconds, images/s).
        inputs: the stage's input folders, for ``stage.json``.
        extra: more ``stage.json`` entries.
        extra_metrics: more metrics for ``metrics.json``.

    Returns:
        The counts written.
    """
    if not cfg.keep_checkpoints:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    info = {
        "steps": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 1),
        "images_per_s": metrics.get("train/images_per_s"),
        **counts,
    }
    data = {"real": datamodule.real.name}  # "phantom" when data=auto found no JSRT folder
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs=inputs or {}, counts=info,
                 extra={"data": data, **(extra or {})})
    write_metrics(Path(cfg.paths.output_dir) / "metrics.json", {**metrics, **(extra_metrics or {})},
                  extra={dir_key: str(stage.path), "data": data, **info})
    return info


def _finish_wandb() -> None:
    """Close the W&B run a stage started, if any (so one failed job of a multirun does not hang the next)."""
    try:
        import wandb  # noqa: PLC0415 - only if a W&B run was started

        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass


def stage_task(fn: Callable[[DictConfig], dict[str, Any]]) -> Callable[[DictConfig], dict[str, Any]]:
    """Wrap a stage's ``run(cfg)``: time it, log failures with the run dir, always close W&B
    (so one failed job of a multirun does not hang the next).

    Args:
        fn: the stage's ``run``.

    Returns:
        ``fn`` wrapped.
    """

    @functools.wraps(fn)
    def _wrapper(cfg: DictConfig) -> dict[str, Any]:
        start = time.time()
        try:
            return fn(cfg)
        except Exception:
            log.exception("stage %s failed; see the run dir for logs", cfg.get("task_name"))
            raise
        finally:
            log.info("stage %s took %.1f s", cfg.get("task_name"), time.time() - start)
            _finish_wandb()

    return _wrapper


def optimized_value(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """The metric a Hydra sweeper optimises (``optimized_metric``), if set and present.

    Args:
        cfg: the stage's config.
        metrics: the stage's metrics.
    """
    name = cfg.get("optimized_metric")
    return to_float(metrics.get(name)) if name else None
