"""Sample sources: where images, label maps, prompts and metadata come from.

A source knows the ids of each split and loads one sample at its native size:

* :class:`FolderSource` — ``images/`` + ``masks/`` (+ optional ``metadata.csv``): any dataset,
  an external test set;
* :class:`ManifestSource` — any folder with a ``manifest.jsonl`` (synthetic data, external test sets);
* :class:`~diffmask.data.ShapesSource` — a procedurally drawn organ/lesion phantom (no files needed).

The chest X-ray sources (JSRT/SCR, the chest phantom) live in :mod:`diffmask.domains.chest`.

``load(id)`` returns a :class:`Sample` with ``image`` (H, W) uint8 (grey) or (H, W, 3) uint8
(colour, ``channels=3``) and ``label`` (H, W) uint8 or None.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from diffmask.data.manifest import ManifestRow, read_manifest
from diffmask.labels import validate_class_names
from diffmask.seeds import check_seed

__all__ = [
    "Sample",
    "SampleSource",
    "DrawnSource",
    "FolderSource",
    "ManifestSource",
    "open_test_set",
    "read_image",
    "read_label",
]

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One sample at native resolution.

    Attributes:
        id: unique id within its source.
        image: (H, W) uint8 grey, or (H, W, 3) uint8 RGB for a colour source (``channels=3``).
        label: (H, W) uint8 label map with values in 0..num_classes-1, or None if unlabelled.
        prompt: caption / generation prompt ("" when the source has none).
        source: "real" or "synthetic".
        meta: metadata strings (every ``metadata.csv`` column but ``id`` and ``split``: sex, age,
            pathology, ...), missing values as "".
    """

    id: str
    image: np.ndarray
    label: np.ndarray | None
    prompt: str = ""
    source: str = "real"
    meta: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class SampleSource(Protocol):
    """What the data module reads samples from: named splits of ids, and one sample per id.

    Attributes:
        name: a short name for logs and metric keys.
        class_names: label names, background first.
    """

    name: str
    class_names: tuple[str, ...]

    def ids(self, split: str) -> list[str]:
        """The sample ids of ``split`` (``train``/``val``/``test``); an error if it is empty."""
        ...

    def load(self, sample_id: str) -> Sample:
        """Read one sample (image, label map if any, prompt, metadata) by its id."""
        ...


