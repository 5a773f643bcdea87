"""W&B runs that compare: who a run is (group, name, tags, job type, config), what its summary
holds, and the media it logs (prediction overlays, per-image table, synthetic pairs, report table).

Identity of a run (:func:`run_identity`):

* **group**: the runs one comparison is made of. ``DIFFMASK_WANDB_GROUP`` when set (``diffmask-pipeline``
  sets it to its invocation's folder, ``<log_dir>/pipeline/<name>/<stamp>``, for every stage it runs);
  else a Hydra multirun's sweep folder (``hydra.sweep.dir``, shared by its jobs); else the run's own
  folder. A folder is named by its path relative to the working directory (as Hydra writes it,
  ``logs/train/multiruns/<stamp>``), so ``diffmask-report`` of that folder logs into the same group.
* **name**: the overrides that vary, ``key=value,...``, without the seeds and the run-only settings
  (:func:`diffmask.evaluation.report.run_only_settings`): in a multirun the keys its command line
  sweeps (read from the sweep folder's ``multirun.yaml``), in a single run all of its overrides; a
  pipeline stage's name starts with the stage. Nothing left: the stage (job type).
* **tags**: the config's ``tags``, the backbone (the segmentation net's class name), the dataset
  (the real source's name) and ``real`` or ``phantom`` (a procedural source: :data:`PHANTOM_SOURCES`).
* **job_type**: the stage (``DIFFMASK_WANDB_JOB_TYPE``, set by the pipeline, else ``task_name``).
* **config**: the resolved Hydra config plus ``overrides``, ``job_num`` (``hydra.job.num``),
  ``run_group``, ``sweep_dir`` and ``dataset`` (:meth:`RunIdentity.config`).

``group``, ``name`` and ``job_type`` left null in ``conf/logger/wandb.yaml`` are filled from the
identity (:func:`fill_wandb_node`); given there (``logger.wandb.group=...``) they win. ``wandb`` is
imported only where a W&B run is made or logged to. Runs under ``WANDB_MODE=disabled`` are skipped
by the media helpers (nothing is predicted or drawn for them).
"""

from __future__ import annotations

import csv
import inspect
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "GROUP_ENV",
    "JOB_TYPE_ENV",
    "PHANTOM_SOURCES",
    "HydraJob",
    "RunIdentity",
    "define_best_metrics",
    "fill_wandb_node",
    "folder_label",
    "hydra_job",
    "is_wandb_node",
    "log_report",
    "log_synthesis",
    "log_test_results",
    "prediction_overlays",
    "report_group",
    "run_identity",
    "wandb_runs",
]

log = logging.getLogger(__name__)

# the group of every run of one diffmask-pipeline invocation (its folder); set by the pipeline
GROUP_ENV = "DIFFMASK_WANDB_GROUP"
# the pipeline stage (baseline, train, finetune, generate_control, ...): the run's job type
JOB_TYPE_ENV = "DIFFMASK_WANDB_JOB_TYPE"
# procedurally drawn real sources: runs on them are tagged "phantom", others "real"
PHANTOM_SOURCES = ("phantom", "shapes")
# W&B's limits on a group / name and on a tag
MAX_LABEL = 128
MAX_TAG = 64
# the keys of a WandbLogger node that are not wandb.init arguments, or are under another name
LOGGER_ONLY = (
    "_target_", "log_model", "prefix", "checkpoint_name", "experiment", "add_file_policy", "anonymous"
)


def _clip(text: str, most: int = MAX_LABEL, keep_end: bool = True) -> str:
    """``text`` cut to ``most`` characters, keeping its end (a folder's stamp) or its start (a name)."""
    if len(text) <= most:
        return text
    return "…" + text[-(most - 1):] if keep_end else text[:most - 1] + "…"


