"""Collect ``metrics.json`` files of a sweep into a results table (mean ± sd over seeds) and plots.

A *condition* is what a run's result depends on: its effective settings, read from the
``.hydra/config.yaml`` Hydra keeps in the run folder (the composed config as saved, interpolations
unresolved), flattened to dotted keys, less the seeds (:data:`REPEAT_KEYS`) and the settings that
only change where and how a run is logged or shown (:func:`run_only_settings`). Runs with equal
settings are repeats of one condition however their command lines were written (``logger=wandb``,
``data.num_workers=0``, ``segmentation=unet`` spelled out or left to the default). The table names a
condition by the keys that vary across the folder's conditions only. A run folder without
``.hydra/config.yaml`` falls back to its command-line overrides (``metrics.json`` ``overrides``, less
seeds and run-only settings), with a warning. Two runs of one condition with the same seeds (a sweep
copied twice into the folder) count once: the one whose ``metrics.json`` is newest, with a warning.

Runs trained on a synthetic set (``metrics.json`` ``data.synthetic_dir``) show the set's label
fidelity (its ``stage.json`` ``label_fidelity.miou``, written by ``diffmask-fidelity --write``;
:mod:`diffmask.evaluation.fidelity`) in a ``label fidelity`` column, blank where the set has none.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from diffmask.artifacts import atomic_write_bytes, atomic_write_text

__all__ = ["RunRecord", "collect_runs", "summarise", "write_report", "plot_figures", "run_only_settings"]

log = logging.getLogger(__name__)

# settings that distinguish repeats, not conditions
REPEAT_KEYS = ("seed", "data.seed")
# a fine-tuning run's starting checkpoint: its path differs per repeat, its source run's condition does not
INIT_KEY = "segmentation.init_weights"
# where Hydra keeps a run's composed config
CONFIG_FILE = Path(".hydra") / "config.yaml"
# Settings that do not change a segmentation result, on top of RUN_ONLY_SETTINGS
# (diffmask/config.py, the list the stages' skip check uses). Patterns are dotted prefixes; '*'
# stands for one key.
REPORT_RUN_ONLY = (
    "task_name", "optimized_metric",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.default_root_dir",
    "callbacks.lr_monitor", "callbacks.*.dirpath", "callbacks.*.filename",
)
# RUN_ONLY_SETTINGS leaves out all of 'trainer', but a result depends on trainer.max_epochs, precision,
# limit_train_batches, ...: the report keeps the trainer's settings but the display ones above
RESULT_SETTINGS = ("trainer",)


@functools.cache
def run_only_settings() -> tuple[str, ...]:
    """The settings a condition leaves out: RUN_ONLY_SETTINGS but ``trainer``, and REPORT_RUN_ONLY.

    Returns:
        Dotted key patterns; a key is left out when it is one of them or lies below one.
    """
    from diffmask.config import RUN_ONLY_SETTINGS  # noqa: PLC0415 - imports Lightning; only when reading runs

    return tuple(k for k in RUN_ONLY_SETTINGS if k not in RESULT_SETTINGS) + REPORT_RUN_ONLY


def _is_run_only(key: str, patterns: tuple[str, ...]) -> bool:
    parts = key.split(".")
    for pattern in patterns:
        head = pattern.split(".")
        if len(parts) >= len(head) and all(fnmatchcase(k, p) for k, p in zip(parts, head, strict=False)):
            return True
    return False


@dataclass
class RunRecord:
    """One run: where it is, its condition and its flat metrics.

    ``condition`` is the command-line overrides less seeds and run-only settings (the condition of a
    run without ``.hydra/config.yaml``); ``settings`` is the effective config less the same, as
    ``{dotted key: value as text}``, or None without a config file. ``repeat`` holds the seeds
    (:data:`REPEAT_KEYS`) that tell repeats of a condition apart; ``duplicates`` the folders of
    other runs of the same condition and seeds that were left out for this one.
    """

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
    settings: dict[str, str] | None = None
    repeat: tuple[str | None, ...] = ()
    config_keys: frozenset[str] = frozenset()  # every dotted key its config file sets, null ones included
    duplicates: list[Path] = field(default_factory=list)

    @property
    def group(self) -> tuple[str, Any]:
        """What repeats of one condition share: its settings, or (without a config) its overrides."""
        if self.settings is not None:
            return "config", tuple(sorted(self.settings.items()))
        return "overrides", self.condition


def _condition(
    overrides: list[str], seed: int | None = None, left_out: tuple[str, ...] | None = None
) -> str:
    """Command-line overrides less seeds and ``left_out`` keys (default: :func:`run_only_settings`),
    sorted."""
    left_out = run_only_settings() if left_out is None else left_out
    kept = []
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in REPEAT_KEYS or _is_run_only(key, left_out):
            continue
        if key == INIT_KEY and value not in ("", "null"):
            # a multirun's 'segmentation.init_weights=<pretrain sweep>/${seed}' names one run per seed
            # Hydra records a multirun's interpolations escaped: $\{seed\}
            value = value.replace("$\\{", "${").replace("\\}", "}")
            o = f"{key}=[{_source_condition(value.replace('${seed}', str(seed)), left_out)}]"
        kept.append(o)
    return " ".join(sorted(kept)) or "(defaults)"


def _source_condition(checkpoint: str, left_out: tuple[str, ...] | None = None) -> str:
    """The condition of the run that wrote ``checkpoint`` (``<run>/checkpoints/x.ckpt`` or ``<run>``),
    else its path.

    The source's command-line overrides (less seeds and run-only settings) name it: short, and the
    same for every seed of the source sweep.
    """
    path = Path(checkpoint)
    source = (path if path.is_dir() else path.parent.parent) / "metrics.json"
    try:
        return _condition(list(json.loads(source.read_text()).get("overrides", [])), left_out=left_out)
    except (OSError, json.JSONDecodeError):
        return checkpoint


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _text(value: Any) -> str:
    """A config value as text: strings as they are, the rest as JSON (``[16, 32]``, ``true``, ``0.1``)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _config_settings(config_file: Path, run: dict[str, Any], left_out: tuple[str, ...]
                     ) -> tuple[dict[str, str], tuple[str | None, ...], frozenset[str]]:
    """A run's condition settings and its seeds from its Hydra ``config.yaml``.

    Args:
        config_file: ``<run>/.hydra/config.yaml``.
        run: the run's ``metrics.json`` (its resolved ``init_weights`` names a fine-tuning run's source).
        left_out: key patterns that are no part of a condition (see :func:`_is_run_only`).

    Returns:
        ({dotted key: value as text} less seeds, ``left_out`` keys and null values, the values of
        :data:`REPEAT_KEYS`, every dotted key the file sets).

    Raises:
        ValueError: naming the file when it is not YAML or not a mapping.
    """
    try:
        config = yaml.safe_load(config_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_file}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file}: expected a mapping (Hydra's composed config), got {type(config).__name__}"
        )
    flat = _flatten(config)
    repeat = tuple(None if flat.get(k) is None else _text(flat[k]) for k in REPEAT_KEYS)
    settings = {k: _text(v) for k, v in flat.items()
                if v is not None and k not in REPEAT_KEYS and not _is_run_only(k, left_out)}
    init = settings.get(INIT_KEY)
    if init is not None and init not in ("", "null"):
        # one checkpoint per seed ('<sweep>/seed${seed}' or a path per run): named by the run it came from
        resolved = run.get("init_weights") or init.replace("${seed}", str(repeat[0]))
        settings[INIT_KEY] = f"[{_source_condition(str(resolved), left_out)}]"
    return settings, repeat, frozenset(flat)


