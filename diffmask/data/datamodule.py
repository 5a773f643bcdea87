"""LightningDataModule that mixes real and synthetic data from the command line.

``real_fraction`` picks a reproducible share of the real training split; ``synthetic_count``
(absolute) or ``synthetic_ratio`` (per selected real image) picks synthetic samples. Val and
test always use real data; extra test sets (``test_sets``) plug in by name.

In paired mode (``paired=True``; ``diffmask-train`` sets it when ``segmentation.merge.alpha``
is not null) the training set is the selected real images, each served with one of its
synthetic variants (the selected synthetic samples whose manifest ``pair_id`` is its id) as
``pair_image`` / ``pair_label``, for random merging masks (EMIT-Diff,
:mod:`diffmask.segmentation.merge`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler, WeightedRandomSampler

from diffmask.data.dataset import PairedDataset, SegmentationDataset, check_intensity, check_resize
from diffmask.data.sources import ManifestSource, SampleSource, open_test_set
from diffmask.labels import validate_class_names
from diffmask.seeds import check_seed

__all__ = ["SegmentationDataModule", "collate_samples", "select_fraction"]

log = logging.getLogger(__name__)


def collate_samples(items: list[dict]) -> dict:
    """Stack tensors (``image``, ``label``, and in paired mode ``pair_image``, ``pair_label``); keep
    strings and metadata dicts as lists (their keys may differ).

    Args:
        items: the dataset items of one batch.
    """
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def select_fraction(ids: list[str], fraction: float, seed: int, field: str = "real_fraction") -> list[str]:
    """A reproducible subset of ``round(fraction * len(ids))`` ids, at least one when fraction > 0.

    0 gives none, 1 gives all; 0.1 of the 173 JSRT training images gives 17.

    Subsets are nested: for one seed, the ids of a smaller fraction are inside a larger one.

    Args:
        ids: the ids to draw from.
        fraction: the share to keep, in [0, 1].
        seed: seed of the draw.
        field: the setting named in the error message.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{field}: expected a fraction in [0, 1], got {fraction}")
    n = max(1, round(fraction * len(ids))) if fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(ids))
    return [ids[i] for i in sorted(order[:n])]


def _check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
    return int(channels)


def _check_counts(
    batch_size: int,
    synthetic_ratio: float,
    synthetic_count: int | None,
    real_share: float | None,
    synthetic_ignore_margin: int,
    synthetic_min_class_presence: float | None,
) -> None:
    """Value checks of the datamodule's numeric settings (named errors)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if synthetic_ratio < 0:
        raise ValueError(f"synthetic_ratio: expected >= 0, got {synthetic_ratio}")
    if synthetic_count is not None and synthetic_count < 0:
        raise ValueError(f"synthetic_count: expected >= 0 or null, got {synthetic_count}")
    if real_share is not None and not 0.0 < real_share < 1.0:
        raise ValueError(f"real_share: expected a share in (0, 1) or null, got {real_share}")
    if synthetic_ignore_margin < 0:
        raise ValueError(f"synthetic_ignore_margin: expected >= 0 pixels, got {synthetic_ignore_margin}")
    if synthetic_min_class_presence is not None and not 0.0 <= synthetic_min_class_presence <= 1.0:
        raise ValueError(
            "synthetic_min_class_presence: expected a share in [0, 1] or null, got "
            f"{synthetic_min_class_presence}"
        )


def _check_paired(synthetic_dir, real_fraction: float, real_share: float | None) -> None:
    """Settings that paired mode (random merging masks) cannot work with."""
    why = "paired data (for segmentation.merge.alpha, random merging masks)"
    if not synthetic_dir:
        raise ValueError(
            f"{why} needs data.synthetic_dir: a synthetic set whose manifest rows carry pair_id, the real "
            "training image each was made from"
        )
    if real_fraction == 0:
        raise ValueError(
            f"{why} pairs real training images with their variants: data.real_fraction=0 leaves none"
        )
    if real_share is not None:
        raise ValueError(
            f"data.real_share={real_share} has no meaning with {why}: every item is a real image and a "
            "variant of it, mixed by segmentation.merge.alpha; set data.real_share=null"
        )


def _check_optional_classes(optional_classes: Sequence[str], class_names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [c for c in optional_classes if c not in class_names[1:]]
    if unknown:
        raise ValueError(f"optional_classes: {unknown} are not foreground classes of {list(class_names)}")
    return tuple(optional_classes)


def _check_real_source(real: SampleSource, class_names: tuple[str, ...], channels: int) -> None:
    """The real source reads images of ``channels`` and has ``class_names`` (its attributes only)."""
    if getattr(real, "channels", channels) != channels:
        raise ValueError(
            f"channels={channels} but the {real.name} source reads {real.channels}-channel images; "
            "give the source channels: ${data.channels}"
        )
    if tuple(real.class_names) != class_names:
        raise ValueError(
            f"class_names {list(class_names)} differ from the {real.name} source's {list(real.class_names)}"
        )


def _check_test_set_names(
    real_name: str, external_sets: Sequence[str] | None, test_sets: Mapping[str, str] | None
) -> list[str]:
    """The external set folders, once their names (folder names) and ``test_sets``' names are unique."""
    if isinstance(external_sets, str | Mapping):
        raise ValueError(f"external_sets: expected a list of folders, got {external_sets!r}")
    names: set[str] = set()
    for path in external_sets or []:
        name = Path(path).name
        if name in names or name == real_name:
            raise ValueError(f"external_sets: two test sets named {name!r} (by their folders); rename one")
        names.add(name)
    for name in test_sets or {}:
        if name in names or name == real_name:
            raise ValueError(
                f"test_sets: the name {name!r} is taken (real data or paths.external_sets); rename it"
            )
    return [str(p) for p in external_sets or []]


