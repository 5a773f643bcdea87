"""Controlled generation (EMIT-Diff): ``augment_ratio`` variants per condition, each keeping its mask.

Condition sources (``synthesis.source``):

* ``real`` — the labelled real images' own masks (and edges), EMIT-Diff as published;
* ``deformed`` — those masks and images under a random elastic + affine warp (one per variant,
  :class:`~diffmask.control.conditions.Deformation`), so shapes beyond the labelled ones appear;
* ``folder`` — the masks (and images, for edges) of a synthesis folder (``synthesis.condition_dir``),
  e.g. a DiffMask attention-mask set re-rendered into images that agree with its masks.

Each request's id is ``<condition id>_v<k>``, its ``pair_id`` the condition's id; its prompt is
built from the condition's metadata (or is the folder row's prompt) and its seeds follow from
``(seed, condition id, k)`` alone, so a set is the same whatever the batch size, sharding or restarts.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from diffmask.control.conditions import ConditionBuilder, Deformation
from diffmask.data.dataset import normalize_intensity, resize_sample
from diffmask.data.sources import SampleSource
from diffmask.prompts.builder import PromptBuilder

__all__ = ["ControlRequest", "ConditionDataset", "controlled_requests", "SOURCES"]

log = logging.getLogger(__name__)
SOURCES = ("real", "deformed", "folder")


@dataclass(frozen=True)
class ControlRequest:
    """One image to generate from a condition.

    Attributes:
        id: sample id (``<pair_id>_v<k>``).
        prompt: the prompt.
        seed: seed of the initial noise.
        pair_id: the sample whose mask (and image) make the condition.
        deform_seed: seed of this variant's warp (None = the condition as it is).
        meta: the condition sample's metadata.
    """

    id: str
    prompt: str
    seed: int
    pair_id: str
    deform_seed: int | None = None
    meta: dict[str, str] = field(default_factory=dict)


def controlled_requests(
    source: SampleSource,
    ids: Sequence[str],
    augment_ratio: int,
    seed: int,
    prompt_builder: PromptBuilder | None,
    deform: bool = False,
    use_row_prompts: bool = False,
    fixed_prompt: str | None = None,
) -> list[ControlRequest]:
    """``augment_ratio`` requests per condition sample in ``ids``.

    Args:
        source: where the conditions come from.
        ids: the condition samples.
        augment_ratio: variants per condition (EMIT-Diff: 3-50).
        seed: the run's seed.
        prompt_builder: builds prompts from each sample's metadata (None: the sample's own prompt).
        deform: draw a warp per variant (``synthesis.source=deformed``).
        use_row_prompts: take each sample's own prompt when it has one (a synthesis folder's rows).
        fixed_prompt: one prompt for every request (a ControlNet fitted with ``control.prompt``).
    """
    if augment_ratio < 1:
        raise ValueError(
            f"synthesis.augment_ratio: expected >= 1 variants per condition, got {augment_ratio}"
        )
    if not ids:
        raise ValueError(f"synthesis: no condition samples in {source.name}")
    out = []
    for sid in ids:
        sample = source.load(sid)
        for k in range(augment_ratio):
            rng = random.Random(f"{seed}/{sid}/{k}")
            if fixed_prompt is not None:
                prompt = fixed_prompt
            elif (use_row_prompts and sample.prompt) or prompt_builder is None:
                prompt = sample.prompt
            else:
                prompt = prompt_builder.build(sample.meta, rng=rng).text
            out.append(ControlRequest(
                id=f"{sid}_v{k:03d}", prompt=prompt, seed=rng.getrandbits(31), pair_id=sid,
                deform_seed=rng.getrandbits(31) if deform else None, meta=dict(sample.meta),
            ))
    return out


class ConditionDataset(Dataset):
    """Requests as items with their condition: ``id, prompt, seed, meta, pair_id`` and ``condition``
    (C, S, S) float32, ``mask`` (S, S) uint8 (the label map the condition was made from). A colour
    sample's edges are those of its luminance (:class:`~diffmask.control.conditions.ConditionBuilder`).

    Args:
        requests: from :func:`controlled_requests`.
        source: the condition samples.
        builder: makes condition images (the ControlNet's settings, from its ``control.json``).
        size: the model's resolution.
        intensity: normalisation applied to the condition images' pixels before their edges are
            taken (``raw`` = as read; the ControlNet was fitted on normalised images).
        resize: ``stretch`` or ``letterbox``.
        deformation: the warp of variants with a ``deform_seed``.

    Raises (when an item is read):
        ValueError: a condition sample without a mask, or labels outside the classes (named).
    """

    def __init__(
        self,
        requests: Sequence[ControlRequest],
        source: SampleSource,
        builder: ConditionBuilder,
        size: int,
        intensity: str = "raw",
        resize: str = "stretch",
        deformation: Deformation | None = None,
    ):
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("requests: ids must be unique")
        if any(r.deform_seed is not None for r in requests) and deformation is None:
            raise ValueError("synthesis.deform: requests ask for warps but no deformation is configured")
        self.requests = list(requests)
        self.source = source
        self.builder = builder
        self.size = size
        self.intensity = intensity
        self.resize = resize
        self.deformation = deformation

    def __len__(self) -> int:
        return len(self.requests)

    def condition_of(self, request: ControlRequest) -> tuple[np.ndarray, np.ndarray]:
        """(condition (C, S, S) float32, label map (S, S) uint8) of one request."""
        sample = self.source.load(request.pair_id)
        where = f"{getattr(self.source, 'root', self.source.name)}: {request.pair_id}"
        if sample.label is None:
            raise ValueError(f"{where}: no mask (sem_seg_file_name); a condition needs a label map")
        if sample.image.shape[:2] != sample.label.shape:  # (S, S) grey or (S, S, 3) colour images
            raise ValueError(
                f"{where}: image {sample.image.shape} and mask {sample.label.shape} differ in size"
            )
        image, label = resize_sample(sample, self.size, self.resize)
        if self.intensity != "raw":
            image = normalize_intensity(image, self.intensity)
        image = image.astype(np.float32) / 255.0
        if request.deform_seed is not None:
            image, label = self.deformation(image, label, np.random.default_rng(request.deform_seed))
        cond = self.builder(image, label, where=where)
        return cond, label.astype(np.uint8)

    def __getitem__(self, index: int) -> dict:
        r = self.requests[index]
        cond, label = self.condition_of(r)
        return {"id": r.id, "prompt": r.prompt, "seed": r.seed, "meta": dict(r.meta), "pair_id": r.pair_id,
                "condition": torch.from_numpy(cond), "mask": torch.from_numpy(label)}

    @staticmethod
    def collate(items: list[dict]) -> dict[str, list]:
        """Lists per key, as :func:`~diffmask.synthesis.requests.collate_requests` (tensors kept per item)."""
        return {key: [it[key] for it in items] for key in items[0]}