def folder_label(folder: str | os.PathLike) -> str:
    """A folder as a group: its path relative to the working directory when below it, else as given.

    Args:
        folder: a sweep, pipeline-invocation or run folder.

    Returns:
        A POSIX path of at most 128 characters (its end kept).
    """
    path = Path(folder)
    try:
        label = path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        label = path.as_posix()
    return _clip(label.removeprefix("./") or ".")


@dataclass(frozen=True)
class HydraJob:
    """What Hydra says of the running job (all empty outside a Hydra app).

    Attributes:
        overrides: the job's command-line overrides (``hydra.overrides.task``).
        num: ``hydra.job.num`` (None outside Hydra).
        sweep_dir: ``hydra.sweep.dir`` in a multirun, else None.
        run_dir: the job's output folder (``hydra.runtime.output_dir``).
    """

    overrides: tuple[str, ...] = ()
    num: int | None = None
    sweep_dir: Path | None = None
    run_dir: Path | None = None


def hydra_job() -> HydraJob:
    """The running Hydra job's overrides, number and folders.

    Returns:
        A :class:`HydraJob`; the empty one outside a Hydra app (``compose`` in tests, notebooks).
    """
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415
    from hydra.types import RunMode  # noqa: PLC0415

    if not HydraConfig.initialized():
        return HydraJob()
    hc = HydraConfig.get()
    try:
        num = int(hc.job.num)
    except Exception:  # noqa: BLE001 - missing (???) in some run modes
        num = None
    multirun = hc.mode == RunMode.MULTIRUN
    return HydraJob(
        overrides=tuple(str(o) for o in hc.overrides.task),
        num=num,
        sweep_dir=Path(hc.sweep.dir) if multirun else None,
        run_dir=Path(hc.runtime.output_dir) if hc.runtime.output_dir else None,
    )


