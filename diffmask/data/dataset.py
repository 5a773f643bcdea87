"""Torch datasets over a :class:`~diffmask.data.sources.SampleSource`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffmask.data.sources import Sample, SampleSource
from diffmask.labels import IGNORE_INDEX, ignore_boundaries

__all__ = [
    "INTENSITY_MODES",
    "RESIZE_MODES",
    "PairedDataset",
    "SegmentationDataset",
    "check_intensity",
    "check_resize",
    "normalize_intensity",
    "resize_sample",
]

log = logging.getLogger(__name__)
INTENSITY_MODES = ("raw", "percentile", "equalize", "clahe")
RESIZE_MODES = ("stretch", "letterbox")


def check_intensity(mode: str) -> str:
    """``mode`` if it is one of :data:`INTENSITY_MODES`, else a ValueError naming the field."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity: expected one of {list(INTENSITY_MODES)}, got {mode!r}")
    return mode


def check_resize(mode: str) -> str:
    """``mode`` if it is one of :data:`RESIZE_MODES`, else a ValueError naming the field."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize: expected one of {list(RESIZE_MODES)}, got {mode!r}")
    return mode


def normalize_intensity(image: np.ndarray, mode: str = "raw") -> np.ndarray:
    """Per-image intensity normalisation of a uint8 (H, W) grey or (H, W, 3) colour image; returns uint8.

    A colour image is normalised channel by channel (``percentile`` over all channels at once,
    so that the colour balance is kept).

    * ``raw``: unchanged.
    * ``percentile``: the 1st..99th percentile stretched linearly to 0..255 (undoes a linear
      change of exposure or window).
    * ``equalize``: histogram equalisation, with the histogram of the central half of the image
      (each side's middle 50 %, where the lungs and heart are in any chest X-ray; chosen for chest
      films: for other modalities prefer ``raw``, ``percentile`` or ``clahe``) mapping every
      pixel. Any strictly increasing change of the grey levels (gamma, window, exposure) gives
      the same output up to quantisation, which takes away much of the appearance gap between
      hospitals. The central histogram keeps a dark border or a wider field of view from
      shifting the whole map, as a whole-image histogram does (the whole-image version lost on
      shrunk JSRT test images: experiments/robustness/README.md, Results).
    * ``clahe``: contrast-limited adaptive histogram equalisation (scikit-image,
      ``clip_limit=0.01``, tiles of 1/8 of the side): equalises each region against its own
      neighbourhood, so a local change (a bias across the film, a marker, a border) stays local.
    """
    if check_intensity(mode) == "raw":
        return image
    if image.ndim == 3 and mode != "percentile":
        return np.stack([normalize_intensity(image[..., c], mode) for c in range(image.shape[-1])], -1)
    if mode == "percentile":
        lo, hi = np.percentile(image, [1.0, 99.0])
        if hi <= lo:
            return image
        out = (image.astype(np.float32) - lo) * (255.0 / (hi - lo))
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    if mode == "clahe":
        from skimage.exposure import equalize_adapthist  # noqa: PLC0415 - only this mode needs it

        if image.max() == image.min():
            return image
        return np.round(equalize_adapthist(image, clip_limit=0.01) * 255).astype(np.uint8)
    # equalize
    h, w = image.shape
    top, left = h // 4, w // 4
    hist = np.bincount(image[top : h - top, left : w - left].ravel(), minlength=256)
    if np.count_nonzero(hist) < 2:
        return image
    lut = np.round(np.cumsum(hist) * (255.0 / hist.sum())).astype(np.uint8)
    return lut[image]


def letterbox(array: np.ndarray, fill: int = 0) -> np.ndarray:
    """``array`` (H, W) or (H, W, C) padded evenly on its short side with ``fill`` to a square."""
    h, w = array.shape[:2]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    pad = ((top, side - h - top), (left, side - w - left)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, pad, constant_values=fill)


def resize_sample(sample: Sample, size: int, mode: str = "stretch") -> tuple[np.ndarray, np.ndarray | None]:
    """Resize to ``size``×``size``: image with area/bilinear filtering, label with nearest.

    A non-square image is stretched (``mode="stretch"``) or first padded to a square with black
    and background (``mode="letterbox"``).
    """
    image, label = sample.image, sample.label
    if check_resize(mode) == "letterbox" and image.shape[0] != image.shape[1]:
        image = letterbox(image)
        label = None if label is None else letterbox(label)
    if image.shape[:2] != (size, size):
        resample = Image.BOX if image.shape[0] > size else Image.BILINEAR
        image = np.asarray(Image.fromarray(image).resize((size, size), resample))
    if label is not None and label.shape != (size, size):
        label = np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST))
    return image, label


def _plain(x) -> torch.Tensor:
    """MONAI returns MetaTensors; training code wants plain, contiguous tensors."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.contiguous()


