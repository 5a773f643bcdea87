"""Training throughput (images/s) measured over training batches only."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch

__all__ = ["TrainingThroughput"]


class TrainingThroughput(pl.Callback):
    """Logs ``train/images_per_s`` (all devices together), skipping the first ``warmup`` batches.

    Args:
        warmup: batches ignored at the start (compilation, cuDNN autotuning, data workers).
    """

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.images = 0
        self.seconds = 0.0
        self._seen = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # time the work, not the kernel launches
        if self._start is None or self._seen <= self.warmup:
            return
        self.seconds += time.perf_counter() - self._start
        self.images += int(batch["image"].shape[0]) * trainer.world_size
        pl_module.log("train/images_per_s", self.images_per_s, batch_size=1, rank_zero_only=True)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")
