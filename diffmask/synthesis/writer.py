"""Writes generated samples to a stage folder: PNGs first, then one manifest row per sample.

Each rank appends to its own shard ``manifest.rank<r>.jsonl``; rank 0 merges the shards into
``manifest.jsonl`` after predicting. A PNG is written atomically *before* its row is appended
(fsynced), so a sample counts as done only when both exist: a restart skips exactly those ids.
With class maps, ``attn/<id>.npz`` (``class_maps`` (K, S, S) float16) is written before the row
too. A sample the quality filter drops gets no files, only a row ``{id, seed, prompt, reason}``
in ``dropped.rank<r>.jsonl``, so a restart skips it as well and the stage can count it.

Images are written as the model made them: grey PNGs (mode ``L``) for a grey model, RGB PNGs for
a colour one (``data.channels=3``); the set's ``stage.json`` records ``channels``
(:func:`set_channels`), and :class:`~diffmask.data.ManifestSource` with those channels reads it.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.callbacks import BasePredictionWriter

from diffmask.artifacts import StageDir, atomic_write_bytes
from diffmask.data.manifest import ManifestRow, append_manifest_row, write_manifest

__all__ = [
    "SyntheticWriter", "read_done_rows", "read_dropped", "class_maps_npz", "load_class_maps", "read_gray",
    "set_channels",
]

log = logging.getLogger(__name__)
SHARD_GLOB = "manifest.rank*.jsonl"
DROPPED_GLOB = "dropped.rank*.jsonl"


def class_maps_npz(class_maps: np.ndarray) -> bytes:
    """``.npz`` bytes holding ``class_maps`` (K, S, S) as float16 (what ``attn_file`` points to)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, class_maps=np.asarray(class_maps, dtype=np.float16))
    return buf.getvalue()


def load_class_maps(path: str | os.PathLike) -> np.ndarray:
    """(K, S, S) float32 class maps from an ``attn_file``."""
    with np.load(path) as data:
        if "class_maps" not in data:
            raise ValueError(f"{path}: expected an array 'class_maps', found {list(data.keys())}")
        return data["class_maps"].astype(np.float32)


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """A written mask PNG (or a grey image) as (S, S) uint8; images are read with their set's channels
    (:func:`diffmask.data.sources.read_image`), never converted to grey here."""
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


def set_channels(folder: str | os.PathLike) -> int:
    """The image channels of a synthetic set: its ``stage.json`` ``channels``; 1 (grey) for a set
    without one (made before they were recorded, or by hand)."""
    folder = Path(folder)
    stage_file = (folder if folder.is_dir() else folder.parent) / StageDir.STAGE_FILE
    if not stage_file.is_file():
        return 1
    return int(json.loads(stage_file.read_text()).get("channels", 1))


def _png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of an (S, S) uint8 array (grey, mode ``L``) or an (S, S, 3) one (RGB)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _read_rows_tolerant(path: Path) -> list[dict[str, Any]]:
    """Rows of a shard; a torn last line (crash mid-append) is ignored."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line", path)
                continue
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return rows


def _drop_torn_tail(path: Path) -> None:
    """Cut a shard back to its last complete line, so new rows never join a torn one."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def read_done_rows(folder: str | os.PathLike) -> dict[str, ManifestRow]:
    """Rows of every shard in ``folder`` whose image file exists, by id (first row wins)."""
    folder = Path(folder)
    done: dict[str, ManifestRow] = {}
    for shard in sorted(folder.glob(SHARD_GLOB)):
        for i, raw in enumerate(_read_rows_tolerant(shard), 1):
            row = ManifestRow.from_json(raw, where=f"{shard}, row {i}")
            if row.id not in done and (folder / row.file_name).is_file():
                done[row.id] = row
    return done


def read_dropped(folder: str | os.PathLike) -> dict[str, str]:
    """Ids the quality filter dropped, with the reason, from every ``dropped.rank*.jsonl``."""
    out: dict[str, str] = {}
    for shard in sorted(Path(folder).glob(DROPPED_GLOB)):
        for raw in _read_rows_tolerant(shard):
            out.setdefault(str(raw["id"]), str(raw.get("reason", "")))
    return out