class SegmentationDataset(Dataset):
    """Items are dicts:

    * ``image``: float32 (C, S, S) in [0, 1]; C = ``channels`` (1 grey, 3 RGB)
    * ``label``: int64 (1, S, S) class indices (all ``ignore_index`` if the sample is unlabelled)
    * ``id``, ``prompt``, ``source``: strings; ``meta``: dict of strings

    Args:
        source: where samples come from.
        ids: sample ids to serve.
        size: output side in pixels.
        transform: optional MONAI dict transform applied to ``image``/``label``.
        ignore_index: label value for unlabelled pixels.
        ignore_margin: pixels within this distance (at ``size``) of another class are labelled
            ``ignore_index``, so a loss skips the least certain border of pseudo-labels (0: none).
        intensity: per-image normalisation after resizing and augmenting (:func:`normalize_intensity`).
        resize: ``stretch`` or ``letterbox`` for non-square images (:func:`resize_sample`); the
            first one met is logged.
        seed_offset: added to torch's seed when seeding ``transform``, so that two datasets
            fetched in step (a real image and its synthetic pair) with equal transforms do not
            draw the same augmentation.
        channels: 1 (grey) or 3 (colour); a sample of the other kind is an error naming it.
    """

    def __init__(
        self,
        source: SampleSource,
        ids: Sequence[str],
        size: int,
        transform: Callable | None = None,
        ignore_index: int = IGNORE_INDEX,
        ignore_margin: int = 0,
        intensity: str = "raw",
        resize: str = "stretch",
        seed_offset: int = 0,
        channels: int = 1,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
        self.channels = int(channels)
        if size not in (32, 48, 64, 96, 128, 192, 256, 384, 512) and size % 16:
            raise ValueError(f"size: expected a multiple of 16 (e.g. 64, 128, 256), got {size}")
        self.source = source
        self.ids = list(ids)
        self.size = size
        self.transform = transform
        if ignore_margin < 0:
            raise ValueError(f"ignore_margin: expected >= 0 pixels, got {ignore_margin}")
        self.ignore_index = ignore_index
        self.ignore_margin = int(ignore_margin)
        self.intensity = check_intensity(intensity)
        self.resize = check_resize(resize)
        self._told_non_square = False
        self.seed_offset = int(seed_offset)
        self._transform_seed: int | None = None  # torch's seed the transform was last seeded with

    def _seed_transform(self) -> None:
        """Seed the random transform from torch's seed in this process, once per seed.

        MONAI's random transforms draw from their own ``RandomState``, seeded from the OS unless
        set, so without this two runs with the same ``seed`` augment differently. In the main
        process torch's seed is the run's seed (``pl.seed_everything``); in a DataLoader worker
        it is ``base_seed + worker_id``, drawn from the run's seed every epoch, so workers
        neither repeat each other nor the previous epoch, and runs repeat exactly.
        """
        seed = (torch.initial_seed() + self.seed_offset) % 2**32
        if self._transform_seed != seed and hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=seed)
            self._transform_seed = seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        sample = self.source.load(self.ids[index])
        got = 1 if sample.image.ndim == 2 else sample.image.shape[-1]
        if got != self.channels:
            raise ValueError(
                f"{self.source.name}: sample {sample.id} has {got} channel(s), expected {self.channels} "
                f"(data.channels): grey and colour data are never converted silently"
            )
        h, w = sample.image.shape[:2]
        if h != w and not self._told_non_square:
            self._told_non_square = True
            log.info(
                "%s: non-square images (e.g. %s, %dx%d) are %s to %dx%d (data.resize=%s)",
                self.source.name,
                sample.id,
                h,
                w,
                "stretched" if self.resize == "stretch" else "padded to a square and resized",
                self.size,
                self.size,
                self.resize,
            )
        image, label = resize_sample(sample, self.size, self.resize)
        img_t = torch.from_numpy(image.astype(np.float32) / 255.0)
        img_t = img_t[None] if img_t.ndim == 2 else img_t.permute(2, 0, 1).contiguous()
        if label is None:
            lab_t = torch.full((1, self.size, self.size), self.ignore_index, dtype=torch.int64)
        else:
            if self.ignore_margin:
                label = ignore_boundaries(label, self.ignore_margin, self.ignore_index)
            lab_t = torch.from_numpy(label.astype(np.int64))[None]
        item = {"image": img_t, "label": lab_t}
        if self.transform is not None:
            self._seed_transform()
            item = self.transform(item)
            item = {"image": _plain(item["image"]).float(), "label": _plain(item["label"]).round().long()}
        if self.intensity != "raw":
            # normalised after augmenting: the augmentation plays another site's acquisition, the
            # normalisation is part of the model's input, at training and test time alike
            acquired = np.round(item["image"].clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            grey_or_rgb = acquired[..., 0] if self.channels == 1 else acquired
            normalised = normalize_intensity(grey_or_rgb, self.intensity)
            image_t = torch.from_numpy(normalised.astype(np.float32) / 255.0)
            item["image"] = image_t[None] if image_t.ndim == 2 else image_t.permute(2, 0, 1).contiguous()
        item.update(
            id=sample.id,
            prompt=sample.prompt,
            source=sample.source,
            meta={k: str(v) for k, v in sample.meta.items()},
        )
        return item


class PairedDataset(Dataset):
    """Real items, each with one synthetic variant of it, for random merging masks (EMIT-Diff;
    :mod:`diffmask.segmentation.merge`).

    Item ``i`` is ``real[i]`` plus ``pair_image``, ``pair_label`` and ``pair_sample_id`` from
    ``synthetic[j]``, ``j`` drawn uniformly from ``variants[i]`` at every fetch with torch's RNG
    (the run's seed in the main process, the worker's seed in a DataLoader worker, so seeded runs
    repeat). An empty ``variants[i]`` pairs the real item with itself (a copy of its image and
    label): merging then gives its plain loss. The two datasets augment independently, each
    label following its own image.

    Args:
        real: the real training samples.
        synthetic: the synthetic samples (with their own augmentation, ignore margin, intensity).
        variants: per real item, the indices into ``synthetic`` of its variants.

    Raises:
        ValueError: ``variants`` not one list per real item, or an index outside ``synthetic``.
    """

    def __init__(self, real: Dataset, synthetic: Dataset, variants: Sequence[Sequence[int]]):
        if len(variants) != len(real):
            raise ValueError(f"variants: expected one list per real item ({len(real)}), got {len(variants)}")
        bad = [j for choices in variants for j in choices if not 0 <= j < len(synthetic)]
        if bad:
            raise ValueError(
                f"variants: indices {bad[:5]} are outside the {len(synthetic)} synthetic samples"
            )
        self.real = real
        self.synthetic = synthetic
        self.variants = [list(choices) for choices in variants]

    def __len__(self) -> int:
        return len(self.real)

    def __getitem__(self, index: int) -> dict:
        item = self.real[index]
        choices = self.variants[index]
        if not choices:
            item.update(
                pair_image=item["image"].clone(), pair_label=item["label"].clone(), pair_sample_id=item["id"]
            )
            return item
        pair = self.synthetic[choices[int(torch.randint(len(choices), ()))]]
        item.update(pair_image=pair["image"], pair_label=pair["label"], pair_sample_id=pair["id"])
        return item
