"""Segmentation stage: fit a backbone on real (+ synthetic) data, test the best checkpoint.

    diffmask-train data=jsrt segmentation=transunet data.real_fraction=0.1 trainer=gpu
    diffmask-train -m segmentation=unet,transunet data.real_fraction=0.1,1.0
    diffmask-train train=false segmentation.init_weights=<run dir> 'data.test_sets={other: <folder>}'
    diffmask-train segmentation.merge.alpha=0.6 data.synthetic_dir=<set whose rows carry pair_id>

Random merging masks (EMIT-Diff): a non-null ``segmentation.merge.alpha`` makes the datamodule
paired (``SegmentationDataModule(paired=True)``; there is no ``data.paired`` key): each real
training image comes with a synthetic variant of it from ``data.synthetic_dir`` (rows whose
``pair_id`` is its id), and the loss mixes the two patch by patch.

Writes ``metrics.json`` (test/<set>/iou_<class>, test/<set>/miou, ...) into the run dir.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from diffmask.cli.common import (
    instantiate_callbacks,
    instantiate_loggers,
    job_overrides,
    log_config,
    optimized_value,
    require_training,
    seed_run,
    stage_task,
    write_metrics,
)
from diffmask.config import CONFIG_PATH
from diffmask.evaluation.paired import PER_IMAGE_FILE, write_per_image
from diffmask.evaluation.wandb_logging import (
    define_best_metrics,
    log_test_results,
    prediction_overlays,
    run_identity,
    wandb_runs,
)

log = logging.getLogger("diffmask.train")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the segmentation stage described by ``cfg``; returns the test metrics."""
    seed_run(cfg)
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

    start = time.time()
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
    fit_seconds = time.time() - start
    metrics: dict[str, Any] = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    best_path = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if cfg.get("test", True):
        ckpt = best_path or (cfg.get("ckpt_path") if not cfg.get("train", True) else None)
        init = cfg.segmentation.get("init_weights")
        if not ckpt and not cfg.get("train", True) and init:
            log.info("train=false: testing the weights loaded from segmentation.init_weights=%s", init)
        elif not ckpt:
            log.warning("no best checkpoint found; testing the current weights")
        # our own checkpoint (holds config objects), so full unpickling is safe
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=False)
        metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    if trainer.is_global_zero:
        out = Path(cfg.paths.output_dir) / "metrics.json"
        per_image = Path(cfg.paths.output_dir) / PER_IMAGE_FILE
        if cfg.get("test", True):  # before metrics.json, which marks the run complete (diffmask-pipeline resumes on it)
            write_per_image(per_image, model.per_image, datamodule.class_names)
        score = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        facts = {
            "data": {
                "real": datamodule.real.name,
                "size": datamodule.size,
                "real_fraction": datamodule.real_fraction,
                "n_real_train": len(datamodule.real_train_ids),
                "real_train_ids": list(datamodule.real_train_ids),  # which labelled images: the same across seeds?
                "n_synthetic_train": len(datamodule.synthetic_ids),
                "synthetic_dir": OmegaConf.to_container(cfg.data, resolve=True).get("synthetic_dir"),  # a folder or a list
                # paired (segmentation.merge.alpha): n_pairs, n_real_with_variants, n_real_self_paired, ...
                **({"paired": datamodule.pair_info} if datamodule.paired else {}),
            },
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
            "run_group": identity.group,  # its sweep / pipeline invocation (diffmask-report --wandb-project logs there)
        }
        write_metrics(out, metrics, extra=facts)
        log.info("metrics written to %s", out)
        if wandb_runs(loggers):  # summary (test scores per set and class, run facts), per-image table, overlays
            tested = cfg.get("test", True)
            overlays = prediction_overlays(model, datamodule) if tested else {}
            log_test_results(loggers, metrics, facts, per_image if tested else None, overlays, step=trainer.global_step)
        for key in sorted(k for k in metrics if k.startswith("test/")):
            log.info("%s = %.4f", key, float(metrics[key]))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return optimized_value(cfg, run(cfg))


if __name__ == "__main__":
    main()