def swept_keys(sweep_dir: str | os.PathLike) -> set[str] | None:
    """The keys a multirun sweeps: the sweep overrides of its command line and its sweeper's params.

    Args:
        sweep_dir: the multirun's folder, holding the ``multirun.yaml`` Hydra writes before its jobs.

    Returns:
        Override keys (without ``+``/``~``), or None without a readable ``multirun.yaml``.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: PLC0415
    from hydra.errors import HydraException  # noqa: PLC0415

    file = Path(sweep_dir) / "multirun.yaml"
    if not file.is_file():
        return None
    try:
        conf = OmegaConf.load(file)
        given = [str(o) for o in (OmegaConf.select(conf, "hydra.overrides.task") or [])]
        params = OmegaConf.select(conf, "hydra.sweeper.params")
        if params:
            given += [f"{k}={v}" for k, v in OmegaConf.to_container(params, resolve=False).items()]
    except Exception as e:  # noqa: BLE001 - a name is not worth failing a run for
        log.warning("%s: not read (%s); the W&B name holds all of the job's overrides", file, e)
        return None
    parser = OverridesParser.create()
    keys = set()
    for text in given:
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException:
            continue
        if override.is_sweep_override():
            keys.add(override.get_key_element().lstrip("+~"))
    return keys


def _short_value(value: str) -> str:
    """An override's value for a name: Hydra's escapes undone, a path by its last two parts."""
    value = value.replace("$\\{", "${").replace("\\}", "}")
    if "/" in value and not value.startswith(("[", "{")):
        value = "/".join(Path(value).parts[-2:])
    return value


def name_overrides(overrides: Iterable[str], keys: set[str] | None = None) -> list[str]:
    """The overrides that tell runs apart: ``key=value`` less seeds and run-only settings.

    Args:
        overrides: a job's command-line overrides.
        keys: keep only these keys (a multirun's swept keys); None keeps every key.

    Returns:
        ``key=value`` strings in command-line order, values shortened (:func:`_short_value`).
    """
    from diffmask.evaluation.report import REPEAT_KEYS, _is_run_only, run_only_settings  # noqa: PLC0415

    left_out = run_only_settings()
    kept = []
    for text in overrides:
        key, _, value = text.partition("=")
        key = key.lstrip("+~")
        if key in REPEAT_KEYS or _is_run_only(key, left_out) or (keys is not None and key not in keys):
            continue
        kept.append(f"{key}={_short_value(value)}")
    return kept


def real_kind(dataset: str | None) -> str | None:
    """``phantom`` for a procedural source (:data:`PHANTOM_SOURCES`), ``real`` for another, None unknown."""
    if not dataset:
        return None
    return "phantom" if dataset in PHANTOM_SOURCES else "real"


@dataclass(frozen=True)
class RunIdentity:
    """Who a run is on W&B (see the module docstring).

    Attributes:
        group: the sweep, pipeline invocation or run it belongs to.
        name: the overrides that vary (or the stage).
        job_type: the stage.
        tags: config tags, backbone, dataset, real/phantom.
        overrides: the job's command-line overrides.
        job_num: ``hydra.job.num`` (None outside Hydra).
        sweep_dir: the multirun's folder (None for a single run).
        dataset: the real source's name (None unknown).
    """

    group: str
    name: str
    job_type: str
    tags: tuple[str, ...]
    overrides: tuple[str, ...]
    job_num: int | None
    sweep_dir: str | None
    dataset: str | None

    def config(self) -> dict[str, Any]:
        """The keys W&B's config gets on top of the resolved Hydra config.

        Returns:
            ``overrides``, ``job_num``, ``run_group``, ``sweep_dir``, ``dataset`` and ``data_kind``.
        """
        return {"overrides": list(self.overrides), "job_num": self.job_num, "run_group": self.group,
                "sweep_dir": self.sweep_dir, "dataset": self.dataset, "data_kind": real_kind(self.dataset)}

    def init_kwargs(self) -> dict[str, Any]:
        """``group``, ``name``, ``job_type`` and ``tags`` for ``wandb.init``.

        Returns:
            The keyword arguments.
        """
        return {"group": self.group, "name": self.name, "job_type": self.job_type, "tags": list(self.tags)}


def dataset_name(cfg: DictConfig) -> str | None:
    """The real source's name without building it: ``data.real.name``, or a procedural source's.

    Args:
        cfg: a stage config.

    Returns:
        The name, or None when only building the source would tell (JSRT or a folder, ``data=auto``).
    """
    name = OmegaConf.select(cfg, "data.real.name", default=None)
    if name:
        return str(name)
    target = str(OmegaConf.select(cfg, "data.real._target_", default="") or "")
    kinds = {"PhantomSource": "phantom", "ShapesSource": "shapes", "JSRTSource": "jsrt"}
    return kinds.get(target.rsplit(".", 1)[-1])


def run_identity(
    cfg: DictConfig, dataset: str | None = None, stage: str | None = None, job: HydraJob | None = None
) -> RunIdentity:
    """The group, name, tags, job type and config additions of the run ``cfg`` describes.

    Args:
        cfg: the stage's composed config.
        dataset: the real source's name (e.g. ``datamodule.real.name``: ``phantom`` when ``data=auto``
            found no JSRT folder); None: :func:`dataset_name`.
        stage: the job type (default: ``DIFFMASK_WANDB_JOB_TYPE``, else ``cfg.task_name``).
        job: the Hydra job (default: :func:`hydra_job`).

    Returns:
        The :class:`RunIdentity`.
    """
    job = job or hydra_job()
    job_type = os.environ.get(JOB_TYPE_ENV) or stage or str(cfg.get("task_name") or "run")
    pipeline_group = os.environ.get(GROUP_ENV)
    if pipeline_group:
        group = _clip(pipeline_group)
    else:
        folder = job.sweep_dir or job.run_dir or OmegaConf.select(cfg, "paths.output_dir", default=None)
        group = folder_label(folder) if folder else job_type
    # a multirun: the keys it sweeps; a pipeline's single run: none (the stage tells it apart)
    keys = swept_keys(job.sweep_dir) if job.sweep_dir else (set() if pipeline_group else None)
    varying = ",".join(name_overrides(job.overrides, keys))
    if pipeline_group:
        name = f"{job_type} {varying}" if varying else job_type
    else:
        name = varying or job_type
    dataset = dataset or dataset_name(cfg)
    backbone = OmegaConf.select(cfg, "segmentation.net._target_", default=None)
    tags = [str(t) for t in (cfg.get("tags") or [])]
    backbone_name = str(backbone).rsplit(".", 1)[-1] if backbone else None
    tags += [t for t in (backbone_name, dataset, real_kind(dataset)) if t]
    return RunIdentity(
        group=group, name=_clip(name, keep_end=False), job_type=job_type,
        tags=tuple(dict.fromkeys(_clip(t, MAX_TAG) for t in tags)),
        overrides=job.overrides, job_num=job.num,
        sweep_dir=str(Path(job.sweep_dir).resolve()) if job.sweep_dir else None, dataset=dataset,
    )


def is_wandb_node(node: Any) -> bool:
    """True for a logger node whose ``_target_`` is Lightning's ``WandbLogger``."""
    return isinstance(node, DictConfig) and str(node.get("_target_", "")).rsplit(".", 1)[-1] == "WandbLogger"


