import contextlib

import pytest
import torch

from diffmask.attention import AttentionRecorder, capture_cross_attention
from diffmask.diffusion import (
    ControlledSampler,
    Sampler,
    TextToImageSampler,
    VariationSampler,
    class_token_index,
)
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder


@pytest.fixture
def sampler():
    return TextToImageSampler(tiny_scratch_components(32, seed=3), 32, prompt_builder=chest_prompt_builder())


PROMPTS = [
    chest_prompt_builder().build({"sex": "M", "age": "40"}).text,
    chest_prompt_builder().build({"sex": "F"}).text,
]


def captured(sampler, sink, *args, **kwargs):
    """A sampler call with the sink capturing cross-attention, told each step by its begin_step."""
    capture = (
        contextlib.nullcontext() if sink is None else capture_cross_attention(sampler.components.unet, sink)
    )
    with capture:
        return sampler(*args, on_step_begin=getattr(sink, "begin_step", None), **kwargs)


def test_two_images_in_range_and_same_seed_same_images(sampler):
    a = sampler(PROMPTS, [7, 8], num_inference_steps=3, guidance_scale=3.0)
    b = sampler(PROMPTS, [7, 8], num_inference_steps=3, guidance_scale=3.0)
    assert a.images.shape == (2, 1, 32, 32)
    assert 0.0 <= float(a.images.min()) and float(a.images.max()) <= 1.0
    assert torch.equal(a.images, b.images)
    assert a.seeds == [7, 8] and a.prompts == PROMPTS
    c = sampler(PROMPTS, [7, 9], num_inference_steps=3, guidance_scale=3.0)
    assert torch.allclose(a.images[0], c.images[0], atol=1e-5)
    assert not torch.allclose(a.images[1], c.images[1], atol=1e-3)


def test_an_images_result_does_not_depend_on_its_batch(sampler):
    alone = sampler(PROMPTS[1:], [8], num_inference_steps=3, guidance_scale=2.0)
    batch = sampler(PROMPTS, [7, 8], num_inference_steps=3, guidance_scale=2.0)
    assert torch.allclose(alone.images[0], batch.images[1], atol=1e-5)


def test_ddpm_sampling_is_seeded_per_image():
    s = TextToImageSampler(tiny_scratch_components(32, seed=3), 32, scheduler="ddpm")
    a = s(PROMPTS, [1, 2], num_inference_steps=3, guidance_scale=1.0)
    b = s(PROMPTS[:1], [1], num_inference_steps=3, guidance_scale=1.0)
    assert torch.allclose(a.images[0], b.images[0], atol=1e-5)
    assert a.token_positions == []  # no prompt builder → positions unknown


def test_attention_sink_sees_the_conditional_half(sampler):
    out_positions = sampler.token_positions(PROMPTS)
    index, _ = class_token_index(out_positions)
    rec = AttentionRecorder()
    rec.set_tokens(index)
    steps = []
    rec.begin_step = lambda i, t: steps.append(t)
    captured(sampler, rec, PROMPTS, [1, 2], num_inference_steps=2, guidance_scale=3.0)
    assert len(steps) == 2 and steps[0] > steps[1]
    assert rec.maps, "no cross-attention recorded"
    for m in rec.maps.values():
        assert m.shape[0] == 2 and m.shape[1] == index.shape[1]
        assert float(m.min()) >= 0 and float(m.max()) <= 1
    # the processors are restored afterwards
    assert all(
        type(p).__name__ != "CrossAttentionCaptureProcessor"
        for p in sampler.components.unet.attn_processors.values()
    )


def test_bad_calls_are_clear_errors(sampler):
    with pytest.raises(ValueError, match="equally many"):
        sampler(PROMPTS, [1], num_inference_steps=2)
    with pytest.raises(ValueError, match="more than the tokenizer's maximum"):
        sampler([" ".join(["left lung right lung heart"] * 20)], [1], num_inference_steps=1)
    with pytest.raises(ValueError, match="scheduler"):
        TextToImageSampler(sampler.components, 32, scheduler="euler")
    with pytest.raises(ValueError, match="num_inference_steps: expected >= 1"):
        sampler(PROMPTS, [1, 2], num_inference_steps=0)


