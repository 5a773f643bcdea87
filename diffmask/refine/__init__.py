"""Mask refinement: adaptive threshold, DenseCRF, AffinityNet and self-attention random walks, chained in
config order."""

from diffmask.refine.background import add_background
from diffmask.refine.chain import RefinementChain
from diffmask.refine.densecrf import DenseCRFRefiner, ParallelRefiner, densecrf_refine
from diffmask.refine.mask_maker import AttentionMaskMaker
from diffmask.refine.random_walk import local_random_walk, local_transition, random_walk, transition_matrix
from diffmask.refine.self_affinity import SelfAffinityRefiner, affinity_walk
from diffmask.refine.threshold import (
    IGNORE_INDEX,
    ThresholdRefiner,
    class_levels,
    mask_confidence,
    threshold_masks,
)

# the AffinityNet module pulls in pytorch_lightning (seconds to import): load it on first use so
# CRF worker processes, which import this package, start fast
_LAZY = {"AffinityBackbone", "AffinityRefiner", "affinity_loss", "ignore_boundaries", "local_offsets"}


def __getattr__(name: str):
    if name in _LAZY:
        from diffmask.refine import affinity

        return getattr(affinity, name)
    raise AttributeError(f"module 'diffmask.refine' has no attribute {name!r}")


__all__ = [
    "IGNORE_INDEX",
    "AttentionMaskMaker",
    "AffinityBackbone",
    "AffinityRefiner",
    "DenseCRFRefiner",
    "ParallelRefiner",
    "RefinementChain",
    "SelfAffinityRefiner",
    "ThresholdRefiner",
    "add_background",
    "affinity_loss",
    "affinity_walk",
    "class_levels",
    "densecrf_refine",
    "ignore_boundaries",
    "local_offsets",
    "local_random_walk",
    "local_transition",
    "mask_confidence",
    "random_walk",
    "threshold_masks",
    "transition_matrix",
]
