import functools

import numpy as np
import pytest
import pytorch_lightning as pl

from diffmask.attention import AttentionRecorder
from diffmask.diffusion import TextToImageSampler, class_token_index
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder


@pytest.fixture
def sampler():
    return TextToImageSampler(tiny_scratch_components(32, seed=1), 32, prompt_builder=chest_prompt_builder())


@pytest.fixture
def trainer_factory():
    return functools.partial(
        pl.Trainer,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class ThresholdMaskMaker:
    """A trivial mask maker: records attention with an AttentionRecorder, labels bright pixels 1."""

    def __init__(self):
        self.calls = 0

    def new_sink(self, prompts, token_positions, resolution):
        assert len(prompts) == len(token_positions) and resolution == 32
        index, _ = class_token_index(token_positions)
        sink = AttentionRecorder()
        sink.set_tokens(index)
        return sink

    def __call__(self, images, sink, token_positions):
        self.calls += 1
        assert sink.maps, "the sink recorded nothing"
        masks = (images[:, 0].numpy() > 0.5).astype(np.uint8)
        scores = [{"left_lung": float(m.mean()), "heart": 0.5} for m in masks]
        return masks, scores


@pytest.fixture
def mask_maker():
    return ThresholdMaskMaker()