def collect_runs(sweep_dir: str | Path, skip_bad: bool = False, ignore: tuple[str, ...] | list[str] = ()
                 ) -> tuple[list[RunRecord], dict[Path, str]]:
    """Every ``metrics.json`` under ``sweep_dir`` (recursively), as :class:`RunRecord` rows.

    Runs of one condition with the same seeds (:data:`REPEAT_KEYS`; e.g. a sweep copied twice into
    the folder) count once: the run whose ``metrics.json`` was written last (the first in path order
    on a tie) is kept, with a warning naming the folders, and lists the others in its ``duplicates``.
    Runs without ``.hydra/config.yaml`` are grouped by their command-line overrides, with a warning.

    Args:
        sweep_dir: the folder to search.
        skip_bad: log a corrupt or foreign ``metrics.json`` (or ``.hydra/config.yaml``) and carry on,
            instead of stopping at it.
        ignore: more dotted keys (or prefixes; ``*`` for one key) to leave out of the conditions,
            besides the seeds and :func:`run_only_settings`.

    Returns:
        (runs, bad files -> why; empty unless ``skip_bad``).
    """
    root = Path(sweep_dir)
    if not root.exists():
        raise FileNotFoundError(f"{root}: sweep folder not found")
    left_out = run_only_settings() + tuple(ignore)
    runs, bad = [], {}
    for path in sorted(root.rglob("metrics.json")):
        try:
            runs.append(_read_run(path, left_out))
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e} (diffmask-report --skip-bad lists such files and carries on)") from e
            log.warning("skipping %s", e)
            bad[path] = str(e).removeprefix(f"{path}: ")
    if not runs:
        raise FileNotFoundError(f"{root}: no readable metrics.json found below this folder ({len(bad)} bad)")
    no_config = [r.path for r in runs if r.settings is None]
    if no_config:
        log.warning(
            "%d run folder(s) without %s: grouped by their command-line overrides (less seeds and run-only "
            "settings), so a setting written out differently splits a condition: %s",
            len(no_config), CONFIG_FILE, ", ".join(_rel(p, root) for p in no_config[:10])
            + (" ..." if len(no_config) > 10 else ""),
        )
    return _drop_duplicates(runs, root), bad


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) and path != root else str(path)


