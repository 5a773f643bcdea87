"""Check a dataset folder (``images/`` + ``masks/`` + optional ``metadata.csv``) before anything trains.

Every file is read once and every problem is collected (one bad file does not stop the scan).
Each problem names its file and what was expected; errors are what would break training or
falsify a result (unreadable files, wrong labels or sizes, a class the masks never hold, a test
image whose exact twin is in training), warnings are what a user should look at.

    report = check_folder("../shared/data/busi", ["background", "lesion"], optional_classes=["lesion"])
    print(report.summary())
    report.ok  # no error
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffmask.data.sources import IMAGE_SUFFIXES, MASK_SUFFIXES, _find_file
from diffmask.labels import validate_class_names

__all__ = [
    "ERROR",
    "WARNING",
    "Problem",
    "CheckReport",
    "check_folder",
    "positional_folder",
]

ERROR = "error"
WARNING = "warning"
STANDARD_SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = "test"  # FolderSource's split of an image without a metadata split
MAX_LISTED = 5  # ids named in one problem line
GREY, COLOUR, RGB_EQUAL = "grey", "colour", "rgb_equal"
GREY_MODES = ("1", "L", "LA", "I", "F")  # plus "I;16*"
MASK_MODES = ("L", "P", "I", "I;16", "1")  # what read_label accepts


@dataclass
class Problem:
    """One finding.

    Attributes:
        level: ``"error"`` or ``"warning"``.
        file: the file (or config field) it is about.
        message: what is wrong and what was expected.
    """

    level: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper():7s} {self.file}: {self.message}"


@dataclass
class _ImageInfo:
    split: str | None  # None: not in metadata.csv
    shape: tuple[int, int] | None = None  # (H, W); None: unreadable
    kind: str | None = None  # GREY, COLOUR or RGB_EQUAL
    digest: str | None = None
    classes: frozenset[int] | None = None  # label values of its mask; None: no usable mask
    mask_digest: str | None = None


@dataclass
class CheckReport:
    """What :func:`check_folder` found.

    Attributes:
        folder: the checked folder.
        class_names: the expected classes, background first.
        channels: the expected image channels (1 grey, 3 colour).
        optional_classes: classes allowed to be absent from a mask.
        splits: number of images per split (images listed in ``metadata.csv``, or every image without one).
        num_images: image files found in ``images/``.
        sizes: ``min_h``, ``max_h``, ``min_w``, ``max_w``, ``non_square`` over readable images.
        channels_found: readable images per kind: ``grey``, ``colour``, ``rgb_equal`` (RGB with
            three equal channels).
        presence: split (and ``all``) -> foreground class -> share of that split's masks holding it.
        masks_checked: split (and ``all``) -> number of masks whose labels were read.
        absent: foreground class -> number of masks without it.
        label_values: every label value found in a mask.
        duplicates: groups of ids of images with the same pixels.
        problems: every error and warning, in the order found.
    """

    folder: str
    class_names: list[str]
    channels: int
    optional_classes: list[str]
    splits: dict[str, int] = field(default_factory=dict)
    num_images: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    channels_found: dict[str, int] = field(default_factory=dict)
    presence: dict[str, dict[str, float]] = field(default_factory=dict)
    masks_checked: dict[str, int] = field(default_factory=dict)
    absent: dict[str, int] = field(default_factory=dict)
    label_values: list[int] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems of level ``error``."""
        return [p for p in self.problems if p.level == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of level ``warning``."""
        return [p for p in self.problems if p.level == WARNING]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings alone are fine)."""
        return not self.errors

    def add(self, level: str, file: str | os.PathLike, message: str) -> None:
        """Record one problem.

        Args:
            level: ``"error"`` or ``"warning"``.
            file: the file or config field it is about.
            message: what is wrong and what was expected.
        """
        self.problems.append(Problem(level, str(file), message))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with ``ok`` and the error and warning counts.

        Returns:
            A dict of plain lists, dicts, strings and numbers.
        """
        data = asdict(self)
        data.update(ok=self.ok, num_errors=len(self.errors), num_warnings=len(self.warnings))
        return data

    def summary(self) -> str:
        """The printed summary: counts, sizes, channels, class presence, label values, then each problem.

        Returns:
            Multi-line text.
        """
        fg = self.class_names[1:]
        opt = f" (optional: {', '.join(self.optional_classes)})" if self.optional_classes else ""
        lines = [
            f"dataset: {self.folder}",
            f"expected: classes {', '.join(self.class_names)}{opt}; channels {self.channels} "
            f"({'grey' if self.channels == 1 else 'colour'})",
            f"images: {self.num_images} files; per split: "
            + (", ".join(f"{s} {n}" for s, n in self.splits.items()) or "none"),
        ]
        if self.sizes:
            s = self.sizes
            lines.append(f"sizes: H {s['min_h']}..{s['max_h']}, W {s['min_w']}..{s['max_w']}; "
                         f"{s['non_square']} not square")
        c = self.channels_found
        lines.append(f"channels found: grey {c.get(GREY, 0)}, colour {c.get(COLOUR, 0)}, "
                     f"RGB with equal channels {c.get(RGB_EQUAL, 0)}")
        if self.presence:
            width = max(len(n) for n in fg) + 2
            lines.append("class presence (share of masks holding the class):")
            lines.append(f"  {'split':8s}{'masks':>7s}  " + "".join(f"{n:>{width}s}" for n in fg))
            for split, shares in self.presence.items():
                lines.append(f"  {split:8s}{self.masks_checked[split]:7d}  "
                             + "".join(f"{shares[n]:>{width}.3f}" for n in fg))
            lines.append("masks without the class: " + ", ".join(
                f"{n} {self.absent[n]}{' (optional)' if n in self.optional_classes else ''}" for n in fg))
        lines.append(f"label values found: {self.label_values}")
        if self.duplicates:
            lines.append(f"exact duplicates: {len(self.duplicates)} groups, "
                         f"{sum(len(g) for g in self.duplicates)} images")
        lines.append(f"errors: {len(self.errors)}, warnings: {len(self.warnings)}")
        lines.extend(str(p) for p in self.problems)
        return "\n".join(lines)


def positional_folder(args: Sequence[str]) -> list[str]:
    """Turn a first command-line argument that is not a Hydra override into ``folder=<it>``.

    Args:
        args: the arguments after the program name.

    Returns:
        The arguments, the first one rewritten when it has no ``=`` and is not a flag.
    """
    args = list(args)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"folder={args[0]}"
    return args


def _listed(ids: Sequence[str]) -> str:
    more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return ", ".join(ids[:MAX_LISTED]) + more


def _stems(folder: Path, suffixes: tuple[str, ...], what: str, report: CheckReport) -> dict[str, Path]:
    """Files of ``folder`` by stem, the one the loaders pick (suffix order); warns about the rest."""
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix.lower() in suffixes:
            by_stem[p.stem].append(p)
        else:
            report.add(WARNING, p, f"ignored: not {'an' if what == 'image' else 'a'} {what} file "
                                    f"(expected {', '.join(suffixes)})")
    chosen: dict[str, Path] = {}
    for stem, files in by_stem.items():
        pick = _find_file(folder, stem, suffixes)
        if pick is None:
            report.add(ERROR, files[0], f"suffix {files[0].suffix!r} is not found by the loaders "
                                        f"(expected lower or upper case: {', '.join(suffixes)})")
            continue
        chosen[stem] = pick
        if len(files) > 1:
            others = ", ".join(f.name for f in files if f != pick)
            report.add(
                WARNING, pick, f"several {what} files for id {stem!r}: {pick.name} is read, {others} ignored"
            )
    return chosen


def _read_metadata(root: Path, report: CheckReport) -> tuple[dict[str, str] | None, bool]:
    """``metadata.csv`` as id -> split ("" when the row has none); None without a usable file.

    Returns (rows, has_split_column).
    """
    meta = root / "metadata.csv"
    if not meta.is_file():
        return None, False
    try:
        with open(meta, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "id" not in columns:
                report.add(ERROR, meta, f"missing column 'id' (found {columns}); expected a column 'id' "
                                        "naming each image without its suffix")
                return None, False
            rows: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                sid = (row.get("id") or "").strip()
                if not sid:
                    report.add(ERROR, meta, f"line {line}: empty id")
                elif sid in rows:
                    report.add(
                        ERROR, meta, f"line {line}: id {sid!r} is listed twice; expected one row per image"
                    )
                else:
                    rows[sid] = (row.get("split") or "").strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        report.add(
            ERROR, meta, f"unreadable ({type(e).__name__}: {e}); expected a UTF-8 CSV with a column 'id'"
        )
        return None, False
    return rows, "split" in columns


def _digest(arr: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.shape}{arr.dtype}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _image_info(path: Path, info: _ImageInfo, report: CheckReport) -> None:
    """Read one image: its size, channel kind and pixel digest (an error naming it if unreadable)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in GREY_MODES or mode.startswith("I;16"):
                arr = np.asarray(im.getchannel(0) if mode == "LA" else im)
                kind = GREY
            else:
                rgb = np.asarray(im.convert("RGB"))
                equal = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
                kind, arr = (RGB_EQUAL, rgb[..., 0]) if equal else (COLOUR, rgb)
    except Exception as e:  # PIL raises several types for corrupt files
        report.add(ERROR, path, f"unreadable image ({type(e).__name__}: {e}); expected a readable "
                                f"{'/'.join(s.lstrip('.') for s in IMAGE_SUFFIXES)} file")
        return
    if arr.dtype == np.float32 and not np.isfinite(arr).all():
        report.add(ERROR, path, "holds NaN or infinite pixel values; expected finite values")
    info.shape = (int(arr.shape[0]), int(arr.shape[1]))
    info.kind = kind
    info.digest = _digest(arr)
    want = report.channels
    if kind == COLOUR and want == 1:
        report.add(
            ERROR,
            path,
            "colour image (3 different channels) where grey images (channels 1) are expected; "
            "the loader would drop its colour (set data.channels=3 if the data is colour)",
        )
    elif kind != COLOUR and want == 3:
        if kind == RGB_EQUAL:
            what = "RGB image with three equal channels (counts as grey)"
        else:
            what = f"grey image ({mode})"
        report.add(
            ERROR,
            path,
            f"{what} where colour images (channels 3) are expected (set data.channels=1 if the data is grey)",
        )


def _mask_info(path: Path, info: _ImageInfo, num_classes: int, report: CheckReport) -> np.ndarray | None:
    """Read one mask's label values (counts per value).

    Errors name the mask when it is unreadable, off-size or off-range.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                report.add(ERROR, path, f"mode {im.mode!r}; expected a single-channel label map (L or P) "
                                        f"with values 0..{num_classes - 1}")
                return None
            arr = np.asarray(im.convert("L") if im.mode == "1" else im)
    except Exception as e:
        report.add(ERROR, path, f"unreadable mask ({type(e).__name__}: {e}); expected a PNG label map")
        return None
    if info.shape is not None and arr.shape != info.shape:
        report.add(ERROR, path, f"mask size {arr.shape[0]}x{arr.shape[1]} (HxW) does not match its image's "
                                f"{info.shape[0]}x{info.shape[1]}")
    if arr.dtype == np.uint8:
        counts = np.bincount(arr.ravel(), minlength=256)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(arr)
    bad = [int(v) for v in values if v < 0 or v >= num_classes]
    if bad:
        hint = " (0/255 masks? store class k as value k)" if 255 in bad else ""
        report.add(
            ERROR,
            path,
            f"label values {bad[:10]} outside 0..{num_classes - 1}; expected one value per "
            f"class of {report.class_names}{hint}",
        )
    info.classes = frozenset(int(v) for v in values)
    info.mask_digest = _digest(arr)
    return values


def _split_checks(rows: dict[str, str] | None, has_split: bool, required: Sequence[str], known: set[str],
                  root: Path, report: CheckReport) -> None:
    meta = root / "metadata.csv"
    if rows is None or not has_split:
        if set(required) - {DEFAULT_SPLIT}:
            what = "split column" if rows is not None else "metadata.csv"
            report.add(WARNING, meta if rows is not None else root,
                       f"no {what}: every image is in split {DEFAULT_SPLIT!r}; expected a 'split' column "
                       f"({'/'.join(required)}) to train on this folder "
                       "(fine for a test-only set: splits=[test])")
        return
    by_value: dict[str, list[str]] = defaultdict(list)
    for sid, split in rows.items():
        if split not in known:
            by_value[split].append(sid)
    for value, ids in by_value.items():
        if value:
            report.add(ERROR, meta, f"unknown split {value!r} in {len(ids)} rows (ids {_listed(ids)}); "
                                    f"expected one of {sorted(known)}")
        else:
            report.add(
                WARNING,
                meta,
                f"empty split in {len(ids)} rows (ids {_listed(ids)}), read as {DEFAULT_SPLIT!r}",
            )
    for split in required:
        if not report.splits.get(split):
            report.add(ERROR, meta, f"split {split!r} is empty (splits present: {sorted(report.splits)}); "
                                    "expected images in every split the config uses")


def _class_checks(infos: dict[str, _ImageInfo], masks: dict[str, Path], report: CheckReport) -> None:
    names = report.class_names
    checked = {sid: inf for sid, inf in infos.items() if inf.classes is not None}
    by_split: dict[str, list[_ImageInfo]] = defaultdict(list)
    for inf in checked.values():
        by_split[inf.split or "unlisted"].append(inf)
    groups = [*sorted(by_split.items(), key=lambda kv: _split_order(kv[0])), ("all", list(checked.values()))]
    for split, group in groups:
        report.masks_checked[split] = len(group)
        report.presence[split] = {
            n: (sum(k in inf.classes for inf in group) / len(group) if group else 0.0)
            for k, n in enumerate(names) if k > 0
        }
    for k, name in enumerate(names):
        if k == 0:
            continue
        without = sorted(sid for sid, inf in checked.items() if k not in inf.classes)
        report.absent[name] = len(without)
        if not checked:
            continue
        if len(without) == len(checked):
            report.add(
                ERROR,
                f"data.class_names[{k}]",
                f"class {name!r} (label {k}) is in no mask; the config asks for "
                "a class the masks never hold (check data.class_names)",
            )
        elif without and name not in report.optional_classes:
            files = [masks[sid].name for sid in without]
            report.add(WARNING, masks[without[0]].parent,
                       f"class {name!r} is absent from {len(without)} of {len(checked)} masks "
                       f"({_listed(files)}); expected in every mask unless listed in data.optional_classes")


def _split_order(split: str) -> tuple[int, str]:
    return (STANDARD_SPLITS.index(split) if split in STANDARD_SPLITS else len(STANDARD_SPLITS), split)


def _duplicate_checks(infos: dict[str, _ImageInfo], images: dict[str, Path], train: str, test: str,
                      report: CheckReport) -> None:
    groups: dict[str, list[str]] = defaultdict(list)
    for sid, inf in infos.items():
        if inf.digest is not None:
            groups[inf.digest].append(sid)
    for ids in groups.values():
        if len(ids) < 2:
            continue
        ids = sorted(ids)
        report.duplicates.append(ids)
        splits = sorted({infos[i].split or "unlisted" for i in ids}, key=_split_order)
        files = ", ".join(f"{images[i].name} ({infos[i].split or 'unlisted'})" for i in ids)
        first = images[ids[0]]
        if len({infos[i].mask_digest for i in ids}) > 1:
            files += "; their masks differ (two labellings of one image)"
        if train in splits and test in splits:
            report.add(ERROR, first, f"leak: exact duplicate images straddle {train} and {test}: {files}; "
                                     "expected each image (or its twin) in one split only")
        elif len(splits) > 1:
            report.add(
                WARNING, first, f"leak: exact duplicate images across splits {', '.join(splits)}: {files}"
            )
        else:
            report.add(WARNING, first, f"exact duplicate images (same pixels): {files}")


def check_folder(
    root: str | os.PathLike,
    class_names: Sequence[str],
    channels: int = 1,
    optional_classes: Sequence[str] = (),
    splits: Sequence[str] = STANDARD_SPLITS,
    train_split: str = "train",
    test_split: str = "test",
) -> CheckReport:
    """Check a dataset folder: files, labels, sizes, channels, metadata, splits, classes, duplicates.

    Args:
        root: the folder with ``images/``, ``masks/`` and optionally ``metadata.csv``.
        class_names: label names, background first (label k is ``class_names[k]``).
        channels: expected image channels: 1 (grey) or 3 (colour).
        optional_classes: foreground classes allowed to be absent from a mask (e.g. a lesion);
            every other foreground class is expected in every mask.
        splits: split names that must hold images (train, val, test; e.g. ``["test"]`` for a
            test-only set).
        train_split, test_split: the splits an exact duplicate must not straddle (an error).

    Returns:
        The :class:`CheckReport`; ``report.ok`` is False when any error was found.

    Raises:
        ValueError: naming the argument when ``class_names``, ``channels``, ``optional_classes``
            or ``splits`` is invalid (a config error, not a data problem).
    """
    names = list(validate_class_names(list(class_names), "data.class_names"))
    if channels not in (1, 3):
        raise ValueError(f"data.channels: expected 1 (grey) or 3 (colour), got {channels!r}")
    unknown = [c for c in optional_classes if c not in names[1:]]
    if unknown:
        raise ValueError(f"data.optional_classes: {unknown} are not foreground classes of {names}")
    splits = [str(s) for s in splits]
    if not splits:
        raise ValueError("splits: expected at least one split name")
    root = Path(root)
    report = CheckReport(str(root), names, int(channels), [str(c) for c in optional_classes])
    for sub in ("", "images", "masks"):
        if not (root / sub).is_dir():
            report.add(ERROR, root / sub, "folder not found; expected a folder with images/ and masks/ "
                                          "(and optionally metadata.csv)")
            return report
    images = _stems(root / "images", IMAGE_SUFFIXES, "image", report)
    masks = _stems(root / "masks", MASK_SUFFIXES, "mask", report)
    report.num_images = len(images)
    if not images:
        report.add(ERROR, root / "images", f"no images; expected files {', '.join(IMAGE_SUFFIXES)}")
    rows, has_split = _read_metadata(root, report)
    infos: dict[str, _ImageInfo] = {}
    for sid in sorted(images):
        split = (rows.get(sid, None) if rows is not None else "")
        if split is not None:
            split = split if has_split and split else DEFAULT_SPLIT
        infos[sid] = _ImageInfo(split=split)
    if rows is not None:
        for sid in rows:
            if sid not in images:
                report.add(
                    ERROR,
                    root / "metadata.csv",
                    f"id {sid!r} has no image; expected "
                    f"{root / 'images' / sid}.png (or {', '.join(IMAGE_SUFFIXES[1:])})",
                )
        unlisted = sorted(set(images) - set(rows))
        if unlisted:
            report.add(WARNING, root / "metadata.csv",
                       f"{len(unlisted)} images have no row and are not used: "
                       f"{_listed([images[i].name for i in unlisted])}; expected a row per image")
    for inf in infos.values():
        if inf.split is not None:
            report.splits[inf.split] = report.splits.get(inf.split, 0) + 1
    report.splits = dict(sorted(report.splits.items(), key=lambda kv: _split_order(kv[0])))

    values: set[int] = set()
    for sid, inf in infos.items():
        _image_info(images[sid], inf, report)
        mask = masks.get(sid)
        if mask is None:
            report.add(ERROR, images[sid], f"no mask; expected {root / 'masks' / sid}.png")
            continue
        found = _mask_info(mask, inf, len(names), report)
        if found is not None:
            values.update(int(v) for v in found)
    for sid in sorted(set(masks) - set(images)):
        report.add(WARNING, masks[sid], f"mask without an image; expected {root / 'images' / sid}.png")
    report.label_values = sorted(values)

    readable = [inf for inf in infos.values() if inf.shape is not None]
    if readable:
        hs, ws = [i.shape[0] for i in readable], [i.shape[1] for i in readable]
        report.sizes = {"min_h": min(hs), "max_h": max(hs), "min_w": min(ws), "max_w": max(ws),
                        "non_square": sum(h != w for h, w in zip(hs, ws, strict=True))}
    for kind in (GREY, COLOUR, RGB_EQUAL):
        report.channels_found[kind] = sum(inf.kind == kind for inf in readable)

    known = set(STANDARD_SPLITS) | set(splits) | {train_split, test_split}
    _split_checks(rows, has_split, splits, known, root, report)
    _class_checks(infos, masks, report)
    _duplicate_checks(infos, images, train_split, test_split, report)
    return report
