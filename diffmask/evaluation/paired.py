"""Paired comparison of two training recipes on the same test images: a bootstrap interval.

Each segmentation run writes ``per_image.csv``: one row per test image and test set, ``set, id,
iou_<class>..., dice_<class>...`` with the per-image scores of :mod:`diffmask.evaluation.metrics`
(where the image's ground truth lacks a class: 1 when the prediction lacks it too, 0 when it
paints it). A cell is empty only for a class that the row's test set never labels. Files written
before that rule have no ``dice_`` columns and an empty cell wherever the image lacked the class;
they are still read, and such cells are left out as they were.

Two recipes (each one run or several seeds) are compared per test set on the images they share:

1. per recipe, each image's per-class score (IoU, or Dice with ``metric="dice"``) is averaged
   over its runs (seeds);
2. the set's mean score is the mean over classes of the mean over images, as the test metric
   (``miou`` / ``mdice``) is; a class is counted on an image where both recipes score it;
3. the images are resampled with replacement ``n_boot`` times, the same draw for both recipes
   (paired), and the 2.5 / 97.5 percentiles of the difference give a 95 % interval.

The interval covers the choice of test images, not the seeds (averaged in step 1): with three
seeds, report the seeds' standard deviation beside it (``diffmask-report``). A difference is
called real when the interval excludes 0.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from diffmask.artifacts import atomic_write_text

__all__ = [
    "METRICS",
    "PER_IMAGE_FILE",
    "PairedComparison",
    "compare_recipes",
    "comparison_markdown",
    "comparison_rows",
    "paired_bootstrap",
    "read_per_image",
    "write_comparison",
    "write_per_image",
    "write_rows_csv",
]

PER_IMAGE_FILE = "per_image.csv"


METRICS = ("iou", "dice")


def write_per_image(path: str | os.PathLike, rows: list[dict], class_names: Sequence[str]) -> Path:
    """Atomically write per-image rows ``{set, id, iou_<class>, dice_<class>}`` as CSV.

    Args:
        path: the file to write.
        rows: one dict per image (e.g. :attr:`SegmentationLitModule.per_image`); a NaN or a
            missing score is written as an empty cell, other keys are left out.
        class_names: class names, background (no column) first.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fields = ["set", "id", *(f"{m}_{c}" for m in METRICS for c in class_names[1:])]
    return write_rows_csv(path, rows, fields)


def write_rows_csv(path: str | os.PathLike, rows: Sequence[Mapping], fields: Sequence[str]) -> Path:
    """Atomically write ``rows`` as CSV with the columns ``fields`` (other keys left out; a NaN or
    a missing value as an empty cell): the per-image files of training and of the mask stage.

    Args:
        path: the file.
        rows: the rows (mappings of column -> value).
        fields: the columns, in order.

    Returns:
        The path written.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return atomic_write_text(path, buf.getvalue())


def read_per_image(path: str | os.PathLike, metric: str = "iou") -> dict[str, dict[str, dict[str, float]]]:
    """One score of a ``per_image.csv``, per set, image and class.

    Args:
        path: the file (written by :func:`write_per_image`, or before it wrote Dice).
        metric: ``iou`` or ``dice`` (the ``<metric>_<class>`` columns).

    Returns:
        ``{set: {id: {class: score}}}``; empty cells (a class not scored there) are left out.

    Raises:
        ValueError: naming ``metric`` when it is unknown or the file has no such column (a file
            from before Dice was written asked for ``dice``), or naming the file and line of a
            cell that is not a number.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
    path = Path(path)
    prefix = f"{metric}_"
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"set", "id"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns set, id, iou_<class>...; found {reader.fieldnames}")
        if not any(k.startswith(prefix) for k in reader.fieldnames):
            raise ValueError(
                f"metric: {path} has no {prefix}<class> columns (found {reader.fieldnames}); files written "
                "before per-image Dice hold IoU only"
            )
        for line, row in enumerate(reader, 2):
            try:
                scores = {
                    k[len(prefix):]: float(v) for k, v in row.items()
                    if k and k.startswith(prefix) and v not in ("", None)
                }
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from e
            out[row["set"]][row["id"]] = scores
    return dict(out)