class SyntheticWriter(BasePredictionWriter):
    """Saves ``images/<id>.png`` (+ ``masks/<id>.png``) and manifest rows for each prediction batch.

    Args:
        output_dir: the stage's work folder (``StageDir.begin()``).
        class_names: label names, background first (score keys are checked against them).
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str]):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.class_names = tuple(class_names)
        self.written = 0
        self.skipped = 0
        self.dropped = 0

    def shard_path(self, rank: int) -> Path:
        """The manifest shard that process ``rank`` appends its rows to."""
        return self.output_dir / f"manifest.rank{rank}.jsonl"

    def dropped_path(self, rank: int) -> Path:
        """The file where process ``rank`` records the samples the quality filter dropped."""
        return self.output_dir / f"dropped.rank{rank}.jsonl"

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prepare the folders and resume: ids already written or dropped go to ``pl_module.skip_ids``.

        A torn last line of this rank's shards (an interrupted write) is cut first.

        Args:
            trainer: the trainer (its global rank names the shards).
            pl_module: the generating module; its ``skip_ids`` are set.
        """
        (self.output_dir / "images").mkdir(parents=True, exist_ok=True)
        (self.output_dir / "masks").mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.shard_path(trainer.global_rank))
        _drop_torn_tail(self.dropped_path(trainer.global_rank))
        # Each id belongs to one rank (Lightning's unrepeated sampler), so ranks never race on an id.
        done = {*read_done_rows(self.output_dir), *read_dropped(self.output_dir)}
        pl_module.skip_ids = set(done)
        self.skipped = len(done)
        if done:
            log.info("synthesis: resuming, %d samples already written", len(done))

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        """Write a batch's images (+ masks, class maps) and append their manifest rows to this rank's shard.

        Samples the quality filter dropped are recorded in the rank's dropped file instead.

        Args:
            trainer: the trainer (its global rank names the shards).
            pl_module: the generating module (unused).
            prediction: :meth:`~diffmask.synthesis.module.SynthesisLitModule.predict_step`'s output;
                None when every request of the batch was skipped.
            batch_indices: the batch's dataset indices (unused).
            batch: the batch (unused).
            batch_idx: the batch's index (unused).
            dataloader_idx: the dataloader's index (unused).

        Raises:
            ValueError: a mask score names no class of ``class_names``.
        """
        if prediction is None:
            return
        shard = self.shard_path(trainer.global_rank)
        masks = prediction.get("masks")
        class_maps = prediction.get("class_maps")
        dropped = prediction.get("dropped") or [None] * len(prediction["id"])
        for i, sid in enumerate(prediction["id"]):
            if dropped[i] is not None:
                with open(self.dropped_path(trainer.global_rank), "a", encoding="utf-8") as f:
                    record = {
                        "id": sid, "seed": int(prediction["seed"][i]), "prompt": prediction["prompt"][i],
                        "reason": dropped[i],
                    }
                    f.write(json.dumps(record, sort_keys=True) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                self.dropped += 1
                continue
            file_name = f"images/{sid}.png"
            atomic_write_bytes(self.output_dir / file_name, _png_bytes(prediction["images"][i]))
            mask_name, scores = None, {}
            if masks is not None:
                mask_name = f"masks/{sid}.png"
                atomic_write_bytes(self.output_dir / mask_name, _png_bytes(masks[i]))
                scores = {str(k): float(v) for k, v in prediction["scores"][i].items()}
                unknown = sorted(set(scores) - set(self.class_names))
                if unknown:
                    raise ValueError(
                        f"mask_maker: score keys {unknown} are not class names {list(self.class_names)}"
                    )
            attn_name = None
            if class_maps is not None:
                attn_name = f"attn/{sid}.npz"
                atomic_write_bytes(self.output_dir / attn_name, class_maps_npz(class_maps[i]))
            row = ManifestRow(
                id=sid, file_name=file_name, sem_seg_file_name=mask_name, prompt=prediction["prompt"][i],
                attn_file=attn_name,
                source="synthetic", seed=int(prediction["seed"][i]), scores=scores,
                meta=dict(prediction["meta"][i]) if "meta" in prediction else {},
                pair_id=prediction["pair_id"][i] if "pair_id" in prediction else None,
            )
            append_manifest_row(shard, row)
            self.written += 1

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge the shards into ``manifest.jsonl`` on rank 0 once every rank has finished.

        Args:
            trainer: the trainer (its strategy's barriers).
            pl_module: the generating module (unused).
        """
        trainer.strategy.barrier("synthesis_merge")
        if trainer.is_global_zero:
            self.merge()
        trainer.strategy.barrier("synthesis_merged")

    def merge(self) -> list[ManifestRow]:
        """Write ``manifest.jsonl`` from every shard (one row per id, sorted by id)."""
        rows = sorted(read_done_rows(self.output_dir).values(), key=lambda r: r.id)
        write_manifest(self.output_dir, rows)
        return rows
