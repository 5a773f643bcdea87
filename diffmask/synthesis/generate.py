"""Run generation into a folder with ``trainer.predict`` (any strategy: single device or DDP)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from diffmask.diffusion.sampler import DiffusionSampler
from diffmask.synthesis.module import MaskMaker, SynthesisLitModule
from diffmask.synthesis.requests import GenerationRequest, RequestDataset, collate_requests
from diffmask.synthesis.writer import SyntheticWriter

__all__ = ["generate_samples"]


def generate_samples(
    trainer_factory,
    sampler: DiffusionSampler,
    requests: Sequence[GenerationRequest],
    output_dir: str | os.PathLike,
    class_names: Sequence[str],
    batch_size: int = 8,
    num_inference_steps: int = 50,
    guidance_scale: float = 3.0,
    eta: float = 0.0,
    mask_maker: MaskMaker | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Generate every request not yet in ``output_dir``; write PNGs, shards and ``manifest.jsonl``.

    Args:
        trainer_factory: called as ``trainer_factory(callbacks=[writer])`` → a ``pl.Trainer``
            (e.g. a partially instantiated trainer config).
        sampler, requests, class_names: what to generate and with which model.
        output_dir: the work folder (a ``StageDir``'s ``.tmp``); resumable.
        batch_size: images per device per step.
        num_inference_steps, guidance_scale, eta: sampling settings.
        mask_maker: optional masks + scores from recorded attention.

    Returns:
        counts: ``written`` (this run, this rank), ``skipped`` (already on disk at start),
        ``rows`` (rows in the merged manifest, rank 0; -1 elsewhere).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    writer = SyntheticWriter(output_dir, class_names)
    trainer: pl.Trainer = trainer_factory(callbacks=[writer])
    module = SynthesisLitModule(sampler, num_inference_steps, guidance_scale, eta=eta, mask_maker=mask_maker)
    loader = DataLoader(
        RequestDataset(requests), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_requests,
    )
    # predictions go to disk batch by batch; keeping them would hold every image in memory
    trainer.predict(module, dataloaders=loader, return_predictions=False)
    rows = sum(1 for _ in open(os.path.join(output_dir, "manifest.jsonl"))) if trainer.is_global_zero else -1
    return {"written": writer.written, "skipped": writer.skipped, "rows": rows}
