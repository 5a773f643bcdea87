"""Chest X-ray sample sources: the JSRT/SCR folder and the procedurally drawn chest phantom.

* :class:`JSRTSource` — the JSRT/SCR folder (a :class:`~diffmask.data.FolderSource` whose
  ``metadata.csv`` with splits is required);
* :class:`PhantomSource` — procedurally drawn chest-like images (no files needed);
* :func:`auto_source` — JSRT when its folder exists, else the phantom (``data=auto``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from diffmask.data.sources import DrawnSource, FolderSource, Sample, SampleSource
from diffmask.domains.chest.labels import CHEST_CLASS_NAMES
from diffmask.labels import validate_class_names

__all__ = ["JSRTSource", "PhantomSource", "auto_source", "draw_phantom"]

log = logging.getLogger(__name__)


class JSRTSource(FolderSource):
    """The JSRT/SCR folder: ``images/<id>.png``, ``masks/<id>.png``, ``metadata.csv`` (with splits).

    Args:
        root: folder path.
        class_names: label names, background first (default: background, left_lung, right_lung, heart).

    Examples::

        src = JSRTSource("../shared/data/jsrt_scr")
        len(src.ids("train"))  # 173
    """

    REQUIRED_COLUMNS = ("id", "split")
    META_COLUMNS = ("sex", "age", "finding", "diagnosis", "reading")

    def __init__(self, root: str | os.PathLike, class_names: list[str] | tuple[str, ...] = CHEST_CLASS_NAMES):
        if not Path(root).is_dir():
            raise FileNotFoundError(
                f"{root}: JSRT folder not found (set paths.jsrt_dir or the DIFFMASK_JSRT_DIR variable)"
            )
        super().__init__(
            root, class_names, name="jsrt", require_metadata=True, meta_columns=self.META_COLUMNS
        )


class PhantomSource(DrawnSource):
    """Procedurally drawn chest-like images with left lung, right lung and heart masks.

    Deterministic per (seed, id): a bright body ellipse, two dark lung fields (label 1, the
    patient's left lung, on the image's right), a bright heart (label 3) overlapping the medial
    lower lungs and lying mostly on the image's right, ribs and noise. Random shape jitter,
    sex / age / finding metadata. No files are needed, so demos and tests run anywhere.

    Args:
        size: image side in pixels.
        num_train, num_val, num_test: split sizes.
        seed: base seed.
        class_names: must be the 4 chest classes (the phantom draws exactly these).
    """

    def __init__(
        self,
        size: int = 128,
        num_train: int = 48,
        num_val: int = 12,
        num_test: int = 12,
        seed: int = 0,
        class_names: list[str] | tuple[str, ...] = CHEST_CLASS_NAMES,
    ):
        if size < 16:
            raise ValueError(f"size: expected at least 16 pixels, got {size}")
        self.class_names = validate_class_names(class_names)
        if self.class_names != CHEST_CLASS_NAMES:
            raise ValueError(
                f"class_names: the phantom draws {list(CHEST_CLASS_NAMES)}, got {list(class_names)}"
            )
        super().__init__("phantom", {"train": num_train, "val": num_val, "test": num_test}, seed)
        self.size = size

    def load(self, sample_id: str) -> Sample:
        """Draw the sample ``sample_id`` (the same pixels and metadata on every call)."""
        rng = self.sample_rng(sample_id)
        image, label = draw_phantom(self.size, rng)
        meta = {
            "sex": str(rng.choice(["M", "F"])),
            "age": str(int(rng.integers(20, 85))),
            "finding": str(rng.choice(["no nodule", "lung nodule"])),
            "diagnosis": "",
            "reading": "",
        }
        return Sample(id=sample_id, image=image, label=label, prompt="", source="real", meta=meta)


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0):
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * c + dy * s) / rx
    v = (-dx * s + dy * c) / ry
    return u * u + v * v


def draw_phantom(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one phantom chest X-ray. Returns (image uint8 (S,S), label uint8 (S,S))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    j = lambda scale: float(rng.normal(0.0, scale))  # noqa: E731 - shape jitter
    body = _ellipse(yy, xx, 0.55 + j(0.02), 0.5 + j(0.01), 0.5 + j(0.02), 0.44 + j(0.02)) <= 1.0
    # image left = patient's right lung (label 2); image right = patient's left lung (label 1)
    # (the jitters are drawn in argument order: the same seed draws the same phantom)
    right_lung = _ellipse(
        yy, xx, 0.47 + j(0.02), 0.30 + j(0.015), 0.27 + j(0.02), 0.13 + j(0.01), 0.08 + j(0.03)
    ) <= 1.0
    left_lung = _ellipse(
        yy, xx, 0.49 + j(0.02), 0.70 + j(0.015), 0.28 + j(0.02), 0.12 + j(0.01), -0.08 + j(0.03)
    ) <= 1.0
    heart = _ellipse(
        yy, xx, 0.64 + j(0.02), 0.56 + j(0.015), 0.14 + j(0.015), 0.16 + j(0.015), 0.3 + j(0.05)
    ) <= 1.0
    label = np.zeros((size, size), np.uint8)
    label[right_lung] = 2
    label[left_lung] = 1
    label[heart] = 3  # SCR lungs exclude the heart
    img = np.full((size, size), 0.08, np.float32)
    img[body] = 0.62 + j(0.03)
    img[label == 1] = 0.25 + j(0.03)
    img[label == 2] = 0.25 + j(0.03)
    img[label == 3] = 0.70 + j(0.03)
    ribs = 0.06 * (np.sin((yy * 14 + 2 * (xx - 0.5) ** 2 * 8) * np.pi + rng.uniform(0, np.pi)) > 0.6)
    img = img + ribs * ((label == 1) | (label == 2))
    # soft edges: a 3x3 box blur, then noise
    pad = np.pad(img, 1, mode="edge")
    img = sum(pad[dy : dy + size, dx : dx + size] for dy in range(3) for dx in range(3)) / 9.0
    img = img + rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), label


def auto_source(
    jsrt_dir: str | os.PathLike | None,
    phantom_size: int = 128,
    class_names: list[str] | tuple[str, ...] = CHEST_CLASS_NAMES,
) -> SampleSource:
    """JSRT when its folder exists, else the phantom; logs which one it used."""
    if jsrt_dir and (Path(jsrt_dir) / "metadata.csv").is_file():
        log.info("data: using JSRT/SCR from %s", Path(jsrt_dir).resolve())
        return JSRTSource(jsrt_dir, class_names)
    log.warning(
        "\n%s\ndata=auto: no JSRT folder at %s (paths.jsrt_dir / DIFFMASK_JSRT_DIR):\n"
        "  THIS RUN USES THE BUILT-IN PHANTOM (size %d), not real X-rays; "
        "its metrics.json says data.real=phantom.\n"
        "  Use data=jsrt to make a missing folder an error.\n%s",
        "=" * 100, Path(jsrt_dir).resolve() if jsrt_dir else None, phantom_size, "=" * 100,
    )
    return PhantomSource(size=phantom_size, class_names=class_names)