def _drop_duplicates(runs: list[RunRecord], root: Path) -> list[RunRecord]:
    """One run per (condition, real data, seeds): the newest ``metrics.json``; warns naming the others."""
    by_repeat: dict[tuple, list[RunRecord]] = defaultdict(list)
    for i, r in enumerate(runs):
        # without any seed on record repeats cannot be told from copies: all are kept
        key = (r.group, r.real, r.repeat) if any(v is not None for v in r.repeat) else ("unseeded", i)
        by_repeat[key].append(r)
    kept = []
    for (*_, repeat), members in by_repeat.items():
        newest = max(members, key=lambda r: (r.path / "metrics.json").stat().st_mtime)  # the first on a tie
        newest.duplicates = [r.path for r in members if r is not newest]
        if newest.duplicates:
            log.warning(
                "%d runs of one condition with the same seeds (%s): %s; counting it once, keeping %s "
                "(the newest metrics.json)",
                len(members), ", ".join(f"{k}={v}" for k, v in zip(REPEAT_KEYS, repeat, strict=True)),
                ", ".join(_rel(r.path, root) for r in members), _rel(newest.path, root),
            )
        kept.append(newest)
    return sorted(kept, key=lambda r: r.path)


def _read_run(path: Path, left_out: tuple[str, ...]) -> RunRecord:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise ValueError(f"{path}: no 'metrics' mapping; not a diffmask metrics file")
    info = data.get("data") or {}
    synthetic_dir = info.get("synthetic_dir")
    overrides = [str(o) for o in data.get("overrides", [])]
    config_file = path.parent / CONFIG_FILE
    config_keys: frozenset[str] = frozenset()
    if config_file.is_file():
        settings, repeat, config_keys = _config_settings(config_file, data, left_out)
    else:
        given = dict(o.lstrip("+~").partition("=")[::2] for o in overrides)
        seed = None if data.get("seed") is None else str(data["seed"])
        settings, repeat = None, (seed, given.get("data.seed"))
    return RunRecord(
        path=path.parent,
        condition=_condition(overrides, data.get("seed"), left_out),
        real=str(info.get("real", "?")),
        backbone=str(data.get("backbone", "?")).rsplit(".", 1)[-1],
        real_fraction=info.get("real_fraction"),
        n_real=info.get("n_real_train"),
        n_synthetic=info.get("n_synthetic_train"),
        seed=data.get("seed"),
        metrics={k: v for k, v in data["metrics"].items() if isinstance(v, int | float)},
        label_fidelity=(_label_fidelity(synthetic_dir)
                        if synthetic_dir and info.get("n_synthetic_train") != 0 else None),
        settings=settings,
        repeat=repeat,
        config_keys=config_keys,
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


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation; no deviation (None) for a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _varying(conditions: list[dict[str, str]]) -> list[str]:
    """The keys whose value is not the same in every condition (a missing key counts as null)."""
    keys = sorted(set().union(*conditions)) if conditions else []
    return [k for k in keys if len({c.get(k) for c in conditions}) > 1]


def _short_key(key: str) -> str:
    return key.removesuffix("._target_")


def _short_value(key: str, value: str | None) -> str:
    if value is None:
        return "null"
    # a class path names a backbone or optimiser: its last part says which
    return value.rsplit(".", 1)[-1] if key.endswith("._target_") and "/" not in value else value


def _injective(labels: list[Any]) -> bool:
    return len(set(labels)) == len(labels)


def _label_keys(conditions: list[dict[str, str]], varying: list[str]) -> list[str]:
    """The varying keys a label needs: a node whose ``_target_`` varies (``segmentation.net=TransUNet``)
    stands for the keys below it that vary with it, as long as the labels stay distinct."""
    targets = [_short_key(k) for k in varying if k.endswith("._target_")]
    keys = list(varying)
    for key in varying:
        if key.endswith("._target_") or not any(key.startswith(t + ".") for t in targets):
            continue
        trial = [k for k in keys if k != key]
        if _injective([tuple(c.get(k) for k in trial) for c in conditions]):
            keys = trial
    return keys


def _label(settings: dict[str, str | None], keys: list[str], short: bool = True) -> str:
    """``key=value, ...`` for ``keys`` (a class path shortened to its name when ``short``)."""
    return ", ".join(
        f"{_short_key(k)}={_short_value(k, settings.get(k)) if short else settings.get(k) or 'null'}"
        for k in keys
    )


def _condition_labels(conditions: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(the keys that vary across ``conditions``, one distinct label per condition)."""
    varying = _varying(conditions)
    if not varying:
        return varying, ["(one condition)"] * len(conditions)
    keys = _label_keys(conditions, varying)
    labels = [_label(c, keys) for c in conditions]
    if not _injective(labels):  # two class paths with one name: say them in full
        labels = [_label(c, keys, short=False) for c in conditions]
    return varying, labels


def summarise(runs: list[RunRecord], prefix: str = "test/") -> tuple[list[str], list[dict[str, Any]]]:
    """Group runs by condition and real data; mean and sd over repeats of every metric under ``prefix``.

    Runs of one condition on other real data (JSRT and the phantom) are never averaged together.

    Args:
        runs: from :func:`collect_runs` (duplicates already left out).
        prefix: the metrics to summarise.

    Returns:
        (metric names, rows) with row keys: ``condition`` (a label naming the settings that vary
        across the conditions, ``key=value, ...``; for runs without a config the overrides),
        ``condition_from`` (``config`` or ``overrides``), ``settings`` ({varying key: value}, empty
        for runs without a config), real, backbone, real_fraction, n_real, n_synthetic, ``n_runs``,
        ``runs`` (their folders), ``duplicates`` ({folder left out as a copy: the folder kept}), ``unset``
        (varying settings some of its runs' config files do not have at all), ``label_fidelity``
        (mean over the runs whose synthetic set records one; absent when none does), and for each
        metric ``<metric>`` (mean), ``<metric>_std`` (sample sd; None where one run has it) and
        ``<metric>_n`` (the runs that have it).
    """
    groups: dict[tuple[Any, str], list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.group, r.real)].append(r)
    # name the conditions with a config by what tells them apart
    conditions = {r.group: r.settings for r in runs if r.settings is not None}
    varying, labels = _condition_labels(list(conditions.values()))
    label_of = dict(zip(conditions, labels, strict=True))
    own_class = [_short_key(k) for k in varying if k.endswith("._target_")]  # nodes whose class varies
    metric_names = sorted({k for r in runs for k in r.metrics if k.startswith(prefix)})
    rows = []
    for (group, real), members in groups.items():
        first = members[0]
        from_config = first.settings is not None
        row: dict[str, Any] = {
            "condition": label_of[group] if from_config else first.condition,
            "condition_from": "config" if from_config else "overrides",
            "settings": {k: first.settings.get(k) for k in varying} if from_config else {},
            "real": real,
            "backbone": first.backbone,
            "real_fraction": first.real_fraction,
            "n_real": first.n_real,
            "n_synthetic": first.n_synthetic,
            "n_runs": len(members),
            "runs": [r.path for r in members],
            "duplicates": {d: r.path for r in members for d in r.duplicates},
            # varying settings its runs' config files lack (a setting added to conf/ after they ran?), but
            # those of a class of its own (segmentation.net.img_size of a TransUNet, not of a UNet)
            "unset": sorted({k for r in members if from_config for k in varying
                             if k not in r.config_keys
                             and not any(k.startswith(t + ".") for t in own_class)}),
        }
        fidelity = [r.label_fidelity for r in members if r.label_fidelity is not None]
        if fidelity:
            row["label_fidelity"] = statistics.fmean(fidelity)
        for m in metric_names:
            values = [r.metrics[m] for r in members if m in r.metrics and not math.isnan(r.metrics[m])]
            if values:
                row[m], row[f"{m}_std"] = _mean_std(values)
                row[f"{m}_n"] = len(values)
        rows.append(row)
    rows.sort(key=lambda r: (r["backbone"], r["real_fraction"] or 0, r["n_synthetic"] or 0, r["condition"]))
    return metric_names, rows


def _cell(row: dict[str, Any], metric: str) -> str:
    """``mean ± sd``, or ``mean (n=1)`` for a single run; ``(n=k)`` where fewer runs than the row's have
    it."""
    if metric not in row:
        return "—"
    n, std = row[f"{metric}_n"], row[f"{metric}_std"]
    if std is None:
        return f"{row[metric]:.4f} (n={n})"
    return f"{row[metric]:.4f} ± {std:.4f}" + (f" (n={n})" if n != row["n_runs"] else "")


def _markdown(metric_names: list[str], rows: list[dict[str, Any]]) -> str:
    # IoU per test set and class, and mIoU; Dice is in the CSV
    metric_names = [m for m in metric_names if m.rsplit("/", 1)[-1].startswith(("iou_", "miou"))]
    short = [m.split("/", 1)[-1] for m in metric_names]
    # the synthetic sets' label fidelity, when any run was trained on one
    fidelity = any(r["n_synthetic"] or "label_fidelity" in r for r in rows)
    head = ["backbone", "real data", "real frac.", "n real", "n synth.",
            *(["label fidelity"] if fidelity else []), "n", *short, "condition"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        real = f"**{r['real']}** (not real X-rays)" if r["real"] == "phantom" else r["real"]
        cells = [r["backbone"], real, f"{r['real_fraction']}", f"{r['n_real']}", f"{r['n_synthetic']}"]
        if fidelity:
            cells.append(f"{r['label_fidelity']:.4f}" if "label_fidelity" in r else "")
        cells.append(f"{r['n_runs']}")
        cells += [_cell(r, m) for m in metric_names]
        fallback = r["condition_from"] == "overrides"
        note = f" (overrides: no {CONFIG_FILE.as_posix()})" if fallback else ""
        cells.append(f"`{r['condition']}`" + note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _keys(keys: list[str], most: int = 30) -> str:
    shown = ", ".join(f"`{k}`" for k in keys[:most])
    more = f" and {len(keys) - most} more (all are columns of report.csv)" if len(keys) > most else ""
    return shown + more


def _grouping_notes(rows: list[dict[str, Any]], root: Path, ignore: tuple[str, ...] = ()) -> str:
    """How the runs were grouped: the varying settings, what was left out, fallbacks and duplicates.

    Args:
        rows: from :func:`summarise`.
        root: the sweep folder (folders are named relative to it).
        ignore: the keys left out of the conditions on request (``--ignore``).

    Returns:
        Markdown sections for ``report.md``.
    """
    varying = sorted({k for r in rows for k in r["settings"]})
    lines = ["\n## Conditions\n",
             f"A condition is a run's settings in `{CONFIG_FILE.as_posix()}` "
             f"less its seeds ({', '.join(REPEAT_KEYS)})"
             + (", " if ignore else " and ")
             + f"the settings that change no result ({_keys(list(run_only_settings()))})"
             + (f" and those left out on request ({_keys(list(ignore))})" if ignore else "")
             + ". The condition column names the settings that vary across the conditions: "
             + (_keys(varying) if varying else "none, one condition") + "."]
    unset = sorted({k for r in rows for k in r["unset"]})
    if unset:
        lines.append(f"\nMissing from some runs' config files (a setting added to conf/ after they ran?), "
                     f"and so counted as null there: {_keys(unset)}. `diffmask-report --ignore KEY` leaves a "
                     "setting out of the conditions.")
    fallback = [p for r in rows if r["condition_from"] == "overrides" for p in r["runs"]]
    if fallback:
        lines.append(f"\n{len(fallback)} run(s) without `{CONFIG_FILE.as_posix()}` are grouped by their "
                     "command-line overrides (less seeds and run-only settings): "
                     + ", ".join(f"`{_rel(p, root)}`" for p in fallback))
    copies = {dup: kept for r in rows for dup, kept in r["duplicates"].items()}
    if copies:
        lines.append(f"\n## {len(copies)} duplicate run(s) counted once\n")
        lines.append("Each has the condition and seeds of a run kept, "
                     "the one whose metrics.json is newest:\n")
        lines += [f"- `{_rel(dup, root)}` (kept: `{_rel(kept, root)}`)"
                  for dup, kept in sorted(copies.items())]
    return "\n".join(lines) + "\n"


def _bad_files(bad: dict[Path, str], root: Path) -> str:
    if not bad:
        return ""
    lines = [f"\n## {len(bad)} metrics.json file(s) left out (unreadable)\n"]
    lines += [f"- `{_rel(path, root)}`: {why}" for path, why in bad.items()]
    return "\n".join(lines) + "\n"


def _csv(metric_names: list[str], rows: list[dict[str, Any]]) -> str:
    fields = ["condition", "real", "backbone", "real_fraction", "n_real", "n_synthetic", "n_runs",
              "label_fidelity", "condition_from"]
    # a column per setting that varies across the conditions
    varying = sorted({k for r in rows for k in r["settings"]} - set(fields) - {k for r in rows for k in r})
    fields += varying
    fields += [x for m in metric_names for x in (m, f"{m}_std", f"{m}_n")]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows([{**r, **r["settings"]} for r in rows])
    return buf.getvalue()


def _n_range(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _plot_label(settings: dict[str, str | None], keys: list[str], width: int = 60) -> str:
    """``key=value`` items for a plot: keys by their last part where that is unambiguous, long
    values cut short, items wrapped at ``width`` characters."""
    last = [_short_key(k).rsplit(".", 1)[-1] for k in keys]
    names = last if _injective(last) else [_short_key(k) for k in keys]
    items = []
    for name, key in zip(names, keys, strict=True):
        value = _short_value(key, settings.get(key))
        if "/" in value and len(value) > 30 and not value.startswith("["):
            value = ".../" + "/".join(value.rstrip("/").split("/")[-2:])
        items.append(f"{name}={value if len(value) <= 40 else value[:37] + '...'}")
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + len(item) + 2 > width:
            lines.append("")
        lines[-1] += (", " if lines[-1] else "") + item
    return "\n".join(lines)


def _unique_labels(*candidates: list[str]) -> list[str]:
    """The first candidate list whose labels are distinct; else the last one, numbered."""
    for labels in candidates:
        if _injective(labels):
            return labels
    return [f"{label} #{i + 1}" for i, label in enumerate(candidates[-1])]


def _row_labels(rows: list[dict[str, Any]], exclude: tuple[str, ...] = ()) -> list[str]:
    """One distinct plot label per row: the settings that vary across ``rows`` (less ``exclude``),
    the overrides of a run without a config, and the real data where it varies."""
    config = [r["settings"] for r in rows if r["condition_from"] == "config"]
    keys = [k for k in _label_keys(config, _varying(config)) if k not in exclude] if config else []
    several_real = len({r["real"] for r in rows}) > 1
    plain, full = [], []
    for r in rows:
        prefix = f"{r['real']}: " if several_real else ""
        if r["condition_from"] == "config":
            text = _plot_label(r["settings"], keys) if keys else "(one condition)"
            whole = _label(r["settings"], keys, short=False) if keys else text
        else:
            kept = " ".join(t for t in r["condition"].split(" ")
                            if not any(t.startswith(f"{k}=") for k in exclude))
            whole = "overrides: " + (kept or "(defaults)")
            text = whole if len(whole) <= 60 else whole[:57] + "..."
        plain.append(prefix + text)
        full.append(prefix + whole)
    detailed = [f"{r['backbone']}, r={r['real_fraction']}, s={r['n_synthetic']}: {label}"
                for r, label in zip(rows, full, strict=True)]
    return _unique_labels(plain, full, detailed)


def _error_bars(
    ax, points: list[tuple[float, float, float | None]], color: str, horizontal: bool = False
) -> None:
    """± 1 sd bars at (position, mean, sd) points; none where sd is None (a single run)."""
    points = [p for p in points if p[2] is not None]
    if not points:
        return
    pos, mean, sd = zip(*points, strict=True)
    if horizontal:
        ax.errorbar(mean, pos, xerr=sd, fmt="none", ecolor=color, capsize=4)
    else:
        ax.errorbar(pos, mean, yerr=sd, fmt="none", ecolor=color, capsize=3)


def plot_figures(rows: list[dict[str, Any]], miou_key: str) -> dict[str, Any]:
    """The report's figures for one metric (e.g. ``test/jsrt/miou``), not yet saved.

    ``iou_vs_real_fraction``: the metric against the real fraction, a line per condition apart from
    the real fraction; ``backbones``: a horizontal bar per condition (and real data), from 0. Both
    show the mean ± 1 sd over seeds, say so in the title and axis label, and give n per line or bar.

    Args:
        rows: from :func:`summarise`.
        miou_key: the metric to plot.

    Returns:
        ``{"iou_vs_real_fraction": figure, "backbones": figure}`` (matplotlib figures; the caller
        closes them); empty when no row has ``miou_key``.
    """
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    with_key = [r for r in rows if miou_key in r]
    if not with_key:
        return {}
    metric = miou_key.removeprefix("test/")
    spread = "mean ± 1 sd over seeds"
    counts = [r[f"{miou_key}_n"] for r in with_key]
    figures = {}

    # the metric vs the real fraction: one line per condition apart from the real fraction
    lines: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in with_key:
        if r["condition_from"] == "config":
            series = tuple((k, v) for k, v in sorted(r["settings"].items()) if k != "data.real_fraction")
        else:
            series = tuple(t for t in r["condition"].split(" ") if not t.startswith("data.real_fraction="))
        lines[(r["backbone"], r["n_synthetic"] or 0, r["real"], r["condition_from"], series)].append(r)
    keys = sorted(lines, key=str)
    # a line is labelled by its first point's settings less the real fraction
    labels = _row_labels([lines[k][0] for k in keys], exclude=("data.real_fraction",))
    fig, ax = plt.subplots(figsize=(11, 4.5), layout="constrained")
    for key, label in zip(keys, labels, strict=True):
        members = sorted(lines[key], key=lambda r: r["real_fraction"] or 0)
        n = _n_range([r[f"{miou_key}_n"] for r in members])
        (line,) = ax.plot([r["real_fraction"] or 0 for r in members], [r[miou_key] for r in members],
                          marker="o", label=f"{label} (n={n})")
        _error_bars(ax, [(r["real_fraction"] or 0, r[miou_key], r[f"{miou_key}_std"]) for r in members],
                    line.get_color())
    ax.set_title(f"{metric} vs real fraction: {spread}, n = {_n_range(counts)} runs per point")
    ax.set_xlabel("real fraction of the training split")
    ax.set_ylabel(f"{metric} ({spread})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, not over it
    figures["iou_vs_real_fraction"] = fig

    # a horizontal bar per condition and real data, from 0, labelled by the settings that vary
    labels = [f"{label} (n={r[f'{miou_key}_n']})"
              for label, r in zip(_row_labels(with_key), with_key, strict=True)]
    height = sum(0.22 * (label.count("\n") + 1) + 0.2 for label in labels) + 1.5
    fig, ax = plt.subplots(figsize=(11, max(3.0, height)), layout="constrained")
    ax.barh(range(len(with_key)), [r[miou_key] for r in with_key], color="tab:blue")
    _error_bars(ax, [(i, r[miou_key], r[f"{miou_key}_std"]) for i, r in enumerate(with_key)], "black",
                horizontal=True)
    ax.set_yticks(range(len(with_key)), labels, fontsize=7)
    ax.invert_yaxis()  # the table's order, top down
    ax.set_title(f"{metric} per condition: {spread}, n = {_n_range(counts)} runs per bar")
    ax.set_xlabel(f"{metric} (bars: {spread}" + ("; no error bar where n = 1)" if min(counts) == 1 else ")"))
    top = max(r[miou_key] + (r[f"{miou_key}_std"] or 0.0) for r in with_key)
    ax.set_xlim(0.0, max(1.0, top * 1.05))
    ax.grid(axis="x", alpha=0.3)
    figures["backbones"] = fig
    return figures


def _plots(rows: list[dict[str, Any]], miou_key: str, out: Path, suffix: str = "") -> list[Path]:
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plotting is optional at import time

    paths = []
    for name, fig in plot_figures(rows, miou_key).items():
        paths.append(_save_fig(fig, out / f"{name}{suffix}.png"))
        plt.close(fig)
    return paths


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")  # the legend beside the axes too
    return atomic_write_bytes(path, buf.getvalue())


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None, test_set: str | None = None,
                 wandb_project: str | None = None, skip_bad: bool = False,
                 ignore: tuple[str, ...] | list[str] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` and PNG plots for a sweep; optionally log them to W&B.

    Args:
        sweep_dir: folder holding the runs (searched recursively for ``metrics.json``).
        out_dir: where to write (default: ``sweep_dir``).
        test_set: the test set whose ``miou`` the plots show (default: one pair of plots per test set).
        wandb_project: log the table and plots to this W&B project (honours WANDB_MODE=offline), in the
            sweep's group with its path in the config, W&B's files under ``out_dir``
            (:func:`~diffmask.evaluation.wandb_logging.log_report`).
        skip_bad: leave out corrupt ``metrics.json`` files, listed in ``report.md``, instead of stopping.
        ignore: more settings to leave out of the conditions (dotted keys or prefixes, ``*`` for one key).

    Returns:
        Paths of the written files by kind.
    """
    out = Path(out_dir or sweep_dir)
    root = Path(sweep_dir)
    runs, bad = collect_runs(sweep_dir, skip_bad, ignore)
    metric_names, rows = summarise(runs)
    # one pair of plots per test set (JSRT and every external set), or only the one asked for
    sets = [test_set] if test_set else [m.split("/")[1] for m in metric_names if m.endswith("/miou")]
    n_copies = sum(len(r["duplicates"]) for r in rows)
    summary = (f"{len(runs)} runs, {len(rows)} conditions"
               + (f" ({n_copies} duplicate run(s) counted once, listed below)" if n_copies else "")
               + "; mean ± 1 sd over seeds, n = runs per condition (a single run: its value and n=1).\n\n")
    written = {
        "markdown": atomic_write_text(out / "report.md", f"# Results: {root.name}\n\n" + summary
                                      + _markdown(metric_names, rows)
                                      + _grouping_notes(rows, root, tuple(ignore))
                                      + _bad_files(bad, root)),
        "csv": atomic_write_text(out / "report.csv", _csv(metric_names, rows)),
    }
    for name in sets:
        for p in _plots(rows, f"test/{name}/miou", out, suffix=f"_{name}"):
            written[p.stem] = p
    if wandb_project:
        from diffmask.evaluation.wandb_logging import log_report  # noqa: PLC0415 - only with W&B

        # in the sweep's W&B group (its runs' run_group), files under out/wandb
        columns = list(_csv(metric_names, rows).splitlines()[0].split(","))
        log_report(wandb_project, root, out, [r.path for r in runs], columns,
                   [[{**r, **r["settings"]}.get(c) for c in columns] for r in rows],
                   {k: p for k, p in written.items() if p.suffix == ".png"},
                   config={"test_set": test_set, "ignore": list(ignore), "n_conditions": len(rows)})
    return written