def test_prompt_without_class_words_samples_but_has_no_positions(sampler):
    out = sampler(["a chest x-ray"], [0], num_inference_steps=1, guidance_scale=1.0)
    assert out.images.shape == (1, 1, 32, 32) and out.token_positions == []
    with pytest.raises(ValueError, match="not found"):
        sampler.token_positions(["a chest x-ray"])


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp", "unipc"])
def test_each_scheduler_samples_with_attention_capture(scheduler):
    """Fast solvers call the UNet once per step, so capture sees every step; class maps come out
    at the image size and the same seed gives the same image."""
    import functools

    from diffmask.attention.store import CrossAttentionStore

    sampler = TextToImageSampler(tiny_scratch_components(32, seed=3), 32, scheduler=scheduler,
                                 prompt_builder=chest_prompt_builder())
    positions = sampler.token_positions(PROMPTS)
    store = functools.partial(CrossAttentionStore, upsample="bilinear")(output_size=32)
    store.set_tokens(positions)
    steps = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def begin_step(self, index, timestep):
            steps.append(index)
            if hasattr(self.inner, "begin_step"):
                self.inner.begin_step(index, timestep)

    a = captured(sampler, Counting(store), PROMPTS, [1, 2], num_inference_steps=4, guidance_scale=2.0)
    assert steps == [0, 1, 2, 3]
    maps = store.result()
    assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all()
    again = functools.partial(CrossAttentionStore, upsample="bilinear")(output_size=32)
    again.set_tokens(positions)
    b = captured(sampler, again, PROMPTS, [1, 2], num_inference_steps=4, guidance_scale=2.0)
    # the solver's state is reset per call: the same seeds give the same images
    assert torch.isfinite(a.images).all() and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="scheduler: expected one of"):
        TextToImageSampler(tiny_scratch_components(32), 32, scheduler="euler")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_variations_start_from_the_init_image_and_run_the_last_share_of_the_steps(scheduler):
    """SDEdit: strength s runs the last round(s * steps) steps from the noised image; at a low
    strength the result stays near the image, and it is seeded per image like plain sampling."""
    comps = tiny_scratch_components(32, seed=3)
    sampler = VariationSampler(comps, 32, scheduler=scheduler, prompt_builder=chest_prompt_builder())
    plain = TextToImageSampler(comps, 32, scheduler=scheduler, prompt_builder=chest_prompt_builder())
    yy = torch.linspace(0, 1, 32)
    init = torch.stack([yy[None, :, None].expand(1, 32, 32), yy[None, None, :].expand(1, 32, 32)])  # ramps
    rec = AttentionRecorder()
    rec.set_tokens(class_token_index(sampler.token_positions(PROMPTS))[0])
    steps = []
    rec.begin_step = lambda i, t: steps.append(int(t))
    full = [int(t) for t in (sampler.scheduler.set_timesteps(10) or sampler.scheduler.timesteps)]
    a = captured(sampler, rec, PROMPTS, [1, 2], init, 0.3, num_inference_steps=10, guidance_scale=2.0)
    assert steps == full[-3:] and rec.maps
    b = sampler(PROMPTS, [1, 2], init, 0.3, num_inference_steps=10, guidance_scale=2.0)
    assert torch.allclose(a.images, b.images, atol=1e-5)  # capture on vs off: the same image

    def distance(strength):  # mean |image - init| (a random tiny UNet redraws what the noise hides)
        if strength is None:
            out = plain(PROMPTS, [1, 2], num_inference_steps=10, guidance_scale=2.0)
        else:
            out = sampler(PROMPTS, [1, 2], init_images=init, strength=strength, num_inference_steps=10,
                          guidance_scale=2.0)
        return float((out.images - init).abs().mean())

    assert distance(0.1) < 0.08 and distance(0.1) < float((a.images - init).abs().mean()) < distance(None)
    # each image from its own init and seed, whatever the batch
    alone = sampler(
        PROMPTS[1:], [2], init_images=init[1:], strength=0.3, num_inference_steps=10, guidance_scale=2.0
    )
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-5)
    # the sampler is reused: the next call sets its schedule afresh
    again = sampler(
        PROMPTS, [1, 2], init_images=init, strength=0.3, num_inference_steps=10, guidance_scale=2.0
    )
    assert torch.equal(again.images, b.images)
    with pytest.raises(ValueError, match="strength"):
        sampler(PROMPTS, [1, 2], init_images=init, strength=0.0, num_inference_steps=10)
    with pytest.raises(ValueError, match="runs no step"):
        sampler(PROMPTS, [1, 2], init_images=init, strength=0.04, num_inference_steps=10)
    with pytest.raises(ValueError, match="init_images: expected"):
        sampler(PROMPTS, [1, 2], init_images=init[:1], strength=0.5, num_inference_steps=10)
    with pytest.raises(ValueError, match="init_images: a variation needs"):
        sampler(PROMPTS, [1, 2], init_images=None, strength=0.5, num_inference_steps=10)


