"""Re-refine a synthetic dataset's saved class maps into a new dataset, without sampling again.

A generate run with ``synthesis.save_class_maps=true`` keeps each sample's class maps in
``attn/<id>.npz``. The refinement ablation (raw / threshold / +CRF / +affinity) then needs one
sampling run, not one per chain: :func:`remask_folder` writes a new dataset folder whose images
and class maps are hard links to the source's (copies where links are impossible) and whose
masks come from another refinement chain (or quality filter).

Resumable: a mask is written atomically before anything refers to it, and a restart keeps the
masks already on disk; the manifest is written once, atomically, at the end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from diffmask.artifacts import atomic_write_bytes, link_or_copy
from diffmask.data.manifest import ManifestRow, read_manifest, write_manifest
from diffmask.data.sources import read_image
from diffmask.refine.threshold import IGNORE_INDEX, mask_confidence
from diffmask.synthesis.writer import _png_bytes, load_class_maps, read_gray

__all__ = ["remask_folder"]

log = logging.getLogger(__name__)


def remask_folder(
    source: str | os.PathLike,
    work: str | os.PathLike,
    mask_maker,
    class_names: Sequence[str],
    quality_filter=None,
    batch_size: int = 16,
    channels: int = 1,
) -> dict[str, Any]:
    """Write ``work`` = ``source``'s images and class maps with masks from ``mask_maker``.

    Args:
        source: a synthetic dataset folder whose rows have ``attn_file`` (class maps).
        work: the new folder (a :class:`~diffmask.artifacts.StageDir` work folder).
        mask_maker: an :class:`~diffmask.refine.AttentionMaskMaker` (its ``from_maps``).
        class_names: background first; must match the class maps' channels.
        quality_filter: optional :class:`~diffmask.synthesis.MaskQualityFilter`; dropped
            samples get no row (counted in ``dropped``).
        batch_size: samples refined per call (the CRF worker pool's unit of work).
        channels: the source's image channels (1 grey, 3 RGB: DenseCRF then sees the colours); an
            image of the other kind is an error.

    Returns:
        counts: ``rows``, ``written`` (masks made this run), ``skipped`` (on disk already),
        ``dropped``.
    """
    source, work = Path(source), Path(work)
    rows = read_manifest(source)
    if not rows:
        raise ValueError(f"{source}: the manifest is empty; nothing to re-mask")
    missing = [r.id for r in rows if not r.attn_file]
    if missing:
        raise ValueError(
            f"{source}: rows {missing[:3]} have no attn_file; re-masking needs the class maps "
            "(generate with synthesis=attention_masks synthesis.save_class_maps=true)"
        )
    k = len(class_names) - 1
    written = skipped = 0
    kept: list[ManifestRow] = []
    dropped: dict[str, str] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        maps = [load_class_maps(source / r.attn_file) for r in chunk]
        for r, m in zip(chunk, maps, strict=True):
            if m.ndim != 3 or m.shape[0] != k:
                raise ValueError(
                    f"{source / r.attn_file}: class maps of shape {m.shape}, expected ({k}, S, S) for the "
                    f"classes {list(class_names[1:])}"
                )
        todo = [i for i, r in enumerate(chunk) if not (work / f"masks/{r.id}.png").is_file()]
        labels: dict[int, np.ndarray] = {}
        scores: dict[int, dict[str, float]] = {}
        if todo:
            images = np.stack([read_image(source / chunk[i].file_name, channels) for i in todo])
            masks, new_scores = mask_maker.from_maps(images, np.stack([maps[i] for i in todo]))
            for i, mask, score in zip(todo, masks, new_scores, strict=True):
                labels[i], scores[i] = mask, score
        for i, row in enumerate(chunk):
            mask_name = f"masks/{row.id}.png"
            if i in labels:
                atomic_write_bytes(work / mask_name, _png_bytes(labels[i]))
                written += 1
            else:
                labels[i] = read_gray(work / mask_name)
                confidence = mask_confidence(maps[i], labels[i], IGNORE_INDEX)
                scores[i] = {n: float(c) for n, c in zip(class_names[1:], confidence, strict=True)}
                skipped += 1
            reason = quality_filter.reason(labels[i], scores[i]) if quality_filter is not None else None
            if reason is not None:
                dropped[row.id] = reason
                continue
            image_name = f"images/{Path(row.file_name).name}"
            attn_name = f"attn/{Path(row.attn_file).name}"
            link_or_copy(source / row.file_name, work / image_name)
            link_or_copy(source / row.attn_file, work / attn_name)
            kept.append(replace(row, file_name=image_name, attn_file=attn_name, sem_seg_file_name=mask_name,
                                scores=scores[i]))
    write_manifest(work, kept)
    for sid in dropped:  # a dropped sample keeps no files, as in generation
        (work / f"masks/{sid}.png").unlink(missing_ok=True)
    log.info("re-masked %d samples from %s (%d new, %d on disk, %d dropped)",
             len(kept), source, written, skipped, len(dropped))
    return {"rows": len(kept), "written": written, "skipped": skipped, "dropped": len(dropped)}