def read_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """Read an image as (H, W) uint8 (``channels=1``) or (H, W, 3) uint8 RGB (``channels=3``).

    8-bit images are read as they are. 16-bit, 32-bit and float images (common for X-rays and
    CT/MR slices from other hospitals) are scaled linearly from their own min..max to 0..255:
    converting them directly would clip every value above 255 to white. Nothing is converted
    silently:

    * ``channels=1``: an RGB(A) image is accepted only when its three channels are equal (a grey
      image saved as RGB, as many ultrasound exports are); a colour one is an error.
    * ``channels=3``: a grey image is an error (a grey file in a colour dataset); palette images
      are expanded to RGB, an alpha channel is dropped.

    Raises:
        FileNotFoundError: the file is not there.
        ValueError: naming the file, when it is unreadable or its channels do not match.
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.float64)
                if arr.ndim != 2:
                    raise ValueError(f"expected one channel, got shape {arr.shape}")
                arr = _rescale_to_uint8(arr, path)
                grey = True
            elif im.mode in ("L", "1", "LA") or (im.mode == "P" and _palette_is_grey(im)):
                arr = np.asarray(im.convert("L"), dtype=np.uint8)
                grey = True
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                grey = bool((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all())
                if grey and channels == 1:
                    arr = arr[..., 0].copy()
    except Exception as e:  # PIL raises several types for corrupt files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    if channels == 1 and not grey:
        raise ValueError(
            f"{path}: a colour image in a grey dataset (data.channels=1); set data.channels=3 for colour data"
        )
    if channels == 3 and arr.ndim == 2:
        raise ValueError(
            f"{path}: a grey image in a colour dataset (data.channels=3); "
            "a dataset is all grey or all colour (data.channels=1 for grey data)"
        )
    return arr


def _palette_is_grey(im: Image.Image) -> bool:
    palette = np.asarray(im.convert("RGB"))
    return bool((palette[..., 0] == palette[..., 1]).all() and (palette[..., 1] == palette[..., 2]).all())


def _rescale_to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise ValueError("holds NaN or infinite pixel values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        log.warning("%s: constant image (value %g)", path, lo)
        return np.zeros(arr.shape, np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def read_label(
    path: str | os.PathLike, num_classes: int, image_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Read a label-map PNG as (H, W) uint8 and check values and size.

    Raises:
        ValueError: naming the file when it is unreadable, not single-channel, holds labels
            outside ``0..num_classes-1`` or does not match ``image_shape``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mask file not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ValueError(f"mode {im.mode!r}, expected a single-channel label map (L or P)")
            arr = np.asarray(im if im.mode != "1" else im.convert("L"))
    except ValueError as e:
        raise ValueError(f"{path}: unreadable mask ({e})") from e
    except Exception as e:
        raise ValueError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from e
    bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
    if bad.size:
        raise ValueError(
            f"{path}: mask has labels {bad.tolist()[:10]} outside 0..{num_classes - 1} "
            f"(expected {num_classes} classes)"
        )
    if image_shape is not None and arr.shape != tuple(image_shape)[:2]:
        raise ValueError(f"{path}: mask size {arr.shape} does not match its image size {tuple(image_shape)}")
    return arr.astype(np.uint8)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif")


def _find_file(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Path | None:
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


class FolderSource:
    """A folder of ``images/<id>.<png|jpg|...>`` with label maps ``masks/<id>.<png|...>``.

    ``metadata.csv`` (column ``id``; optional ``split``; every other column is the image's
    metadata, e.g. ``sex, age, finding`` or ``pathology``, which prompts may use) is optional:
    without it, or without a split, an image is in ``default_split``. This is how a dataset of
    any modality, and a second real test set (another hospital), plugs in by path; labels
    ``0..k`` with ``k`` below the number of classes (e.g. lungs only) are fine.

    Args:
        root: folder path.
        class_names: label names, background first.
        name: a short name for logs and metric keys (default: the folder name).
        default_split: the split of every image when there is no ``metadata.csv`` (or no split
            in it) and no ``auto_split``.
        auto_split: ``[train, val, test]`` shares, e.g. ``[0.7, 0.1, 0.2]``: images without a
            split are divided reproducibly (ids sorted, then shuffled with seed 0) instead of all
            going to ``default_split``; for a new dataset that comes without splits. Near-duplicates
            are not grouped: give a ``split`` column when the data has them.
        require_metadata: refuse a folder without ``metadata.csv``.
        channels: 1 (grey) or 3 (colour, RGB); an image of the other kind is an error
            (:func:`read_image`).
        meta_columns: the ``metadata.csv`` columns kept as :attr:`Sample.meta` (missing ones
            as ""); None = every column but ``id`` and ``split``.

    Raises:
        FileNotFoundError: naming the folder or file that is missing.
        ValueError: naming ``metadata.csv`` when a required column is missing.
    """

    REQUIRED_COLUMNS: tuple[str, ...] = ("id",)  # rows without a split are ``default_split``

    def __init__(
        self,
        root: str | os.PathLike,
        class_names: list[str] | tuple[str, ...],
        name: str | None = None,
        default_split: str = "test",
        require_metadata: bool = False,
        channels: int = 1,
        meta_columns: Sequence[str] | None = None,
        auto_split: Sequence[float] | None = None,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
        self.channels = int(channels)
        self.meta_columns = None if meta_columns is None else tuple(str(c) for c in meta_columns)
        self.root = Path(root)
        self.name = name or self.root.name
        self.class_names = validate_class_names(class_names)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: folder not found")
        for sub in ("images", "masks"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(f"{self.root / sub}: folder not found (expected images/ and masks/)")
        meta_file = self.root / "metadata.csv"
        if meta_file.is_file():
            with open(meta_file, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                columns = reader.fieldnames or []
                missing = [c for c in self.REQUIRED_COLUMNS if c not in columns]
                if missing:
                    raise ValueError(f"{meta_file}: missing column(s) {missing}; found {columns}")
                self._rows = {row["id"]: row for row in reader}
        elif require_metadata:
            raise FileNotFoundError(f"{meta_file}: metadata.csv not found")
        else:
            stems = sorted(
                p.stem for p in (self.root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not stems:
                raise FileNotFoundError(f"{self.root / 'images'}: no images ({', '.join(IMAGE_SUFFIXES)})")
            self._rows = {stem: {"id": stem} for stem in stems}
        unsplit = sorted(sid for sid, row in self._rows.items() if not row.get("split"))
        drawn = _draw_splits(unsplit, auto_split) if auto_split is not None and unsplit else {}
        if drawn:
            log.info(
                "%s: %d images without a split divided train/val/test %s (auto_split)",
                self.name,
                len(unsplit),
                "/".join(str(len(v)) for v in drawn.values()),
            )
        self._splits: dict[str, list[str]] = {k: list(v) for k, v in drawn.items()}
        for sid, row in self._rows.items():
            if row.get("split") or not drawn:
                self._splits.setdefault(row.get("split") or default_split, []).append(sid)

    def ids(self, split: str) -> list[str]:
        """The sorted ids of ``split``.

        Raises:
            ValueError: the split holds no image.
        """
        ids = sorted(self._splits.get(split, []))
        if not ids:
            where = self.root / "metadata.csv" if (self.root / "metadata.csv").is_file() else self.root
            raise ValueError(f"{where}: split {split!r} is empty (splits present: {sorted(self._splits)})")
        return ids

    def load(self, sample_id: str) -> Sample:
        """Read ``images/<id>.*`` and ``masks/<id>.*``, with the metadata columns as ``meta``.

        Raises:
            FileNotFoundError: the image or the mask file is missing.
        """
        row = self._rows[sample_id]
        image_file = _find_file(self.root / "images", sample_id, IMAGE_SUFFIXES)
        if image_file is None:
            raise FileNotFoundError(f"{self.root / 'images' / sample_id}.png: image file not found")
        mask_file = _find_file(self.root / "masks", sample_id, MASK_SUFFIXES)
        if mask_file is None:
            raise FileNotFoundError(f"{self.root / 'masks' / sample_id}.png: mask file not found")
        image = read_image(image_file, self.channels)
        label = read_label(mask_file, len(self.class_names), image.shape)
        columns = self.meta_columns or [k for k in row if k not in ("id", "split") and k is not None]
        meta = {k: (row.get(k) or "") for k in columns}
        return Sample(id=sample_id, image=image, label=label, prompt="", source="real", meta=meta)


def _draw_splits(ids: list[str], shares: Sequence[float]) -> dict[str, list[str]]:
    """``ids`` divided into train/val/test by ``shares`` (reproducible: seed 0 on the sorted ids)."""
    shares = [float(x) for x in shares]
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6 or shares[0] == 0:
        raise ValueError(
            f"auto_split: expected [train, val, test] shares summing to 1 (train > 0), got {list(shares)}"
        )
    order = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    n_val, n_test = round(shares[1] * len(ids)), round(shares[2] * len(ids))
    n_train = len(ids) - n_val - n_test
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


class ManifestSource:
    """Any folder of image/mask PNGs described by a ``manifest.jsonl`` (see :mod:`diffmask.data.manifest`).

    Args:
        root: the folder (or its manifest file); or a list of them, read as one set (e.g. an
            EMIT-Diff set and a DiffMask set): ids are then ``<folder name>/<id>``, so sets made
            with the same ids do not collide, and ``root`` is the first folder.
        class_names: label names, background first.
        default_split: the split of rows that have no ``split`` field (``train`` for synthetic
            data, ``test`` for an external test set).
        name: a short name for logs and metric keys (default: the folder name(s), joined by +).
        min_score: drop rows whose lowest ``score_<class>`` is below this (quality filter).
        channels: 1 (grey) or 3 (colour); an image of the other kind is an error.
    """

    def __init__(
        self,
        root: str | os.PathLike | Sequence[str | os.PathLike],
        class_names: list[str] | tuple[str, ...],
        default_split: str = "train",
        name: str | None = None,
        min_score: float | None = None,
        channels: int = 1,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
        self.channels = int(channels)
        if isinstance(root, Sequence) and not isinstance(root, str):
            paths = [Path(p) for p in root]
        else:
            paths = [Path(root)]
        if not paths:
            raise ValueError("root: expected a manifest folder, or a non-empty list of them")
        folders = [p if p.is_dir() else p.parent for p in paths]
        if len(set(f.name for f in folders)) != len(folders):
            raise ValueError(
                f"root: {[str(f) for f in folders]}: two folders share a name, "
                "which would be their ids' prefix"
            )
        self.folders = folders
        self.root = folders[0]
        self.class_names = validate_class_names(class_names)
        self.name = name or "+".join(f.name for f in folders)
        if len(paths) == 1:
            rows = read_manifest(paths[0])
        else:  # one set: ids prefixed by their folder, files made absolute
            rows = [
                dataclasses.replace(
                    r,
                    id=f"{folder.name}/{r.id}",
                    file_name=str(folder.absolute() / r.file_name),
                    sem_seg_file_name=(
                        str(folder.absolute() / r.sem_seg_file_name) if r.sem_seg_file_name else None
                    ),
                    attn_file=str(folder.absolute() / r.attn_file) if r.attn_file else None,
                )
                for path, folder in zip(paths, folders, strict=True) for r in read_manifest(path)
            ]
        if min_score is not None:
            rows = [r for r in rows if not r.scores or min(r.scores.values()) >= min_score]
        self._rows: dict[str, ManifestRow] = {r.id: r for r in rows}
        self._splits: dict[str, list[str]] = {}
        for r in rows:
            self._splits.setdefault(r.split or default_split, []).append(r.id)

    def rows(self) -> list[ManifestRow]:
        """Every manifest row kept (after the ``min_score`` filter), in manifest order."""
        return list(self._rows.values())

    def class_presence(self, ids: list[str] | None = None) -> dict[str, float]:
        """For each foreground class, the share of labelled rows whose mask holds at least one pixel of it.

        Reads the masks of ``ids`` (default: every row); ``{}`` when no row has a mask. An
        undertrained generator's attention masks are mostly background: presence near 0.
        """
        rows = [self._rows[i] for i in (self._rows if ids is None else ids)]
        labelled = [r for r in rows if r.sem_seg_file_name]
        if not labelled:
            return {}
        counts = np.zeros(len(self.class_names), np.int64)
        for r in labelled:
            label = read_label(self._resolve(r.sem_seg_file_name), len(self.class_names))
            counts += np.bincount(label.ravel(), minlength=len(self.class_names))[: len(self.class_names)] > 0
        return {
            name: float(c) / len(labelled)
            for name, c in zip(self.class_names[1:], counts[1:], strict=True)
        }

    def ids(self, split: str) -> list[str]:
        """The ids of ``split`` in manifest order (rows without a split are ``default_split``).

        Raises:
            ValueError: the split holds no row.
        """
        ids = self._splits.get(split, [])
        if not ids:
            raise ValueError(
                f"{self.root / 'manifest.jsonl'}: split {split!r} is empty "
                f"(splits present: {sorted(self._splits)})"
            )
        return list(ids)

    def _resolve(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.root / path

    def load(self, sample_id: str) -> Sample:
        """Read one row's image and label map (None for a row without ``sem_seg_file_name``)."""
        row = self._rows[sample_id]
        image = read_image(self._resolve(row.file_name), self.channels)
        label = None
        if row.sem_seg_file_name:
            label = read_label(self._resolve(row.sem_seg_file_name), len(self.class_names), image.shape)
        meta = {k: "" if v is None else str(v) for k, v in row.meta.items()}
        return Sample(id=row.id, image=image, label=label, prompt=row.prompt, source=row.source, meta=meta)