def _perturbed_controlnet(unet, seed=0):
    """A ControlNet with random (not zero-initialised) output layers, so that it changes the image."""
    from diffmask.control import build_controlnet

    net = build_controlnet(unet, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def test_controlled_sampler_follows_its_conditions_and_checks_them():
    comps = tiny_scratch_components(32, seed=3)
    plain = TextToImageSampler(comps, 32, prompt_builder=chest_prompt_builder())
    controlled = ControlledSampler(
        comps, 32, _perturbed_controlnet(comps.unet), prompt_builder=chest_prompt_builder()
    )
    cond = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    kw = {"num_inference_steps": 3, "guidance_scale": 2.0}
    a = controlled(PROMPTS, [1, 2], cond, **kw)
    assert torch.equal(a.images, controlled(PROMPTS, [1, 2], cond, **kw).images)
    assert not torch.equal(a.images, plain(PROMPTS, [1, 2], **kw).images)
    # with its residuals scaled to zero the ControlNet adds nothing: the plain sampler's images, to the bit
    off = controlled(PROMPTS, [1, 2], cond, control_scale=0.0, **kw)
    assert torch.equal(off.images, plain(PROMPTS, [1, 2], **kw).images)
    alone = controlled(PROMPTS[1:], [2], cond[1:], **kw)
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-5)
    with pytest.raises(ValueError, match="control: a sampler with a ControlNet needs condition images"):
        controlled(PROMPTS, [1, 2], **kw)
    with pytest.raises(
        ValueError, match=r"control: expected \(2, C, 32, 32\) condition images, got \(1, 1, 32, 32\)"
    ):
        controlled(PROMPTS, [1, 2], cond[:1], **kw)
    with pytest.raises(ValueError, match="control: only a ControlledSampler"):
        plain.check_inputs(PROMPTS, [1, 2], 3, control=cond)


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmpp", "unipc"])
def test_step_kwargs_come_from_the_schedulers_step_signature(scheduler):
    """generator for schedulers that draw noise in step(), eta for DDIM; nothing a step() cannot take."""
    import inspect

    sampler = TextToImageSampler(tiny_scratch_components(32, seed=3), 32, scheduler=scheduler)
    kwargs = sampler.prepare_extra_step_kwargs([4, 5], eta=0.5)
    accepted = set(inspect.signature(sampler.scheduler.step).parameters)
    assert set(kwargs) <= accepted
    assert ("eta" in kwargs) == (scheduler == "ddim")
    assert ("generator" in kwargs) == (scheduler in ("ddim", "ddpm", "dpmpp"))
    if "generator" in kwargs:  # one generator per image, seeded seed + 1
        assert [g.initial_seed() for g in kwargs["generator"]] == [5, 6]


def test_sampling_is_pinned_to_the_seeds(sampler):
    """Bit-identical images for the same seeds and settings: across calls, across sampler objects on
    the same model, with or without a step hook, and as a ControlNet at scale 0 gives. (Checked once
    against the single-class sampler this module replaced: every scheduler, guidance on/off, eta,
    pixel and latent models, the three modes and the attention maps agreed to the bit.)"""
    kw = {"num_inference_steps": 3, "guidance_scale": 2.5, "eta": 0.3}
    a = sampler(PROMPTS, [7, 8], **kw)
    twin = TextToImageSampler(sampler.components, 32, prompt_builder=chest_prompt_builder())
    seen = []
    b = twin(PROMPTS, [7, 8], on_step_begin=lambda i, t: seen.append((i, t)), **kw)
    assert torch.equal(a.images, b.images) and [i for i, _ in seen] == [0, 1, 2]
    assert isinstance(sampler, Sampler) and not isinstance(sampler, VariationSampler)
