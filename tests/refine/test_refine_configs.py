"""conf/refine/*.yaml instantiate to the classes they name, with the documented defaults."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffmask.refine import AffinityRefiner, DenseCRFRefiner, ThresholdRefiner

CONF = Path(__file__).resolve().parents[2] / "conf" / "refine"


def _with_data(node, channels: int):
    """``node`` under a root that has ``data.channels``.

    That is what ``${data.channels}`` reads in a stage config.
    """
    return OmegaConf.create({"data": {"channels": channels}, "node": node}).node


def test_refine_configs_instantiate():
    threshold = instantiate(OmegaConf.load(CONF / "threshold.yaml"))
    crf = instantiate(OmegaConf.load(CONF / "densecrf.yaml"))
    # AffinityNet reads data.channels images (1 grey by default)
    affinity = instantiate(_with_data(OmegaConf.load(CONF / "affinity.yaml"), channels=1))
    assert isinstance(threshold, ThresholdRefiner) and threshold.method == "otsu"
    assert isinstance(crf, DenseCRFRefiner)
    assert crf.params == dict(
        gaussian_sxy=3.0,
        gaussian_compat=3.0,
        bilateral_sxy=80.0,
        bilateral_srgb=13.0,
        bilateral_compat=10.0,
        iterations=10,
        reference_size=512,
        prior_weight=0.8,
        ignore_index=255,
    )
    assert isinstance(affinity, AffinityRefiner)
    assert affinity.radius == 5 and affinity.beta == 8
    assert affinity.t == 2 and affinity.walk_background is False
    assert affinity.backbone.stride == 4
    assert isinstance(affinity.configure_optimizers(), torch.optim.Adam)
    assert affinity.backbone.in_channels == 1


def test_affinity_config_reads_colour_images_with_data_channels_3():
    affinity = instantiate(_with_data(OmegaConf.load(CONF / "affinity.yaml"), channels=3))
    assert affinity.backbone.in_channels == 3
    assert affinity(torch.rand(1, 3, 32, 32)).shape[-1] == 8
