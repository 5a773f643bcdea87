"""Latent autoencoder stage (issue 16): ``diffmask-fit-autoencoder``, then ``diffusion=latent``."""

from diffmask.autoencoder.channels import (
    check_autoencoder_channels,
    from_autoencoder_channels,
    to_autoencoder_channels,
)
from diffmask.autoencoder.module import (
    AUTOENCODER_FILE,
    AutoencoderLitModule,
    autoencoder_channels,
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
    "autoencoder_channels",
    "build_autoencoder",
    "check_autoencoder_channels",
    "downsampling_factor",
    "from_autoencoder_channels",
    "image_gradient_loss",
    "load_autoencoder",
    "psnr",
    "reconstruct",
    "save_grid",
    "ssim",
    "to_autoencoder_channels",
]
