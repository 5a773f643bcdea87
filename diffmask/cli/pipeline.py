"""diffmask-pipeline: (autoencoder fit -> codebook ->) diffusion fit (-> ControlNet fit) -> synthetic
generation with masks (DiffMask's attention-mask pairs and/or EMIT-Diff's controlled pairs) ->
segmentation (-> fine-tuning on the real images) -> a paired comparison with a real-data baseline,
over several training seeds.

    diffmask-pipeline experiment=pipeline_demo name=demo
    diffmask-pipeline experiment=pipeline_demo name=demo dry_run=true     # print each stage's command

Each stage runs as its own process (``python -m diffmask.cli.<stage>``); the stage wiring, the check
that every stage's config composes and the runs themselves are :mod:`diffmask.pipeline`.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from diffmask.config import CONFIG_PATH
from diffmask.pipeline import run

__all__ = ["main", "run"]

log = logging.getLogger("diffmask.pipeline")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-pipeline`` entry point: run (or with ``dry_run`` print) every configured stage.

    Args:
        cfg: the composed ``pipeline`` config.
    """
    log.debug(OmegaConf.to_yaml(cfg))
    run(cfg)


if __name__ == "__main__":
    main()
