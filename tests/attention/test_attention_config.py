"""conf/attention/default.yaml instantiates a CrossAttentionStore."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffmask.attention import CrossAttentionStore

CONF = Path(__file__).resolve().parents[2] / "conf" / "attention" / "default.yaml"


def test_attention_config_instantiates():
    store = instantiate(OmegaConf.load(CONF))
    assert isinstance(store, CrossAttentionStore)
    assert store.output_size == (256, 256) and store.resolutions is None and store.normalize == "max"