def _find_runs(folders: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            files.append(folder)
            continue
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: run folder not found")
        found = sorted(folder.rglob(PER_IMAGE_FILE))
        if not found:
            raise FileNotFoundError(
                f"{folder}: no {PER_IMAGE_FILE} below this folder (runs from before it was written?)"
            )
        files.extend(found)
    return files


def _seed_mean(files: list[Path], test_set: str, metric: str = "iou") -> dict[str, dict[str, float]]:
    """Each image's per-class score averaged over the runs that scored it."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for f in files:
        for sid, scores in read_per_image(f, metric).get(test_set, {}).items():
            for cls, v in scores.items():
                sums[sid][cls].append(v)
    return {sid: {c: float(np.mean(v)) for c, v in per.items()} for sid, per in sums.items()}


def _miou(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """mIoU over the last-but-one axis of images: (..., N, C) -> (...)."""
    counts = present.sum(-2)
    means = np.where(counts > 0, (values * present).sum(-2) / np.maximum(counts, 1), np.nan)
    return np.nanmean(means, -1)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Bootstrap of ``mIoU(a) - mIoU(b)`` over images, both resampled with the same draws.

    Args:
        a: (N, C) per-image, per-class scores (IoU or Dice) of one recipe on N images; NaN where a
            class is not scored on an image (counted where neither ``a`` nor ``b`` is NaN).
        b: the other recipe's, on the same N images.
        n_boot: bootstrap draws.
        seed: seed of the draws.

    Returns:
        ``miou_a``, ``miou_b`` (the mean scores: mIoU, or mDice for Dice inputs), ``diff``,
        ``ci_low``, ``ci_high`` (95 %), ``p`` (two-sided: twice
        the smaller share of draws on either side of 0).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N, C) arrays of one shape, got {a.shape} and {b.shape}")
    present = ~np.isnan(a) & ~np.isnan(b)
    a0, b0 = np.where(present, a, 0.0), np.where(present, b, 0.0)
    idx = np.random.default_rng(seed).integers(0, a.shape[0], size=(n_boot, a.shape[0]))
    diffs = _miou(a0[idx], present[idx]) - _miou(b0[idx], present[idx])
    miou_a, miou_b = float(_miou(a0, present)), float(_miou(b0, present))
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    p = 2 * min(float(np.mean(diffs <= 0)), float(np.mean(diffs >= 0)))
    return {"miou_a": miou_a, "miou_b": miou_b, "diff": miou_a - miou_b, "ci_low": float(lo),
            "ci_high": float(hi),
            "p": min(1.0, p)}


@dataclass
class PairedComparison:
    """One test set's comparison of recipe A against recipe B."""

    test_set: str
    n_images: int
    n_runs_a: int
    n_runs_b: int
    miou_a: float
    miou_b: float
    diff: float
    ci_low: float
    ci_high: float
    p: float

    @property
    def real(self) -> bool:
        """The 95 % interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def compare_recipes(
    runs_a: Sequence[str | os.PathLike],
    runs_b: Sequence[str | os.PathLike],
    test_sets: Sequence[str] | None = None,
    n_boot: int = 10000,
    seed: int = 0,
    metric: str = "iou",
) -> list[PairedComparison]:
    """Compare recipe A (its runs: folders searched for ``per_image.csv``, or the files) with B.

    Only images scored by both recipes count; a test set one recipe lacks is left out.

    Args:
        runs_a: recipe A's run folders or ``per_image.csv`` files.
        runs_b: recipe B's.
        test_sets: compare only these sets (default: every set both recipes scored).
        n_boot: bootstrap draws.
        seed: seed of the draws.
        metric: ``iou`` (``miou_a``/``miou_b`` are mIoU) or ``dice`` (they are mDice).

    Returns:
        One :class:`PairedComparison` per test set.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {list(METRICS)}, got {metric!r}")
    files_a, files_b = _find_runs(runs_a), _find_runs(runs_b)
    sets_a = {s for f in files_a for s in read_per_image(f, metric)}
    sets_b = {s for f in files_b for s in read_per_image(f, metric)}
    names = [s for s in (test_sets or sorted(sets_a & sets_b)) if s in sets_a and s in sets_b]
    if not names:
        raise ValueError(f"no test set scored by both recipes (A: {sorted(sets_a)}, B: {sorted(sets_b)})")
    return [_compare_set(name, files_a, files_b, n_boot, seed, metric) for name in names]


def _compare_set(name: str, files_a: list[Path], files_b: list[Path], n_boot: int, seed: int,
                 metric: str) -> PairedComparison:
    """One test set's comparison: the images both recipes scored, seeds averaged per image."""
    a, b = _seed_mean(files_a, name, metric), _seed_mean(files_b, name, metric)
    ids = sorted(set(a) & set(b))
    classes = sorted({c for sid in ids for c in (*a[sid], *b[sid])})
    arr_a = np.array([[a[sid].get(c, np.nan) for c in classes] for sid in ids])
    arr_b = np.array([[b[sid].get(c, np.nan) for c in classes] for sid in ids])
    stats = paired_bootstrap(arr_a, arr_b, n_boot, seed)
    return PairedComparison(name, len(ids), len(files_a), len(files_b), **stats)


def comparison_markdown(results: list[PairedComparison], name_a: str = "A", name_b: str = "B") -> str:
    """A table: one row per test set, the difference A - B with its 95 % interval and whether it is real.

    Args:
        results: :func:`compare_recipes`'s results.
        name_a: recipe A's name.
        name_b: recipe B's name.
    """
    lines = [
        f"| test set | images | {name_a} (runs) | {name_b} (runs) | {name_a} - {name_b} | 95 % interval "
        "| p | real? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.test_set} | {r.n_images} | {r.miou_a:.4f} ({r.n_runs_a}) "
            f"| {r.miou_b:.4f} ({r.n_runs_b}) | "
            f"{r.diff:+.4f} | [{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {r.p:.3f} | {'yes' if r.real else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def comparison_rows(results: list[PairedComparison]) -> list[dict]:
    """The results as JSON-ready rows (every field and ``real``).

    Args:
        results: :func:`compare_recipes`'s results.
    """
    return [{**asdict(r), "real": r.real} for r in results]


def write_comparison(out: str | os.PathLike, results: list[PairedComparison], a: Sequence[str],
                     b: Sequence[str], name_a: str, name_b: str, n_boot: int, metric: str) -> Path:
    """Write a comparison as markdown (a heading, the method, :func:`comparison_markdown`'s table) and,
    beside it with the suffix ``.json``, its sides and :func:`comparison_rows`.

    Args:
        out: the markdown file.
        results: :func:`compare_recipes`'s results.
        a: recipe A's run folders (or ``per_image.csv`` files).
        b: recipe B's.
        name_a: recipe A's name.
        name_b: recipe B's name.
        n_boot: the bootstrap draws the results were made with.
        metric: the per-image score compared (``iou`` or ``dice``).

    Returns:
        The markdown file's path.
    """
    out = Path(out)
    table = comparison_markdown(results, name_a, name_b)
    atomic_write_text(out, f"# {name_a} vs {name_b}\n\npaired bootstrap over test images, "
                           f"{n_boot} draws, per-image {metric}; runs averaged per image\n\n" + table)
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        {"a": a, "b": b, "name_a": name_a, "name_b": name_b, "metric": metric,
         "results": comparison_rows(results)}, indent=2) + "\n")
    return out
