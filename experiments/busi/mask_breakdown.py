"""Attention masks on BUSI's test images, split by pathology: lesion images vs normal ones.

    python experiments/busi/mask_breakdown.py <evaluate-masks run dir> [--data ../shared/data/busi]

Reads the run's ``per_image_masks.csv`` (diffmask-evaluate-masks) and the folder's ``metadata.csv``
(``pathology``), and prints per refinement step: the mean lesion IoU over the benign and malignant
images, and the share of normal images whose lesion mask is empty (the target: >= 0.5 and >= 0.8).
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path,
                        help="a diffmask-evaluate-masks run folder (holds per_image_masks.csv)")
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("DIFFMASK_BUSI_DIR", "../shared/data/busi")))
    parser.add_argument("--set", default="busi", help="the test set's name in the rows")
    args = parser.parse_args()
    with open(args.data / "metadata.csv", newline="") as f:
        pathology = {r["id"]: r["pathology"] for r in csv.DictReader(f)}
    lesion_iou: dict[str, list[float]] = defaultdict(list)
    normal_empty: dict[str, list[bool]] = defaultdict(list)
    with open(args.run / "per_image_masks.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["set"] != args.set:
                continue
            if pathology[r["id"]] == "normal":
                normal_empty[r["step"]].append(int(r["pred_lesion"]) == 0)
            else:
                lesion_iou[r["step"]].append(float(r["iou_lesion"]))
    print("| step | lesion IoU, benign + malignant (n) | normal images with an empty mask (n) |")
    print("| --- | --- | --- |")
    for step in lesion_iou:
        ious, empty = lesion_iou[step], normal_empty[step]
        empty_share = sum(empty) / max(len(empty), 1)
        print(f"| {step} | {sum(ious) / len(ious):.3f} ({len(ious)}) | {empty_share:.3f} ({len(empty)}) |")


if __name__ == "__main__":
    main()
