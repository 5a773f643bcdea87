"""Autoencoder stage: train the latent autoencoder on the real images (no labels needed).

    diffmask-fit-autoencoder data=auto data.size=128 name=ae128
    diffmask-fit-autoencoder data.size=128 autoencoder=f8 name=ae128f8

Writes a plain ``AutoencoderKL`` folder (loadable by ``AutoencoderKL.from_pretrained``, with the
measured ``scaling_factor``), ``autoencoder.json``, ``test_metrics.json`` (PSNR / SSIM per test
set), ``grid.png`` and ``stage.json`` to ``${paths.artifact_dir}/autoencoder/<name>``;
``metrics.json`` into the run dir. Resumable. With ``reconstructions=true`` the training images'
reconstructions and their masks become a set (``<stage>/reconstructions``) for
``diffmask-train data.synthetic_dir=...`` (what the round trip costs a segmenter).
Colour data (``data.channels=3``) gives a colour autoencoder (RGB in and out; ``grid.png`` and the
reconstructions are RGB PNGs); ``autoencoder.json`` and ``stage.json`` record the channels.

The stage itself is :mod:`diffmask.autoencoder.stage`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.artifacts import StageDir
from diffmask.autoencoder.stage import fit_autoencoder
from diffmask.config import CONFIG_PATH
from diffmask.stages import seed_run, skip_complete_stage, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit the autoencoder described by ``cfg`` and export it
    (:func:`~diffmask.autoencoder.stage.fit_autoencoder`).

    Args:
        cfg: the ``fit_autoencoder`` config.

    Returns:
        The final metrics (``{}`` when the stage is complete already).
    """
    stage = StageDir(cfg.output_dir)
    if skip_complete_stage(stage, cfg):
        return {}
    seed_run(cfg)
    return fit_autoencoder(cfg, stage)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit_autoencoder")
def main(cfg: DictConfig) -> None:
    """The ``diffmask-fit-autoencoder`` entry point.

    Args:
        cfg: the composed ``fit_autoencoder`` config.
    """
    run(cfg)


if __name__ == "__main__":
    main()
