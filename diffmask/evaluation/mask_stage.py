"""The mask-quality stage: a diffusion model's attention masks scored on real test images, per refinement
step.

``diffmask-evaluate-masks`` (:mod:`diffmask.cli.evaluate_masks`) seeds the run and calls
:func:`evaluate_masks`: it loads the model (:func:`load_mask_model`, which sets ``data.size`` and
``data.intensity`` to the model's), tests :class:`~diffmask.evaluation.mask_quality.MaskQualityLitModule`
and writes ``per_image_masks.csv`` and ``metrics.json`` (:func:`write_mask_results`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, open_dict

from diffmask.artifacts import StageDir
from diffmask.diffusion.components import load_components
from diffmask.domains.recorded import prompt_builder_from_dict
from diffmask.evaluation.mask_quality import MASK_ROWS_FILE, write_mask_rows
from diffmask.stages import job_overrides, write_metrics

__all__ = ["evaluate_masks", "load_mask_model", "summary_lines", "write_mask_results"]

# the stage's messages keep the logger name of diffmask-evaluate-masks
log = logging.getLogger("diffmask.evaluate_masks")


def load_mask_model(cfg: DictConfig) -> tuple[StageDir, Any, dict[str, Any]]:
    """Load the diffusion stage in ``cfg.input_dir``; set ``cfg.data``'s size and intensity to its model's.

    Args:
        cfg: the ``evaluate_masks`` config; ``data.size`` and ``data.intensity`` are set in place.

    Returns:
        (the model's stage, its components, their metadata).

    Raises:
        ValueError: the model's ``diffmask.json`` lacks ``prompt_builder`` or ``resolution``, or
            ``data.channels`` is not the channels it was fitted on.
    """
    model_stage = StageDir(cfg.input_dir)
    model_stage.info()  # a clear error when the diffusion stage has not finished
    # the test images are served with data.channels: the model must have been fitted on that kind of image
    components = load_components(model_stage.path, channels=int(cfg.data.channels))
    meta = components.metadata or {}
    if "prompt_builder" not in meta or "resolution" not in meta:
        raise ValueError(
            f"input_dir: {model_stage.path}/diffmask.json lacks prompt_builder/resolution; "
            "export it with the fit stage"
        )
    with open_dict(cfg):
        # attention maps and masks are compared at the resolution the model was trained at, on
        # real images normalised as its training images were (models from before: raw)
        cfg.data.size = int(meta["resolution"])
        if cfg.data.get("intensity", "raw") != components.intensity:
            log.info("data.intensity=%s: the model at %s was trained on it", components.intensity,
                     model_stage.path)
        cfg.data.intensity = components.intensity
    return model_stage, components, meta


def write_mask_results(cfg: DictConfig, model_stage: StageDir, datamodule: Any, model: Any,
                       metrics: dict[str, Any]) -> None:
    """Write ``per_image_masks.csv``, then ``metrics.json``, to the run dir; log the mIoUs.

    Args:
        cfg: the ``evaluate_masks`` config (with the model's data settings).
        model_stage: the diffusion model's stage.
        datamodule: the real test data.
        model: the tested :class:`~diffmask.evaluation.mask_quality.MaskQualityLitModule`.
        metrics: its results.
    """
    degenerate = dict(getattr(model, "degenerate", {}) or {})
    out = Path(cfg.paths.output_dir) / "metrics.json"
    write_mask_rows(Path(cfg.paths.output_dir) / MASK_ROWS_FILE, model.per_image)
    write_metrics(out, metrics, extra={
        "model_dir": str(model_stage.path),
        "data": {"real": datamodule.real.name},  # "phantom" when data=auto found no JSRT folder
        "test_sets": datamodule.test_set_names,
        "test_set_info": datamodule.test_set_info(),
        "missing_test_sets": datamodule.missing_test_sets,
        "timesteps": list(cfg.model.timesteps),
        "size": int(cfg.data.size),
        "intensity": cfg.data.intensity,
        "channels": int(cfg.data.channels),
        "overrides": job_overrides(),
        "seed": cfg.seed,
        # "masks/<set>/<step>" -> reasons; their figures are failures, not results
        "degenerate_steps": degenerate,
    })
    log.info("metrics written to %s", out)
    for level, line in summary_lines(metrics, degenerate):
        log.log(level, "%s", line)
    if degenerate:
        log.warning("%d degenerate refinement step(s): %s", len(degenerate), ", ".join(sorted(degenerate)))


def summary_lines(metrics: dict[str, Any], degenerate: dict[str, list[str]]) -> list[tuple[int, str]]:
    """The printed summary: one ``(log level, line)`` per mIoU metric, degenerate steps marked.

    A degenerate step's lines read ``masks/jsrt/affinity/miou 0.0000  DEGENERATE: heart absent from
    every mask`` at warning level, never a plain number.

    Args:
        metrics: the flat metrics (``masks/<set>/<step>/miou``, ...).
        degenerate: ``masks/<set>/<step>`` -> reasons (the module's ``degenerate``).
    """
    lines = []
    for key in sorted(k for k in metrics if k.endswith("miou")):
        value = metrics[key]
        text = f"{key} = {value:.4f}" if isinstance(value, (int, float)) else f"{key} = {value}"
        step = key.rsplit("/", 1)[0]
        if step in degenerate:
            lines.append((logging.WARNING, f"{text}  DEGENERATE: {'; '.join(degenerate[step])}"))
        else:
            lines.append((logging.INFO, text))
    return lines


def evaluate_masks(cfg: DictConfig) -> dict[str, Any]:
    """Score the attention masks of the model in ``cfg.input_dir`` on real test images; write the results.

    Args:
        cfg: the ``evaluate_masks`` config; the run is seeded already (:func:`~diffmask.stages.seed_run`).

    Returns:
        The metrics (per test set, class and refinement step).
    """
    model_stage, components, meta = load_mask_model(cfg)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, components=components,
                                    prompt_builder=prompt_builder_from_dict(meta["prompt_builder"]))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer)
    trainer.test(model, datamodule=datamodule)
    metrics = dict(model.results)
    if trainer.is_global_zero:
        write_mask_results(cfg, model_stage, datamodule, model, metrics)
    return metrics