def wandb_node(logger_cfg: DictConfig | None) -> DictConfig | None:
    """The ``WandbLogger`` node of a ``logger`` group (``logger=wandb``), or None."""
    if not isinstance(logger_cfg, DictConfig):
        return None
    return next((node for node in logger_cfg.values() if is_wandb_node(node)), None)


def fill_wandb_node(node: DictConfig, identity: RunIdentity) -> DictConfig:
    """A copy of a ``WandbLogger`` node with the identity's group, name and job type where the node
    leaves them null, and the identity's tags added to the node's.

    Args:
        node: the ``logger.wandb`` node (interpolations resolved against its config).
        identity: the run's :class:`RunIdentity`.

    Returns:
        A new, resolved node to instantiate.
    """
    filled = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    for key, value in identity.init_kwargs().items():
        if key == "tags":
            filled.tags = list(dict.fromkeys([*(filled.get("tags") or []), *value]))
        elif filled.get(key) is None:
            filled[key] = value
    return filled


def wandb_runs(loggers: Iterable[Any]) -> list[Any]:
    """The live W&B runs of Lightning loggers (not those of ``WANDB_MODE=disabled``).

    Args:
        loggers: the stage's Lightning loggers.

    Returns:
        Each ``WandbLogger``'s ``experiment`` (started here if it was not yet), disabled ones left out.
    """
    from pytorch_lightning.loggers import WandbLogger  # noqa: PLC0415

    runs = [lg.experiment for lg in loggers if isinstance(lg, WandbLogger)]
    return [r for r in runs if not getattr(r, "disabled", False)]


def define_best_metrics(loggers: Iterable[Any], class_names: Sequence[str]) -> None:
    """Make the summary of ``val/miou``, ``val/mdice``, each class's ``val/iou_<c>``, ``val/dice_<c>`` (and
    their dataset-level ``val/agg_*`` twins) their best (max) epoch, and of ``val/loss`` its min, instead
    of the last epoch's.

    Args:
        loggers: the stage's Lightning loggers (only W&B ones are touched).
        class_names: class names, background (not scored) first.
    """
    scores = ["miou", "mdice", *(f"{m}_{c}" for c in class_names[1:] for m in ("iou", "dice"))]
    maximised = [f"val/{p}{k}" for p in ("", "agg_") for k in scores]
    for run in wandb_runs(loggers):
        for key in maximised:
            run.define_metric(key, summary="max", step_metric="trainer/global_step")
        run.define_metric("val/loss", summary="min", step_metric="trainer/global_step")


def _display(image: np.ndarray) -> np.ndarray:
    """A (C, H, W) or (H, W) float image as uint8 (H, W) or (H, W, 3), stretched to its own range."""
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return (np.nan_to_num(scaled) * 255).round().clip(0, 255).astype(np.uint8)


