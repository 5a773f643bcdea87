"""Samplers, one class per mode, with per-sample seeds.

* :class:`TextToImageSampler`: images from prompts, starting from pure noise.
* :class:`ControlledSampler`: the same, with a ControlNet steering every step by condition images.
* :class:`VariationSampler`: SDEdit; each image starts from a real image noised part-way.

They share :class:`Sampler`, which holds the model, the scheduler and the prompt handling,
checks a call's inputs (:meth:`Sampler.check_inputs`) and runs the denoising loop.

Attention capture is not a mode: the caller opens the capture around a call and passes the
sink's ``begin_step`` as ``on_step_begin``, so the sink knows the step of every UNet call::

    sampler = TextToImageSampler.from_pretrained("artifacts/diffusion/run1")
    with store.capture(sampler.components.unet):
        out = sampler(prompts, seeds, num_inference_steps=20, on_step_begin=store.begin_step)
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from diffmask.autoencoder.channels import from_autoencoder_channels
from diffmask.diffusion.components import DiffusionComponents, check_resolution, load_components
from diffmask.diffusion.module import encode_conditioning, encode_posterior
from diffmask.domains.recorded import prompt_builder_from_dict
from diffmask.prompts.builder import PromptBuilder, class_token_positions

__all__ = [
    "SCHEDULERS",
    "GenerationOutput",
    "Sampler",
    "TextToImageSampler",
    "ControlledSampler",
    "VariationSampler",
]

# ddim/ddpm: per-image noise generators; dpmpp (DPM-Solver++ multistep) and unipc: deterministic
# fast solvers (10-20 steps), one UNet call per step, so attention capture sees every step
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmpp": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

StepHook = Callable[[int, int], Any]
"""Called as ``hook(step_index, timestep)`` before each step's UNet call."""

ResidualsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]
"""``fn(model_input, timestep, text_states)`` -> extra keyword arguments of the UNet call."""


