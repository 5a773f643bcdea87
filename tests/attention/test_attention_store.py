"""CrossAttentionStore: shapes on a tiny diffusers UNet, unchanged outputs, windows, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffmask.attention import CrossAttentionStore, capture_cross_attention
from diffmask.diffusion.tiny_models import tiny_latent_unet
from diffmask.domains.chest import chest_prompt_builder
from diffmask.prompts import build_prompt_tokenizer, class_token_positions, prompt_vocabulary

SEQ = 8  # text tokens per prompt


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_latent_unet(32)


def _inputs(batch: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, SEQ, 32, generator=g)


def test_class_maps_shape_and_range_under_guidance(unet):
    # 16x16 latent: the cross-attention layers run at 16 (down 0, up 1) and 8 (mid)
    store = CrossAttentionStore(output_size=(32, 32), resolutions="all")
    store.set_tokens([[[1], [2, 3]], [[4], [5]]], prompt_lengths=[6, 6])
    x, emb = _inputs(4)  # classifier-free guidance: [uncond x2, cond x2]
    with torch.no_grad(), store.capture(unet) as names:
        for i, t in enumerate([900, 500]):
            store.set_step(i, t)
            unet(x, t, encoder_hidden_states=emb)
    assert len(names) == 6
    maps = store.result()
    assert maps.shape == (2, 2, 32, 32)
    assert maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps.flatten(2).amax(dim=2), torch.ones(2, 2))
    # running sums, one per layer, not one per step
    assert len(store._sums) == 6 and set(store._counts.values()) == {2}


def test_capture_leaves_unet_output_unchanged(unet):
    x, emb = _inputs(2)
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, 10, encoder_hidden_states=emb).sample
        store = CrossAttentionStore(output_size=16)
        store.set_tokens([[[1]], [[2]]])
        with store.capture(unet):
            captured = unet(x, 10, encoder_hidden_states=emb).sample
        after = unet(x, 10, encoder_hidden_states=emb).sample
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, plain)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}


def test_resolution_filter_keeps_only_matching_layers(unet):
    x, emb = _inputs(1)
    store = CrossAttentionStore(output_size=16, resolutions=[8])
    store.set_tokens([[[1]]])
    with torch.no_grad(), store.capture(unet):
        unet(x, 10, encoder_hidden_states=emb)
    assert list(store._sums) == ["mid_block.attentions.0.transformer_blocks.0.attn2.processor"]
    assert store.result().shape == (1, 1, 16, 16)

    store = CrossAttentionStore(output_size=16, resolutions=[64])
    store.set_tokens([[[1]]])
    with torch.no_grad(), store.capture(unet):
        unet(x, 10, encoder_hidden_states=emb)
    with pytest.raises(ValueError, match="grid sizes seen: \\[8, 16\\]"):
        store.result()


def _probs(batch: int, value_at: int, q: int = 16, t: int = SEQ) -> torch.Tensor:
    """(batch, 2 heads, q, t) probabilities putting everything on token ``value_at`` in the left half."""
    p = torch.full((batch, 2, q, t), 1.0 / t)
    p[:, :, : q // 2] = 0
    p[:, :, : q // 2, value_at] = 1
    return p


def test_step_window_and_guidance_half():
    store = CrossAttentionStore(output_size=4, step_window=[1, 2], normalize="none", upsample="bilinear")
    store.set_tokens([[[1], [2]]])
    store.set_step(0)
    store.record("a", _probs(1, 2, q=16), None)  # outside the window: ignored
    store.set_step(1)
    cond = _probs(2, 1, q=16)
    cond[0] = 0.5  # unconditional half: must be ignored
    store.record("a", cond, (4, 4))
    store.set_step(2)
    store.record("a", _probs(1, 2, q=16), None)  # outside the window: ignored
    maps = store.result()[0]
    assert store._counts == {"a": 1}
    torch.testing.assert_close(maps[0, :2], torch.ones(2, 4))  # class 0 = token 1 fills the top half
    torch.testing.assert_close(maps[0, 2:], torch.full((2, 4), 1.0 / SEQ))
    torch.testing.assert_close(maps[1, :2], torch.zeros(2, 4))


def test_timestep_window_needs_set_step():
    store = CrossAttentionStore(output_size=4, timestep_window=[0, 500])
    store.set_tokens([[[1]]])
    with pytest.raises(ValueError, match="set_step"):
        store.record("a", _probs(1, 1), None)
    store.set_step(0, 900)
    store.record("a", _probs(1, 1), None)
    assert not store._sums
    store.set_step(1, 400)
    store.record("a", _probs(1, 1), None)
    assert store._counts == {"a": 1}


def test_unknown_layer_is_rejected(unet):
    store = CrossAttentionStore(layers=["down_blocks.9.attn2.processor"])
    store.set_tokens([[[1]]])
    with pytest.raises(ValueError, match="not cross-attention layers"):
        with store.capture(unet):
            pass
    with pytest.raises(ValueError, match="not cross-attention layers"):
        with capture_cross_attention(unet, store, layers=["nope"]):
            pass


def test_token_outside_prompt_is_rejected():
    store = CrossAttentionStore()
    with pytest.raises(ValueError, match="not in the prompt"):
        store.set_tokens([[[1], [7]]], prompt_lengths=[5])
    store.set_tokens([[[1], [SEQ + 3]]])  # no prompt length: caught against the sequence length
    with pytest.raises(ValueError, match="outside the text sequence"):
        store.record("a", _probs(1, 1), None)


def test_a_class_the_prompt_leaves_out_has_an_all_zero_map_and_no_mask():
    """A lesion-free image's prompt does not name the lesion (PromptBuilder absent_when): no token,
    a zero map, and thresholding gives it no pixel."""
    from diffmask.refine.threshold import threshold_masks

    store = CrossAttentionStore(output_size=4)
    store.set_tokens([[[1], []], [[1], [2]]])
    store.record("a", _probs(2, 1), None)
    maps = store.result()
    assert torch.all(maps[0, 1] == 0) and maps[0, 0].max() == 1 and maps[1, 1].max() == 1
    label, _ = threshold_masks(maps[0], ignore_band=0.05)
    assert not (label == 2).any() and not (label == 255).all()


def test_empty_map_is_rejected():
    store = CrossAttentionStore(output_size=4)
    store.set_tokens([[[1], [3]]])
    store.record("a", _probs(1, 1), None)  # token 3 gets zero attention on the left half only
    p = torch.zeros(1, 2, 16, SEQ)
    p[..., 1] = 1
    store.reset()
    store.record("a", p, None)  # token 3 gets no attention anywhere
    with pytest.raises(ValueError, match="class 1 is empty"):
        store.result()
    nan = torch.full((1, 2, 16, SEQ), float("nan"))
    store.reset()
    store.record("a", nan, None)
    with pytest.raises(ValueError, match="empty"):
        store.result()


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="resolutions"):
        CrossAttentionStore(resolutions="some")
    with pytest.raises(ValueError, match="normalize"):
        CrossAttentionStore(normalize="l2")
    with pytest.raises(ValueError, match="step_window"):
        CrossAttentionStore(step_window=[5, 2])


def test_store_takes_the_prompt_builders_token_positions():
    """One token finder for the whole package: the prompt builder's (character offsets)."""
    builder = chest_prompt_builder()
    tok = build_prompt_tokenizer(prompt_vocabulary(builder.words()), model_max_length=64)
    built = builder.build({"sex": "F", "age": "40"})
    positions = class_token_positions(tok, built)
    length = len(tok(built.text)["input_ids"])
    store = CrossAttentionStore(output_size=8)
    store.set_tokens([positions], prompt_lengths=[length])
    assert store.num_classes == 3 and store.batch_size == 1
    with pytest.raises(ValueError, match="not in the prompt"):
        store.set_tokens([positions], prompt_lengths=[positions[-1][-1]])


def test_extract_class_maps_of_real_images(unet):
    from diffusers import DDPMScheduler

    from diffmask.attention import extract_class_maps

    scheduler = DDPMScheduler(num_train_timesteps=100)
    latents, emb = _inputs(2)
    store = CrossAttentionStore(output_size=32)
    tokens = [[[1], [2]], [[1], [3]]]
    maps = extract_class_maps(
        unet, scheduler, latents, emb, tokens, 50, store, generator=torch.Generator().manual_seed(0)
    )
    again = extract_class_maps(
        unet, scheduler, latents, emb, tokens, 50, store, generator=torch.Generator().manual_seed(0)
    )
    assert maps.shape == (2, 2, 32, 32)
    torch.testing.assert_close(maps, again)
    assert set(store._counts.values()) == {1}  # one UNet call
    with pytest.raises(ValueError, match="timestep"):
        extract_class_maps(unet, scheduler, latents, emb, tokens, 100, store)
    with pytest.raises(ValueError, match="not in the prompt"):
        extract_class_maps(unet, scheduler, latents, emb, tokens, 10, store, prompt_lengths=[3, 3])
