"""Class maps of existing (real) images: noise them to timestep t, run the UNet once, read the store.

This is the measurement behind the mask stage's key figure (mask IoU on real test images): the
same attention-to-mask path as generation, but on images whose masks are known.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffmask.attention.store import CrossAttentionStore

__all__ = ["extract_class_maps"]


@torch.no_grad()
def extract_class_maps(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    token_positions: Sequence[Sequence[Sequence[int]]],
    timestep: int,
    store: CrossAttentionStore,
    prompt_lengths: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Cross-attention class maps of clean images noised to ``timestep``.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers scheduler with ``add_noise`` (DDPM/DDIM) and ``config.num_train_timesteps``.
        latents: (B, C, h, w) clean model inputs: VAE latents (scaled) for a latent model, or
            the images themselves for a pixel-space UNet.
        encoder_hidden_states: (B, T, D) text embeddings of each image's prompt.
        token_positions: per image, per class, the token positions of the class phrase.
        timestep: noise level in ``[0, num_train_timesteps)``.
        store: collects the maps; it is reset here and its step/timestep windows apply to step 0
            at ``timestep``.
        prompt_lengths: per image, its prompt's real token count (checks positions).
        generator: for the noise (same generator state, same maps).

    Returns:
        (B, K, H, W) class maps in [0, 1] (see :meth:`CrossAttentionStore.result`).

    Raises:
        ValueError: mismatched batch sizes, a timestep out of range, or any store error
            (token outside the prompt, unknown layer, empty map).
    """
    if latents.ndim != 4:
        raise ValueError(f"latents: expected (B, C, h, w), got shape {tuple(latents.shape)}")
    if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != latents.shape[0]:
        raise ValueError(
            f"encoder_hidden_states: expected ({latents.shape[0]}, T, D), "
            f"got {tuple(encoder_hidden_states.shape)}"
        )
    if len(token_positions) != latents.shape[0]:
        raise ValueError(
            f"token_positions: expected {latents.shape[0]} entries (one per image), "
            f"got {len(token_positions)}"
        )
    steps = int(scheduler.config.num_train_timesteps)
    if not 0 <= int(timestep) < steps:
        raise ValueError(f"timestep: expected an integer in [0, {steps}), got {timestep}")
    store.set_tokens(token_positions, prompt_lengths)
    store.set_step(0, int(timestep))
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.full((latents.shape[0],), int(timestep), device=latents.device, dtype=torch.long)
    noisy = scheduler.add_noise(latents, noise, t)
    with store.capture(unet):
        unet(noisy, t, encoder_hidden_states=encoder_hidden_states.to(latents.dtype))
    return store.result()
