"""The generate stage's run, from a :class:`~diffmask.synthesis.kinds.GenerationPlan` to a committed set.

:func:`run_generation` makes the labels' objects (:func:`~diffmask.synthesis.labels.build_synthesis`),
samples every request into the stage's work folder (resumable, any Lightning strategy), runs the
affinity pass when asked, commits ``stage.json`` (counts, class presence, intensity, channels),
scores label fidelity (``fidelity_model``) and logs the set to W&B (``logger=wandb``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from diffmask.artifacts import StageDir
from diffmask.attention.store import CrossAttentionStore
from diffmask.data.manifest import read_manifest
from diffmask.evaluation.fidelity import format_fidelity, label_fidelity, record_label_fidelity
from diffmask.evaluation.wandb_logging import log_synthesis
from diffmask.refine.mask_maker import AttentionMaskMaker
from diffmask.refine.threshold import ThresholdRefiner
from diffmask.synthesis.affinity_pass import refine_with_affinity
from diffmask.synthesis.generate import generate_samples
from diffmask.synthesis.kinds import GenerationPlan
from diffmask.synthesis.labels import affinity_device, build_synthesis
from diffmask.synthesis.quality import class_presence_record

__all__ = ["run_generation", "plan_labels", "attention_agreement_record"]

log = logging.getLogger("diffmask.generate")  # the generate stage's logger: its messages keep their name


def run_generation(cfg: DictConfig, stage: StageDir, plan: GenerationPlan,
                   trainer_factory: Callable[..., Any]) -> dict[str, Any]:
    """Generate ``plan`` into ``stage`` (resuming its work folder) and commit it.

    Args:
        cfg: the generate stage's config (sampling, ``synthesis``, ``fidelity_model``, logger settings).
        stage: the output stage (its work folder is begun or resumed here).
        plan: what to sample (:func:`~diffmask.synthesis.kinds.plan_generation`).
        trainer_factory: ``trainer_factory(callbacks=[writer])`` -> a ``pl.Trainer``.

    Returns:
        The counts recorded in ``stage.json`` (plus ``label_fidelity_miou`` when scored); on a DDP
        rank other than 0 the bare sampling counts (``rows`` = -1).

    Raises:
        ValueError: a bad ``synthesis`` group or ``prompt_list`` (before any sampling).
        RuntimeError: the folder does not account for every request after sampling.
    """
    mask_maker, quality_filter, affinity = plan_labels(cfg, plan)
    work = stage.begin(resume=True)
    start = time.time()
    counts = _sample(cfg, plan, work, trainer_factory, mask_maker, quality_filter)
    if counts["rows"] < 0:  # not rank 0: rank 0 runs the affinity pass and commits
        return counts
    if counts["rows"] + counts["dropped_total"] != len(plan.requests):
        raise RuntimeError(
            f"{work}: {counts['rows']} manifest rows + {counts['dropped_total']} dropped for "
            f"{len(plan.requests)} requests; rerun to resume"
        )
    if affinity is not None:
        counts.update(refine_with_affinity(
            work, class_names=plan.class_names,
            device=affinity_device(cfg.trainer.get("accelerator")), seed=cfg.seed,
            channels=plan.sampler.components.channels, **affinity,
        ))
    seconds = time.time() - start
    agreement = plan.kind == "controlled" and mask_maker is not None
    info = _commit(cfg, stage, plan, work, counts, seconds, agreement)
    log.info("%d samples in %s (%d new, %.1f s)", counts["rows"], stage.path, counts["written"], seconds)
    _score_and_log(cfg, stage, plan.class_names, info)
    return info


def plan_labels(cfg: DictConfig, plan: GenerationPlan) -> tuple[Any, Any, dict[str, Any] | None]:
    """(mask maker, quality filter, affinity settings) of ``plan``'s run.

    A controlled run with ``synthesis.capture_attention`` gets DiffMask's attention masks of its
    images (thresholded), to score against their condition masks.

    Args:
        cfg: the generate stage's config.
        plan: the run's plan.

    Raises:
        ValueError: a bad ``synthesis`` group, or with attention masks a ``prompt_list`` entry that
            does not name every class.
    """
    mask_maker, quality_filter, affinity = build_synthesis(cfg.synthesis)
    if plan.kind != "controlled" and cfg.prompt_list and mask_maker is not None:
        for i, prompt in enumerate(cfg.prompt_list):  # attention masks read every class word
            try:
                plan.sampler.prompt_builder.locate(str(prompt))
            except ValueError as err:
                raise ValueError(f"prompt_list[{i}]: {err}; attention masks need every class word "
                                 "(or synthesis=none for images only)") from None
    if plan.kind == "controlled" and cfg.synthesis.get("capture_attention"):
        # DiffMask's attention masks of the controlled images, scored against their condition masks
        mask_maker = AttentionMaskMaker(functools.partial(CrossAttentionStore), ThresholdRefiner(),
                                        class_names=plan.class_names)
    return mask_maker, quality_filter, affinity


def attention_agreement_record(folder: str | os.PathLike, class_names: Sequence[str]) -> dict[str, float]:
    """Mean per-class IoU of the controlled images' attention masks with their condition masks
    (the manifest's ``score_<class>``, written by capture_attention).

    Args:
        folder: the synthesis (work) folder.
        class_names: the label classes, background first (background is not scored).
    """
    rows = read_manifest(folder)
    return {name: float(np.mean([r.scores[name] for r in rows if name in r.scores]))
            for name in class_names[1:] if any(name in r.scores for r in rows)}


def _sample(cfg: DictConfig, plan: GenerationPlan, work: os.PathLike, trainer_factory: Callable[..., Any],
            mask_maker: Any, quality_filter: Any) -> dict[str, Any]:
    """Sample every request not yet in ``work`` (:func:`generate_samples`); close the mask maker."""
    counts = generate_samples(
        trainer_factory,
        plan.sampler,
        plan.requests,
        work,
        class_names=plan.class_names,
        batch_size=cfg.batch_size,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        eta=cfg.eta,
        mask_maker=mask_maker,
        num_workers=cfg.num_workers,
        save_class_maps=bool(cfg.synthesis.get("save_class_maps")
                             or (plan.kind == "controlled" and mask_maker is not None)),
        quality_filter=quality_filter,
        **plan.sample_settings,
    )
    if mask_maker is not None:
        mask_maker.close()
    return counts


def _commit(cfg: DictConfig, stage: StageDir, plan: GenerationPlan, work: os.PathLike, counts: dict[str, Any],
            seconds: float, agreement: bool) -> dict[str, Any]:
    """Commit the work folder with its ``stage.json``; return the recorded counts."""
    # every rank's new samples (``written`` is rank 0's alone under DDP): all in the folder now, less
    # those at start
    made = counts["rows"] + counts["dropped_total"] - counts["skipped"]
    info = {**counts, "made": made, "requested": len(plan.requests), "seconds": round(seconds, 1),
            "images_per_s": made / seconds if seconds > 0 else None}
    presence = class_presence_record(work, plan.class_names, cfg.synthesis.get("min_class_presence"),
                                     optional_classes=list(cfg.data.get("optional_classes") or []))
    if agreement:
        presence["attention_agreement"] = attention_agreement_record(work, plan.class_names)
    components = plan.sampler.components
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs=dict(plan.inputs), counts=info,
                 extra={"intensity": components.intensity, "channels": components.channels, **presence})
    return info


def _score_and_log(cfg: DictConfig, stage: StageDir, class_names: Sequence[str],
                   info: dict[str, Any]) -> None:
    """Label fidelity (``fidelity_model``) into ``info`` and the set's record; the W&B log
    (``logger=wandb``)."""
    if cfg.get("fidelity_model"):
        # label fidelity: a segmentation model trained on real images, scored against the set's masks
        result = label_fidelity(stage.path, cfg.fidelity_model, class_names,
                                device=affinity_device(cfg.trainer.get("accelerator")))
        record_label_fidelity(stage.path, result)
        log.info("label fidelity (%s): %s", cfg.fidelity_model, format_fidelity(result))
        info["label_fidelity_miou"] = result["miou"]
    # logger=wandb: a W&B run (job type generate) with a grid of the set's first pairs and its counts
    if log_synthesis(cfg, stage.path, class_names, info):
        log.info("the first synthetic pairs and the counts logged to W&B")
