"""Segmentation stage: fit a backbone on real (+ synthetic) data, test the best checkpoint.

    diffmask-train data=jsrt segmentation=transunet data.real_fraction=0.1 trainer=gpu
    diffmask-train -m segmentation=unet,transunet data.real_fraction=0.1,1.0
    diffmask-train train=false segmentation.init_weights=<run dir> 'data.test_sets={other: <folder>}'
    diffmask-train segmentation.merge.alpha=0.6 data.synthetic_dir=<set whose rows carry pair_id>

Random merging masks (EMIT-Diff): a non-null ``segmentation.merge.alpha`` makes the datamodule
paired (``SegmentationDataModule(paired=True)``; there is no ``data.paired`` key): each real
training image comes with a synthetic variant of it from ``data.synthetic_dir`` (rows whose
``pair_id`` is its id), and the loss mixes the two patch by patch.

Writes ``metrics.json`` (test/<set>/iou_<class>, test/<set>/miou, ...) into the run dir; the stage itself
is :mod:`diffmask.segmentation.stage`.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from diffmask.config import CONFIG_PATH
from diffmask.segmentation.stage import train_segmentation
from diffmask.stages import optimized_value, seed_run, stage_task


@stage_task
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test the segmentation stage described by ``cfg``
    (:func:`~diffmask.segmentation.stage.train_segmentation`).

    Args:
        cfg: the ``train`` config.

    Returns:
        The test metrics (and the last ``val/*`` ones).
    """
    seed_run(cfg)
    return train_segmentation(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The ``diffmask-train`` entry point; returns the sweeper's ``optimized_metric``.

    Args:
        cfg: the composed ``train`` config.
    """
    return optimized_value(cfg, run(cfg))


if __name__ == "__main__":
    main()
