"""Attention alignment: pull each class phrase's cross-attention towards that class's mask.

Trained from scratch, the class words (present in every caption) do not localise (measured
attention-mask IoU ~0.1); this loss, on a few labelled images, makes them localise.

The loss, per captured cross-attention layer whose grid side is in ``resolutions``:

* ``a_k(x)`` = head-averaged attention of pixel ``x`` on the tokens of class phrase ``k``
  (summed over the phrase's tokens, so it is that phrase's share of the softmax mass);
* the background bin is everything else, ``a_0 = 1 - sum_k a_k`` (BOS/EOS/padding/other words),
  so ``[a_0, a_1, ..., a_K]`` is a per-pixel distribution over background + classes;
* the target ``m_c(x)`` is the one-hot label map area-averaged to the layer's grid;
* loss = mean over pixels of the cross-entropy ``-sum_c m_c log a_c`` (= KL up to the target's
  entropy), averaged over the layers and the labelled items.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AttentionAlignment", "attention_alignment_loss", "class_token_index", "downsample_label"]


def class_token_index(positions: Sequence[Sequence[Sequence[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ragged class-token positions for :class:`~diffmask.attention.AttentionRecorder`.

    Args:
        positions: per item, per class, the token positions of that class phrase.

    Returns:
        ``index`` (B, K*M) long (the recorder's ``token_index``; pads repeat the first
        position) and ``weight`` (B, K, M) float with 1 on real positions, 0 on pads.
    """
    b = len(positions)
    k = len(positions[0])
    m = max(len(p) for item in positions for p in item)
    index = torch.zeros(b, k, m, dtype=torch.long)
    weight = torch.zeros(b, k, m)
    for i, item in enumerate(positions):
        if len(item) != k:
            raise ValueError(f"positions: item {i} has {len(item)} classes, expected {k}")
        for j, pos in enumerate(item):
            index[i, j, :] = pos[0]
            index[i, j, : len(pos)] = torch.as_tensor(pos)
            weight[i, j, : len(pos)] = 1.0
    return index.view(b, k * m), weight


def downsample_label(label: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """One-hot label maps (B, 1, H, W) int → area-averaged class fractions (B, C, h, w) in [0, 1]."""
    onehot = F.one_hot(label[:, 0].clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


def attention_alignment_loss(
    maps: dict[str, torch.Tensor],
    weight: torch.Tensor,
    label: torch.Tensor,
    resolutions: Sequence[int] | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy between attention-derived class distributions and downsampled masks.

    Args:
        maps: layer → (B, K*M, h, w) head-averaged attention probabilities of the packed class
            token positions (an ``AttentionRecorder``'s ``maps``).
        weight: (B, K, M) from :func:`class_token_index`.
        label: (B, 1, H, W) int64 label maps with values 0..K (0 = background).
        resolutions: grid sides (h) of the layers to use; None = every layer.
        eps: floor inside the log.

    Returns:
        (loss scalar, number of layers used). The loss is 0 (with grad-free zero) if no layer matches.
    """
    b, k, m = weight.shape
    losses = []
    for fmap in maps.values():
        h, w = fmap.shape[-2:]
        if resolutions is not None and h not in resolutions:
            continue
        per_class = (fmap.view(b, k, m, h, w) * weight.to(fmap)[..., None, None]).sum(2)  # (B, K, h, w)
        background = (1.0 - per_class.sum(1, keepdim=True)).clamp_min(0.0)
        probs = torch.cat([background, per_class], dim=1).float()
        target = downsample_label(label, k + 1, (h, w)).to(probs.device)
        losses.append(-(target * torch.log(probs + eps)).sum(1).mean())
    if not losses:
        return label.new_zeros((), dtype=torch.float32), 0
    return torch.stack(losses).mean(), len(losses)


class AttentionAlignment:
    """Settings of the alignment loss (a part of :class:`~diffmask.diffusion.DiffusionLitModule`).

    Args:
        label_fraction: share of the real training split whose masks are used (0 = off, the
            paper's pure method; 0.1 of JSRT's 173 = 17 images). The subset is
            ``select_fraction(real.ids("train"), label_fraction, seed)`` — the same draw the
            segmentation stage makes for ``real_fraction``, so equal fractions mean equal images.
        weight: factor of the alignment loss added to the denoising loss.
        resolutions: attention grid sides used (e.g. [8, 16]); None = every cross-attention layer.
        seed: seed of the draw; None = the datamodule's seed (the segmentation stage's default).
    """

    def __init__(
        self,
        label_fraction: float = 0.0,
        weight: float = 0.1,
        resolutions: Sequence[int] | None = None,
        seed: int | None = None,
    ):
        if not 0.0 <= label_fraction <= 1.0:
            raise ValueError(f"align.label_fraction: expected a fraction in [0, 1], got {label_fraction}")
        if weight < 0:
            raise ValueError(f"align.weight: expected >= 0, got {weight}")
        if resolutions is not None:
            resolutions = [int(r) for r in resolutions]
            if not resolutions or min(resolutions) < 1:
                raise ValueError(f"align.resolutions: expected positive grid sides or null, got {resolutions}")
        self.label_fraction = float(label_fraction)
        self.weight = float(weight)
        self.resolutions = resolutions
        self.seed = seed

    @property
    def enabled(self) -> bool:
        return self.label_fraction > 0 and self.weight > 0
