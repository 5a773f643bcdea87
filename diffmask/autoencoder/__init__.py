"""Latent autoencoder stage (issue 16): ``diffmask-fit-autoencoder``, then ``diffusion=latent``."""

from diffmask.autoencoder.module import (
    AUTOENCODER_FILE,
    AutoencoderLitModule,
    build_autoencoder,
    downsampling_factor,
    image_gradient_loss,
    load_autoencoder,
    psnr,
    reconstruct,
    save_grid,
    ssim,
)

__all__ = [
    "AUTOENCODER_FILE",
    "AutoencoderLitModule",
    "build_autoencoder",
    "downsampling_factor",
    "image_gradient_loss",
    "load_autoencoder",
    "psnr",
    "reconstruct",
    "save_grid",
    "ssim",
]