def _class_labels(class_names: Sequence[str], *masks: np.ndarray, ignore_index: int = 255) -> dict[int, str]:
    labels = {i: str(name) for i, name in enumerate(class_names)}
    if any((np.asarray(m) == ignore_index).any() for m in masks):
        labels[ignore_index] = "ignore"
    return labels


def overlay(image: np.ndarray, class_names: Sequence[str], prediction: np.ndarray | None = None,
            ground_truth: np.ndarray | None = None, caption: str | None = None) -> Any:
    """A ``wandb.Image`` of ``image`` with its masks as W&B overlays.

    Args:
        image: (C, H, W) or (H, W) image, any range (stretched for display).
        class_names: class names, background first (the overlays' legend).
        prediction: (H, W) predicted classes, shown as the ``prediction`` overlay.
        ground_truth: (H, W) label (``255``: ignored pixels), shown as ``ground_truth``.
        caption: text under the image (the image id).

    Returns:
        The ``wandb.Image``.
    """
    import wandb  # noqa: PLC0415

    given = {
        k: np.asarray(m).astype(np.int64)
        for k, m in (("prediction", prediction), ("ground_truth", ground_truth))
        if m is not None
    }
    labels = _class_labels(class_names, *given.values())
    masks = {k: {"mask_data": m, "class_labels": labels} for k, m in given.items()}
    return wandb.Image(_display(image), masks=masks or None, caption=caption)


def prediction_overlays(model: Any, datamodule: Any, n: int = 4) -> dict[str, list[Any]]:
    """The first ``n`` images of each test set with the model's prediction and the ground truth.

    Predicts again (no grad, eval mode) with the model's current weights (after ``trainer.test``:
    the tested checkpoint's), post-processed as in testing (``model.labels``).

    Args:
        model: a :class:`~diffmask.segmentation.module.SegmentationLitModule`.
        datamodule: its (set up) datamodule: ``test_dataloader()``, ``test_set_names``, ``class_names``.
        n: images per test set.

    Returns:
        ``{test set name: [wandb.Image, ...]}``.
    """
    import torch  # noqa: PLC0415

    device = next(model.parameters()).device
    training = model.training
    model.eval()
    out: dict[str, list[Any]] = {}
    try:
        with torch.no_grad():
            for name, loader in zip(datamodule.test_set_names, datamodule.test_dataloader(), strict=True):
                dataset = loader.dataset
                k = min(n, len(dataset))
                if not k:
                    continue
                batch = loader.collate_fn([dataset[i] for i in range(k)])
                pred = model.labels(model(batch["image"].to(device))).cpu().numpy()
                out[name] = [
                    overlay(
                        img.float().numpy(), datamodule.class_names, p, lab[0].numpy(), caption=str(sid)
                    )
                    for img, lab, p, sid in zip(
                        batch["image"], batch["label"], pred, batch["id"], strict=True
                    )
                ]
    finally:
        model.train(training)
    return out


def per_image_table(path: str | os.PathLike) -> Any:
    """A ``per_image.csv`` as a ``wandb.Table``: ``set`` and ``id`` as text, scores as floats (NaN blank).

    Args:
        path: the file :func:`~diffmask.evaluation.paired.write_per_image` wrote.

    Returns:
        The ``wandb.Table``.
    """
    import wandb  # noqa: PLC0415

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty; expected a header row set,id,iou_<class>,...")
    columns, data = rows[0], rows[1:]
    text = {"set", "id"}

    def cell(column: str, value: str) -> Any:
        return value if column in text else (float(value) if value else None)

    cells = [[cell(c, v) for c, v in zip(columns, row, strict=True)] for row in data]
    return wandb.Table(columns=columns, data=cells)


def _summary_value(value: Any) -> Any:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return None if math.isnan(number) else number


