"""The project's own latent autoencoder: a diffusers ``AutoencoderKL`` trained on the real images.

Stable Diffusion, which DiffMask fine-tunes, denoises an autoencoder's 8x smaller grid. Hub weights
cannot be had offline, so this stage trains one (4x by default: 128 px -> 32 x 32 x 4) on the real
training images (no labels needed). Loss: L1 reconstruction + a KL term (a small weight keeps the
latents near a Gaussian) + an edge-preserving L1 on image gradients (class borders, e.g. organ outlines, are
what the masks follow). The export is a plain ``AutoencoderKL.from_pretrained`` folder whose
``scaling_factor`` is measured on the training latents (1 / their standard deviation), as SD's
0.18215 was.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from diffmask.artifacts import atomic_write_bytes, atomic_write_json
from diffmask.autoencoder.channels import (
    channel_word,
    check_autoencoder_channels,
    from_autoencoder_channels,
    to_autoencoder_channels,
)

__all__ = [
    "AUTOENCODER_FILE",
    "AutoencoderLitModule",
    "autoencoder_channels",
    "build_autoencoder",
    "downsampling_factor",
    "load_autoencoder",
    "image_gradient_loss",
    "psnr",
    "reconstruct",
    "ssim",
    "save_grid",
]

log = logging.getLogger(__name__)
AUTOENCODER_FILE = "autoencoder.json"  # beside config.json: resolution, factor, measured latent statistics


def build_autoencoder(
    factor: int = 4,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    in_channels: int = 1,
    mid_block_attention: bool = False,
    out_channels: int | None = None,
) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` that downsamples ``factor`` times.

    Grey or colour images in, the same out.

    Args:
        factor: image side / latent side, a power of two (4: 128 px -> 32 x 32; 8 as SD).
        latent_channels: channels of the latent grid (SD: 4).
        block_out_channels: channels per level; ``log2(factor) + 1`` levels.
        layers_per_block: ResNet layers per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        in_channels: image channels (``data.channels``: 1 grey, 3 colour).
        mid_block_attention: self-attention in the middle block (SD has it; on CPU at a 32 x 32
            grid it costs more than it gives).
        out_channels: channels of the reconstruction; None = ``in_channels`` (anything else is an
            error: the autoencoder reconstructs its input).
    """
    if in_channels not in (1, 3):
        raise ValueError(f"autoencoder.vae.in_channels: expected 1 (grey) or 3 (colour), got {in_channels}")
    if out_channels is not None and int(out_channels) != int(in_channels):
        raise ValueError(
            f"autoencoder.vae.out_channels: {out_channels} differs from in_channels {in_channels}; "
            "the autoencoder reconstructs its input (both are data.channels)"
        )
    levels = int(round(math.log2(factor))) + 1 if factor >= 1 else 0
    if factor < 2 or 2 ** (levels - 1) != factor:
        raise ValueError(f"autoencoder.factor: expected a power of two >= 2 (4 or 8), got {factor}")
    if len(block_out_channels) != levels:
        raise ValueError(
            f"autoencoder.block_out_channels: factor {factor} needs {levels} levels (log2(factor) + 1), "
            f"got {list(block_out_channels)}"
        )
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(
            f"autoencoder.block_out_channels: {bad} not divisible by norm_num_groups={norm_num_groups}"
        )
    return AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        mid_block_add_attention=mid_block_attention,
    )


def autoencoder_channels(path: str | os.PathLike, vae: AutoencoderKL | None = None) -> int | None:
    """The image channels the project's autoencoder in ``path`` was fitted on (its ``autoencoder.json``;
    before they were recorded: its ``in_channels``); None for a foreign VAE (Stable Diffusion's ``vae/``)."""
    info_file = Path(path) / AUTOENCODER_FILE
    if not info_file.is_file():
        return None
    info = json.loads(info_file.read_text())
    if "channels" in info:
        return int(info["channels"])
    if vae is None:
        return int(AutoencoderKL.load_config(path)["in_channels"])
    return int(vae.config.in_channels)


