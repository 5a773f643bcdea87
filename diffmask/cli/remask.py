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

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.config import CONFIG_PATH
from diffmask.refine.remask_stage import adopt_source_settings, remask_stage
from diffmask.stages import seed_run, skip_complete_stage, stage_task
from diffmask.synthesis.labels import affinity_device, build_synthesis


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Re-refine ``cfg.input_dir``'s class maps into ``cfg.output_dir`` (:mod:`diffmask.refine.remask_stage`).

    Args:
        cfg: the ``remask`` config.

    Returns:
        The counts ({} when the output is complete already).
    """
    seed_run(cfg)  # the affinity pass's training order
    source, channels = adopt_source_settings(cfg)
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    mask_maker, quality_filter, affinity = build_synthesis(cfg.get("synthesis"))
    return remask_stage(cfg, source, stage, channels, mask_maker, quality_filter, affinity,
                        device=affinity_device(cfg.device))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="remask")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-remask`` entry point.

    Args:
        cfg: the composed ``remask`` config.
    """
    run(cfg)


if __name__ == "__main__":
    main()
