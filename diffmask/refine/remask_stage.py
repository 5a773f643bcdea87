"""The re-mask stage: a synthetic set's saved class maps re-refined with another chain into a new set.

``diffmask-remask`` (:mod:`diffmask.cli.remask`) seeds the run, reads the source's settings into its
config (:func:`adopt_source_settings`), skips a complete output, builds the refinement from the
``synthesis`` group and calls :func:`remask_stage`; the folder work itself is
:func:`diffmask.synthesis.remask.remask_folder` (and
:func:`~diffmask.synthesis.affinity_pass.refine_with_affinity`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from diffmask.artifacts import StageDir
from diffmask.synthesis.affinity_pass import refine_with_affinity
from diffmask.synthesis.quality import class_presence_record
from diffmask.synthesis.remask import remask_folder
from diffmask.synthesis.writer import set_channels

__all__ = ["adopt_source_settings", "remask_stage"]

# the stage's messages keep the logger name of diffmask-remask
log = logging.getLogger("diffmask.remask")


def _source_channels(cfg: DictConfig, source: StageDir) -> int:
    """The source images' channels; ``data.channels``, when given, must agree."""
    # the source images' channels (1 for a set made before they were recorded)
    channels = set_channels(source.path)
    asked = cfg.data.get("channels")
    if asked is not None and int(asked) != channels:
        raise ValueError(
            f"data.channels={asked}, but the set in {source.path} holds {channels}-channel images "
            f"(its stage.json channels); grey and colour are never converted silently (leave data.channels "
            f"unset to follow the set)"
        )
    return channels


def adopt_source_settings(cfg: DictConfig) -> tuple[StageDir, int]:
    """Check ``cfg.input_dir`` and set ``cfg.data``'s classes and channels to the source set's.

    Args:
        cfg: the ``remask`` config; its ``data.class_names``, ``data.optional_classes`` (when the source
            recorded them) and ``data.channels`` are set in place.

    Returns:
        (the source stage, its images' channels).

    Raises:
        ValueError: the output is the input, or ``data.channels`` differs from the source images'.
    """
    source = StageDir(cfg.input_dir)
    recorded = source.info().get("config", {})  # a clear error when the source is not a complete stage
    if source.path.resolve() == StageDir(cfg.output_dir).path.resolve():
        raise ValueError(f"output_dir: {cfg.output_dir} is the input_dir; choose another name")
    names = (recorded.get("data") or {}).get("class_names")
    optional = (recorded.get("data") or {}).get("optional_classes")
    channels = _source_channels(cfg, source)
    with open_dict(cfg):
        if names:
            cfg.data.class_names = list(names)  # the classes the maps were recorded for
        if optional is not None:
            cfg.data.optional_classes = list(optional)
        cfg.data.channels = channels  # AffinityNet's in_channels (conf/refine/affinity.yaml) reads it
    return source, channels


def _remask(cfg: DictConfig, source: StageDir, work, channels: int, mask_maker, quality_filter,
            affinity: dict[str, Any] | None, device: str) -> dict[str, Any]:
    """Re-refine the source's class maps into ``work`` (then the affinity pass); the counts."""
    class_names = list(cfg.data.class_names)
    try:
        counts = remask_folder(source.path, work, mask_maker, class_names, quality_filter=quality_filter,
                               batch_size=cfg.batch_size, channels=channels)
    finally:
        mask_maker.close()
    if affinity is not None:
        counts.update(refine_with_affinity(
            work, class_names=class_names, device=device, seed=cfg.seed, channels=channels, **affinity,
        ))
    return counts


def remask_stage(cfg: DictConfig, source: StageDir, stage: StageDir, channels: int, mask_maker,
                 quality_filter=None, affinity: dict[str, Any] | None = None,
                 device: str = "cpu") -> dict[str, Any]:
    """Re-mask ``source`` into ``stage`` (resuming its work folder) and commit it.

    Args:
        cfg: the ``remask`` config, with the source's settings (:func:`adopt_source_settings`).
        source: the source set.
        stage: the output set.
        channels: the source images' channels.
        mask_maker: the refinement chain's mask maker (None: an error).
        quality_filter: the masks' quality filter, or None.
        affinity: the affinity pass's settings (keyword arguments of
            :func:`~diffmask.synthesis.affinity_pass.refine_with_affinity`), or None for no pass.
        device: where the affinity pass runs.

    Returns:
        The counts recorded in the output's ``stage.json`` (rows, written, ..., seconds).

    Raises:
        ValueError: no mask maker (``synthesis=attention_masks`` makes one).
    """
    if mask_maker is None:
        raise ValueError("synthesis: re-masking needs a mask maker (synthesis=attention_masks)")
    work = stage.begin(resume=True)
    start = time.time()
    counts = _remask(cfg, source, work, channels, mask_maker, quality_filter, affinity, device)
    seconds = time.time() - start
    info = {**counts, "seconds": round(seconds, 1)}
    presence = class_presence_record(work, list(cfg.data.class_names),
                                     cfg.synthesis.get("min_class_presence"),
                                     optional_classes=list(cfg.data.get("optional_classes") or []))
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs={"synthesis": str(source.path)},
                 counts=info, extra={"intensity": source.info().get("intensity", "raw"), "channels": channels,
                                     **presence})
    log.info("%d samples re-masked into %s (%.1f s)", counts["rows"], stage.path, seconds)
    return info
