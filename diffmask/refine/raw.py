"""Raw attention masks: argmax over class maps, background where the peak is weak (no refinement).

The first row of a refinement ablation (raw / threshold / +CRF / +affinity).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffmask.refine.chain import require_keys

__all__ = ["raw_attention_labels", "RawAttentionRefiner"]


def raw_attention_labels(class_maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """(..., K, H, W) class maps in [0, 1] -> (..., H, W) labels.

    A pixel's label is its argmax + 1, or 0 where the max is below the threshold.
    """
    peak, best = class_maps.max(dim=-3)
    return torch.where(peak >= threshold, best + 1, torch.zeros_like(best))


class RawAttentionRefiner:
    """Keyed wrapper of :func:`raw_attention_labels` for a sample dict (chainable).

    Reads ``sample[probs_key]`` (K, H, W) and writes ``sample[label_key]`` (H, W) uint8 and
    ``sample[confidence_key]`` (K,): the mean class-map value inside each class's mask minus the
    mean outside it (0 for an empty class), like the threshold step's confidence.

    Args:
        threshold: background where the largest class map is below this, in [0, 1).
        probs_key: key of the class maps read.
        label_key: key of the label map written.
        confidence_key: key of the per-class confidence written.
    """

    def __init__(self, threshold: float = 0.3, probs_key: str = "class_maps", label_key: str = "label",
                 confidence_key: str = "confidence"):
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold: expected in [0, 1), got {threshold}")
        self.threshold = float(threshold)
        self.probs_key = probs_key
        self.label_key = label_key
        self.confidence_key = confidence_key

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        require_keys(sample, (self.probs_key,), "RawAttentionRefiner")
        maps = torch.as_tensor(np.asarray(sample[self.probs_key], dtype=np.float32))
        label = raw_attention_labels(maps, self.threshold).numpy().astype(np.uint8)
        confidence = np.zeros(maps.shape[0], np.float32)
        for k in range(maps.shape[0]):
            inside = label == k + 1
            if inside.any() and (~inside).any():
                confidence[k] = float(maps[k].numpy()[inside].mean() - maps[k].numpy()[~inside].mean())
        out = dict(sample)
        out[self.label_key] = label
        out[self.confidence_key] = confidence
        return out
