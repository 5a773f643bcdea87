"""Image arrays as the refiners and the dataset writers take them: uint8, channel-last.

Models work on float tensors (B, C, S, S) in [0, 1] with C = ``data.channels`` (1 grey, 3 RGB);
PNG files, DenseCRF and the writers take uint8 arrays (S, S) for grey and (S, S, 3) for colour.
Nothing here changes the number of channels.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8_images", "channels_first"]


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """(B, C, S, S) floats in [0, 1] -> uint8 (B, S, S) for C = 1, (B, S, S, C) otherwise.

    Values are rounded and clipped.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, C, S, S), got shape {tuple(images.shape)}")
    x = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return x[:, 0] if x.shape[1] == 1 else np.ascontiguousarray(np.moveaxis(x, 1, -1))


def channels_first(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One image as a float (C, H, W) tensor in [0, 1]: from (H, W), (H, W, 1|3) (numpy's channel-last,
    as the writers and :func:`to_uint8_images` make them) or (1|3, H, W); uint8 is divided by 255."""
    x = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if x.ndim == 2:
        x = x[None]
    elif x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
        x = x.permute(2, 0, 1)
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"image: expected (H, W), (H, W, 1|3) or (1|3, H, W), got shape {tuple(x.shape)}")
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()
