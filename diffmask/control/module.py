"""LightningModule that fits a ControlNet beside a (frozen) diffusion model, and its export/load.

The ControlNet is diffusers' ``ControlNetModel`` made from the base model's UNet
(:func:`build_controlnet`): its encoder is a copy of the UNet's, its conditioning embedding
reads the condition images of :class:`~diffmask.control.conditions.ConditionBuilder`, and its
zero-initialised output convolutions make it start as a no-op. The export is a folder that
``ControlNetModel.from_pretrained(folder)`` loads, plus ``control.json`` (the base model it was
made from with a fingerprint of its UNet, the condition settings, resolution, classes, the
labelled ids, the intensity normalisation, the image channels).

Colour data (``data.channels=3``): the base model must generate colour images (its
``channels``); edge conditions are taken from each image's luminance, mask conditions are the
same as for grey images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel

from diffmask.artifacts import atomic_write_json
from diffmask.autoencoder.channels import channel_word, check_datamodule_channels
from diffmask.control.conditions import ConditionBuilder
from diffmask.diffusion.components import (
    DiffusionComponents,
    check_model_channels,
    check_resolution,
    load_components,
)
from diffmask.diffusion.module import encode_images, encode_prompts
from diffmask.prompts.builder import PromptBuilder

__all__ = ["ControlLitModule", "build_controlnet", "load_controlled", "model_fingerprint", "CONTROL_FILE"]

log = logging.getLogger(__name__)
CONTROL_FILE = "control.json"
BASE_UNET = "base_unet"  # the tuned base UNet, when it was not locked while fitting


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over a diffusers model folder's ``unet/`` (config and weights): which base a ControlNet fits."""
    unet = Path(model_dir) / "unet"
    files = sorted(p for p in unet.glob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(
            f"{unet}: no UNet config or weights (expected a diffusers-format model folder)"
        )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def build_controlnet(
    unet: UNet2DConditionModel,
    conditioning_channels: int,
    vae_scale_factor: int = 1,
    conditioning_embedding_out_channels: Sequence[int] | None = None,
) -> ControlNetModel:
    """A ControlNet copied from ``unet`` (encoder weights, time embedding), its outputs zero.

    Args:
        unet: the base model's UNet.
        conditioning_channels: channels of the condition images.
        vae_scale_factor: pixels per latent cell (1 in pixel space, 8 for Stable Diffusion): the
            conditioning embedding downsamples the full-size condition by this much.
        conditioning_embedding_out_channels: channels of the embedding's levels; None = 16 in
            pixel space, diffusers' (16, 32, 96, 256) for a factor of 8, else doubling per level.
    """
    levels = int(round(math.log2(vae_scale_factor))) + 1
    if 2 ** (levels - 1) != vae_scale_factor:
        raise ValueError(f"vae_scale_factor: expected a power of two, got {vae_scale_factor}")
    if conditioning_embedding_out_channels is None:
        conditioning_embedding_out_channels = (
            (16, 32, 96, 256) if levels == 4 else tuple(16 * 2**i for i in range(levels))
        )
    channels = tuple(int(c) for c in conditioning_embedding_out_channels)
    if len(channels) != levels:
        raise ValueError(
            f"control.conditioning_embedding_out_channels: {list(channels)} has {len(channels)} levels; "
            f"the condition must be downsampled {levels - 1} times (VAE factor {vae_scale_factor}), "
            f"so it needs {levels}"
        )
    return ControlNetModel.from_unet(
        unet, conditioning_channels=int(conditioning_channels), conditioning_embedding_out_channels=channels
    )


class ControlLitModule(pl.LightningModule):
    """Fits a ControlNet so that the base diffusion model follows condition images (edges, masks).

    Batches come from :class:`~diffmask.data.SegmentationDataModule` (``image``, ``label``,
    ``meta``, ``id``); the condition of each item is made from its image and label map by
    ``condition`` (with mask ablation drawn while fitting). The loss is the base model's
    denoising loss with the ControlNet's residuals added to the UNet.

    Args:
        components: the base model (its text encoder and VAE stay frozen).
        controlnet: see :func:`build_controlnet`.
        condition: makes the condition images.
        prompt_builder: the base model's prompt builder (prompts from each image's metadata,
            the prompts the base was fitted with); unused with a fixed ``prompt``.
        optimizer: partial optimizer factory.
        lr_scheduler: optional partial LR scheduler, stepped every optimizer step.
        resolution: image side in pixels.
        sd_locked: keep the base UNet frozen (ControlNet's ``sd_locked``); False also trains the
            UNet's decoder (up blocks and output), exported as ``base_unet/``.
        prompt: a fixed prompt for every image (EMIT-Diff's "Lung, Xray"); None = built from metadata.
        cond_dropout: probability of an empty prompt (the condition alone must steer).
        field_dropout: probability of each metadata word becoming neutral (as the base was fitted).
    """

    def __init__(
        self,
        components: DiffusionComponents,
        controlnet: ControlNetModel,
        condition: ConditionBuilder,
        prompt_builder: PromptBuilder | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        resolution: int = 64,
        sd_locked: bool = True,
        prompt: str | None = None,
        cond_dropout: float = 0.1,
        field_dropout: float = 0.25,
    ):
        super().__init__()
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"control.cond_dropout: expected a probability in [0, 1), got {cond_dropout}")
        if prompt is None and prompt_builder is None:
            raise ValueError("control.prompt: give a fixed prompt or a prompt builder (the base model's)")
        if int(controlnet.config.conditioning_channels) != condition.channels:
            raise ValueError(
                f"controlnet: it reads {controlnet.config.conditioning_channels} condition channels, but "
                f"condition type {condition.type!r} makes {condition.channels}"
            )
        self.save_hyperparameters(
            ignore=["components", "controlnet", "condition", "prompt_builder", "optimizer", "lr_scheduler"]
        )
        check_resolution(components, resolution)
        self.components = components
        self.channels = int(components.channels)
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.controlnet = controlnet
        self.condition = condition
        self.prompt_builder = prompt_builder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.resolution = resolution
        self.sd_locked = sd_locked
        self.prompt = prompt
        self.cond_dropout = cond_dropout
        self.field_dropout = field_dropout
        self.prediction_type = self.noise_scheduler.config.prediction_type
        self.text_encoder.requires_grad_(False).eval()
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()
        self.unet.requires_grad_(False)
        if not sd_locked:
            for m in (*self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out):
                if m is not None:
                    m.requires_grad_(True)
        self._rng = random.Random(0)
        self._np_rng = np.random.default_rng(0)

    def setup(self, stage: str) -> None:
        """Check the datamodule's channels against the base model's, and seed the prompt and ablation RNGs.

        The seed differs per process (``torch.initial_seed()`` and the global rank).

        Args:
            stage: the Lightning stage (``fit``, ``validate``, ...).
        """
        check_datamodule_channels(self.trainer if self._trainer is not None else None, self.channels,
                                  "the base diffusion model")
        seed = torch.initial_seed() * 1009 + self.global_rank
        self._rng = random.Random(seed)
        self._np_rng = np.random.default_rng(seed % 2**63)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """The ControlNet's parameters, plus the unfrozen base UNet's when ``sd_locked`` is False."""
        params = list(self.controlnet.parameters())
        if not self.sd_locked:
            params += [p for p in self.unet.parameters() if p.requires_grad]
        return params

    def configure_optimizers(self):
        """The optimizer over :meth:`trained_parameters`, with the LR scheduler stepped every step if set."""
        optimizer = self.optimizer_factory(self.trained_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the loss ------------------------------------------------------------------------
    def prompts(self, metas: Sequence[dict], train: bool) -> list[str]:
        """The prompt of each item: the fixed ``prompt``, or built from its metadata.

        Args:
            metas: the items' metadata (a batch's ``meta``).
            train: while fitting: a prompt is emptied with probability ``cond_dropout`` and metadata
                words are dropped with probability ``field_dropout``; otherwise neither.

        Returns:
            One prompt per item.
        """
        out = []
        for meta in metas:
            if train and self.cond_dropout > 0 and self._rng.random() < self.cond_dropout:
                out.append("")
            elif self.prompt is not None:
                out.append(self.prompt)
            else:
                built = self.prompt_builder.build(meta, rng=self._rng if train else None,
                                                  drop_fields=self.field_dropout if train else 0.0)
                out.append(built.text)
        return out

    def conditions(self, batch: dict, train: bool) -> torch.Tensor:
        """(B, C, S, S) condition images of a batch (mask ablation drawn while fitting); the edges of a
        colour image are its luminance's."""
        image = batch["image"].detach().float().cpu()
        image = (image[:, 0] if image.shape[1] == 1 else image.permute(0, 2, 3, 1)).numpy()  # (B, S, S[, 3])
        label = batch["label"][:, 0].detach().cpu().numpy()
        cond = self.condition.batch(image, label, rng=self._np_rng if train else None, ids=batch.get("id"))
        return torch.from_numpy(cond).to(batch["image"].device)

    def denoising_loss(
        self, batch: dict, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The MSE of the controlled UNet's prediction (noise, or velocity) on noised latents of the batch.

        Args:
            batch: a datamodule batch (``image``, ``label``, ``meta``, ``id``).
            train: draw the fitting randomness (prompt dropout, mask ablation) as while fitting.
            generator: a CPU generator for the noise and timesteps (fixed noise for validation);
                None draws on the batch's device.

        Raises:
            ValueError: the images' channels differ from the base model's.
        """
        if batch["image"].shape[1] != self.channels:
            raise ValueError(
                f"image: {batch['image'].shape[1]} channel(s), the base model takes {self.channels} "
                f"({channel_word(self.channels)}); grey and colour are never converted silently"
            )
        clean = encode_images(batch["image"], self.vae, self.resolution)
        cond = self.conditions(batch, train).to(clean.dtype)
        b = clean.shape[0]
        dev = "cpu" if generator is not None else clean.device
        noise = torch.randn(clean.shape, generator=generator, device=dev).to(clean)
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=generator, device=dev
        ).to(clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(clean, noise, t)
        with torch.no_grad():
            prompts = self.prompts(batch["meta"], train)
            states = encode_prompts(self.tokenizer, self.text_encoder, prompts, clean.device)
        down, mid = self.controlnet(
            noisy, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False
        )
        pred = self.unet(
            noisy, t, encoder_hidden_states=states, down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        return F.mse_loss(pred.float(), target.float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The denoising loss with the fitting randomness; logs ``train/loss``.

        Args:
            batch: a datamodule batch.
            batch_idx: the batch's index (unused).
        """
        loss = self.denoising_loss(batch, train=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Logs ``val/mse``, the denoising loss with noise fixed by ``batch_idx`` (comparable across epochs).

        Args:
            batch: a datamodule batch.
            batch_idx: the batch's index, the noise seed.
        """
        gen = torch.Generator().manual_seed(batch_idx)  # fixed noise: comparable across epochs
        loss = self.denoising_loss(batch, train=False, generator=gen)
        self.log("val/mse", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)

    # ---- export ----------------------------------------------------------------------------
    def export(
        self, path: str | os.PathLike, base_dir: str | os.PathLike, extra: dict[str, Any] | None = None
    ) -> Path:
        """Write the ControlNet (``ControlNetModel.from_pretrained(path)`` loads it) + ``control.json``.

        An unlocked base UNet is written to ``base_unet/``.

        Args:
            path: the folder (created).
            base_dir: the base diffusion model's folder (recorded with its UNet fingerprint).
            extra: further JSON-able entries for ``control.json``.

        Returns:
            ``path``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.controlnet.save_pretrained(path)
        if not self.sd_locked:
            self.unet.save_pretrained(path / BASE_UNET)
        meta = {
            "format": 1,
            "base_model": str(Path(base_dir).resolve()),
            "base_fingerprint": model_fingerprint(base_dir),
            "condition": self.condition.to_dict(),
            "resolution": self.resolution,
            "channels": self.channels,
            "class_names": list(self.prompt_builder.class_names) if self.prompt_builder is not None else None,
            "prompt": self.prompt,
            "sd_locked": self.sd_locked,
            "global_step": int(self.global_step),
            **(extra or {}),
        }
        atomic_write_json(path / CONTROL_FILE, json.loads(json.dumps(meta, default=str)))
        return path


def read_control_metadata(control_dir: str | os.PathLike) -> dict[str, Any]:
    """``control.json`` of a ControlNet stage folder; a clear error when it is not one."""
    meta_file = Path(control_dir) / CONTROL_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"synthesis.control_dir: {control_dir} has no {CONTROL_FILE}; expected a folder written by "
            "diffmask-fit-control"
        )
    return json.loads(meta_file.read_text())


def load_controlled(
    control_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    check_base: bool = True,
    channels: int | None = None,
) -> tuple[DiffusionComponents, ControlNetModel, dict[str, Any]]:
    """The base model (with its tuned UNet when it was unlocked), the ControlNet and ``control.json``.

    ``channels`` (``data.channels``; None = not checked) must be the channels the ControlNet and its
    base model were fitted on (``control.json``: 1 when not recorded).

    Raises:
        FileNotFoundError: ``control_dir`` is not a ControlNet stage folder.
        ValueError: ``base_dir`` is not the model the ControlNet was made from (fingerprints differ);
            ``channels`` differ from the ControlNet's or the base model's (both values and the folder named).
    """
    meta = read_control_metadata(control_dir)
    if channels is not None:
        check_model_channels(
            control_dir, int(meta.get("channels", 1)), channels, what="ControlNet", record=CONTROL_FILE
        )
    if check_base:
        found = model_fingerprint(base_dir)
        if found != meta.get("base_fingerprint"):
            raise ValueError(
                f"input_dir: {base_dir} is not the diffusion model the ControlNet in {control_dir} was made "
                f"from ({meta.get('base_model')}; UNet fingerprint {str(meta.get('base_fingerprint'))[:12]}, "
                f"this one {found[:12]}); pass that model as input_dir, or fit a ControlNet on this one"
            )
    components = load_components(base_dir, channels=channels)
    if (Path(control_dir) / BASE_UNET).is_dir():
        components.unet = UNet2DConditionModel.from_pretrained(Path(control_dir) / BASE_UNET)
    controlnet = ControlNetModel.from_pretrained(control_dir)
    return components, controlnet, meta
