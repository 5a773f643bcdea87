"""Re-mask a synthetic dataset from its saved class maps with another refinement chain.

    diffmask-remask input_dir=artifacts/synthesis/px128 name=px128_crf 'synthesis.refine=[threshold,densecrf]'
    diffmask-remask input_dir=artifacts/synthesis/px128 name=px128_aff 'synthesis.refine=[threshold,affinity]'

The source must have been generated with ``synthesis=attention_masks`` (``save_class_maps`` is on
by default). Writes ``${paths.artifact_dir}/synthesis/<name>`` (images and class maps linked to
the source's, new ``masks/``, ``manifest.jsonl``, ``stage.json``); resumable, skipped when complete.
The images are read with the source's channels (its ``stage.json``; ``data.channels``, when
given, must agree): DenseCRF and AffinityNet see a colour set's RGB images.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from diffmask.artifacts import StageDir
from diffmask.cli.common import seed_run, skip_complete_stage, stage_task
from diffmask.cli.generate import affinity_device, build_synthesis
from diffmask.config import CONFIG_PATH
from diffmask.synthesis.affinity_pass import refine_with_affinity
from diffmask.synthesis.quality import class_presence_record
from diffmask.synthesis.remask import remask_folder
from diffmask.synthesis.writer import set_channels

log = logging.getLogger("diffmask.remask")


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Re-refine ``cfg.input_dir``'s class maps into ``cfg.output_dir``; returns counts."""
    seed_run(cfg)  # the affinity pass's training order
    source = StageDir(cfg.input_dir)
    recorded = source.info().get("config", {})  # a clear error when the source is not a complete stage
    if source.path.resolve() == StageDir(cfg.output_dir).path.resolve():
        raise ValueError(f"output_dir: {cfg.output_dir} is the input_dir; choose another name")
    names = (recorded.get("data") or {}).get("class_names")
    optional = (recorded.get("data") or {}).get("optional_classes")
    channels = set_channels(source.path)  # the source images' channels (1 for a set made before they were recorded)
    asked = cfg.data.get("channels")
    if asked is not None and int(asked) != channels:
        raise ValueError(
            f"data.channels={asked}, but the set in {source.path} holds {channels}-channel images (its stage.json "
            f"channels); grey and colour are never converted silently (leave data.channels unset to follow the set)"
        )
    with open_dict(cfg):
        if names:
            cfg.data.class_names = list(names)  # the classes the maps were recorded for
        if optional is not None:
            cfg.data.optional_classes = list(optional)
        cfg.data.channels = channels  # AffinityNet's in_channels (conf/refine/affinity.yaml) reads it
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    mask_maker, quality_filter, affinity = build_synthesis(cfg.get("synthesis"))
    if mask_maker is None:
        raise ValueError("synthesis: re-masking needs a mask maker (synthesis=attention_masks)")
    class_names = list(cfg.data.class_names)
    work = stage.begin(resume=True)
    start = time.time()
    try:
        counts = remask_folder(source.path, work, mask_maker, class_names, quality_filter=quality_filter,
                               batch_size=cfg.batch_size, channels=channels)
    finally:
        mask_maker.close()
    if affinity is not None:
        counts.update(refine_with_affinity(
            work, class_names=class_names, device=affinity_device(cfg.device), seed=cfg.seed, channels=channels,
            **affinity,
        ))
    seconds = time.time() - start
    info = {**counts, "seconds": round(seconds, 1)}
    presence = class_presence_record(work, class_names, cfg.synthesis.get("min_class_presence"),
                                     optional_classes=list(cfg.data.get("optional_classes") or []))
    stage.commit(config=OmegaConf.to_container(cfg, resolve=True), inputs={"synthesis": str(source.path)},
                 counts=info, extra={"intensity": source.info().get("intensity", "raw"), "channels": channels,
                                     **presence})
    log.info("%d samples re-masked into %s (%.1f s)", counts["rows"], stage.path, seconds)
    return info


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="remask")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