class SegmentationDataModule(pl.LightningDataModule):
    """Real (+ synthetic) training data, real validation and test data.

    Args:
        real: source of real data with train/val/test splits.
        class_names: label names, background first; must match the sources' class names
            (the configs give ``data.class_names``); None = the real source's.
        size: image side (64, 128, 256, ...).
        batch_size: per-device batch size.
        real_fraction: share of the real train split used (0.1 of 173 = 17 ids; 0 = none).
        synthetic_dir: optional synthetic dataset folder (``manifest.jsonl`` + images/ + masks/),
            or a list of them read as one set (ids ``<folder name>/<id>``; e.g. an EMIT-Diff set and
            a DiffMask set).
        synthetic_min_score: drop synthetic samples whose lowest per-class score is below this.
        synthetic_ignore_margin: synthetic mask pixels within this many pixels (at ``size``) of
            another class are left out of the loss: the borders are where attention masks are
            least sure (0 = every pixel counts).
        synthetic_min_class_presence: refuse a synthetic set in which a foreground class appears
            in fewer than this share of the masks (an undertrained generator's masks are mostly
            background); read from the set's ``stage.json`` (``class_presence``, recorded by
            generate and remask), else measured on its masks. None = train on it anyway.
        synthetic_ratio: synthetic samples per selected real sample (used when
            ``synthetic_count`` is None); with ``real_fraction=0``, or in paired mode with a ratio
            of 0, all synthetic samples are used.
        synthetic_count: absolute number of synthetic samples (overrides the ratio; None = ratio).
        real_share: when real and synthetic samples are mixed, the expected share of real ones in
            each training batch (drawn with replacement; an epoch keeps its length). None = as
            many as their count gives (17 real among 346 synthetic: 5 %).
        augment: transform for real training samples (None = none).
        synthetic_augment: transform for synthetic samples (None = none).
        test_sets: extra named test sets, name -> a manifest folder or an ``images/`` + ``masks/``
            folder (:func:`~diffmask.data.sources.open_test_set`; rows without a split count as
            ``test``); the real source's test split always comes first, under ``real.name``. A
            missing folder is an error: it was asked for.
        external_sets: folders of test sets from other hospitals, scored by every run
            (``paths.external_sets``, default Montgomery), each named by its folder; scored after
            the real test split, before ``test_sets``. A missing folder is one log line and an
            entry in :attr:`missing_test_sets` (the run's ``metrics.json``), never a crash: an
            outside user has none of them.
        intensity: per-image intensity normalisation of every image served, real, synthetic,
            validation and test alike: ``raw``, ``percentile``, ``equalize`` (the configs'
            default) or ``clahe`` (:func:`~diffmask.data.dataset.normalize_intensity`).
        resize: how a non-square image becomes ``size`` x ``size``: ``stretch`` (both axes
            scaled, as the SCR and Montgomery masks were made) or ``letterbox`` (the short side
            padded with black and background first, keeping the aspect ratio).
        num_workers: DataLoader workers.
        seed: seed of the real/synthetic subset draws.
        train_split: the real source's split to train on.
        val_split: the real source's split to validate on.
        test_split: the real source's split to test on (external sets are scored only when it is ``test``).
        paired: serve the selected real training images only, each with a synthetic variant of
            it drawn afresh at every fetch (:class:`~diffmask.data.dataset.PairedDataset`): the
            selected synthetic samples whose ``pair_id`` is its id; real images without one are
            paired with themselves (logged). Synthetic samples go through ``synthetic_augment``,
            ``synthetic_ignore_margin`` and the synthetic intensity as when mixed; the pair's
            augmentations are drawn independently. Needs ``synthetic_dir`` and real images, and
            excludes ``real_share``. :attr:`pair_info` counts the pairs (``metrics.json``).
            ``diffmask-train`` sets it from ``segmentation.merge.alpha``; it is no config key.
        channels: 1 (grey) or 3 (colour, RGB) for every image served, real, synthetic and test;
            an image of the other kind is an error naming it, never a silent conversion.
        optional_classes: foreground classes that may be absent from an image (lesions); the
            others (anatomy) are expected in every image. The synthetic class-presence check
            (``synthetic_min_class_presence``) applies to the expected classes only.
        prompt: how prompts describe this dataset (modality noun, class words, metadata fields;
            see ``conf/data/jsrt.yaml``). The datamodule keeps it as :attr:`prompt`; the
            diffusion stages read it by interpolation (``${data.prompt...}``).

    Life cycle: the constructor only stores and checks the settings (no file is read); :meth:`setup`
    opens the synthetic and test sets, checks every test image and the synthetic masks, and draws
    the training ids, once. The CLIs call ``setup()`` right after building the datamodule, so a bad
    file fails before any model is built; reading a data-derived attribute before ``setup()`` runs
    it (code that reads them straight after construction keeps working).

    Public interface (what stages and modules may read; everything ``_``-prefixed is internal):

    - settings as given: :attr:`class_names`, :attr:`size`, :attr:`batch_size`, :attr:`channels`,
      :attr:`intensity` (``data.intensity``), :attr:`resize`, :attr:`seed` (``data.seed``),
      :attr:`real_fraction`, :attr:`paired`, :attr:`prompt`, :attr:`optional_classes`;
    - the real data: :attr:`real` (the source), :meth:`real_ids` (a split's ids),
      :meth:`split_name`, :meth:`real_dataset` (images served as the loaders serve them),
      :meth:`set_real_source` (serve them through another source, e.g. one adding metadata);
    - after :meth:`setup`: :attr:`real_train_ids`, :attr:`synthetic_ids`, :attr:`synthetic`,
      :attr:`synthetic_intensity`, :attr:`pair_info`, :meth:`test_sources`, :attr:`test_set_names`,
      :meth:`test_set_info`, :attr:`extra_test_sets`, :attr:`missing_test_sets`,
      :attr:`test_set_classes`.

    Raises:
        ValueError: (constructor) a setting out of range, or in paired mode no ``synthetic_dir``,
            ``real_fraction=0`` or a ``real_share``; (:meth:`setup`) bad test or synthetic data, an
            empty training set, or in paired mode no real image with a variant.
    """

    def __init__(
        self,
        real: SampleSource,
        class_names: list[str] | tuple[str, ...] | None = None,
        size: int = 128,
        batch_size: int = 8,
        real_fraction: float = 1.0,
        synthetic_dir: str | Sequence[str] | None = None,
        synthetic_ratio: float = 0.0,
        synthetic_count: int | None = None,
        synthetic_min_score: float | None = None,
        synthetic_ignore_margin: int = 0,
        synthetic_min_class_presence: float | None = 0.5,
        real_share: float | None = None,
        augment: Callable | None = None,
        synthetic_augment: Callable | None = None,
        test_sets: Mapping[str, str] | None = None,
        external_sets: Sequence[str] | None = None,
        intensity: str = "raw",
        resize: str = "stretch",
        num_workers: int = 0,
        seed: int = 0,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        paired: bool = False,
        channels: int = 1,
        optional_classes: Sequence[str] = (),
        prompt: Mapping | None = None,
    ):
        super().__init__()
        _check_counts(
            batch_size,
            synthetic_ratio,
            synthetic_count,
            real_share,
            synthetic_ignore_margin,
            synthetic_min_class_presence,
        )
        self.channels = _check_channels(channels)
        self.prompt = dict(prompt or {})
        self.paired = bool(paired)
        if self.paired:
            _check_paired(synthetic_dir, real_fraction, real_share)
        self.seed = check_seed(seed, "data.seed")
        self.intensity = check_intensity(intensity)
        self.resize = check_resize(resize)
        self.class_names = validate_class_names(real.class_names if class_names is None else class_names)
        self.optional_classes = _check_optional_classes(optional_classes, self.class_names)
        _check_real_source(real, self.class_names, self.channels)
        self._real = real
        self.size = size
        self.batch_size = batch_size
        self.real_fraction = real_fraction
        self.synthetic_dir = synthetic_dir
        self.synthetic_min_score = synthetic_min_score
        self.synthetic_ratio = synthetic_ratio
        self.synthetic_count = synthetic_count
        self.synthetic_min_class_presence = synthetic_min_class_presence
        self.synthetic_ignore_margin = int(synthetic_ignore_margin)
        self.real_share = real_share
        self.augment = augment
        self.synthetic_augment = synthetic_augment
        self.num_workers = num_workers
        self._splits = {"train": train_split, "val": val_split, "test": test_split}
        self._external_sets = _check_test_set_names(real.name, external_sets, test_sets)
        self._test_sets = dict(test_sets or {})
        self._draws = torch.Generator().manual_seed(self.seed + 2)
        self._ready = False  # setup() has read and checked the data (the state below)
        self._synthetic: ManifestSource | None = None
        self._synthetic_intensity = self.intensity  # from the sets' stage.json (_check_synthetic_set)
        self._extra_test_sets: dict[str, SampleSource] = {}
        self._missing_test_sets: dict[str, str] = {}
        self._test_set_classes: dict[str, list[str]] = {}  # filled by _check_test_sets
        self._real_train_ids: list[str] = []
        self._synthetic_ids: list[str] = []
        self._pair_info: dict[str, int] | None = None  # set in paired mode, for metrics.json
        self._variants: list[list[int]] = []  # per real training id, indices into synthetic_ids

    # ---- reading and checking the data (setup) --------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Open the synthetic and test sets, check them and draw the training ids (once; later calls
        do nothing, whatever the stage).

        Every check runs here, for every stage: a bad test image fails before a fit, not after it.
        The CLIs call it right after building the datamodule; the Trainer calls it again (a no-op).

        Args:
            stage: Lightning's stage (``fit``, ``validate``, ``test``, ``predict``) or None; the
                same work is done for each.

        Raises:
            ValueError: a bad test or synthetic set, a test set lacking a class of
                ``class_names`` (the real one), an empty training set, or in paired mode no real
                image with a variant.
            FileNotFoundError: a folder of ``test_sets`` is not a test set.
        """
        if self._ready:
            return
        real = self._real
        if self.synthetic_dir:
            self._synthetic = ManifestSource(
                self.synthetic_dir,
                self.class_names,
                "train",
                min_score=self.synthetic_min_score,
                channels=self.channels,
            )
        self._open_test_sets()
        self._check_test_sets()
        self._real_train_ids = select_fraction(real.ids(self._splits["train"]), self.real_fraction, self.seed)
        self._synthetic_ids = self._select_synthetic()
        if self._synthetic is not None:
            self._synthetic_intensity = self._check_synthetic_sets()
        if self.paired:
            self._pair_variants(self.synthetic_dir)
        if not self._real_train_ids and not self._synthetic_ids:
            raise ValueError(
                f"data: the training set is empty (real_fraction={self.real_fraction}, "
                f"synthetic_dir={self.synthetic_dir}, "
                f"synthetic_count={self.synthetic_count}, synthetic_ratio={self.synthetic_ratio})"
            )
        self._ready = True
        log.info(
            "data: %d real train (%s, fraction %.3g) %s %d synthetic train images at %dpx%s",
            len(self._real_train_ids),
            real.name,
            self.real_fraction,
            "paired with variants among" if self.paired else "+",
            len(self._synthetic_ids),
            self.size,
            "" if self.real_share is None else f", real share per batch {self.real_share:g}",
        )

    def _set_up(self) -> SegmentationDataModule:
        """This datamodule after :meth:`setup` (run now when it has not been)."""
        if not self._ready:
            self.setup()
        return self

    def _open_test_sets(self) -> None:
        """The external sets that exist (the others are recorded as missing), then ``test_sets``."""
        test_split = self._splits["test"]
        for path in self._external_sets:
            name = Path(path).name
            if test_split != "test":  # e.g. tuning on the validation split: other hospitals stay unseen
                self._missing_test_sets[name] = (
                    f"not scored: data.test_split={test_split} (external sets are test-only)"
                )
                log.info("external test set %r not scored: data.test_split=%s", name, test_split)
                continue
            if not Path(path).exists():
                self._missing_test_sets[name] = f"{path}: folder not found"
                log.warning(
                    "external test set %r not found at %s: not scored (paths.external_sets)", name, path
                )
                continue
            self._extra_test_sets[name] = open_test_set(
                path, self.class_names, name=name, channels=self.channels
            )
        for name, path in self._test_sets.items():
            self._extra_test_sets[name] = open_test_set(
                path, self.class_names, name=name, channels=self.channels
            )

    def _check_synthetic_sets(self) -> str:
        """The intensity that serves the synthetic images (one for every folder of the set)."""
        served = {self._check_synthetic_set(folder) for folder in self._synthetic.folders}
        if len(served) > 1:
            raise ValueError(
                f"data.synthetic_dir: {[str(f) for f in self._synthetic.folders]} come from generators "
                "fitted on "
                "different data.intensity settings (their stage.json); list sets made alike"
            )
        return served.pop()

    # ---- the public interface: what the stages and modules read --------------------------------
    @property
    def real(self) -> SampleSource:
        """The source of real data (train/val/test splits); replace it with :meth:`set_real_source`."""
        return self._real

    def set_real_source(self, source: SampleSource) -> None:
        """Serve the real images from ``source`` from now on (e.g. a wrapper adding metadata words).

        Args:
            source: a source with the same ids and class names as the current one.

        Raises:
            ValueError: its class names differ.
        """
        if tuple(source.class_names) != self.class_names:
            raise ValueError(
                f"class_names {list(self.class_names)} differ from the {source.name} source's "
                f"{list(source.class_names)}"
            )
        self._real = source

    def split_name(self, role: str) -> str:
        """The real source's split that plays ``role`` (``data.train_split``, ``val_split``, ``test_split``).

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        return self._splits[role]

    def real_ids(self, role: str = "train") -> list[str]:
        """Every id of the real source's split that plays ``role`` (not only the selected ones:
        :attr:`real_train_ids` are those).

        Args:
            role: ``train``, ``val`` or ``test``.
        """
        return self._real.ids(self._splits[role])

    def real_dataset(self, ids: Sequence[str], transform: Callable | None = None) -> SegmentationDataset:
        """Real images ``ids`` served as every loader serves them (size, intensity, resize, channels).

        Args:
            ids: ids of the real source.
            transform: augmentation (None = none).
        """
        return self._real_dataset(self._real, list(ids), transform)

    @property
    def real_train_ids(self) -> list[str]:
        """The selected real training ids (``real_fraction`` of the train split); runs :meth:`setup`
        if needed."""
        return self._set_up()._real_train_ids

    def train_metas(self) -> list[dict[str, str]]:
        """Metadata of the selected real training images, as the real source serves them now."""
        return [self.real.load(sid).meta for sid in self.real_train_ids]

    @property
    def synthetic_ids(self) -> list[str]:
        """The selected synthetic training ids; runs :meth:`setup` if needed."""
        return self._set_up()._synthetic_ids

    @property
    def synthetic(self) -> ManifestSource | None:
        """The synthetic set (None without ``synthetic_dir``); runs :meth:`setup` if needed."""
        return self._set_up()._synthetic

    @property
    def synthetic_intensity(self) -> str:
        """The normalisation applied to the synthetic images (from their ``stage.json``); runs
        :meth:`setup` if needed."""
        return self._set_up()._synthetic_intensity

    @property
    def pair_info(self) -> dict[str, int] | None:
        """Paired mode: the pair counts for ``metrics.json`` (else None); runs :meth:`setup` if needed."""
        return self._set_up()._pair_info

    @property
    def extra_test_sets(self) -> dict[str, SampleSource]:
        """The test sets scored after the real test split, by name; runs :meth:`setup` if needed."""
        return self._set_up()._extra_test_sets

    @property
    def missing_test_sets(self) -> dict[str, str]:
        """External test sets not scored, with why (``metrics.json``); runs :meth:`setup` if needed."""
        return self._set_up()._missing_test_sets

    @property
    def test_set_classes(self) -> dict[str, list[str]]:
        """Per test set, the classes its masks hold (it is scored on those); runs :meth:`setup` if needed."""
        return self._set_up()._test_set_classes

    def test_sources(self) -> dict[str, SampleSource]:
        """Every test set by name: the real source first, then :attr:`extra_test_sets`."""
        return {self._real.name: self._real, **self.extra_test_sets}

    def _pair_variants(self, synthetic_dir: str) -> None:
        """Find each selected real training image's variants among the selected synthetic samples."""
        pair_of = {r.id: r.pair_id for r in self._synthetic.rows()}
        position = {sid: i for i, sid in enumerate(self._real_train_ids)}
        self._variants = [[] for _ in self._real_train_ids]
        unmatched = 0
        for j, sid in enumerate(self._synthetic_ids):
            i = position.get(pair_of.get(sid))
            if i is None:
                unmatched += 1
            else:
                self._variants[i].append(j)
        with_variants = sum(bool(v) for v in self._variants)
        if not with_variants:
            n_tagged = sum(pair_of.get(sid) is not None for sid in self._synthetic_ids)
            raise ValueError(
                f"data.synthetic_dir={synthetic_dir}: none of the {len(self._synthetic_ids)} selected "
                "synthetic samples "
                f"({n_tagged} with a pair_id) is a variant of one of the {len(self._real_train_ids)} "
                "selected real "
                f"training images ({self._real.name}): paired data (segmentation.merge.alpha) needs "
                "manifest rows whose "
                "pair_id is a real training id (data.real_fraction, data.synthetic_count / "
                "synthetic_ratio select both)"
            )
        self_paired = len(self._variants) - with_variants
        self._pair_info = {
            "n_pairs": len(self._synthetic_ids) - unmatched,
            "n_real_with_variants": with_variants,
            "n_real_self_paired": self_paired,
            "n_synthetic_unmatched": unmatched,
        }
        if self_paired:
            log.warning(
                "data: %d of %d real training images have no variant among the selected synthetic samples: "
                "paired with themselves (their plain loss)",
                self_paired,
                len(self._variants),
            )
        if unmatched:
            log.info(
                "data: %d selected synthetic samples are no variant of a selected real image: unused",
                unmatched,
            )

    def _check_synthetic_set(self, folder: Path) -> str:
        """The normalisation that serves ``folder``'s images like the real ones; when synthetic
        samples are used, refuse masks in which a class is mostly absent (``synthetic_min_class_presence``).

        A generator trained on ``data.intensity=X`` images makes X-normalised images (its set's
        ``stage.json`` records X): with X = this run's setting they are served as they are (CLAHE
        twice is not CLAHE), with X = ``raw`` they are normalised like the real ones, and any
        other X is refused: real and synthetic images would differ in appearance by construction.
        """
        stage_file = (folder if folder.is_dir() else folder.parent) / "stage.json"
        info = json.loads(stage_file.read_text()) if stage_file.is_file() else {}
        made_from = info.get("intensity", "raw")
        if made_from == self.intensity:
            served = "raw"
        elif made_from == "raw":
            served = self.intensity
        else:
            raise ValueError(
                f"data.intensity={self.intensity}, but the synthetic images in {stage_file.parent} come "
                "from a "
                f"diffusion model trained on data.intensity={made_from} images (its stage.json): give "
                "every stage "
                "the same setting (pipeline: in its common list)"
            )
        if self.synthetic_min_class_presence is None or not self._synthetic_ids:
            return served
        presence = info.get("class_presence")
        if presence is None:  # a set made before stage.json recorded it, or by hand
            presence = self._synthetic.class_presence()
        sparse = {
            name: share
            for name, share in presence.items()
            if share < self.synthetic_min_class_presence and name not in self.optional_classes
        }
        if sparse:
            shares = ", ".join(f"{name} in {share:.0%}" for name, share in sparse.items())
            raise ValueError(
                f"synthetic_dir: {folder}: class(es) present in too few masks ({shares}; "
                f"data.synthetic_min_class_presence={self.synthetic_min_class_presence:g}); an undertrained "
                "generator's attention masks are mostly background (see the set's stage.json warnings). "
                "A class that may be absent from an image (a lesion) belongs in data.optional_classes. "
                "To train on it anyway: data.synthetic_min_class_presence=null"
            )
        return served

    def _check_test_sets(self) -> None:
        """Open every test image and mask now, so that a bad file fails before the fit, not after it
        (when the fit's scores on the other test sets would be lost with it). A class that no mask
        of the real test split holds is an error (the dataset config asks for a class its masks
        never contain); an external set may lack classes (lungs only) and is scored on those it has."""
        for name, source in {self._real.name: self._real, **self._extra_test_sets}.items():
            ids = source.ids(self._splits["test"])
            problems = []
            seen = np.zeros(len(self.class_names), bool)
            for sid in ids:
                try:
                    sample = source.load(sid)
                except (OSError, ValueError) as e:
                    problems.append(str(e))
                    continue
                if sample.label is None:
                    problems.append(f"{sid}: no mask (a test image needs a label map: sem_seg_file_name)")
                    continue
                seen[np.unique(sample.label)] = True
            if problems:
                shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
                where = getattr(source, "root", name)
                raise ValueError(
                    f"test set {name!r} ({where}): {len(problems)} of {len(ids)} test samples are bad "
                    f"(checked before the fit):\n  {shown}"
                )
            self._test_set_classes[name] = [
                c for c, there in zip(self.class_names[1:], seen[1:], strict=True) if there
            ]
            absent = [c for c in self.class_names[1:] if c not in self._test_set_classes[name]]
            if (
                absent and source is self._real
            ):  # the dataset's own masks: a class it never holds is a config error
                where = getattr(source, "root", name)
                raise ValueError(
                    f"data.class_names asks for {absent} (labels "
                    f"{[self.class_names.index(c) for c in absent]}), but no "
                    f"mask of the {name} test split ({where}) holds them: check the class list against the "
                    "masks' "
                    "label values (diffmask-check-data)"
                )
            if absent:
                log.info(
                    "test set %r has no %s label: scored on %s only",
                    name,
                    ", ".join(absent),
                    ", ".join(self._test_set_classes[name]),
                )

    def test_set_info(self) -> dict[str, dict]:
        """Per test set: its folder, image count and the classes it is scored on (for ``metrics.json``)."""
        sources = self.test_sources()
        return {
            name: {
                "path": str(getattr(src, "root", "")) or None,
                "n_images": len(src.ids(self._splits["test"])),
                "classes": self.test_set_classes.get(name),
            }
            for name, src in sources.items()
        }

    def _select_synthetic(self) -> list[str]:
        if self._synthetic is None:
            if self.synthetic_count:
                raise ValueError(
                    f"synthetic_count={self.synthetic_count} but no synthetic data is configured"
                )
            return []
        pool = self._synthetic.ids(self._splits["train"])
        if self.synthetic_count is not None:
            n = self.synthetic_count
        elif self.real_fraction == 0 or (self.paired and self.synthetic_ratio == 0):
            n = len(pool)  # synthetic only; or paired, where the pool only supplies variants
        else:
            n = round(self.synthetic_ratio * len(self._real_train_ids))
        if n > len(pool):
            raise ValueError(
                f"data: asked for {n} synthetic samples but {self._synthetic.name} has only {len(pool)}"
            )
        order = np.random.default_rng(self.seed + 1).permutation(len(pool))
        return [pool[i] for i in sorted(order[:n])]

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    @property
    def test_set_names(self) -> list[str]:
        """Names of the test sets in :meth:`test_dataloader` order (the real one first)."""
        return list(self.test_sources())

    def train_dataset(self) -> torch.utils.data.Dataset:
        """The training set: selected real (augmented) + synthetic samples, or in paired mode the
        selected real images with their variants."""
        if self.paired:
            real = self._real_dataset(self.real, self.real_train_ids, self.augment)
            # the pair's augmentation is drawn independently of its real image's; an offset beyond any
            # worker id (workers are seeded base_seed + worker_id) keeps workers from sharing streams too
            return PairedDataset(real, self._synthetic_dataset(seed_offset=1_000_003), self._variants)
        parts = []
        if self.real_train_ids:
            parts.append(self._real_dataset(self.real, self.real_train_ids, self.augment))
        if self.synthetic_ids:
            parts.append(self._synthetic_dataset())
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def _real_dataset(
        self, source: SampleSource, ids: list[str], transform: Callable | None = None
    ) -> SegmentationDataset:
        return SegmentationDataset(
            source,
            ids,
            self.size,
            transform,
            intensity=self.intensity,
            resize=self.resize,
            channels=self.channels,
        )

    def _synthetic_dataset(self, seed_offset: int = 0) -> SegmentationDataset:
        return SegmentationDataset(
            self.synthetic,
            self.synthetic_ids,
            self.size,
            self.synthetic_augment,
            ignore_margin=self.synthetic_ignore_margin,
            intensity=self.synthetic_intensity,
            resize=self.resize,
            seed_offset=seed_offset,
            channels=self.channels,
        )

    def _loader(self, dataset, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_sampler(self) -> Sampler | None:
        """Weighted draws giving real samples ``real_share`` of each epoch (None: plain shuffling)."""
        n_real, n_syn = len(self.real_train_ids), len(self.synthetic_ids)
        if self.real_share is None or self.paired or not n_real or not n_syn:
            return None
        weights = torch.cat(
            [
                torch.full((n_real,), self.real_share / n_real, dtype=torch.double),
                torch.full((n_syn,), (1.0 - self.real_share) / n_syn, dtype=torch.double),
            ]
        )
        # one generator per datamodule: successive epochs (and reloaded loaders) draw afresh
        return WeightedRandomSampler(
            weights, num_samples=n_real + n_syn, replacement=True, generator=self._draws
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or ``real_share``-weighted) batches of :meth:`train_dataset`."""
        return self._loader(self.train_dataset(), shuffle=True, sampler=self.train_sampler())

    def val_dataloader(self) -> DataLoader:
        """Batches of the real validation split (no augmentation)."""
        return self._loader(self.real_dataset(self.real_ids("val")), shuffle=False)

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test set, in :attr:`test_set_names` order."""
        sources = self.test_sources()
        return [
            self._loader(self._real_dataset(src, src.ids(self._splits["test"])), shuffle=False)
            for src in sources.values()
        ]
