"""Pipeline-style sampling with per-sample seeds and optional attention capture."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffmask.attention import AttentionSink, capture_cross_attention
from diffmask.autoencoder.channels import from_autoencoder_channels
from diffmask.diffusion.components import DiffusionComponents, check_resolution, load_components
from diffmask.diffusion.module import encode_conditioning, encode_posterior
from diffmask.prompts.builder import PromptBuilder, class_token_positions, prompt_builder_from_dict

__all__ = ["DiffusionSampler", "GenerationOutput"]

# ddim/ddpm: per-image noise generators; dpmpp (DPM-Solver++ multistep) and unipc: deterministic
# fast solvers (10-20 steps), one UNet call per step, so attention capture sees every step
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}


@dataclass
class GenerationOutput:
    """Result of :meth:`DiffusionSampler.__call__`.

    Attributes:
        images: (B, C, S, S) float in [0, 1] (CPU); C = the model's channels (1 grey, 3 colour).
        prompts: the prompts, in batch order.
        seeds: the seed of each image.
        token_positions: per image, per class, the token positions of the class phrase (empty
            when the sampler has no prompt builder to find them).
    """

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    token_positions: list[list[list[int]]] = field(default_factory=list)


class DiffusionSampler:
    """Samples images for prompts; each image's noise comes from its own seed.

    Results therefore do not depend on batch composition, DDP sharding or resumption (up to
    floating-point differences of batched kernels).

    Args:
        components: the model (UNet, text encoder, tokenizer, scheduler config, optional VAE).
        resolution: image side in pixels.
        scheduler: ``ddim`` (deterministic with ``eta=0``), ``ddpm``, ``dpmpp`` (DPM-Solver++
            multistep) or ``unipc`` (UniPC); the last two are deterministic and need fewer steps.
        prompt_builder: finds the class phrases in prompts (for ``token_positions``); optional.
        device: where to run (default: the UNet's device).
        controlnet: optional ``ControlNetModel`` (:mod:`diffmask.control`); then every call
            needs ``control`` images and the UNet takes the ControlNet's residuals.

    Examples::

        sampler = DiffusionSampler.from_pretrained("artifacts/diffusion/run1", device="cuda")
        out = sampler(["a breast ultrasound image, benign, showing the lesion"], seeds=[0], num_inference_steps=50)
    """

    def __init__(
        self,
        components: DiffusionComponents,
        resolution: int,
        scheduler: str = "ddim",
        prompt_builder: PromptBuilder | None = None,
        device: str | torch.device | None = None,
        controlnet: torch.nn.Module | None = None,
    ):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        self.components = components
        self.resolution = resolution
        self.latent_size = check_resolution(components, resolution)
        sched_cfg = dict(components.noise_scheduler.config)
        self.scheduler = SCHEDULERS[scheduler].from_config(sched_cfg)
        self.prompt_builder = prompt_builder
        self.device = torch.device(device) if device is not None else components.unet.device
        self.controlnet = controlnet
        for m in (components.unet, components.text_encoder, components.vae, controlnet):
            if m is not None:
                m.to(self.device).eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        scheduler: str = "ddim",
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        resolution: int | None = None,
        channels: int | None = None,
    ) -> DiffusionSampler:
        """Load an exported model (or any SD folder, then ``resolution`` is required).

        ``channels`` (``data.channels``) must be the channels the model was fitted on (a ValueError
        naming both and the folder otherwise); None = the model's own.
        """
        comps = load_components(path, torch_dtype=torch_dtype, channels=channels)
        meta = comps.metadata or {}
        if resolution is None:
            if "resolution" not in meta:
                raise ValueError(f"resolution: {path} has no diffmask.json resolution; pass resolution=")
            resolution = int(meta["resolution"])
        builder = prompt_builder_from_dict(meta["prompt_builder"]) if "prompt_builder" in meta else None
        return cls(comps, resolution, scheduler=scheduler, prompt_builder=builder, device=device)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(B, C, s, s) standard normal noise, item i from ``seeds[i]`` alone (drawn on the CPU)."""
        c = self.components.unet.config.in_channels
        shape = (1, c, self.latent_size, self.latent_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device, self.components.unet.dtype)

    def token_positions(self, prompts: Sequence[str], strict: bool = True) -> list[list[list[int]]]:
        """Per prompt, per class, the token positions of the class phrase.

        Returns [] without a prompt builder, or (with ``strict=False``) when a prompt does not
        name every class. Raises ValueError for a prompt longer than the tokenizer allows.
        """
        if self.prompt_builder is None:
            return []
        out = []
        for p in prompts:
            try:
                located = self.prompt_builder.locate(p)
            except ValueError:
                if strict:
                    raise
                return []
            out.append(class_token_positions(self.components.tokenizer, located))
        return out

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        attention_sink: AttentionSink | None = None,
        eta: float = 0.0,
        control: torch.Tensor | None = None,
        control_scale: float = 1.0,
        init_images: torch.Tensor | None = None,
        strength: float = 1.0,
    ) -> GenerationOutput:
        """Generate one image per (prompt, seed).

        Args:
            prompts: B prompts (each at most the tokenizer's length; longer → ValueError).
            seeds: B integer seeds.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale (<= 1 disables guidance).
            attention_sink: receives every cross-attention layer's probabilities at every step
                via :func:`~diffmask.attention.capture_cross_attention`; with guidance the batch is
                ``[uncond, cond]`` (an ``AttentionRecorder`` keeps the conditional half). A sink
                with a ``begin_step(index, timestep)`` method is told each step.
            eta: DDIM noise (0 = deterministic); ignored by DDPM.
            control: (B, C, S, S) condition images for the ControlNet (required with one).
            control_scale: multiplier of the ControlNet's residuals (1 = as fitted).
            init_images: (B, C, S, S) in [0, 1]: start from these images (SDEdit) instead of
                pure noise: each is encoded (the VAE posterior's mean in latent space), noised to
                the schedule's step at ``strength`` with the image's own seed, and denoised over
                the remaining ``round(strength * num_inference_steps)`` steps.
            strength: the share of the schedule that is run from ``init_images`` (0 < s <= 1;
                1 = from noise at the first timestep, only the layout's trace is kept).

        Returns:
            :class:`GenerationOutput` with images (B, C, S, S) in [0, 1] on the CPU (C = the
            model's ``channels``).
        """
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"prompts/seeds: expected equally many (>0), got {len(prompts)} and {len(seeds)}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        comps, device = self.components, self.device
        if (control is None) != (self.controlnet is None):
            raise ValueError(
                "control: a sampler with a ControlNet needs condition images, and one without cannot take them"
            )
        if control is not None and (control.shape[0] != len(prompts) or control.shape[-1] != self.resolution
                                    or control.shape[-2] != self.resolution):
            raise ValueError(
                f"control: expected ({len(prompts)}, C, {self.resolution}, {self.resolution}) condition images, "
                f"got {tuple(control.shape)}"
            )
        positions = self.token_positions(prompts, strict=False)
        # 1. text states; guidance doubles the batch as [uncond, cond]
        guided = guidance_scale > 1.0
        states = encode_conditioning(comps, prompts, device)
        if guided:
            uncond = encode_conditioning(comps, [""] * len(prompts), device)
            states = torch.cat([uncond, states])
        states = states.to(comps.unet.dtype)
        if control is not None:
            control = control.to(device, comps.unet.dtype)
            control = torch.cat([control, control]) if guided else control
        # 2. initial noise, one generator per image (or a real image noised part-way)
        generators = [torch.Generator().manual_seed(s + 1) for s in seeds]  # for stochastic steps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if init_images is None:
            x = self.initial_noise(seeds) * self.scheduler.init_noise_sigma
        else:
            timesteps, x = self._noised_init(init_images, seeds, num_inference_steps, strength)
        with contextlib.ExitStack() as stack:
            if attention_sink is not None:
                stack.enter_context(capture_cross_attention(comps.unet, attention_sink))
            for i, t in enumerate(timesteps):
                if attention_sink is not None and hasattr(attention_sink, "begin_step"):
                    attention_sink.begin_step(i, int(t))
                # 3. predict noise (or v), with guidance
                inp = torch.cat([x, x]) if guided else x
                inp = self.scheduler.scale_model_input(inp, t)
                residuals: dict[str, Any] = {}
                if control is not None:
                    down, mid = self.controlnet(inp, t, encoder_hidden_states=states, controlnet_cond=control,
                                                conditioning_scale=control_scale, return_dict=False)
                    residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
                pred = comps.unet(inp, t, encoder_hidden_states=states, **residuals).sample
                if guided:
                    pred_uncond, pred_cond = pred.chunk(2)
                    pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
                # 4. one scheduler step
                kwargs: dict[str, Any] = {}
                if isinstance(self.scheduler, DDIMScheduler | DDPMScheduler):
                    kwargs["generator"] = generators
                if isinstance(self.scheduler, DDIMScheduler):
                    kwargs["eta"] = eta
                x = self.scheduler.step(pred, t, x, **kwargs).prev_sample
        # 5. decode to [0, 1] images of the model's channels (grey averaged back from a 3-channel VAE)
        if comps.vae is not None:
            x = comps.vae.decode(x / comps.vae.config.scaling_factor).sample
            x = from_autoencoder_channels(x, comps.channels)
        images = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
        return GenerationOutput(images=images, prompts=prompts, seeds=seeds, token_positions=positions)

    def _noised_init(self, init_images: torch.Tensor, seeds: Sequence[int], num_inference_steps: int,
                     strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the timesteps left to run, the init images' clean inputs noised to the first of them)."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength: expected 0 < strength <= 1, got {strength}")
        size = (len(seeds), self.components.channels, self.resolution, self.resolution)
        if tuple(init_images.shape) != size:
            raise ValueError(f"init_images: expected {size} images in [0, 1], got {tuple(init_images.shape)}")
        run = min(round(strength * num_inference_steps), num_inference_steps)
        if run < 1:
            raise ValueError(f"strength: {strength} of {num_inference_steps} steps runs no step; raise either")
        order = getattr(self.scheduler, "order", 1)
        begin = (num_inference_steps - run) * order
        timesteps = self.scheduler.timesteps[begin:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(begin)
        images = init_images.to(self.device, torch.float32)
        vae = self.components.vae
        if vae is None:
            clean = images * 2.0 - 1.0
        else:
            mean, _ = encode_posterior(images, vae, self.resolution)
            clean = mean * vae.config.scaling_factor
        clean = clean.to(self.components.unet.dtype)
        noise = self.initial_noise(seeds)
        return timesteps, self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(seeds)))
