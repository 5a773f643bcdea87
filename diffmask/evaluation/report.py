"""Collect ``metrics.json`` files of a sweep into a results table (mean ± std over seeds) and plots.

Runs trained on a synthetic set (``metrics.json`` ``data.synthetic_dir``) show the set's label
fidelity (its ``stage.json`` ``label_fidelity.miou``, written by ``diffmask-fidelity --write``;
:mod:`diffmask.evaluation.fidelity`) in a ``label fidelity`` column, blank where the set has none.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffmask.artifacts import atomic_write_bytes, atomic_write_text

__all__ = ["RunRecord", "collect_runs", "summarise", "write_report"]

log = logging.getLogger(__name__)

# overrides that distinguish repeats, not conditions
REPEAT_KEYS = ("seed", "data.seed")
# a fine-tuning run's starting checkpoint: its path differs per repeat, its source run's condition does not
INIT_KEY = "segmentation.init_weights"


@dataclass
class RunRecord:
    """One run: where it is, its condition (overrides minus seeds) and its flat metrics."""

    path: Path
    condition: str
    real: str  # the real data it saw: "jsrt", or "phantom" when data=auto found no JSRT folder
    backbone: str
    real_fraction: float | None
    n_real: int | None
    n_synthetic: int | None
    seed: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    label_fidelity: float | None = None  # the mIoU recorded in its synthetic set's stage.json, if any


def _condition(overrides: list[str], seed: int | None = None) -> str:
    kept = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in REPEAT_KEYS:
            continue
        if key == INIT_KEY and value not in ("", "null"):
            # a multirun's 'segmentation.init_weights=<pretrain sweep>/${seed}' names one run per seed
            # Hydra records a multirun's interpolations escaped: $\{seed\}
            value = value.replace("$\\{", "${").replace("\\}", "}")
            o = f"{key}=[{_source_condition(value.replace('${seed}', str(seed)))}]"
        kept.append(o)
    return " ".join(sorted(kept)) or "(defaults)"


def _source_condition(checkpoint: str) -> str:
    """The condition of the run that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt`` or ``<run>``), else its path."""
    path = Path(checkpoint)
    source = (path if path.is_dir() else path.parent.parent) / "metrics.json"
    try:
        return _condition(list(json.loads(source.read_text()).get("overrides", [])))
    except (OSError, json.JSONDecodeError):
        return checkpoint


def collect_runs(sweep_dir: str | Path, skip_bad: bool = False) -> tuple[list[RunRecord], dict[Path, str]]:
    """Every ``metrics.json`` under ``sweep_dir`` (recursively), as :class:`RunRecord` rows.

    Args:
        sweep_dir: the folder to search.
        skip_bad: log a corrupt or foreign ``metrics.json`` and carry on, instead of stopping at it.

    Returns:
        (runs, bad files -> why; empty unless ``skip_bad``).
    """
    root = Path(sweep_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: sweep folder not found")
    runs, bad = [], {}
    for path in sorted(root.rglob("metrics.json")):
        try:
            runs.append(_read_run(path))
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e} (diffmask-report --skip-bad lists such files and carries on)") from e
            log.warning("skipping %s", e)
            bad[path] = str(e).removeprefix(f"{path}: ")
    if not runs:
        raise FileNotFoundError(f"{root}: no readable metrics.json found below this folder ({len(bad)} bad)")
    return runs, bad


def _read_run(path: Path) -> RunRecord:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path}: no 'metrics' mapping; not a diffmask metrics file")
    info = data.get("data") or {}
    synthetic_dir = info.get("synthetic_dir")
    return RunRecord(
        path=path.parent,
        condition=_condition(list(data.get("overrides", [])), data.get("seed")),
        real=str(info.get("real", "?")),
        backbone=str(data.get("backbone", "?")).rsplit(".", 1)[-1],
        real_fraction=info.get("real_fraction"),
        n_real=info.get("n_real_train"),
        n_synthetic=info.get("n_synthetic_train"),
        seed=data.get("seed"),
        metrics={k: v for k, v in data["metrics"].items() if isinstance(v, int | float)},
        label_fidelity=_label_fidelity(synthetic_dir) if synthetic_dir and info.get("n_synthetic_train") != 0 else None,
    )


def _label_fidelity(synthetic_dir: str | list[str]) -> float | None:
    """``label_fidelity.miou`` of a synthetic set's ``stage.json``; None when the set, its record or
    its value is missing or unreadable, or for a list of sets (a relative path is taken from the
    current folder)."""
    if not isinstance(synthetic_dir, str):
        return None
    path = Path(synthetic_dir)
    stage_file = (path.parent if path.suffix == ".jsonl" else path) / "stage.json"
    try:
        record = json.loads(stage_file.read_text()).get("label_fidelity") or {}
        value = float(record.get("miou"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None if math.isnan(value) else value


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[RunRecord], prefix: str = "test/") -> tuple[list[str], list[dict[str, Any]]]:
    """Group runs by condition and real data; mean and std over repeats of every metric under ``prefix``.

    Runs of one condition on other real data (JSRT and the phantom) are never averaged together.

    Returns:
        (metric names, rows) with row keys: condition, real, backbone, real_fraction, n_real,
        n_synthetic, n_runs, ``label_fidelity`` (mean over the runs whose synthetic set records
        one; absent when none does), and ``<metric>`` / ``<metric>_std`` for each metric.
    """
    groups: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.condition, r.real)].append(r)
    metric_names = sorted({k for r in runs for k in r.metrics if k.startswith(prefix)})
    rows = []
    for (condition, real), members in groups.items():
        first = members[0]
        row: dict[str, Any] = {
            "condition": condition,
            "real": real,
            "backbone": first.backbone,
            "real_fraction": first.real_fraction,
            "n_real": first.n_real,
            "n_synthetic": first.n_synthetic,
            "n_runs": len(members),
        }
        fidelity = [r.label_fidelity for r in members if r.label_fidelity is not None]
        if fidelity:
            row["label_fidelity"] = statistics.fmean(fidelity)
        for m in metric_names:
            values = [r.metrics[m] for r in members if m in r.metrics and not math.isnan(r.metrics[m])]
            if values:
                row[m], row[f"{m}_std"] = _mean_std(values)
        rows.append(row)
    rows.sort(key=lambda r: (r["backbone"], r["real_fraction"] or 0, r["n_synthetic"] or 0, r["condition"]))
    return metric_names, rows


def _markdown(metric_names: list[str], rows: list[dict[str, Any]]) -> str:
    # IoU per test set and class, and mIoU; Dice is in the CSV
    metric_names = [m for m in metric_names if m.rsplit("/", 1)[-1].startswith(("iou_", "miou"))]
    short = [m.split("/", 1)[-1] for m in metric_names]
    # the synthetic sets' label fidelity, when any run was trained on one
    fidelity = any(r["n_synthetic"] or "label_fidelity" in r for r in rows)
    head = ["backbone", "real data", "real frac.", "n real", "n synth.", *(["label fidelity"] if fidelity else []),
            "runs", *short, "condition"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        real = f"**{r['real']}** (not real X-rays)" if r["real"] == "phantom" else r["real"]
        cells = [r["backbone"], real, f"{r['real_fraction']}", f"{r['n_real']}", f"{r['n_synthetic']}"]
        if fidelity:
            cells.append(f"{r['label_fidelity']:.4f}" if "label_fidelity" in r else "")
        cells.append(f"{r['n_runs']}")
        for m in metric_names:
            cells.append("—" if m not in r else f"{r[m]:.4f} ± {r[m + '_std']:.4f}")
        cells.append(f"`{r['condition']}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bad_files(bad: dict[Path, str], root: Path) -> str:
    if not bad:
        return ""
    lines = [f"\n## {len(bad)} metrics.json file(s) left out (unreadable)\n"]
    lines += [f"- `{path.relative_to(root) if path.is_relative_to(root) else path}`: {why}" for path, why in bad.items()]
    return "\n".join(lines) + "\n"


def _csv(metric_names: list[str], rows: list[dict[str, Any]]) -> str:
    fields = ["condition", "real", "backbone", "real_fraction", "n_real", "n_synthetic", "n_runs", "label_fidelity"]
    fields += [x for m in metric_names for x in (m, f"{m}_std")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plots(rows: list[dict[str, Any]], miou_key: str, out: Path, suffix: str = "") -> list[Path]:
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    paths = []
    with_key = [r for r in rows if miou_key in r]
    if not with_key:
        return paths
    # IoU vs real fraction, one line per (backbone, synthetic count)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    # one line per condition apart from the real fraction (e.g. real_share or fine-tuning make their own)
    lines: dict[tuple, list] = defaultdict(list)
    for r in with_key:
        series = " ".join(t for t in r["condition"].split(" ") if not t.startswith("data.real_fraction="))
        lines[(r["backbone"], r["n_synthetic"] or 0, series)].append(r)
    shared = defaultdict(int)
    for backbone, n_syn, _ in lines:
        shared[(backbone, n_syn)] += 1
    # label a series by what sets it apart: the overrides not common to every series
    common = set.intersection(*(set(series.split(" ")) for _, _, series in lines))
    for (backbone, n_syn, series), members in sorted(lines.items()):
        members.sort(key=lambda r: r["real_fraction"] or 0)
        xs = [r["real_fraction"] or 0 for r in members]
        label = f"{backbone}, {n_syn} synthetic"
        extra = " ".join(t for t in series.split(" ") if t not in common and not t.startswith("data.synthetic_count="))
        if shared[(backbone, n_syn)] > 1 and extra:
            label += f" ({extra if len(extra) <= 60 else extra[:57] + '...'})"
        ax.errorbar(xs, [r[miou_key] for r in members], yerr=[r[miou_key + "_std"] for r in members],
                    marker="o", capsize=3, label=label)
    ax.set_xlabel("real fraction of the training split")
    ax.set_ylabel(miou_key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
    fig.tight_layout()
    paths.append(_save_fig(fig, out / f"iou_vs_real_fraction{suffix}.png"))
    plt.close(fig)
    # per-condition bars
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(with_key) + 2), 4))
    labels = [f"{r['backbone']}\nr={r['real_fraction']} s={r['n_synthetic']}" for r in with_key]
    ax.bar(range(len(with_key)), [r[miou_key] for r in with_key], yerr=[r[miou_key + "_std"] for r in with_key],
           capsize=3, color="tab:blue")
    ax.set_xticks(range(len(with_key)), labels, fontsize=6)
    ax.set_ylabel(miou_key)
    lo = min(r[miou_key] for r in with_key)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    fig.tight_layout()
    paths.append(_save_fig(fig, out / f"backbones{suffix}.png"))
    plt.close(fig)
    return paths


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, test_set: str | None = None,
                 wandb_project: str | None = None, skip_bad: bool = False) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and PNG plots for a sweep; optionally log them to W&B.

    Args:
        sweep_dir: folder holding the runs (searched recursively for ``metrics.json``).
        out_dir: where to write (default: ``sweep_dir``).
        test_set: the test set whose ``miou`` the plots show (default: one pair of plots per test set).
        wandb_project: log the table and plots to this W&B project (honours WANDB_MODE=offline).
        skip_bad: leave out corrupt ``metrics.json`` files, listed in ``report.md``, instead of stopping.

    Returns:
        Paths of the written files by kind.
    """
    out = Path(out_dir or sweep_dir)
    runs, bad = collect_runs(sweep_dir, skip_bad)
    metric_names, rows = summarise(runs)
    # one pair of plots per test set (JSRT and every external set), or only the one asked for
    sets = [test_set] if test_set else [m.split("/")[1] for m in metric_names if m.endswith("/miou")]
    written = {
        "markdown": atomic_write_text(out / "report.md", f"# Results: {Path(sweep_dir).name}\n\n"
                                      f"{len(runs)} runs, {len(rows)} conditions; mean ± std over repeats.\n\n"
                                      + _markdown(metric_names, rows) + _bad_files(bad, Path(sweep_dir))),
        "csv": atomic_write_text(out / "report.csv", _csv(metric_names, rows)),
    }
    for name in sets:
        for p in _plots(rows, f"test/{name}/miou", out, suffix=f"_{name}"):
            written[p.stem] = p
    if wandb_project:
        import wandb  # noqa: PLC0415 - optional

        run = wandb.init(project=wandb_project, job_type="report", name=f"report-{Path(sweep_dir).name}")
        columns = list(_csv(metric_names, rows).splitlines()[0].split(","))
        table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        run.log({"results": table, **{k: wandb.Image(str(p)) for k, p in written.items() if p.suffix == ".png"}})
        run.finish()
    return written
