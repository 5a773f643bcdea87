"""Variations of real images (SDEdit): each sample starts from a real training image, noised part-way.

``diffmask-generate init_images=train strength=0.5``: sample ``i`` takes a training image (every
image once per round, in an order drawn from ``seed``), encodes it, noises it to ``strength`` of
the sampling schedule and denoises it with *its own* prompt while attention is captured, so the
labels are DiffMask's attention masks as for samples from pure noise. The image keeps the source's
layout and texture at low ``strength`` and is redrawn more at high ``strength`` (1 = from noise).
Only the images are read, never the source's masks: the labelled-fraction budget is unchanged,
and any training image can be a source (the generator was fitted on all of them anyway).

Sample ids, prompts and seeds depend on ``(seed, index)`` alone, so growing a set keeps the first
samples; each row's ``meta`` records its ``source_id``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from diffmask.data.dataset import normalize_intensity, resize_sample
from diffmask.data.sources import SampleSource
from diffmask.prompts.builder import PromptBuilder
from diffmask.refine.images import channels_first
from diffmask.synthesis.requests import GenerationRequest

__all__ = ["VariationDataset", "variation_requests"]


def variation_requests(
    num_samples: int,
    seed: int,
    prompt_builder: PromptBuilder,
    source: SampleSource,
    ids: Sequence[str],
    id_prefix: str = "syn",
) -> list[GenerationRequest]:
    """``num_samples`` requests, each a variation of one of ``ids`` with a prompt from its metadata.

    The sources cycle through ``ids`` in one order drawn from ``seed`` (so 2N samples use every
    image twice); prompts and noise seeds come from a stream of ``(seed, index)``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    ids = [str(i) for i in ids]
    if not ids:
        raise ValueError(f"init_images: the {source.name} source has no images in that split")
    order = list(ids)
    random.Random(f"{seed}/order").shuffle(order)
    rng = random.Random(seed)
    out = []
    for i in range(num_samples):
        sid = order[i % len(order)]
        meta = dict(source.load(sid).meta)
        built = prompt_builder.build(meta, rng=rng)
        row = {k: "" if v is None else str(v) for k, v in meta.items()}
        out.append(GenerationRequest(id=f"{id_prefix}{i:06d}", prompt=built.text, seed=rng.getrandbits(31),
                                     meta={**row, "source_id": sid}))
    return out


class VariationDataset(Dataset):
    """Requests as items ``id, prompt, seed, meta`` plus ``init``: the source image (C, S, S) in [0, 1].

    Args:
        requests: from :func:`variation_requests` (``meta["source_id"]`` names the image).
        source: the real images.
        size: the model's resolution.
        intensity: the normalisation the model was fitted on (``raw`` = as read).
        resize: ``stretch`` or ``letterbox`` (as the data module).
        channels: the model's image channels (1 grey, 3 RGB); a source image of the other kind is
            an error when it is read (never converted).
    """

    def __init__(self, requests: Sequence[GenerationRequest], source: SampleSource, size: int,
                 intensity: str = "raw", resize: str = "stretch", channels: int = 1):
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("requests: ids must be unique")
        missing = [r.id for r in requests if "source_id" not in r.meta]
        if missing:
            raise ValueError(
                f"requests: {missing[:3]} have no meta['source_id'] (make them with variation_requests)"
            )
        self.requests = list(requests)
        self.source = source
        self.size = int(size)
        self.intensity = intensity
        self.resize = resize
        self.channels = int(channels)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict:
        r = self.requests[index]
        image, _ = resize_sample(self.source.load(r.meta["source_id"]), self.size, self.resize)
        if self.intensity != "raw":
            image = normalize_intensity(image, self.intensity)
        init = channels_first(np.asarray(image, dtype=np.float32) / 255.0)  # (C, S, S)
        if init.shape[0] != self.channels:
            raise ValueError(
                f"init_images: {self.source.name} image {r.meta['source_id']} has {init.shape[0]} "
                f"channel(s), the model generates {self.channels} (data.channels); grey and colour are "
                "never converted silently"
            )
        return {"id": r.id, "prompt": r.prompt, "seed": r.seed, "meta": dict(r.meta), "init": init}

    @staticmethod
    def collate(items: list[dict]) -> dict[str, list]:
        """Lists per key (the images stay one tensor per item)."""
        return {key: [it[key] for it in items] for key in items[0]}