def load_autoencoder(
    path: str | os.PathLike, resolution: int | None = None, channels: int | None = None
) -> AutoencoderKL:
    """Load an autoencoder folder (this stage's export, or a Stable Diffusion folder's ``vae/``).

    Args:
        path: the folder holding ``config.json`` and the weights.
        resolution: the image side it will be used at; checked against the side this project's
            autoencoder was trained at (its ``autoencoder.json``), since the latent scaling
            factor was measured there. SD's VAE has no such record and is not checked.
        channels: the data's image channels (``data.channels``); None = not checked. The
            project's autoencoder must have been fitted on images of these channels; a foreign
            VAE takes its own channels, or grey images (repeated to its channels).

    Raises:
        FileNotFoundError: no folder, or no ``config.json`` in it.
        ValueError: ``resolution`` differs from the trained side, or is not divisible by the
            factor; ``channels`` differ from the channels the autoencoder was fitted on (both
            values and the folder named).
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"autoencoder_dir: {root} holds no config.json (expected a diffmask-fit-autoencoder stage folder "
            "or a Stable Diffusion folder's vae/)"
        )
    vae = AutoencoderKL.from_pretrained(root)
    factor = downsampling_factor(vae)
    if channels is not None:
        fitted = autoencoder_channels(root, vae)
        if fitted is not None and fitted != int(channels):
            raise ValueError(
                f"autoencoder_dir: {root} was fitted on {fitted}-channel ({channel_word(fitted)}) "
                f"images, but data.channels={channels} ({channel_word(channels)}); grey and colour are "
                "never converted silently: fit an autoencoder on this data (diffmask-fit-autoencoder "
                "with the same data)"
            )
        check_autoencoder_channels(
            int(vae.config.in_channels), int(channels), where=f"autoencoder_dir {root}"
        )
    if resolution is not None:
        info_file = root / AUTOENCODER_FILE
        trained = json.loads(info_file.read_text()).get("resolution") if info_file.is_file() else None
        if trained is not None and int(trained) != int(resolution):
            raise ValueError(
                f"autoencoder_dir: {root} was trained at {trained} px, the diffusion model is at "
                f"{resolution} px "
                f"(data.size); train an autoencoder at data.size={resolution} or set data.size={trained}"
            )
        if resolution % factor:
            raise ValueError(
                f"data.size: {resolution} px is not divisible by the autoencoder's factor {factor}"
            )
    return vae


def downsampling_factor(vae: AutoencoderKL) -> int:
    """Image side / latent side of an ``AutoencoderKL`` (one downsampling between levels)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---- losses and image metrics --------------------------------------------------------------------