class DrawnSource:
    """Base of the procedurally drawn sources (phantoms): named splits of ``<split><index>`` ids
    and a random generator per sample, deterministic per (seed, id). Subclasses draw in ``load``.

    Args:
        name: the source's name (metric keys, logs).
        counts: images per split, e.g. ``{"train": 48, "val": 12, "test": 12}``.
        seed: base seed.
    """

    def __init__(self, name: str, counts: dict[str, int], seed: int):
        self.name = name
        self.seed = check_seed(seed, f"seed ({name})")
        self._splits = {s: [f"{s}{i:04d}" for i in range(n)] for s, n in counts.items()}

    def ids(self, split: str) -> list[str]:
        """The ids of ``split``; a ValueError naming the split sizes when it is empty."""
        ids = self._splits.get(split, [])
        if not ids:
            sizes = {k: len(v) for k, v in self._splits.items()}
            raise ValueError(f"{self.name}: split {split!r} is empty (sizes: {sizes})")
        return list(ids)

    def sample_rng(self, sample_id: str, *salt: int) -> np.random.Generator:
        """The generator of one sample: from the seed, the split and the index in ``sample_id``."""
        split = sample_id.rstrip("0123456789")
        index = int(sample_id[len(split):])
        return np.random.default_rng([self.seed, SPLITS.index(split) if split in SPLITS else 9, index, *salt])


def open_test_set(
    path: str | os.PathLike,
    class_names: list[str] | tuple[str, ...],
    name: str | None = None,
    channels: int = 1,
) -> SampleSource:
    """An external test set by path: a manifest folder (or file), or an ``images/`` + ``masks/`` folder.

    Rows / images without a split count as ``test``; ``channels`` as the training data's.
    """
    path = Path(path)
    if path.is_file() or (path / "manifest.jsonl").is_file():
        return ManifestSource(path, class_names, default_split="test", name=name, channels=channels)
    if (path / "images").is_dir():
        return FolderSource(path, class_names, name=name, default_split="test", channels=channels)
    raise FileNotFoundError(
        f"{path}: not a test set (expected a manifest.jsonl, or images/ and masks/ folders with "
        "optional metadata.csv)"
    )
