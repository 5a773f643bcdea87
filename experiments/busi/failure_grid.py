"""The test images a segmentation run gets most wrong, as a picture: image | truth | prediction.

    python experiments/busi/failure_grid.py <diffmask-train run dir> \
        --out experiments/busi/failures.png [--n 8]

Reads the run's ``per_image.csv`` (worst Dice first, per pathology: the worst lesion images and the
normal images where it paints a lesion), rebuilds the run's model from its checkpoint, predicts at
the run's size and writes one row per image: the image, the true lesion (green) and the predicted
one (red) drawn over it, titled with its id, pathology and Dice.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffmask.data import FolderSource, SegmentationDataset  # noqa: E402
from diffmask.evaluation.fidelity import load_segmentation_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=8,
                        help="rows: half the worst lesion images, half the worst normal ones")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("DIFFMASK_BUSI_DIR", "../shared/data/busi")))
    args = parser.parse_args()
    module, cfg, _ = load_segmentation_model(args.run)
    source = FolderSource(args.data, list(cfg.data.class_names), name="busi", require_metadata=True)
    pathology = {sid: source.load(sid).meta.get("pathology", "") for sid in source.ids("test")}
    with open(args.run / "per_image.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["set"] == "busi"]
    rows.sort(key=lambda r: float(r["dice_lesion"]))
    worst = [r for r in rows if pathology[r["id"]] != "normal"][: args.n // 2]
    worst += [r for r in rows if pathology[r["id"]] == "normal"][: args.n - len(worst)]
    dataset = SegmentationDataset(source, [r["id"] for r in worst], int(cfg.data.size),
                                  intensity=str(cfg.data.get("intensity", "raw")),
                                  resize=str(cfg.data.get("resize", "stretch")))
    fig, axes = plt.subplots(len(worst), 2, figsize=(5, 2.5 * len(worst)), squeeze=False)
    for i, row in enumerate(worst):
        item = dataset[i]
        with torch.no_grad():
            pred = module.labels(module(item["image"][None]))[0].numpy()
        image, truth = item["image"][0].numpy(), item["label"][0].numpy()
        axes[i, 0].imshow(image, cmap="gray")
        axes[i, 0].set_title(f"{row['id']} ({pathology[row['id']]})", fontsize=8)
        overlay = np.stack([image] * 3, -1)
        overlay[truth == 1] = 0.5 * overlay[truth == 1] + 0.5 * np.array([0.0, 1.0, 0.0])
        overlay[pred == 1] = 0.5 * overlay[pred == 1] + 0.5 * np.array([1.0, 0.0, 0.0])
        axes[i, 1].imshow(overlay)
        axes[i, 1].set_title(f"truth green, prediction red; Dice {float(row['dice_lesion']):.2f}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle(f"worst test images of {args.run}", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=60)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
