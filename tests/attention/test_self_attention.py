"""Self-attention capture: bit-identical images, head-averaged running mean, layer choice, clear errors."""

from __future__ import annotations

import pytest
import torch

from diffmask.attention import CrossAttentionStore, SelfAttentionStore, capture_cross_attention
from diffmask.attention.processor import CrossAttentionCaptureProcessor
from diffmask.attention.self_attention import has_self_attention, resample_affinity, self_attention_layers
from diffmask.diffusion import TextToImageSampler
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder

BUILDER = chest_prompt_builder()
PROMPTS = [BUILDER.build({"sex": "M", "age": "40"}).text, BUILDER.build({"sex": "F"}).text]
STEPS = dict(num_inference_steps=3, guidance_scale=3.0)


@pytest.fixture(scope="module")
def sampler():
    return TextToImageSampler(tiny_scratch_components(32, seed=3), 32, prompt_builder=BUILDER)


def cross_store(sampler, self_store=None):
    store = CrossAttentionStore(output_size=32, upsample="bilinear")
    store.set_tokens(sampler.token_positions(PROMPTS))
    store.self_attention = self_store
    return store


def test_capturing_self_attention_leaves_the_images_bit_identical(sampler):
    unet = sampler.components.unet
    plain = sampler(PROMPTS, [7, 8], **STEPS).images
    alone = SelfAttentionStore(batch_size=2)
    with alone.capture(unet):
        images = sampler(PROMPTS, [7, 8], on_step_begin=alone.begin_step, **STEPS).images
    assert torch.equal(images, plain)  # no cross-attention capture: exactly the plain sampler's images
    assert alone.result().shape == (2, 16 * 16, 16 * 16) and alone.seconds > 0
    # beside the cross-attention capture (what generation with a self_affinity step runs)
    store = cross_store(sampler)
    with capture_cross_attention(unet, store):
        cross_only = sampler(PROMPTS, [7, 8], on_step_begin=store.begin_step, **STEPS).images
    both = cross_store(sampler, SelfAttentionStore(batch_size=2))
    with capture_cross_attention(unet, both):
        with_self = sampler(PROMPTS, [7, 8], on_step_begin=both.begin_step, **STEPS).images
    assert torch.equal(with_self, cross_only)
    assert torch.equal(both.result(), store.result())  # the class maps are untouched too
    # every processor is restored
    assert not any(type(p).__name__.endswith("CaptureProcessor") for p in unet.attn_processors.values())


class HeadMean:
    """Reference sink: the head-averaged probabilities of one layer call, as diffusers computes them."""

    def __init__(self):
        self.maps = {}

    def record(self, layer, probs, spatial):
        self.maps[layer] = probs.mean(dim=1)


def test_the_store_keeps_the_head_mean_of_the_conditional_half_as_a_running_mean(sampler):
    unet = sampler.components.unet
    layers = self_attention_layers(unet)
    assert layers and all(n.endswith("attn1.processor") for n in layers)
    fine = [n for n in layers if n.startswith("up_blocks.0")]  # the 16x16 grid
    latents = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    states = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500] * 4)
    ref = HeadMean()
    original = dict(unet.attn_processors)
    procs = dict(original)
    procs[fine[0]] = CrossAttentionCaptureProcessor(fine[0], ref)  # diffusers' own probabilities
    unet.set_attn_processor(procs)
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=states)
    unet.set_attn_processor(dict(original))
    store = SelfAttentionStore(batch_size=2, layers=fine[:1])
    with store.capture(unet), torch.no_grad():
        for step in range(3):  # a 2B batch (classifier-free guidance): the last B are kept
            store.set_step(step, 500)
            unet(latents, t, encoder_hidden_states=states)
    got = store.result()
    assert got.shape == (2, 256, 256)
    assert torch.allclose(got, ref.maps[fine[0]][2:], atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(2, 256), atol=1e-5)
    assert len(store._sums) == 1 and store._counts[(16, 16)] == 3  # one running sum, not one per step


