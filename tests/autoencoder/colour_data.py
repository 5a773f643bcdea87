"""A tiny colour (RGB) dataset written in-test: coloured discs on a textured background.

Layout ``images/<id>.png`` (RGB), ``masks/<id>.png`` (labels 0 background, 1 the disc),
``metadata.csv`` (``id, split, pathology``), so ``FolderSource(root, COLOUR_CLASSES, channels=3)``
reads it, and ``data=busi data.channels=3 data.real.root=<root>`` serves it to a stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOUR_CLASSES = ["background", "lesion"]  # data=busi's classes, so its config serves the folder
SPLITS = {"train": 4, "val": 2, "test": 2}


def colour_image(seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) uint8 RGB with three different channels, and its (S, S) uint8 label map (1 = disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    # a greenish-blue textured background: gradient + stripes + noise, different per channel
    background = np.stack([0.15 + 0.2 * xx, 0.35 + 0.25 * yy, 0.55 + 0.1 * np.sin(12 * xx + 6 * yy)], -1)
    background += rng.normal(0, 0.03, background.shape)
    cy, cx = rng.uniform(0.35, 0.65, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.15, 0.22) ** 2
    colour = np.array([0.9, rng.uniform(0.2, 0.4), 0.15])  # a red-orange disc
    image = np.where(disc[..., None], colour + rng.normal(0, 0.03, background.shape), background)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), disc.astype(np.uint8)


def write_colour_folder(root: Path, size: int = 32, splits: dict[str, int] = SPLITS) -> Path:
    """Write the dataset into ``root`` and return it."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = ["id,split,pathology"]
    seed = 0
    for split, n in splits.items():
        for _ in range(n):
            sid = f"c{seed:03d}"
            image, label = colour_image(seed, size)
            Image.fromarray(image).save(root / "images" / f"{sid}.png")
            Image.fromarray(label).save(root / "masks" / f"{sid}.png")
            lines.append(f"{sid},{split},{'benign' if seed % 2 else 'malignant'}")
            seed += 1
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def colour_overrides(root: Path, size: int = 32) -> list[str]:
    """Hydra overrides that serve the folder at ``root`` to a stage as colour data."""
    return [
        "data=busi",
        "data.channels=3",
        f"data.real.root={root}",
        f"data.size={size}",
        "data.batch_size=4",
        "data.num_workers=0",
    ]


def colour_datamodule(root: Path, batch_size: int = 4):
    """A 32 px, 3-channel, unaugmented datamodule over a folder :func:`write_colour_folder` wrote."""
    from diffmask.data import FolderSource, SegmentationDataModule  # noqa: PLC0415

    return SegmentationDataModule(FolderSource(root, COLOUR_CLASSES, channels=3), size=32,
                                  batch_size=batch_size, channels=3, class_names=COLOUR_CLASSES,
                                  augment=None, num_workers=0)
