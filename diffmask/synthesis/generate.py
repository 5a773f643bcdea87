"""Run generation into a folder with ``trainer.predict`` (any strategy: single device or DDP)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from diffmask.diffusion.sampler import Sampler
from diffmask.synthesis.module import MaskMaker, SynthesisLitModule
from diffmask.synthesis.requests import GenerationRequest, RequestDataset, collate_requests
from diffmask.synthesis.writer import SyntheticWriter, read_dropped

__all__ = ["generate_samples"]


def generate_samples(
    trainer_factory,
    sampler: Sampler,
    requests: Sequence[GenerationRequest] | Dataset,
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    batch_size: int = 8,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    mask_maker: MaskMaker | None = None,
    num_workers: int = 0,
    save_class_maps: bool = False,
    quality_filter: Any | None = None,
    control_scale: float = 1.0,
    strength: float = 1.0,
) -> dict[str, Any]:
    """Generate every request not yet in ``output_dir``; write PNGs, shards and ``manifest.jsonl``.

    Args:
        trainer_factory: called as ``trainer_factory(callbacks=[writer])`` → a ``pl.Trainer``
            (e.g. a partially instantiated trainer config).
        sampler: the sampler of the requests' kind (:mod:`diffmask.diffusion.sampler`): a
            ``ControlledSampler`` for condition images, a ``VariationSampler`` for init images, a
            ``TextToImageSampler`` otherwise.
        requests: what to generate; may also be a dataset of items with condition images
            (controlled generation, :class:`~diffmask.synthesis.controlled.ConditionDataset`,
            collated by its ``collate``) or of items with init images
            (:class:`~diffmask.synthesis.variations.VariationDataset`).
        output_dir: the work folder (a ``StageDir``'s ``.tmp``); resumable.
        class_names: the label classes, background first.
        batch_size: images per device per step.
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        eta: DDIM noise (0 = deterministic).
        mask_maker: optional masks + scores from recorded attention.
        num_workers: data loader workers.
        save_class_maps: also write each sample's class maps (``attn/<id>.npz``, ``attn_file``).
        quality_filter: optional ``reason(mask, scores)``; dropped samples are recorded, not written.
        control_scale: the ControlNet's residual multiplier (controlled generation).
        strength: the share of the schedule run from ``init`` images (variations of real images).

    Returns:
        counts: ``written`` and ``dropped`` (this run, this rank), ``skipped`` (already on disk
        or dropped at start), ``rows`` (rows in the merged manifest, rank 0; -1 elsewhere) and
        ``dropped_total`` (every dropped id in the folder, rank 0; -1 elsewhere).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    writer = SyntheticWriter(output_dir, class_names)
    trainer: pl.Trainer = trainer_factory(callbacks=[writer])
    module = SynthesisLitModule(sampler, num_inference_steps, guidance_scale, eta=eta, mask_maker=mask_maker,
                                save_class_maps=save_class_maps, quality_filter=quality_filter,
                                control_scale=control_scale, strength=strength)
    dataset = requests if isinstance(requests, Dataset) else RequestDataset(requests)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=getattr(dataset, "collate", collate_requests),
    )
    # predictions go to disk batch by batch; keeping them would hold every image in memory
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    rows = sum(1 for _ in open(os.path.join(output_dir, "manifest.jsonl"))) if trainer.is_global_zero else -1
    dropped_total = len(read_dropped(output_dir)) if trainer.is_global_zero else -1
    return {"written": writer.written, "dropped": writer.dropped, "skipped": writer.skipped, "rows": rows,
            "dropped_total": dropped_total}
