import pytest
import torch

from diffmask.attention import AttentionRecorder
from diffmask.diffusion import DiffusionSampler, class_token_index
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder


@pytest.fixture
def sampler():
    return DiffusionSampler(tiny_scratch_components(32, seed=3), 32, prompt_builder=chest_prompt_builder())


PROMPTS = [chest_prompt_builder().build({"sex": "M", "age": "40"}).text, chest_prompt_builder().build({"sex": "F"}).text]


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
    s = DiffusionSampler(tiny_scratch_components(32, seed=3), 32, scheduler="ddpm")
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
    sampler(PROMPTS, [1, 2], num_inference_steps=2, guidance_scale=3.0, attention_sink=rec)
    assert len(steps) == 2 and steps[0] > steps[1]
    assert rec.maps, "no cross-attention recorded"
    for m in rec.maps.values():
        assert m.shape[0] == 2 and m.shape[1] == index.shape[1]
        assert float(m.min()) >= 0 and float(m.max()) <= 1
    # the processors are restored afterwards
    assert all(type(p).__name__ != "CrossAttentionCaptureProcessor" for p in sampler.components.unet.attn_processors.values())


def test_bad_calls_are_clear_errors(sampler):
    with pytest.raises(ValueError, match="equally many"):
        sampler(PROMPTS, [1], num_inference_steps=2)
    with pytest.raises(ValueError, match="more than the tokenizer's maximum"):
        sampler([" ".join(["left lung right lung heart"] * 20)], [1], num_inference_steps=1)
    with pytest.raises(ValueError, match="scheduler"):
        DiffusionSampler(sampler.components, 32, scheduler="euler")


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

    sampler = DiffusionSampler(tiny_scratch_components(32, seed=3), 32, scheduler=scheduler, prompt_builder=chest_prompt_builder())
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

    a = sampler(PROMPTS, [1, 2], num_inference_steps=4, guidance_scale=2.0, attention_sink=Counting(store))
    assert steps == [0, 1, 2, 3]
    maps = store.result()
    assert maps.shape == (2, 3, 32, 32) and torch.isfinite(maps).all()
    again = functools.partial(CrossAttentionStore, upsample="bilinear")(output_size=32)
    again.set_tokens(positions)
    b = sampler(PROMPTS, [1, 2], num_inference_steps=4, guidance_scale=2.0, attention_sink=again)
    # the solver's state is reset per call: the same seeds give the same images
    assert torch.isfinite(a.images).all() and torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="scheduler: expected one of"):
        DiffusionSampler(tiny_scratch_components(32), 32, scheduler="euler")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp"])
def test_variations_start_from_the_init_image_and_run_the_last_share_of_the_steps(scheduler):
    """SDEdit: strength s runs the last round(s * steps) steps from the noised image; at a low
    strength the result stays near the image, and it is seeded per image like plain sampling."""
    sampler = DiffusionSampler(tiny_scratch_components(32, seed=3), 32, scheduler=scheduler, prompt_builder=chest_prompt_builder())
    yy = torch.linspace(0, 1, 32)
    init = torch.stack([yy[None, :, None].expand(1, 32, 32), yy[None, None, :].expand(1, 32, 32)])  # two ramps
    rec = AttentionRecorder()
    rec.set_tokens(class_token_index(sampler.token_positions(PROMPTS))[0])
    steps = []
    rec.begin_step = lambda i, t: steps.append(int(t))
    full = [int(t) for t in (sampler.scheduler.set_timesteps(10) or sampler.scheduler.timesteps)]
    a = sampler(PROMPTS, [1, 2], num_inference_steps=10, guidance_scale=2.0, attention_sink=rec,
                init_images=init, strength=0.3)
    assert steps == full[-3:] and rec.maps
    b = sampler(PROMPTS, [1, 2], num_inference_steps=10, guidance_scale=2.0, init_images=init, strength=0.3)
    assert torch.allclose(a.images, b.images, atol=1e-5)  # capture on vs off: same image
    def distance(strength):  # mean |image - init| (a random tiny UNet redraws what the noise hides)
        kw = {} if strength is None else {"init_images": init, "strength": strength}
        return float((sampler(PROMPTS, [1, 2], num_inference_steps=10, guidance_scale=2.0, **kw).images - init).abs().mean())

    assert distance(0.1) < 0.08 and distance(0.1) < float((a.images - init).abs().mean()) < distance(None)
    # each image from its own init and seed, whatever the batch
    alone = sampler(PROMPTS[1:], [2], num_inference_steps=10, guidance_scale=2.0, init_images=init[1:], strength=0.3)
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-5)
    # a plain call after a variation runs the whole schedule again
    steps.clear()
    sampler(PROMPTS, [1, 2], num_inference_steps=10, guidance_scale=2.0, attention_sink=rec)
    assert steps == full
    with pytest.raises(ValueError, match="strength"):
        sampler(PROMPTS, [1, 2], num_inference_steps=10, init_images=init, strength=0.0)
    with pytest.raises(ValueError, match="runs no step"):
        sampler(PROMPTS, [1, 2], num_inference_steps=10, init_images=init, strength=0.04)
    with pytest.raises(ValueError, match="init_images: expected"):
        sampler(PROMPTS, [1, 2], num_inference_steps=10, init_images=init[:1], strength=0.5)