def log_test_results(
    loggers: Iterable[Any],
    metrics: Mapping[str, Any],
    facts: Mapping[str, Any],
    per_image: str | os.PathLike | None = None,
    overlays: Mapping[str, list[Any]] | None = None,
    step: int | None = None,
) -> None:
    """Put a segmentation run's results in its W&B summary and log its media.

    Summary: every ``test/<set>/...`` metric (per class IoU and Dice, means, aggregates),
    ``best_val_miou``, ``data/real``, ``data/n_real_train``, ``data/n_synthetic_train``,
    ``data/real_fraction``, ``missing_test_sets``, ``fit_seconds``, ``epochs``. Media:
    ``test/per_image`` (the ``per_image.csv`` table) and ``test/<set>/predictions`` (overlays).

    Args:
        loggers: the stage's Lightning loggers (only live W&B runs are written to).
        metrics: the run's metrics (``test/...`` keys are summarised).
        facts: the run information written to ``metrics.json`` (``data``, ``missing_test_sets``, ...).
        per_image: the run's ``per_image.csv`` (None or missing: no table).
        overlays: ``{test set: [wandb.Image]}`` (:func:`prediction_overlays`).
        step: ``trainer/global_step`` for the media (the x-axis Lightning's logger uses).
    """
    runs = wandb_runs(loggers)
    if not runs:
        return
    data = facts.get("data") or {}
    summary = {k: _summary_value(v) for k, v in metrics.items() if k.startswith("test/")}
    summary.update({
        "best_val_miou": facts.get("best_val_miou"),
        **{f"data/{k}": data.get(k) for k in ("real", "n_real_train", "n_synthetic_train", "real_fraction")},
        "missing_test_sets": dict(facts.get("missing_test_sets") or {}),
        "fit_seconds": facts.get("fit_seconds"),
        "epochs": facts.get("epochs"),
    })
    media: dict[str, Any] = {f"test/{name}/predictions": images for name, images in (overlays or {}).items()}
    if per_image is not None and Path(per_image).is_file():
        media["test/per_image"] = per_image_table(per_image)
    if media and step is not None:
        media["trainer/global_step"] = step
    for run in runs:
        if media:
            run.log(media)
        run.summary.update(summary)


def log_synthesis(
    cfg: DictConfig,
    folder: str | os.PathLike,
    class_names: Sequence[str],
    counts: Mapping[str, Any],
    n: int = 8,
    dataset: str | None = None,
) -> bool:
    """Log a generated set to W&B when the config has a ``WandbLogger`` node (``logger=wandb``).

    A run of its own (job type ``generate``): the first ``n`` synthetic pairs as images with their
    mask as an overlay (``synthesis/pairs``), the counts in the summary, the config with the
    identity's additions. Interpolations of the node resolve against ``cfg``.

    Args:
        cfg: the generation config.
        folder: the committed synthetic set (``manifest.jsonl``, ``images/``, ``masks/``).
        class_names: its class names, background first.
        counts: the stage's counts (``rows``, ``made``, ``images_per_s``, ...), numbers summarised.
        n: pairs to show.
        dataset: the real source's name, for the tags.

    Returns:
        True when a run was logged.
    """
    node = wandb_node(cfg.get("logger"))
    if node is None:
        return False
    import wandb  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from diffmask.data.manifest import read_manifest  # noqa: PLC0415
    from diffmask.data.sources import read_image  # noqa: PLC0415

    identity = run_identity(cfg, dataset=dataset, stage="generate")
    config = {**OmegaConf.to_container(cfg, resolve=True), **identity.config()}
    with wandb.init(**init_arguments(fill_wandb_node(node, identity)), config=config) as run:
        if getattr(run, "disabled", False):
            return False
        folder = Path(folder)
        channels = int(OmegaConf.select(cfg, "data.channels", default=1) or 1)
        pairs = []
        for row in read_manifest(folder)[:n]:
            image = read_image(folder / row.file_name, channels)
            image = image if image.ndim == 2 else np.moveaxis(image, -1, 0)
            mask = np.asarray(Image.open(folder / row.sem_seg_file_name)) if row.sem_seg_file_name else None
            pairs.append(overlay(image, class_names, ground_truth=mask,
                                 caption=_clip(f"{row.id}: {row.prompt}", 200, keep_end=False)))
        if pairs:
            run.log({"synthesis/pairs": pairs})
        run.summary.update({f"synthesis/{k}": v for k, v in counts.items() if isinstance(v, int | float)})
    return True


