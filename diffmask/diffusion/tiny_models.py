"""Tiny random-weight models for tests and offline demos (no download).

* :func:`tiny_scratch_components` — a ~0.3 M-parameter pixel UNet + 2-layer CLIP text encoder.
* :func:`save_tiny_stable_diffusion` — a Stable Diffusion folder in diffusers format (two-block
  UNet, tiny VAE, tiny CLIP text encoder, CLIP-BPE tokenizer built here) saved with
  ``save_pretrained``, so the ``diffusion=pretrained`` path runs exactly as with SD 1.5 weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from diffmask.diffusion.components import DiffusionComponents, build_scratch_components
from diffmask.prompts.tokenizer import build_prompt_tokenizer, prompt_vocabulary

__all__ = ["tiny_scratch_components", "tiny_latent_unet", "save_tiny_stable_diffusion"]


def tiny_scratch_components(resolution: int = 32, seed: int = 0, prediction_type: str = "epsilon",
                            channels: int = 1,
                            only_cross_attention: bool | Sequence[bool] = False) -> DiffusionComponents:
    """A pixel-space model small enough for CPU tests (UNet levels 16/32, 2 attention heads).

    Args:
        resolution: image side.
        seed: torch seed of the random init.
        prediction_type: the noise scheduler's prediction type.
        channels: 1 (grey) or 3 (colour) images.
        only_cross_attention: drop self-attention (all levels, or one flag per level).
    """
    torch.manual_seed(seed)
    return build_scratch_components(
        resolution=resolution,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_heads=2,
        cross_attention_dim=32,
        norm_num_groups=8,
        text_hidden_size=32,
        text_layers=2,
        text_heads=2,
        text_intermediate_size=64,
        max_prompt_tokens=48,
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        channels=channels,
        only_cross_attention=only_cross_attention,
    )


def tiny_latent_unet(sample_size: int = 32, seed: int = 0) -> UNet2DConditionModel:
    """A bare SD-shaped UNet (4 latent channels, cross-attention dim 32, attention at the first
    and last level) in eval mode: for attention-capture tests and benchmarks."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()


def save_tiny_stable_diffusion(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SD-1.x-shaped model (random weights) with ``save_pretrained``; returns the folder.

    Latent side = image side / 2 (a two-level VAE); the UNet has two levels, so images must be a
    multiple of 4 px.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    tokenizer = build_prompt_tokenizer(prompt_vocabulary(), model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # SD 1.5's scheduler settings
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    return folder
