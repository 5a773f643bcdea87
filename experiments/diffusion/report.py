"""Figures for the diffusion study: a sample grid and the training-loss curves.

    python experiments/diffusion/report.py --synthesis artifacts/synthesis/px128 \
        --metrics-csv logs/fit_diffusion/runs/<run>/csv/version_0/metrics.csv \
        --out experiments/diffusion/figures
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from diffmask.data import read_manifest

# overlay colours per label value (patient's left lung = label 1, on the image's right)
MASK_COLOURS = np.array([[0, 0, 0], [255, 80, 80], [80, 160, 255], [255, 220, 60]], np.float32)


def _overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
    colour = MASK_COLOURS[np.clip(mask, 0, len(MASK_COLOURS) - 1)]
    fg = (mask > 0) & (mask < len(MASK_COLOURS))
    rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colour[fg]
    return rgb.astype(np.uint8)


def sample_grid(folder: Path, out: Path, n: int = 16) -> Path:
    """The first ``n`` samples of a synthesis folder: each image, and beside it its mask overlaid
    (when the manifest has masks)."""
    rows = read_manifest(folder)[:n]
    tiles = []
    for r in rows:
        img = np.asarray(Image.open(folder / r.file_name).convert("L"))
        tile = np.repeat(img[..., None], 3, axis=-1)
        if r.sem_seg_file_name:
            mask = np.asarray(Image.open(folder / r.sem_seg_file_name))
            tile = np.concatenate([tile, _overlay(img, mask)], axis=1)
        tiles.append(tile)
    h, w = tiles[0].shape[:2]
    cols = max(1, math.ceil(math.sqrt(len(tiles) * h / w)))
    grid = np.zeros((h * math.ceil(len(tiles) / cols), w * cols, 3), np.uint8)
    for i, tile in enumerate(tiles):
        y, x = divmod(i, cols)
        grid[y * h : (y + 1) * h, x * w : (x + 1) * w] = tile
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    return out


def loss_curves(metrics_csv: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("train/mse", "train/align_loss", "val/mse", "val/align_loss"):
                if row.get(key):
                    series.setdefault(key, []).append((int(row["step"]), float(row[key])))
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
    for ax, (key, points) in zip(np.atleast_1d(axes), sorted(series.items()), strict=True):
        ax.plot(*zip(*points, strict=True))
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthesis", type=Path, help="a synthesis stage folder")
    ap.add_argument("--metrics-csv", type=Path, help="CSVLogger metrics.csv of a fit_diffusion run")
    ap.add_argument("--out", type=Path, default=Path("experiments/diffusion/figures"))
    args = ap.parse_args()
    if args.synthesis:
        print(sample_grid(args.synthesis, args.out / f"grid_{args.synthesis.name}.png"))
    if args.metrics_csv:
        print(loss_curves(args.metrics_csv, args.out / "loss_curves.png"))


if __name__ == "__main__":
    main()
