import functools

import pytest
import torch

from diffmask.data import SegmentationDataModule
from diffmask.diffusion import DiffusionLitModule
from diffmask.diffusion.tiny_models import save_tiny_stable_diffusion, tiny_scratch_components
from diffmask.domains.chest import PhantomSource, chest_prompt_builder


@pytest.fixture
def phantom_dm():
    """4 training phantoms at 32 px, one batch."""
    return SegmentationDataModule(
        PhantomSource(size=32, num_train=4, num_val=2, num_test=2), size=32, batch_size=4
    )


@pytest.fixture
def make_module():
    def make(components=None, lr=2e-3, **kwargs):
        components = components or tiny_scratch_components(32)
        kwargs.setdefault("resolution", 32)
        kwargs.setdefault("ema_decay", 0.0)
        kwargs.setdefault("cond_dropout", 0.0)
        return DiffusionLitModule(
            components, chest_prompt_builder(), functools.partial(torch.optim.AdamW, lr=lr), **kwargs
        )

    return make


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd") / "sd")

