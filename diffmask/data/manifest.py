"""The one manifest format for real and synthetic datasets (field names borrowed from detectron2).

A dataset folder holds ``manifest.jsonl``, one JSON object per line:

=====================  ========================================================================
field                  meaning
=====================  ========================================================================
``id``                 unique sample id (string)
``file_name``          image PNG, relative to the manifest's folder (or absolute)
``sem_seg_file_name``  label-map PNG (0 = background, 1..K = classes); may be null for
                       unlabelled images
``prompt``             text prompt (generation prompt, or a caption of a real image)
``source``             ``real`` or ``synthetic``
``seed``               generation seed (null for real images)
``split``              optional; ``train``/``val``/``test`` (rows without it take the reader's
                       ``default_split``)
``attn_file``          optional; saved class maps (``.npz``) of a synthetic sample
``score_<class>``      optional per-class mask quality score in [0, 1]
``meta``               optional dict of metadata (sex, age, finding, ...)
``pair_id``            optional; the real sample a synthetic one was made from (controlled
                       generation: its mask is that sample's, or a deformation of it)
=====================  ========================================================================
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmask.artifacts import atomic_write_text, iter_jsonl

__all__ = ["MANIFEST_NAME", "ManifestRow", "read_manifest", "write_manifest", "append_manifest_row"]

MANIFEST_NAME = "manifest.jsonl"
SOURCES = ("real", "synthetic")


@dataclass
class ManifestRow:
    """One line of ``manifest.jsonl`` (the fields are described in the module docstring).

    Args:
        id: unique sample id.
        file_name: image PNG, relative to the manifest's folder (or absolute).
        sem_seg_file_name: label-map PNG, or None for an unlabelled image.
        prompt: text prompt or caption.
        source: ``"real"`` or ``"synthetic"``.
        seed: generation seed (None for real images).
        split: ``train``/``val``/``test``, or None to take the reader's default split.
        attn_file: saved class maps (``.npz``) of a synthetic sample, or None.
        scores: per-class mask quality scores in [0, 1] (written as ``score_<class>``).
        meta: metadata (sex, age, finding, ...).
        pair_id: id of the real sample a synthetic one was made from, or None.
    """

    id: str
    file_name: str
    sem_seg_file_name: str | None = None
    prompt: str = ""
    source: str = "real"
    seed: int | None = None
    split: str | None = None
    attn_file: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    pair_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object (the inverse of :meth:`from_json`).

        ``scores`` are flattened to ``score_<class>`` keys; empty optional fields (``meta``,
        ``split``, ``attn_file``, ``pair_id``) are left out.
        """
        row = {k: v for k, v in asdict(self).items() if k not in ("scores",)}
        if not row["meta"]:
            row.pop("meta")
        for key in ("split", "attn_file", "pair_id"):
            if row[key] is None:
                row.pop(key)
        for name, value in self.scores.items():
            row[f"score_{name}"] = float(value)
        return row

    @classmethod
    def from_json(cls, row: dict[str, Any], where: str) -> ManifestRow:
        """Parse and validate one manifest line (the inverse of :meth:`to_json`).

        Args:
            row: the decoded JSON object.
            where: the place named in error messages (``"<manifest>, row <i>"``).

        Returns:
            The row, ``score_<class>`` keys gathered into ``scores``.

        Raises:
            ValueError: ``id`` or ``file_name`` is missing, or ``source`` is not real/synthetic.
        """
        for key in ("id", "file_name"):
            if key not in row or row[key] in (None, ""):
                raise ValueError(f"{where}: missing required field {key!r} (fields: {sorted(row)})")
        source = row.get("source", "real")
        if source not in SOURCES:
            raise ValueError(f"{where}: field 'source' must be one of {SOURCES}, got {source!r}")
        scores = {
            k[len("score_") :]: float(v) for k, v in row.items() if k.startswith("score_") and v is not None
        }
        seed = row.get("seed")
        return cls(
            id=str(row["id"]),
            file_name=str(row["file_name"]),
            sem_seg_file_name=row.get("sem_seg_file_name"),
            prompt=str(row.get("prompt") or ""),
            source=source,
            seed=None if seed is None else int(seed),
            split=row.get("split"),
            attn_file=row.get("attn_file"),
            scores=scores,
            meta=dict(row.get("meta") or {}),
            pair_id=None if row.get("pair_id") in (None, "") else str(row["pair_id"]),
        )


def manifest_path(path: str | os.PathLike) -> Path:
    """Accept a dataset folder or the manifest file itself."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() or path.suffix != ".jsonl" else path


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and validate a manifest (folder or ``manifest.jsonl``); ids must be unique."""
    mpath = manifest_path(path)
    if not mpath.is_file():
        raise FileNotFoundError(f"{mpath}: manifest not found (expected a folder with {MANIFEST_NAME})")
    rows: list[ManifestRow] = []
    seen: set[str] = set()
    for i, raw in enumerate(iter_jsonl(mpath), 1):
        row = ManifestRow.from_json(raw, where=f"{mpath}, row {i}")
        if row.id in seen:
            raise ValueError(f"{mpath}, row {i}: duplicate id {row.id!r}")
        seen.add(row.id)
        rows.append(row)
    return rows


def write_manifest(path: str | os.PathLike, rows: list[ManifestRow]) -> Path:
    """Atomically write a whole manifest."""
    text = "".join(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in rows)
    return atomic_write_text(manifest_path(path), text)


def append_manifest_row(path: str | os.PathLike, row: ManifestRow) -> None:
    """Append one row (flushed and fsynced) — used by resumable writers after the files exist."""
    mpath = manifest_path(path)
    with open(mpath, "a", encoding="utf-8") as f:
        f.write(json.dumps(row.to_json(), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