def image_gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences of two (B, C, H, W) images."""
    dx = (pred[..., :, 1:] - pred[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (pred[..., 1:, :] - pred[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of (B, C, H, W) images in [0, 1]."""
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def ssim(pred: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of (B, C, H, W) images in [0, 1] (Gaussian window, Wang et al. 2004 constants)."""
    x, y = pred.float(), target.float()
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).to(x.device)
    c = x.shape[1]
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)  # valid region only

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def save_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor]) -> Path:
    """Write rows of (N, C, H, W) images in [0, 1] as one 8-bit PNG (e.g. originals over reconstructions):
    grey for C = 1, RGB for C = 3."""
    from PIL import Image  # noqa: PLC0415

    lines = [torch.cat(list(r.detach().float().cpu().clamp(0, 1)), dim=-1) for r in rows]  # (C, H, N*W) each
    grid = torch.cat(lines, dim=-2)
    grid = grid[0] if grid.shape[0] == 1 else grid.permute(1, 2, 0)
    grid = (grid.numpy() * 255).round().astype(np.uint8)
    import io  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


# ---- the LightningModule -------------------------------------------------------------------------
class AutoencoderLitModule(pl.LightningModule):
    """Trains an ``AutoencoderKL`` to reconstruct the real images (batches of the segmentation datamodule).

    Images (B, C, S, S) in [0, 1] (C = ``data.channels``: 1 grey, 3 colour) are scaled to [-1, 1]
    (as the diffusion stage feeds them; grey repeated to a 3-channel VAE's channels); the
    loss is ``L1 + kl_weight * KL + gradient_weight * L1(image gradients)``, the KL being the
    posterior's mean per latent element.

    Args:
        vae: the autoencoder (:func:`build_autoencoder`).
        optimizer: partial optimizer (``_partial_: true``).
        lr_scheduler: optional partial LR scheduler, stepped every optimizer step.
        resolution: image side (recorded in the export; the latent scaling factor is measured there).
        kl_weight, gradient_weight: loss weights.
        crop: train on random ``crop`` x ``crop`` windows of each image (the autoencoder is fully
            convolutional, so it still codes whole images; a 64 px window costs a quarter of a
            128 px image); None = whole images.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        resolution: int = 128,
        kl_weight: float = 1.0e-4,
        gradient_weight: float = 1.0,
        crop: int | None = None,
    ):
        super().__init__()
        if kl_weight < 0 or gradient_weight < 0:
            raise ValueError(f"kl_weight, gradient_weight: expected >= 0, got {kl_weight}, {gradient_weight}")
        factor = downsampling_factor(vae)
        if resolution % factor:
            raise ValueError(
                f"resolution: {resolution} px is not divisible by the autoencoder's factor {factor}"
            )
        self.save_hyperparameters(ignore=["vae", "optimizer", "lr_scheduler"])
        self.vae = vae
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.resolution = resolution
        self.factor = factor
        self.kl_weight = kl_weight
        self.gradient_weight = gradient_weight
        if crop is not None and (crop % factor or not factor <= crop <= resolution):
            raise ValueError(
                f"crop: expected null or a multiple of the factor {factor} in [{factor}, {resolution}], "
                f"got {crop}"
            )
        self.crop = crop

    def random_crop(self, image: torch.Tensor) -> torch.Tensor:
        """A random ``crop`` x ``crop`` window of each image (all of it when ``crop`` is None)."""
        if self.crop is None or self.crop == image.shape[-1]:
            return image
        b, size = image.shape[0], image.shape[-1]
        offsets = torch.randint(0, size - self.crop + 1, (b, 2)).tolist()
        return torch.stack(
            [image[i, :, y : y + self.crop, x : x + self.crop] for i, (y, x) in enumerate(offsets)]
        )

    def configure_optimizers(self):
        """The optimizer over the VAE's parameters, with the LR scheduler stepped every step if one is set."""
        optimizer = self.optimizer_factory(self.vae.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _inputs(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] != self.resolution or image.shape[-2] != self.resolution:
            raise ValueError(
                f"image: expected {self.resolution}x{self.resolution} px (autoencoder resolution), got "
                f"{tuple(image.shape[-2:])}; set data.size={self.resolution}"
            )
        return to_autoencoder_channels(image * 2.0 - 1.0, int(self.vae.config.in_channels))

    def losses(self, image: torch.Tensor, sample: bool = True, crop: bool = False) -> dict[str, torch.Tensor]:
        """The reconstruction losses of a batch of images.

        Args:
            image: (B, C, S, S) in [0, 1], at the autoencoder's resolution.
            sample: decode a sample of the posterior (training); False decodes its mode.
            crop: code a random ``crop`` window of each image (:meth:`random_crop`).

        Returns:
            ``l1``, ``kl`` (per latent element), ``gradient`` (L1 of the image gradients) and the
            weighted total ``loss``.
        """
        x = self._inputs(image)
        if crop:
            x = self.random_crop(x)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        out = {
            "l1": (recon - x).abs().mean(),
            "kl": posterior.kl().mean() / z[0].numel(),
            "gradient": image_gradient_loss(recon, x),
        }
        out["loss"] = out["l1"] + self.kl_weight * out["kl"] + self.gradient_weight * out["gradient"]
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Losses on random crops of the batch's images, sampling the posterior; logs ``train/*``.

        Args:
            batch: a datamodule batch (its ``image``).
            batch_idx: the batch's index (unused).

        Returns:
            The total loss.
        """
        out = self.losses(batch["image"], crop=True)
        b = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        for key in ("l1", "kl", "gradient"):
            self.log(f"train/{key}", out[key], batch_size=b)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Logs the loss (posterior mode, whole images) and the reconstructions' PSNR and SSIM.

        Args:
            batch: a datamodule batch (its ``image``).
            batch_idx: the batch's index (unused).
        """
        image = batch["image"]
        out = self.losses(image, sample=False)
        recon = self.reconstruct(image)
        b = image.shape[0]
        self.log("val/loss", out["loss"], prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/psnr", psnr(recon, image).mean(), prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/ssim", ssim(recon, image).mean(), batch_size=b, sync_dist=True)

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> its reconstruction through the posterior mean, in [0, 1]."""
        return reconstruct(self.vae, image)

    # ---- export --------------------------------------------------------------------------
    @torch.no_grad()
    def latent_statistics(self, loader) -> dict[str, float]:
        """Mean and standard deviation of the posterior means over ``loader``'s images."""
        total, total_sq, count = 0.0, 0.0, 0
        for batch in loader:
            x = self._inputs(batch["image"].to(self.device))
            z = self.vae.encode(x).latent_dist.mean.double()
            total += float(z.sum())
            total_sq += float((z * z).sum())
            count += z.numel()
        if count == 0:
            raise ValueError("latent_statistics: the loader gave no images")
        mean = total / count
        std = math.sqrt(max(total_sq / count - mean * mean, 1e-12))
        return {"latent_mean": mean, "latent_std": std}

    def export(
        self, path: str | os.PathLike, stats: dict[str, float], extra: dict[str, Any] | None = None
    ) -> Path:
        """Save a plain ``AutoencoderKL`` folder with ``scaling_factor = 1 / latent_std``.

        Next to the diffusers weights and config it writes ``autoencoder.json``: the resolution,
        factor, latent and image channels, the scaling factor, ``stats``, the global step and
        ``extra``.

        Args:
            path: the folder to write (created by ``save_pretrained``).
            stats: :meth:`latent_statistics` (``latent_mean``, ``latent_std``).
            extra: further JSON-able entries for ``autoencoder.json``.

        Returns:
            ``path``.
        """
        path = Path(path)
        self.vae.register_to_config(scaling_factor=float(1.0 / stats["latent_std"]))
        self.vae.save_pretrained(path)
        info = {
            "format": 1,
            "resolution": self.resolution,
            "factor": self.factor,
            "latent_channels": int(self.vae.config.latent_channels),
            # the image channels it was fitted on: a diffusion model on other data is refused
            "channels": int(self.vae.config.in_channels),
            "scaling_factor": float(self.vae.config.scaling_factor),
            **stats,
            "global_step": int(self.global_step),
            **(extra or {}),
        }
        atomic_write_json(path / AUTOENCODER_FILE, json.loads(json.dumps(info, default=str)))
        return path


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, image: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] -> the autoencoder's reconstruction (posterior mean), C channels, in [0, 1]."""
    x = to_autoencoder_channels(image * 2.0 - 1.0, int(vae.config.in_channels)).to(vae.dtype)
    decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
    recon = from_autoencoder_channels(decoded, image.shape[1])
    return ((recon.clamp(-1, 1) + 1) / 2).to(image.dtype)
