"""AffinityNet (Ahn & Kwak, CVPR 2018): learn pixel affinities from seed masks, refine by random walk.

A small CNN maps the image to a feature grid at stride ``2**(len(channels)-1)``. The affinity of
two grid cells within ``radius`` is ``exp(-mean |f_i - f_j|)``. Training needs no real labels:
seeds are the synthetic images' own thresholded / CRF masks, with ``ignore_index`` at uncertain
pixels; cell pairs with the same seed label are pulled together (background and foreground
pairs separately), pairs with different labels pushed apart:

    loss = L_bg+ / 4 + L_fg+ / 4 + L_cross / 2

Refinement builds the sparse (N, N) affinity of one image (both directions plus self-loops),
and propagates its class maps with :func:`diffmask.refine.random_walk.random_walk`
(``T = D^-1 A^beta``, ``t`` steps).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from diffmask.labels import IGNORE_INDEX, ignore_boundaries
from diffmask.refine.background import add_background
from diffmask.refine.images import channels_first
from diffmask.refine.random_walk import local_random_walk, local_transition

log = logging.getLogger(__name__)
__all__ = ["AffinityBackbone", "AffinityRefiner", "local_offsets", "affinity_loss", "ignore_boundaries"]


class AffinityBackbone(nn.Module):
    """A small CNN: (B, C, H, W) image -> (B, feature_dim, H/stride, W/stride) features.

    Args:
        in_channels: image channels (``data.channels``: 1 grey, 3 colour).
        channels: widths of the stages; every stage after the first halves the resolution,
            so the stride is ``2 ** (len(channels) - 1)``.
        feature_dim: channels of the output features.

    Examples::

        net = AffinityBackbone(in_channels=1, channels=(16, 32, 64), feature_dim=32)  # stride 4
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), feature_dim: int = 32):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels: expected >= 1, got {in_channels}")
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels: expected a non-empty list of positive widths, got {list(channels)}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim: expected >= 1, got {feature_dim}")
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(channels):
            layers += [
                nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(min(8, width), width),
                nn.ReLU(inplace=True),
            ]
            prev = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(prev, feature_dim, 1)
        self.stride = 2 ** (len(channels) - 1)
        self.in_channels = int(in_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [0, 1] -> (B, feature_dim, H/stride, W/stride) features.

        Args:
            image: the images; C must be ``in_channels`` (a ValueError otherwise).
        """
        if image.shape[-3] != self.in_channels:
            raise ValueError(
                f"image: {image.shape[-3]} channel(s), AffinityNet reads {self.in_channels} (in_channels: "
                "data.channels); grey and colour are never converted silently"
            )
        return self.head(self.body(image))


def local_offsets(radius: int) -> list[tuple[int, int]]:
    """Offsets (dy, dx) with 0 < dy^2 + dx^2 < radius^2 in one half-plane (each pair once)."""
    if radius < 2:
        raise ValueError(f"radius: expected >= 2, got {radius}")
    out = []
    for dy in range(0, radius):
        for dx in range(-radius + 1, radius):
            if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius:
                out.append((dy, dx))
    return out


def _shift_pairs(grid: torch.Tensor, offsets: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For a (B, C, h, w) grid: (B, P, C, h, w) values at i and at i + offset, and the (P, h, w) validity."""
    _, _, h, w = grid.shape
    r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    padded = F.pad(grid, (r, r, 0, r))
    valid = F.pad(torch.ones(1, 1, h, w, device=grid.device), (r, r, 0, r))
    shifted, ok = [], []
    for dy, dx in offsets:
        shifted.append(padded[:, :, dy : dy + h, r + dx : r + dx + w])
        ok.append(valid[0, 0, dy : dy + h, r + dx : r + dx + w])
    return torch.stack(shifted, dim=1), torch.stack(ok).bool()


def pair_affinities(
    features: torch.Tensor, offsets: list[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, h, w) affinities exp(-mean |f_i - f_{i+o}|) and the (P, h, w) mask of in-bounds pairs."""
    other, valid = _shift_pairs(features, offsets)
    aff = torch.exp(-(features[:, None] - other).abs().mean(dim=2))
    return aff, valid


def seed_grid(seed: torch.Tensor, size: tuple[int, int], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, H, W) seed labels -> (B, h, w) labels of the feature grid; mixed or uncertain cells -> ignore."""
    b = seed.shape[0]
    seed = seed.long()
    classes = int(seed[seed != ignore_index].max().item()) + 1 if (seed != ignore_index).any() else 1
    onehot = torch.zeros(b, classes + 1, *seed.shape[1:], device=seed.device)
    idx = torch.where(seed == ignore_index, torch.full_like(seed, classes), seed)
    onehot.scatter_(1, idx[:, None], 1.0)
    frac = F.adaptive_avg_pool2d(onehot, size)
    top, label = frac[:, :classes].max(dim=1)
    label[top < 0.99] = ignore_index  # a cell counts only if its whole patch agrees
    return label


def affinity_loss(
    aff: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    offsets: list[tuple[int, int]],
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Ahn & Kwak's loss: bg pairs / 4 + fg pairs / 4 + cross-label pairs / 2.

    Args:
        aff: (B, P, h, w) affinities in (0, 1].
        valid: (P, h, w) in-bounds pair mask.
        labels: (B, h, w) grid labels with ``ignore_index``.
        offsets: the P half-plane pair offsets (dy, dx) of ``aff``.
        ignore_index: label of uncertain cells (their pairs are left out).

    Returns:
        dict with ``loss`` and its parts ``bg``, ``fg``, ``cross`` (0 when a part has no pair).
    """
    lab = labels[:, None].float()
    other, _ = _shift_pairs(lab.masked_fill(lab == ignore_index, -1), offsets)
    other = other[:, :, 0]  # (B, P, h, w)
    mine = lab.expand_as(other)
    known = (mine >= 0) & (mine != ignore_index) & (other >= 0) & valid[None]
    same = known & (mine == other)
    bg = same & (mine == 0)
    fg = same & (mine > 0)
    cross = known & (mine != other)
    eps = 1e-5

    def mean_over(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return values[mask].mean() if mask.any() else values.sum() * 0.0

    parts = {
        "bg": mean_over(bg, -torch.log(aff + eps)),
        "fg": mean_over(fg, -torch.log(aff + eps)),
        "cross": mean_over(cross, -torch.log(1 - aff + eps)),
    }
    parts["loss"] = parts["bg"] / 4 + parts["fg"] / 4 + parts["cross"] / 2
    return parts


class AffinityRefiner(pl.LightningModule):
    """Learns pixel affinities from seed masks and refines class maps by random walk.

    Training batches are dicts with ``image_key`` (B, C, H, W) floats in [0, 1] and
    ``seed_key`` (B, H, W) seed labels (0 background, 1..K, ``ignore_index`` uncertain).

    Args:
        backbone: the feature network (its ``stride`` attribute gives the grid stride).
        optimizer: partial optimiser, called with the parameters (default: Adam, lr 1e-3).
        radius: pair radius on the feature grid (5 in the paper).
        beta: affinity power in the random walk (8 in the paper, 16 in DiffuMask).
        t: random-walk steps (256 in the paper).
        background: constant background score in (0, 1) or ``"complement"`` ((1 - max)^power).
        background_power: exponent of the complement rule.
        walk_background: True: the background score is propagated with the classes (Ahn &
            Kwak); False: only the classes walk, each is max-normalised, and the background rule
            is applied afterwards (IRNet), which keeps classes the walk dilutes.
        ignore_index: label of uncertain seed pixels.
        image_key, seed_key, probs_key, label_key: sample/batch keys.

    Examples::

        model = AffinityRefiner(AffinityBackbone(channels=(16, 32, 64)), radius=5, beta=8, t=256)
        trainer.fit(model, seed_loader)
        label, scores = model.refine(image, class_maps)
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        radius: int = 5,
        beta: float = 8.0,
        t: int = 256,
        background: float | str = "complement",
        background_power: float = 1.0,
        walk_background: bool = True,
        ignore_index: int = IGNORE_INDEX,
        image_key: str = "image",
        seed_key: str = "label",
        probs_key: str = "class_maps",
        label_key: str = "label",
    ):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta: expected > 0, got {beta}")
        if int(t) != t or t < 1:
            raise ValueError(f"t: expected a positive integer, got {t}")
        add_background(np.zeros((1, 1, 1), np.float32), background, background_power)  # validates both
        self.save_hyperparameters(ignore=["backbone", "optimizer"])
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.offsets = local_offsets(int(radius))
        self.radius = int(radius)
        self.beta = float(beta)
        self.t = int(t)
        self.background = background
        self.background_power = float(background_power)
        self.walk_background = bool(walk_background)
        self.ignore_index = int(ignore_index)
        self.image_key = image_key
        self.seed_key = seed_key
        self.probs_key = probs_key
        self.label_key = label_key

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [0, 1] -> (B, D, h, w) features."""
        return self.backbone(image)

    # --------------------------------------------------------------- training
    def compute_loss(self, image: torch.Tensor, seed: torch.Tensor) -> dict[str, torch.Tensor]:
        """The affinity loss and its parts (:func:`affinity_loss`) of a batch.

        Args:
            image: (B, C, H, W) images in [0, 1].
            seed: (B, H, W) seed labels (0 background, 1..K, ``ignore_index`` uncertain).
        """
        feats = self(image)
        aff, valid = pair_affinities(feats, self.offsets)
        labels = seed_grid(seed, tuple(feats.shape[-2:]), self.ignore_index)
        return affinity_loss(aff, valid, labels, self.offsets, self.ignore_index)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """The loss of one seed batch; its parts are logged as ``train/affinity_<part>``.

        Args:
            batch: ``image_key`` images and ``seed_key`` seed labels.
            batch_idx: the batch's index (unused).
        """
        parts = self.compute_loss(batch[self.image_key], batch[self.seed_key])
        self.log_dict(
            {f"train/affinity_{k}": v for k, v in parts.items()},
            prog_bar=False,
            batch_size=len(batch[self.image_key]),
        )
        return parts["loss"]

    def configure_optimizers(self):
        """The configured optimiser over the backbone's parameters (default: Adam, lr 1e-3)."""
        if self.optimizer_factory is None:
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return self.optimizer_factory(params=self.parameters())

    def fit_seeds(self, batches: Iterable[dict[str, Any]], max_steps: int) -> list[float]:
        """Train on seed batches with a plain loop (no Trainer), e.g. inside another stage's step.

        Works inside a Lightning ``test``/``predict`` loop (it leaves inference mode locally), so
        a mask stage can fit AffinityNet on its own images' seeds. ``batches`` is re-iterated
        until ``max_steps`` optimiser steps are done.

        Args:
            batches: a re-iterable of dicts with ``image_key`` (B, C, H, W) in [0, 1] and
                ``seed_key`` (B, H, W) seed labels (e.g. a DataLoader or a list of dicts).
            max_steps: optimiser steps.

        Returns:
            the loss of each step.
        """
        if max_steps < 1:
            raise ValueError(f"max_steps: expected >= 1, got {max_steps}")
        opt = self.configure_optimizers()
        if isinstance(opt, dict):
            opt = opt["optimizer"]
        losses: list[float] = []
        was_training = self.training
        self.train()
        with torch.inference_mode(False), torch.enable_grad():
            while len(losses) < max_steps:
                seen = 0
                for batch in batches:
                    # clone: tensors made under inference mode cannot enter autograd
                    image = batch[self.image_key].to(self.device, torch.float32).clone()
                    seed = batch[self.seed_key].to(self.device).clone()
                    loss = self.compute_loss(image, seed)["loss"]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
                    seen += 1
                    if len(losses) >= max_steps:
                        break
                if seen == 0:
                    raise ValueError("batches: no training batch")
        self.train(was_training)
        return losses

    # --------------------------------------------------------------- refinement
    @torch.no_grad()
    def affinity_matrix(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Sparse (N, N) affinity of one (C, H, W) image on its feature grid (N = h*w), with self-loops.

        For :func:`diffmask.refine.random_walk.random_walk`; :meth:`refine` uses the equivalent,
        faster local form.
        """
        feats = self(image[None].to(self.device, torch.float32))
        _, _, h, w = feats.shape
        aff, valid = pair_affinities(feats, self.offsets)
        idx = torch.arange(h * w, device=feats.device).reshape(h, w)
        rows, cols, vals = [idx.flatten()], [idx.flatten()], [torch.ones(h * w, device=feats.device)]
        for p, (dy, dx) in enumerate(self.offsets):
            ok = valid[p]
            i = idx[ok]
            ys, xs = torch.nonzero(ok, as_tuple=True)
            j = idx[ys + dy, xs + dx]
            a = aff[0, p][ok]
            rows += [i, j]
            cols += [j, i]
            vals += [a, a]
        matrix = torch.sparse_coo_tensor(
            torch.stack([torch.cat(rows), torch.cat(cols)]),
            torch.cat(vals),
            (h * w, h * w),
            check_invariants=False,  # indices are in range by construction
        )
        return matrix.coalesce(), (h, w)

    @torch.no_grad()
    def transition_weights(self, image: torch.Tensor) -> torch.Tensor:
        """Local random-walk weights (S, h, w) of one (C, H, W) image (see :func:`local_transition`)."""
        feats = self(image[None].to(self.device, torch.float32))
        aff, valid = pair_affinities(feats, self.offsets)
        return local_transition(aff[0] * valid, self.offsets, self.radius, self.beta)

    @torch.no_grad()
    def refine(self, image: torch.Tensor, class_maps: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Random-walk refinement of one image's class maps.

        Args:
            image: (C, H, W) float in [0, 1].
            class_maps: (K, H, W) class maps in [0, 1] (no background).

        Returns:
            (label, scores): label (H, W) uint8 (0 background, k+1 for class k) and scores
            (K+1, H, W) float32 after propagation, background first.
        """
        if image.ndim != 3 or class_maps.ndim != 3 or image.shape[-2:] != class_maps.shape[-2:]:
            raise ValueError(
                f"image (C, H, W) and class_maps (K, H, W) must share H, W; got {tuple(image.shape)} "
                f"and {tuple(class_maps.shape)}"
            )
        weights = self.transition_weights(image)
        h, w = weights.shape[-2:]
        if min(h, w) <= 2 * self.radius + 1 and not getattr(self, "_warned_small_grid", False):
            # every cell reaches every other in one step: t steps flatten the maps, so the largest
            # region (usually background) takes the whole image
            log.warning(
                "affinity: the feature grid is %dx%d for radius %d; the random walk mixes the whole image. "
                "Use larger images (>= 128 px) or a smaller radius.", h, w, self.radius,
            )
            self._warned_small_grid = True
        maps = class_maps.to(self.device, torch.float32)
        size = tuple(image.shape[-2:])
        if self.walk_background:  # Ahn & Kwak: the background score walks with the classes
            small = F.adaptive_avg_pool2d(
                add_background(maps, self.background, self.background_power)[None], (h, w)
            )
            walked = local_random_walk(small[0], weights, t=self.t)
            full = F.interpolate(walked[None], size=size, mode="bilinear", align_corners=False)[0]
        else:
            # IRNet: walk the classes only, max-normalise each (a class whose region the walk
            # dilutes, e.g. a low-contrast heart, keeps its peak), then apply the background rule
            small = F.adaptive_avg_pool2d(maps[None], (h, w))[0]
            walked = local_random_walk(small, weights, t=self.t)
            walked = walked / walked.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
            up = F.interpolate(walked[None], size=size, mode="bilinear", align_corners=False)[0]
            full = add_background(up.clamp(0, 1), self.background, self.background_power)
        return full.argmax(dim=0).to(torch.uint8).cpu().numpy(), full.cpu()

    def refine_sample(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Keyed form of :meth:`refine` (chainable): writes ``label_key`` and ``"affinity_scores"``."""
        # (H, W) grey or (H, W, 3) RGB uint8 as the writers make them, or (C, H, W)
        image = channels_first(sample[self.image_key])
        maps = sample[self.probs_key]
        maps = maps if isinstance(maps, torch.Tensor) else torch.as_tensor(np.asarray(maps, np.float32))
        label, scores = self.refine(image.float(), maps)
        out = dict(sample)
        out[self.label_key] = label
        out["affinity_scores"] = scores
        return out

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[np.ndarray]:
        """Refined label maps of a batch with ``image_key`` (B, C, H, W) and ``probs_key`` (B, K, H, W)."""
        return [
            self.refine(img, maps)[0]
            for img, maps in zip(batch[self.image_key], batch[self.probs_key], strict=True)
        ]