@dataclass
class GenerationOutput:
    """Result of a sampler call.

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


class Sampler:
    """The parts every sampler shares: model, scheduler, prompts, input checks, denoising loop.

    Each image's noise comes from its own seed, so results do not depend on batch composition,
    DDP sharding or resumption (up to floating-point differences of batched kernels). Use a
    subclass: :class:`TextToImageSampler`, :class:`ControlledSampler` or :class:`VariationSampler`.

    Args:
        components: the model (UNet, text encoder, tokenizer, scheduler config, optional VAE).
        resolution: image side in pixels.
        scheduler: ``ddim`` (deterministic with ``eta=0``), ``ddpm``, ``dpmpp`` (DPM-Solver++
            multistep) or ``unipc`` (UniPC); the last two are deterministic and need fewer steps.
        prompt_builder: finds the class phrases in prompts (for ``token_positions``); optional.
        device: where to run (default: the UNet's device).
    """

    #: whether a call needs ``control`` condition images (a ControlNet steers the UNet)
    takes_control: ClassVar[bool] = False

    def __init__(
        self,
        components: DiffusionComponents,
        resolution: int,
        scheduler: str = "ddim",
        prompt_builder: PromptBuilder | None = None,
        device: str | torch.device | None = None,
    ):
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler: expected one of {sorted(SCHEDULERS)}, got {scheduler!r}")
        self.components = components
        self.resolution = resolution
        self.latent_size = check_resolution(components, resolution)
        self.scheduler = SCHEDULERS[scheduler].from_config(dict(components.noise_scheduler.config))
        self.prompt_builder = prompt_builder
        self.device = torch.device(device) if device is not None else components.unet.device
        self._place(components.unet, components.text_encoder, components.vae)

    def _place(self, *modules: torch.nn.Module | None) -> None:
        """Move the given modules (None skipped) to the sampler's device, in eval mode."""
        for m in modules:
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
    ) -> Sampler:
        """Load an exported model (or any SD folder, then ``resolution`` is required).

        Args:
            path: the model folder (a diffusion stage's export or a Stable Diffusion folder).
            scheduler: the sampling scheduler (see the class).
            device: where to run (default: where the model loads).
            torch_dtype: the weights' dtype (default: as saved).
            resolution: image side in pixels; None = the export's ``diffmask.json`` resolution.
            channels: ``data.channels``, which must be the channels the model was fitted on (a
                ValueError naming both and the folder otherwise); None = the model's own.

        Returns:
            A sampler of this class, with the export's prompt builder when it has one.
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
        """(B, C, s, s) standard normal noise, item i from ``seeds[i]`` alone (drawn on the CPU).

        Args:
            seeds: one integer seed per image.
        """
        c = self.components.unet.config.in_channels
        shape = (1, c, self.latent_size, self.latent_size)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.cat(noise).to(self.device, self.components.unet.dtype)

    def token_positions(self, prompts: Sequence[str], strict: bool = True) -> list[list[list[int]]]:
        """Per prompt, per class, the token positions of the class phrase.

        Args:
            prompts: the prompts.
            strict: raise when a prompt does not name every class (else return []).

        Returns:
            [] without a prompt builder, or (with ``strict=False``) when a prompt does not name
            every class.

        Raises:
            ValueError: a prompt is longer than the tokenizer allows, or (``strict``) does not
                name every class.
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

    def check_inputs(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int,
        control: torch.Tensor | None = None,
        init_images: torch.Tensor | None = None,
        strength: float | None = None,
    ) -> None:
        """Check a call's inputs before any work; every problem is a ValueError naming the argument.

        Args:
            prompts: B prompts.
            seeds: B seeds.
            num_inference_steps: denoising steps (>= 1).
            control: (B, C, S, S) condition images; required exactly when :attr:`takes_control`.
            init_images: (B, C, S, S) images to start from (variations); None = from noise.
            strength: the share of the schedule run from ``init_images`` (0 < s <= 1, and at
                least one of ``num_inference_steps``); None = not a variation. A strength without
                ``init_images`` is an error.

        Raises:
            ValueError: what was expected and what was given.
        """
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(
                f"prompts/seeds: expected equally many (>0), got {len(prompts)} and {len(seeds)}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        if self.takes_control and control is None:
            raise ValueError("control: a sampler with a ControlNet needs condition images (B, C, S, S)")
        if control is not None:
            if not self.takes_control:
                raise ValueError("control: only a ControlledSampler takes condition images")
            size = (len(prompts), self.resolution, self.resolution)
            if control.ndim != 4 or (control.shape[0], *control.shape[-2:]) != size:
                raise ValueError(
                    f"control: expected ({len(prompts)}, C, {self.resolution}, {self.resolution}) "
                    f"condition images, got {tuple(control.shape)}"
                )
        if init_images is not None or strength is not None:
            self._check_init(len(prompts), num_inference_steps, init_images, strength)

    def _check_init(self, batch: int, num_inference_steps: int, init_images: torch.Tensor | None,
                    strength: float | None) -> None:
        """The variation inputs' part of :meth:`check_inputs`."""
        if init_images is None:
            raise ValueError(
                "init_images: a variation needs (B, C, S, S) images in [0, 1] to start from, got None"
            )
        if strength is None or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength: expected 0 < strength <= 1, got {strength}")
        size = (batch, self.components.channels, self.resolution, self.resolution)
        if tuple(init_images.shape) != size:
            raise ValueError(f"init_images: expected {size} images in [0, 1], got {tuple(init_images.shape)}")
        if _steps_to_run(strength, num_inference_steps) < 1:
            raise ValueError(
                f"strength: {strength} of {num_inference_steps} steps runs no step; raise either"
            )

    def prepare_extra_step_kwargs(self, seeds: Sequence[int], eta: float) -> dict[str, Any]:
        """The keyword arguments this scheduler's ``step()`` takes, read from its signature.

        Args:
            seeds: the images' seeds; a scheduler that draws noise in its steps (``generator``)
                gets one CPU generator per image, seeded ``seed + 1``.
            eta: DDIM's noise scale, for schedulers whose ``step()`` has an ``eta``.

        Returns:
            ``generator`` and/or ``eta``, as far as ``step()`` accepts them.
        """
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "generator" in accepted:
            kwargs["generator"] = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]
        if "eta" in accepted:
            kwargs["eta"] = eta
        return kwargs

    def encode_prompts(self, prompts: Sequence[str], guidance_scale: float) -> torch.Tensor:
        """The UNet's ``encoder_hidden_states``; with guidance the batch is ``[uncond, cond]``.

        Args:
            prompts: B prompts (each at most the tokenizer's length; longer -> ValueError).
            guidance_scale: classifier-free guidance scale (<= 1: no unconditional half).
        """
        comps = self.components
        states = encode_conditioning(comps, prompts, self.device)
        if _guided(guidance_scale):
            uncond = encode_conditioning(comps, [""] * len(prompts), self.device)
            states = torch.cat([uncond, states])
        return states.to(comps.unet.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> (B, C, S, S) images in [0, 1] on the CPU, C = the model's channels.

        Args:
            latents: the loop's result (pixels in [-1, 1] for a pixel-space model).
        """
        vae = self.components.vae
        if vae is not None:  # grey is averaged back from a 3-channel VAE
            latents = vae.decode(latents / vae.config.scaling_factor).sample
            latents = from_autoencoder_channels(latents, self.components.channels)
        return ((latents.float().clamp(-1, 1) + 1) / 2).cpu()

    def _sample(
        self,
        prompts: list[str],
        seeds: list[int],
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        guidance_scale: float,
        eta: float,
        on_step_begin: StepHook | None,
        residuals: ResidualsFn | None = None,
    ) -> GenerationOutput:
        """Encode the prompts, denoise ``latents`` over ``timesteps`` and decode them."""
        positions = self.token_positions(prompts, strict=False)
        states = self.encode_prompts(prompts, guidance_scale)
        step_kwargs = self.prepare_extra_step_kwargs(seeds, eta)
        guided = _guided(guidance_scale)
        unet = self.components.unet
        for i, t in enumerate(timesteps):
            if on_step_begin is not None:
                on_step_begin(i, int(t))
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            extra = {} if residuals is None else residuals(model_input, t, states)
            pred = unet(model_input, t, encoder_hidden_states=states, **extra).sample
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        images = self.decode(latents)
        return GenerationOutput(images=images, prompts=prompts, seeds=seeds, token_positions=positions)

    def _from_noise(self, seeds: Sequence[int],
                    num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the initial latents: the seeds' noise at the first timestep's scale, every timestep)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.initial_noise(seeds) * self.scheduler.init_noise_sigma, self.scheduler.timesteps


class TextToImageSampler(Sampler):
    """Generates one image per (prompt, seed), from pure noise.

    Args:
        components: the model (UNet, text encoder, tokenizer, scheduler config, optional VAE).
        resolution: image side in pixels.
        scheduler: ``ddim``, ``ddpm``, ``dpmpp`` or ``unipc`` (see :class:`Sampler`).
        prompt_builder: finds the class phrases in prompts (for ``token_positions``); optional.
        device: where to run (default: the UNet's device).

    Examples::

        sampler = TextToImageSampler.from_pretrained("artifacts/diffusion/run1", device="cuda")
        out = sampler(["a breast ultrasound image, benign, showing the lesion"], seeds=[0],
                      num_inference_steps=50)
    """

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        on_step_begin: StepHook | None = None,
    ) -> GenerationOutput:
        """Generate one image per (prompt, seed).

        Args:
            prompts: B prompts (each at most the tokenizer's length; longer -> ValueError).
            seeds: B integer seeds.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale (<= 1 disables guidance); with guidance
                the UNet's batch is ``[uncond, cond]`` (an attention sink sees both halves).
            eta: DDIM noise (0 = deterministic); ignored by schedulers without it.
            on_step_begin: called as ``on_step_begin(step_index, timestep)`` before each step's
                UNet call, e.g. an attention store's ``begin_step``.

        Returns:
            :class:`GenerationOutput` with images (B, C, S, S) in [0, 1] on the CPU.
        """
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        self.check_inputs(prompts, seeds, num_inference_steps)
        latents, timesteps = self._from_noise(seeds, num_inference_steps)
        return self._sample(prompts, seeds, latents, timesteps, guidance_scale, eta, on_step_begin)


class ControlledSampler(Sampler):
    """Generates one image per (prompt, seed, condition image), a ControlNet steering the UNet.

    Args:
        components: the base model (UNet, text encoder, tokenizer, scheduler config, optional VAE).
        resolution: image side in pixels.
        controlnet: a ``ControlNetModel`` fitted on this model (:mod:`diffmask.control`); the UNet
            takes its residuals at every step.
        scheduler: ``ddim``, ``ddpm``, ``dpmpp`` or ``unipc`` (see :class:`Sampler`).
        prompt_builder: finds the class phrases in prompts (for ``token_positions``); optional.
        device: where to run (default: the UNet's device).
    """

    takes_control: ClassVar[bool] = True

    def __init__(
        self,
        components: DiffusionComponents,
        resolution: int,
        controlnet: torch.nn.Module,
        scheduler: str = "ddim",
        prompt_builder: PromptBuilder | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__(components, resolution, scheduler=scheduler, prompt_builder=prompt_builder,
                         device=device)
        self.controlnet = controlnet
        self.control_metadata: dict[str, Any] = {}  # control.json, when loaded by from_pretrained
        self._place(controlnet)

    @classmethod
    def from_pretrained(
        cls,
        control_dir: str | os.PathLike,
        model_dir: str | os.PathLike,
        scheduler: str = "ddim",
        device: str | torch.device | None = None,
        channels: int | None = None,
    ) -> ControlledSampler:
        """Load a ControlNet stage folder and the diffusion model it was made from.

        Args:
            control_dir: the ControlNet stage folder (``control.json``).
            model_dir: the diffusion model the ControlNet was fitted on (fingerprint-checked).
            scheduler: the sampling scheduler (see :class:`Sampler`).
            device: where to run (default: where the model loads).
            channels: ``data.channels``; must match the ControlNet's and the model's (None = unchecked).

        Returns:
            The sampler at ``control.json``'s resolution, with the model's prompt builder when it has
            one; ``control_metadata`` holds ``control.json``.
        """
        from diffmask.control.module import load_controlled

        components, controlnet, meta = load_controlled(control_dir, model_dir, channels=channels)
        stored = components.metadata or {}
        builder = prompt_builder_from_dict(stored["prompt_builder"]) if "prompt_builder" in stored else None
        sampler = cls(components, int(meta["resolution"]), controlnet, scheduler=scheduler,
                      prompt_builder=builder, device=device)
        sampler.control_metadata = meta
        return sampler

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        control: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        control_scale: float = 1.0,
        eta: float = 0.0,
        on_step_begin: StepHook | None = None,
    ) -> GenerationOutput:
        """Generate one image per (prompt, seed), each following its condition image.

        Args:
            prompts: B prompts (each at most the tokenizer's length; longer -> ValueError).
            seeds: B integer seeds.
            control: (B, C, S, S) condition images for the ControlNet (required).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance scale (<= 1 disables guidance).
            control_scale: multiplier of the ControlNet's residuals (1 = as fitted).
            eta: DDIM noise (0 = deterministic); ignored by schedulers without it.
            on_step_begin: called as ``on_step_begin(step_index, timestep)`` before each step's
                UNet call, e.g. an attention store's ``begin_step``.

        Returns:
            :class:`GenerationOutput` with images (B, C, S, S) in [0, 1] on the CPU.
        """
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        self.check_inputs(prompts, seeds, num_inference_steps, control=control)
        condition = control.to(self.device, self.components.unet.dtype)
        if _guided(guidance_scale):
            condition = torch.cat([condition, condition])
        residuals = functools.partial(self._residuals, condition, control_scale)
        latents, timesteps = self._from_noise(seeds, num_inference_steps)
        return self._sample(prompts, seeds, latents, timesteps, guidance_scale, eta, on_step_begin, residuals)

    def _residuals(self, condition: torch.Tensor, scale: float, model_input: torch.Tensor, t: torch.Tensor,
                   states: torch.Tensor) -> dict[str, Any]:
        """The ControlNet's residuals for one UNet call, as the UNet's keyword arguments."""
        down, mid = self.controlnet(model_input, t, encoder_hidden_states=states, controlnet_cond=condition,
                                    conditioning_scale=scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


class VariationSampler(Sampler):
    """SDEdit: each image starts from a real image noised part-way through the schedule.

    Args:
        components: the model (UNet, text encoder, tokenizer, scheduler config, optional VAE).
        resolution: image side in pixels.
        scheduler: ``ddim``, ``ddpm``, ``dpmpp`` or ``unipc`` (see :class:`Sampler`).
        prompt_builder: finds the class phrases in prompts (for ``token_positions``); optional.
        device: where to run (default: the UNet's device).
    """

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        init_images: torch.Tensor,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        on_step_begin: StepHook | None = None,
    ) -> GenerationOutput:
        """Generate one variation per (prompt, seed, init image).

        Each init image is encoded (the VAE posterior's mean in latent space), noised to the
        schedule's step at ``strength`` with the image's own seed, and denoised over the remaining
        ``round(strength * num_inference_steps)`` steps.

        Args:
            prompts: B prompts (each at most the tokenizer's length; longer -> ValueError).
            seeds: B integer seeds.
            init_images: (B, C, S, S) images in [0, 1] to start from.
            strength: the share of the schedule that is run from ``init_images`` (0 < s <= 1;
                1 = from noise at the first timestep, only the layout's trace is kept).
            num_inference_steps: denoising steps of the whole schedule.
            guidance_scale: classifier-free guidance scale (<= 1 disables guidance).
            eta: DDIM noise (0 = deterministic); ignored by schedulers without it.
            on_step_begin: called as ``on_step_begin(step_index, timestep)`` before each step's
                UNet call, e.g. an attention store's ``begin_step``.

        Returns:
            :class:`GenerationOutput` with images (B, C, S, S) in [0, 1] on the CPU.
        """
        prompts, seeds = list(prompts), [int(s) for s in seeds]
        self.check_inputs(prompts, seeds, num_inference_steps, init_images=init_images, strength=strength)
        latents, timesteps = self._noised_init(init_images, seeds, num_inference_steps, strength)
        return self._sample(prompts, seeds, latents, timesteps, guidance_scale, eta, on_step_begin)

    def _noised_init(self, init_images: torch.Tensor, seeds: Sequence[int], num_inference_steps: int,
                     strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(the init images' clean inputs noised to the first timestep left to run, those timesteps)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        run = _steps_to_run(strength, num_inference_steps)
        begin = (num_inference_steps - run) * getattr(self.scheduler, "order", 1)
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
        return self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(seeds))), timesteps


def _guided(guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs (it doubles the UNet's batch)."""
    return guidance_scale > 1.0


def _steps_to_run(strength: float, num_inference_steps: int) -> int:
    """How many of ``num_inference_steps`` a variation at ``strength`` runs."""
    return min(round(strength * num_inference_steps), num_inference_steps)
