"""Self-attention affinity refinement: class maps propagated through the generator's own self-attention.

The self-attention of the diffusion UNet (``attn1``, averaged over heads, chosen layers and
steps: :class:`~diffmask.attention.self_attention.SelfAttentionStore`) is a row-stochastic
pixel-to-pixel affinity ``A`` that costs nothing to train (Dataset Diffusion, NeurIPS 2023;
DiffSegmenter refine cross-attention maps with it raised to a power). Each walk step replaces a
pixel's class scores by the attention-weighted mean of the scores of the pixels it attends to:
with the class maps as rows of an (C, N) matrix ``M``, ``M <- M A^T``, ``power`` times (the
paper's ``A^power M`` for maps as columns). The walked maps are brought back to the image size,
each class max-normalised, and made into a label map by the usual threshold (or argmax with a
background score).

Unlike AffinityNet (:mod:`diffmask.refine.affinity`), the affinity is captured while the image
is sampled (or while a real image is noised and denoised once, in ``diffmask-evaluate-masks``),
so this step runs only there: offline re-refinement of saved class maps has no self-attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from diffmask.attention.processor import grid_from_tokens
from diffmask.attention.self_attention import SelfAttentionStore
from diffmask.labels import IGNORE_INDEX
from diffmask.refine.background import add_background
from diffmask.refine.threshold import _METHODS, mask_confidence, threshold_masks

__all__ = ["SelfAffinityRefiner", "affinity_walk", "self_attention_step", "SELF_ATTENTION_KEY"]

SELF_ATTENTION_KEY = "self_attention"
_LABELS = ("threshold", "argmax")


def affinity_walk(class_maps: torch.Tensor, affinity: torch.Tensor, power: int) -> torch.Tensor:
    """Propagate (C, H, W) class maps ``power`` steps through a row-normalised (N, N) affinity.

    Args:
        class_maps: (C, H, W) scores at the affinity's grid (N = H * W, row-major).
        affinity: (N, N) non-negative; row i = how much pixel i attends to each pixel. Rows are
            normalised to sum to 1 here.
        power: walk steps (int >= 0); 0 returns ``class_maps`` itself, unchanged.

    Returns:
        (C, H, W) float32 walked maps (``class_maps`` itself for ``power=0``).

    Raises:
        ValueError: a bad power, mismatched sizes, or an affinity row without a positive entry.
    """
    if isinstance(power, bool) or int(power) != power or power < 0:
        raise ValueError(f"power: expected an integer >= 0, got {power!r}")
    if class_maps.ndim != 3:
        raise ValueError(f"class_maps: expected (C, H, W), got shape {tuple(class_maps.shape)}")
    if int(power) == 0:
        return class_maps
    c, h, w = class_maps.shape
    n = h * w
    if affinity.shape != (n, n):
        raise ValueError(f"affinity: expected ({n}, {n}) for {h}x{w} class maps, got {tuple(affinity.shape)}")
    a = affinity.to(class_maps.device, torch.float32).clamp_min(0)
    degree = a.sum(dim=1, keepdim=True)
    if not torch.isfinite(degree).all() or (degree <= 0).any():
        raise ValueError("affinity: a row has no positive (finite) entry")
    trans_t = (a / degree).T.contiguous()  # (N, N): M @ T^T
    vec = class_maps.reshape(c, n).float()
    for _ in range(int(power)):
        vec = vec @ trans_t
    return vec.reshape(c, h, w)


class SelfAffinityRefiner:
    """Chain step: refine class maps with the generator's self-attention (see the module docstring).

    Reads ``sample[probs_key]`` (K, H, W) class maps in [0, 1] and ``sample[affinity_key]``
    (N, N) self-attention at an (h, w) grid with N = h * w and h / w = H / W; writes
    ``label_key`` (H, W) uint8, ``confidence_key`` (K,), ``output_key`` (the walked (K, H, W)
    maps, max-normalised; by default they replace the class maps for the steps after this one)
    and ``"self_affinity_seconds"`` (this step's time).

    Args:
        power: walk steps, int >= 0 (0: the class maps are used as they are).
        capture: builds the self-attention store, called as ``capture(batch_size=B)`` (a partial
            :class:`~diffmask.attention.self_attention.SelfAttentionStore`: its layers,
            resolutions, grid, steps); None: a store with its defaults (every self-attention layer,
            every step, the finest grid).
        labels: ``"threshold"`` (per-class threshold of the walked maps, as
            :class:`~diffmask.refine.threshold.ThresholdRefiner`) or ``"argmax"`` (argmax over a
            background score and the walked maps).
        method: threshold method (``otsu``, ``mean_std``, ``peak_band``).
        k: ``mean_std``'s multiplier.
        ignore_band: half-width of the threshold's uncertain band (``ignore_index`` pixels).
        background: ``argmax``: constant background score in (0, 1) or ``"complement"``.
        background_power: exponent of the complement rule.
        ignore_index: label of uncertain pixels.
        probs_key: key of the class maps read.
        affinity_key: key of the self-attention read.
        label_key: key of the label map written.
        confidence_key: key of the per-class confidence written.
        output_key: key of the walked class maps written (None: not written).

    Examples::

        step = SelfAffinityRefiner(power=4, capture=functools.partial(SelfAttentionStore, grid=32))
        sample = step({"class_maps": maps, "self_attention": affinity})
    """

    def __init__(
        self,
        power: int = 4,
        capture: Callable[..., SelfAttentionStore] | None = None,
        labels: str = "threshold",
        method: str = "otsu",
        k: float = 1.0,
        ignore_band: float = 0.0,
        background: float | str = "complement",
        background_power: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        probs_key: str = "class_maps",
        affinity_key: str = SELF_ATTENTION_KEY,
        label_key: str = "label",
        confidence_key: str = "confidence",
        output_key: str | None = "class_maps",
    ):
        if isinstance(power, bool) or int(power) != power or power < 0:
            raise ValueError(f"power: expected an integer >= 0, got {power!r}")
        if labels not in _LABELS:
            raise ValueError(f"labels: expected one of {_LABELS}, got {labels!r}")
        if method not in _METHODS:
            raise ValueError(f"method: expected one of {_METHODS}, got {method!r}")
        if ignore_band < 0:
            raise ValueError(f"ignore_band: expected >= 0, got {ignore_band}")
        add_background(np.zeros((1, 1, 1), np.float32), background, background_power)  # validates both
        self.power = int(power)
        self.capture = capture
        self.labels = labels
        self.method = method
        self.k = float(k)
        self.ignore_band = float(ignore_band)
        self.background = background
        self.background_power = float(background_power)
        self.ignore_index = int(ignore_index)
        self.probs_key = probs_key
        self.affinity_key = affinity_key
        self.label_key = label_key
        self.confidence_key = confidence_key
        self.output_key = output_key

    def new_self_attention_store(self, batch_size: int) -> SelfAttentionStore:
        """A fresh self-attention store for one batch of ``batch_size`` prompts or images.

        Args:
            batch_size: the batch's size B.
        """
        factory = self.capture if self.capture is not None else SelfAttentionStore
        return factory(batch_size=int(batch_size))

    def walk(self, class_maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """The walked, max-normalised (K, H, W) class maps of one image.

        Args:
            class_maps: (K, H, W) in [0, 1].
            affinity: (N, N) at a grid with the maps' aspect ratio.
        """
        if self.power == 0:
            return class_maps.float()
        k, h, w = class_maps.shape
        gh, gw = grid_from_tokens(int(affinity.shape[0]), (h, w))
        maps = class_maps.float()
        small = maps if (gh, gw) == (h, w) else F.interpolate(
            maps[None], size=(gh, gw), mode="area" if gh * gw < h * w else "bilinear",
            **({} if gh * gw < h * w else {"align_corners": False}))[0]
        walked = affinity_walk(small, affinity, self.power)
        if (gh, gw) != (h, w):
            walked = F.interpolate(walked[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        walked = walked.clamp_min(0)
        peak = walked.flatten(1).amax(dim=1)
        # a class the prompt leaves out (all-zero map) stays all zero: no pixel
        return torch.where(peak[:, None, None] > 0, walked / peak.clamp_min(1e-12)[:, None, None], 0.0)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.probs_key not in sample:
            raise KeyError(f"SelfAffinityRefiner: sample has no {self.probs_key!r} (keys: {sorted(sample)})")
        if self.affinity_key not in sample:
            raise KeyError(
                f"SelfAffinityRefiner: sample has no {self.affinity_key!r} (keys: {sorted(sample)}): the "
                "self_affinity step needs the generator's self-attention captured while the image is made "
                "(diffmask-generate, diffmask-evaluate-masks); saved class maps alone cannot be "
                "re-refined by it"
            )
        start = time.perf_counter()
        maps = torch.as_tensor(np.asarray(sample[self.probs_key], dtype=np.float32))
        affinity = torch.as_tensor(np.asarray(sample[self.affinity_key], dtype=np.float32))
        walked = self.walk(maps, affinity).clamp(0, 1).numpy()
        if self.labels == "threshold":
            label, confidence = threshold_masks(
                walked, self.method, self.k, self.ignore_band, ignore_index=self.ignore_index
            )
        else:
            scores = add_background(walked, self.background, self.background_power)
            label = scores.argmax(axis=0).astype(np.uint8)
            confidence = mask_confidence(walked, label, self.ignore_index)
        out = dict(sample)
        out[self.label_key] = label
        out[self.confidence_key] = confidence
        if self.output_key is not None:
            out[self.output_key] = walked
        out["self_affinity_seconds"] = time.perf_counter() - start
        return out


def self_attention_step(refiner: Any) -> Any | None:
    """The step of ``refiner`` that needs self-attention (has ``new_self_attention_store``), or None.

    Looks at the refiner itself and, for a :class:`~diffmask.refine.chain.RefinementChain`, at
    the steps it runs (the first such step's capture settings are used for all).

    Args:
        refiner: a sample refiner or a chain.
    """
    if hasattr(refiner, "new_self_attention_store"):
        return refiner
    for item in getattr(refiner, "steps", None) or []:
        step = item[1] if isinstance(item, tuple) else item
        if hasattr(step, "new_self_attention_store"):
            return step
    return None
