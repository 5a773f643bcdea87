"""What the stage entry points share: the ``stage_task`` wrapper of a stage's ``run`` and the value a
Hydra sweeper optimises.

The helpers the stage packages use too (loggers and callbacks, seeding, ``metrics.json``, the skip
check, the resumable fit) live in :mod:`diffmask.stages`, below ``diffmask.cli``; they are re-exported
here so that an entry point imports all it needs from one place.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from diffmask.stages import (
    commit_fit_stage,
    instantiate_callbacks,
    instantiate_loggers,
    job_overrides,
    log_config,
    require_training,
    resumable_fit,
    seed_run,
    skip_complete_stage,
    to_float,
    write_metrics,
)

__all__ = [
    "commit_fit_stage",
    "instantiate_callbacks",
    "instantiate_loggers",
    "job_overrides",
    "log_config",
    "optimized_value",
    "require_training",
    "resumable_fit",
    "seed_run",
    "skip_complete_stage",
    "stage_task",
    "write_metrics",
]

log = logging.getLogger("diffmask")


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