def init_arguments(node: DictConfig) -> dict[str, Any]:
    """``wandb.init`` keyword arguments from a (filled) ``WandbLogger`` node.

    ``save_dir`` becomes ``dir``, ``version`` ``id``, ``offline: true`` ``mode="offline"``; keys
    only the Lightning logger reads (``log_model``, ``prefix``, ...) are left out.

    Args:
        node: the node, e.g. :func:`fill_wandb_node`'s.

    Returns:
        The keyword arguments ``wandb.init`` takes.

    Raises:
        ValueError: a key that is neither a ``WandbLogger`` setting nor a ``wandb.init`` argument.
    """
    import wandb  # noqa: PLC0415

    given = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in LOGGER_ONLY}
    renamed = {"save_dir": "dir", "version": "id"}
    args = {renamed.get(k, k): v for k, v in given.items() if k != "offline"}
    if given.get("offline"):
        args["mode"] = "offline"
    accepted = inspect.signature(wandb.init).parameters
    unknown = sorted(k for k in args if k not in accepted)
    if unknown:
        raise ValueError(f"logger.wandb: {unknown} are not WandbLogger settings nor wandb.init arguments")
    return {k: v for k, v in args.items() if v is not None}


def report_group(sweep_dir: str | os.PathLike, run_dirs: Iterable[str | os.PathLike]) -> str:
    """The W&B group of a report on ``sweep_dir``: its runs' group when they share one (each
    ``metrics.json`` ``run_group``), else the folder's own label (:func:`folder_label`).

    Args:
        sweep_dir: the folder the report reads.
        run_dirs: its runs' folders.

    Returns:
        The group.
    """
    groups = set()
    for folder in run_dirs:
        try:
            groups.add(json.loads((Path(folder) / "metrics.json").read_text()).get("run_group"))
        except (OSError, ValueError, AttributeError):
            groups.add(None)
    if len(groups) == 1 and None not in groups:
        return str(groups.pop())
    return folder_label(sweep_dir)


def log_report(
    project: str,
    sweep_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    run_dirs: Sequence[Path],
    columns: list[str],
    rows: list[list[Any]],
    plots: Mapping[str, Path],
    config: Mapping[str, Any] | None = None,
) -> None:
    """Log a report's table and plots to W&B in the sweep's group (job type ``report``).

    Args:
        project: the W&B project.
        sweep_dir: the folder the report reads (its path goes into the config).
        out_dir: the report's folder; W&B's files go to ``<out_dir>/wandb``.
        run_dirs: the runs the report holds (their shared ``run_group`` is the group).
        columns: the table's columns (``report.csv``'s).
        rows: its rows.
        plots: ``{name: PNG}`` logged as images.
        config: more config entries (the report's options).
    """
    import wandb  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sweep_dir)
    group = report_group(root, run_dirs)
    settings = {"sweep_dir": str(root.resolve()), "out_dir": str(out.resolve()), "run_group": group,
                "n_runs": len(run_dirs), **(config or {})}
    name = _clip(f"report {root.name}", keep_end=False)
    with wandb.init(
        project=project,
        group=group,
        job_type="report",
        name=name,
        dir=str(out),
        config=settings,
        tags=["report"],
    ) as run:
        table = wandb.Table(columns=columns, data=rows)
        run.log({"results": table, **{k: wandb.Image(str(p)) for k, p in plots.items()}})
