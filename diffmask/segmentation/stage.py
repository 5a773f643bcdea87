"""The segmentation stage: fit a backbone on real (+ synthetic) data, test the best checkpoint, write the
results.

:func:`train_segmentation` is what ``diffmask-train`` runs (:mod:`diffmask.cli.train`, which seeds the run
first): :func:`build_segmentation` instantiates the data, model, callbacks, loggers and trainer,
:func:`fit_and_test` fits and tests, :func:`write_results` writes ``per_image.csv`` then ``metrics.json``
(the file that marks the run complete) and logs the test scores to W&B.

Random merging masks (EMIT-Diff): a non-null ``segmentation.merge.alpha`` makes the datamodule paired
(``SegmentationDataModule(paired=True)``): each real training image comes with a synthetic variant of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from diffmask.evaluation.paired import PER_IMAGE_FILE, write_per_image
from diffmask.evaluation.wandb_logging import (
    RunIdentity,
    define_best_metrics,
    log_test_results,
    prediction_overlays,
    run_identity,
    wandb_runs,
)
from diffmask.stages import (
    instantiate_callbacks,
    instantiate_loggers,
    job_overrides,
    log_config,
    require_training,
    write_metrics,
)

__all__ = [
    "SegmentationRun",
    "build_segmentation",
    "fit_and_test",
    "run_facts",
    "train_segmentation",
    "write_results",
]

# the stage's messages keep the logger name of diffmask-train
log = logging.getLogger("diffmask.train")


@dataclass
class SegmentationRun:
    """One segmentation run's objects, as :func:`build_segmentation` made them.

    Args:
        cfg: the stage's config.
        datamodule: the real (+ synthetic) data.
        model: the :class:`~diffmask.segmentation.module.SegmentationLitModule`.
        trainer: the trainer, with the callbacks and loggers.
        loggers: the loggers.
        identity: the run's W&B identity (group, name, tags).
    """

    cfg: DictConfig
    datamodule: Any
    model: pl.LightningModule
    trainer: pl.Trainer
    loggers: list[Any]
    identity: RunIdentity


def build_segmentation(cfg: DictConfig) -> SegmentationRun:
    """Instantiate the data, model, callbacks, loggers and trainer ``cfg`` describes; send the config to the
    loggers.

    Args:
        cfg: the ``train`` config.

    Returns:
        The run's objects.

    Raises:
        ValueError: ``train`` is on and the trainer would train nothing
            (:func:`~diffmask.stages.require_training`).
    """
    # random merging masks need (real, synthetic variant) pairs: the merge setting decides the pairing
    paired = (cfg.segmentation.get("merge") or {}).get("alpha") is not None
    datamodule = hydra.utils.instantiate(cfg.data, paired=paired)
    model = hydra.utils.instantiate(cfg.segmentation)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    # the sweep / pipeline invocation it belongs to (W&B group, metrics.json run_group), its W&B name and tags
    identity = run_identity(cfg, dataset=datamodule.real.name)
    loggers = instantiate_loggers(cfg.get("logger"), identity)
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if cfg.get("train", True):
        require_training(trainer)
    log_config(cfg, loggers, identity)
    define_best_metrics(loggers, datamodule.class_names)  # W&B summary: the best val epoch, not the last
    return SegmentationRun(cfg, datamodule, model, trainer, loggers, identity)


def _test(run: SegmentationRun, best_path: str) -> dict[str, Any]:
    """Test the best checkpoint (else ``ckpt_path`` with ``train=false``, else the current weights); the test
    metrics."""
    cfg, trainer = run.cfg, run.trainer
    ckpt = best_path or (cfg.get("ckpt_path") if not cfg.get("train", True) else None)
    init = cfg.segmentation.get("init_weights")
    if not ckpt and not cfg.get("train", True) and init:
        log.info("train=false: testing the weights loaded from segmentation.init_weights=%s", init)
    elif not ckpt:
        log.warning("no best checkpoint found; testing the current weights")
    # our own checkpoint (holds config objects), so full unpickling is safe
    trainer.test(run.model, datamodule=run.datamodule, ckpt_path=ckpt or None, weights_only=False)
    return {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}


def fit_and_test(run: SegmentationRun) -> tuple[dict[str, Any], float, str]:
    """Fit (unless ``train=false``), then test (unless ``test=false``).

    Args:
        run: the run's objects.

    Returns:
        (the ``val/*`` and ``test/*`` metrics, fit seconds, the best checkpoint's path or "").
    """
    cfg, trainer = run.cfg, run.trainer
    start = time.time()
    if cfg.get("train", True):
        trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    fit_seconds = time.time() - start
    metrics: dict[str, Any] = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test", True):
        metrics.update(_test(run, best_path))
    return metrics, fit_seconds, best_path


def _data_facts(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The ``data`` entry of ``metrics.json``: which real and synthetic images the run trained on."""
    return {
        "real": datamodule.real.name,
        "size": datamodule.size,
        "real_fraction": datamodule.real_fraction,
        "n_real_train": len(datamodule.real_train_ids),
        "real_train_ids": list(datamodule.real_train_ids),  # which labelled images: the same across seeds?
        "n_synthetic_train": len(datamodule.synthetic_ids),
        # a folder or a list
        "synthetic_dir": OmegaConf.to_container(cfg.data, resolve=True).get("synthetic_dir"),
        # paired (segmentation.merge.alpha): n_pairs, n_real_with_variants, n_real_self_paired, ...
        **({"paired": datamodule.pair_info} if datamodule.paired else {}),
    }


def run_facts(run: SegmentationRun, fit_seconds: float, best_path: str) -> dict[str, Any]:
    """What ``metrics.json`` records beside the metrics: data, test sets, backbone, seed, best checkpoint, ...

    Args:
        run: the run's objects, fitted and tested.
        fit_seconds: how long the fit took.
        best_path: the best checkpoint's path ("" when there is none).
    """
    cfg, trainer, datamodule = run.cfg, run.trainer, run.datamodule
    score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return {
        "data": _data_facts(cfg, datamodule),
        "test_sets": datamodule.test_set_info(),
        "missing_test_sets": datamodule.missing_test_sets,
        "backbone": cfg.segmentation.net._target_,
        "init_weights": cfg.segmentation.get("init_weights"),  # resolved: e.g. <pretrain multirun>/seed<k>
        "overrides": job_overrides(),
        "seed": cfg.seed,
        "best_checkpoint": best_path or None,
        "best_val_miou": None if score is None else float(score),
        "fit_seconds": round(fit_seconds, 1),
        "epochs": trainer.current_epoch,
        # its sweep / pipeline invocation (diffmask-report --wandb-project logs there)
        "run_group": run.identity.group,
    }


def write_results(run: SegmentationRun, metrics: dict[str, Any], fit_seconds: float, best_path: str) -> None:
    """Write ``per_image.csv`` (when tested), then ``metrics.json``; log the test results to W&B and the log.

    Args:
        run: the run's objects, fitted and tested.
        metrics: its metrics (:func:`fit_and_test`).
        fit_seconds: how long the fit took.
        best_path: the best checkpoint's path ("" when there is none).
    """
    cfg, model, datamodule = run.cfg, run.model, run.datamodule
    out = Path(cfg.paths.output_dir) / "metrics.json"
    per_image = Path(cfg.paths.output_dir) / PER_IMAGE_FILE
    tested = cfg.get("test", True)
    if tested:  # before metrics.json, which marks the run complete (diffmask-pipeline resumes on it)
        write_per_image(per_image, model.per_image, datamodule.class_names)
    facts = run_facts(run, fit_seconds, best_path)
    write_metrics(out, metrics, extra=facts)
    log.info("metrics written to %s", out)
    # W&B: a summary (test scores per set and class, run facts), the per-image table, overlays
    if wandb_runs(run.loggers):
        overlays = prediction_overlays(model, datamodule) if tested else {}
        log_test_results(run.loggers, metrics, facts, per_image if tested else None, overlays,
                         step=run.trainer.global_step)
    for key in sorted(k for k in metrics if k.startswith("test/")):
        log.info("%s = %.4f", key, float(metrics[key]))


def train_segmentation(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the segmentation stage ``cfg`` describes; write its results (on the global-zero rank).

    Args:
        cfg: the ``train`` config; the run is seeded already (:func:`~diffmask.stages.seed_run`).

    Returns:
        The ``val/*`` and ``test/*`` metrics.
    """
    run = build_segmentation(cfg)
    metrics, fit_seconds, best_path = fit_and_test(run)
    if run.trainer.is_global_zero:
        write_results(run, metrics, fit_seconds, best_path)
    return metrics
