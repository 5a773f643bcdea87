"""Figures for the diffusion study: a sample grid and the training-loss curves.

    python experiments/diffusion/report.py --synthesis artifacts/synthesis/px128 \
        --metrics-csv logs/fit_diffusion/runs/<run>/csv/version_0/metrics.csv --out experiments/diffusion/figures
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np
from PIL import Image

from diffmask.data import read_manifest


def sample_grid(folder: Path, out: Path, n: int = 16) -> Path:
    rows = read_manifest(folder)[:n]
    images = [np.asarray(Image.open(folder / r.file_name).convert("L")) for r in rows]
    side = images[0].shape[0]
    cols = math.ceil(math.sqrt(len(images)))
    grid = np.zeros((side * math.ceil(len(images) / cols), side * cols), np.uint8)
    for i, img in enumerate(images):
        y, x = divmod(i, cols)
        grid[y * side : (y + 1) * side, x * side : (x + 1) * side] = img
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
