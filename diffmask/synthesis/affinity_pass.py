"""Second pass of the generate stage: fit AffinityNet on the written images + seeds, rewrite masks.

AffinityNet needs training on the synthetic images themselves, so it cannot run inside the
sampling loop. After generation (threshold/CRF masks in ``masks/``, class maps in ``attn/``):

1. seeds = the written masks with an ignore band of ``ignore_margin`` px at region borders;
2. fit :class:`~diffmask.refine.AffinityRefiner` on (image, seed) for ``train_steps`` steps and
   save its weights atomically to ``affinity.pt`` (a restart loads them instead of refitting);
3. refine each sample's class maps by random walk into ``masks_affinity/<id>.png`` (atomic; a
   restart skips the ones on disk);
4. rewrite ``manifest.jsonl`` (atomic) so ``sem_seg_file_name`` points at the refined masks and
   the ``score_<class>`` values are their confidences.

``masks/`` keeps the seeds, so the pass can be redone with other settings.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from diffmask.artifacts import atomic_write_bytes
from diffmask.data.manifest import read_manifest, write_manifest
from diffmask.data.sources import read_image
from diffmask.refine.images import channels_first
from diffmask.refine.threshold import IGNORE_INDEX, mask_confidence
from diffmask.synthesis.writer import _png_bytes, load_class_maps, read_gray

__all__ = ["refine_with_affinity", "AFFINITY_MASK_DIR", "AFFINITY_WEIGHTS"]

log = logging.getLogger(__name__)
AFFINITY_MASK_DIR = "masks_affinity"
AFFINITY_WEIGHTS = "affinity.pt"


class _SeedDataset(Dataset):
    """(image (C, S, S) in [0, 1], seed (S, S) long) of the seed masks with an ignore band."""

    def __init__(
        self, folder: Path, rows, ignore_margin: int, image_key: str, seed_key: str, channels: int = 1
    ):
        self.folder, self.rows, self.margin = folder, rows, ignore_margin
        self.image_key, self.seed_key = image_key, seed_key
        self.channels = int(channels)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from diffmask.refine.affinity import ignore_boundaries  # noqa: PLC0415 - pulls in Lightning

        row = self.rows[i]
        image = channels_first(read_image(self.folder / row.file_name, self.channels))
        seed = ignore_boundaries(read_gray(self.folder / row.sem_seg_file_name), self.margin)
        return {self.image_key: image, self.seed_key: torch.from_numpy(seed.astype(np.int64))}


def refine_with_affinity(
    folder: str | os.PathLike,
    refiner,
    class_names: Sequence[str],
    train_steps: int = 500,
    batch_size: int = 8,
    ignore_margin: int = 3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    channels: int = 1,
) -> dict[str, Any]:
    """Fit ``refiner`` on ``folder``'s images and seed masks, then rewrite its masks (resumable).

    Args:
        folder: a synthesis work folder with ``manifest.jsonl`` whose rows have ``attn_file``
            (generate with ``save_class_maps``) and ``sem_seg_file_name`` (the seed masks).
        refiner: an :class:`~diffmask.refine.AffinityRefiner`.
        class_names: background first; score keys.
        train_steps, batch_size: AffinityNet training.
        ignore_margin: ignore band (px) around seed region borders.
        device: where to train and refine.
        seed: seed of the training order.
        channels: the set's image channels (1 grey, 3 RGB; AffinityNet's ``in_channels``); an
            image of the other kind is an error.

    Returns:
        counts: ``affinity_refined`` (this run), ``affinity_skipped`` (already on disk),
        ``affinity_trained`` (bool: fitted this run), ``affinity_final_loss``.
    """
    folder = Path(folder)
    rows = read_manifest(folder)
    if not rows:
        raise ValueError(f"{folder}: the manifest is empty; nothing to refine")
    # the seeds are always the generation masks (masks/), also when the manifest was rewritten
    seed_rows = [replace(r, sem_seg_file_name=f"masks/{r.id}.png") for r in rows]
    missing = [r.id for r in rows if not r.attn_file]
    if missing:
        raise ValueError(
            f"{folder}: rows {missing[:3]} have no attn_file; the affinity pass needs the class maps "
            "(generate with synthesis.save_class_maps=true)"
        )
    refiner = refiner.to(device)
    weights = folder / AFFINITY_WEIGHTS
    trained, final_loss = False, None
    if weights.is_file():
        refiner.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
        log.info("affinity: loaded %s (delete it to refit)", weights)
    else:
        gen = torch.Generator().manual_seed(seed)
        loader = DataLoader(
            _SeedDataset(folder, seed_rows, ignore_margin, refiner.image_key, refiner.seed_key, channels),
            batch_size=batch_size, shuffle=True, generator=gen, drop_last=len(rows) > batch_size,
        )
        losses = refiner.fit_seeds(loader, train_steps)
        final_loss = losses[-1]
        buf = io.BytesIO()
        torch.save(refiner.state_dict(), buf)
        atomic_write_bytes(weights, buf.getvalue())
        trained = True
        log.info(
            "affinity: trained %d steps on %d images, last loss %.4f", train_steps, len(rows), final_loss
        )
    refiner.eval()
    done = skipped = 0
    new_rows = []
    for row in rows:
        out_name = f"{AFFINITY_MASK_DIR}/{row.id}.png"
        maps = load_class_maps(folder / row.attn_file)
        if (folder / out_name).is_file():
            label = read_gray(folder / out_name)
            skipped += 1
        else:
            image = channels_first(read_image(folder / row.file_name, channels))
            label, _ = refiner.refine(image, torch.from_numpy(maps))
            atomic_write_bytes(folder / out_name, _png_bytes(label))
            done += 1
        confidence = mask_confidence(maps, label, IGNORE_INDEX)
        scores = {n: float(c) for n, c in zip(class_names[1:], confidence, strict=True)}
        new_rows.append(replace(row, sem_seg_file_name=out_name, scores=scores))
    write_manifest(folder, new_rows)
    return {"affinity_refined": done, "affinity_skipped": skipped, "affinity_trained": trained,
            "affinity_final_loss": final_loss}
