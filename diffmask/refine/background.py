"""A background score for K foreground class maps, as CRF unaries and random walks need."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["add_background"]


def add_background(
    class_maps: np.ndarray | torch.Tensor, background: float | str = "complement", power: float = 1.0
) -> np.ndarray | torch.Tensor:
    """Stack a background map in front of K class maps.

    Args:
        class_maps: (K, H, W) class maps in [0, 1] (numpy or torch; the result has the same type).
        background: a constant score in (0, 1) (DiffuMask uses 0.45), or ``"complement"``:
            ``(1 - max_k p_k) ** power`` (the ``(1 - max)^alpha`` rule of AffinityNet).
        power: exponent of the complement rule.

    Returns:
        (K+1, H, W) scores, background first (not normalised).
    """
    is_torch = isinstance(class_maps, torch.Tensor)
    maps = class_maps if is_torch else torch.as_tensor(np.asarray(class_maps, dtype=np.float32))
    if maps.ndim != 3:
        raise ValueError(f"class_maps: expected (K, H, W), got shape {tuple(maps.shape)}")
    if isinstance(background, str):
        if background != "complement":
            raise ValueError(f"background: expected a number in (0, 1) or 'complement', got {background!r}")
        if power <= 0:
            raise ValueError(f"power: expected > 0, got {power}")
        bg = (1 - maps.amax(dim=0, keepdim=True)).clamp_min(0) ** power
    else:
        if not 0 < float(background) < 1:
            raise ValueError(f"background: expected a number in (0, 1) or 'complement', got {background}")
        bg = torch.full_like(maps[:1], float(background))
    out = torch.cat([bg, maps], dim=0)
    return out if is_torch else out.numpy()