def test_resolutions_grid_windows_and_name_filter(sampler):
    unet = sampler.components.unet
    x = torch.randn(2, 1, 32, 32)
    states = torch.randn(2, 6, 32)
    # every attention layer of the tiny UNet is on the 16x16 grid; the result is resampled to 8x8
    store = SelfAttentionStore(batch_size=2, grid=8, timestep_window=[0, 400])
    with store.capture(unet), torch.no_grad():
        for step, t in enumerate([900, 300]):
            store.set_step(step, t)
            unet(x, torch.tensor([t, t]), encoder_hidden_states=states)
    assert set(store._sums) == {(16, 16)}
    assert store._counts[(16, 16)] == len(self_attention_layers(unet))  # only t=300 kept
    a = store.result()
    assert a.shape == (2, 64, 64) and torch.allclose(a.sum(-1), torch.ones(2, 64), atol=1e-4)
    none = SelfAttentionStore(batch_size=2, resolutions=[8])
    with none.capture(unet), torch.no_grad():
        unet(x, torch.tensor([5, 5]), encoder_hidden_states=states)
    with pytest.raises(ValueError, match="no self-attention was kept"):
        none.result()
    named = SelfAttentionStore(name_contains="mid_block")
    assert named.select_layers(unet) == [n for n in self_attention_layers(unet) if "mid_block" in n]
    with pytest.raises(ValueError, match="no self-attention layer left"):
        SelfAttentionStore(name_contains="nowhere").select_layers(unet)
    with pytest.raises(ValueError, match="not self-attention layers"):
        SelfAttentionStore(
            layers=["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"]
        ).select_layers(unet)


def tiny_components(only_cross_attention):
    return tiny_scratch_components(32, only_cross_attention=only_cross_attention)


def test_self_attention_on_some_levels_only_is_captured():
    # only_cross_attention per level (finest first): the 16x16 level keeps its self-attention
    unet = tiny_components([True, False]).unet
    assert has_self_attention(unet)
    store = SelfAttentionStore(batch_size=1)
    with store.capture(unet) as names, torch.no_grad():
        unet(torch.randn(1, 1, 32, 32), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 6, 32))
    assert names == self_attention_layers(unet) and store.result().shape == (1, 256, 256)
    assert not has_self_attention(tiny_components([False, True]).unet)  # the attention level is cross-only


def test_a_model_without_self_attention_names_the_setting():
    comps = tiny_components(True)
    # diffusers keeps a self-attention in the mid block only: not enough, and refused
    assert self_attention_layers(comps.unet) == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    ]
    store = CrossAttentionStore(output_size=32)
    store.self_attention = SelfAttentionStore()
    with pytest.raises(ValueError, match="only_cross_attention=false"):
        with capture_cross_attention(comps.unet, store):
            pass
    # nothing was left replaced
    assert not any(type(p).__name__.endswith("CaptureProcessor") for p in comps.unet.attn_processors.values())


def test_resample_affinity_keeps_rows_stochastic():
    a = torch.softmax(torch.randn(1, 16, 16), dim=-1)
    assert torch.allclose(resample_affinity(a, (4, 4), (4, 4)), a, atol=1e-6)
    up = resample_affinity(a, (4, 4), (8, 8))
    down = resample_affinity(a, (4, 4), (2, 2))
    assert up.shape == (1, 64, 64) and down.shape == (1, 4, 4)
    for r in (up, down):
        assert (r >= 0).all() and torch.allclose(r.sum(-1), torch.ones(r.shape[:2]), atol=1e-5)
    # a uniform affinity stays uniform
    u = resample_affinity(torch.full((1, 16, 16), 1 / 16), (4, 4), (8, 8))
    assert torch.allclose(u, torch.full_like(u, 1 / 64), atol=1e-6)
