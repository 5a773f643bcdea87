"""Training throughput (images/s) measured over training batches only."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

__all__ = ["TrainingThroughput"]


class TrainingThroughput(pl.Callback):
    """Logs ``train/images_per_s`` (all devices together), skipping the first ``warmup`` batches.

    A run no longer than the warm-up is measured over all its batches instead (a rough figure,
    better than none); a run without a training batch has no figure (``None``).

    Args:
        warmup: batches ignored at the start (compilation, cuDNN autotuning, data workers).
    """

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.images = 0
        self.seconds = 0.0
        self.all_images = 0  # warm-up included
        self.all_seconds = 0.0
        self._seen = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Start the batch's clock once the device has finished the previous work."""
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Stop the clock, add the batch (times the world size) and log ``train/images_per_s``.

        Batches of the warm-up count only towards the fallback figure and are not logged.
        """
        self._seen += 1
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # time the work, not the kernel launches
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        images = int(batch["image"].shape[0]) * trainer.world_size
        self.all_seconds += seconds
        self.all_images += images
        if self._seen <= self.warmup:
            return
        self.seconds += seconds
        self.images += images
        pl_module.log("train/images_per_s", self.images_per_s, batch_size=1, rank_zero_only=True)

    @property
    def images_per_s(self) -> float | None:
        """Images per second after the warm-up, else over every batch; None before any batch."""
        if self.seconds > 0:
            return self.images / self.seconds
        return self.all_images / self.all_seconds if self.all_seconds > 0 else None
