"""Time the mask refiners per image (threshold, DenseCRF, AffinityNet) on real JSRT images.

Class maps are stand-ins for cross-attention: each real class mask shifted by a few percent of
the image and blurred (sigma 3 % of the image), so the IoU columns are a sanity check of the
refiners, not the stage's figure (that needs the diffusion model's own attention).

    .venv/bin/python experiments/masks/bench_refine.py --n 8 --size 256 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter, shift

from diffmask.domains.chest import JSRTSource
from diffmask.refine import (
    AffinityBackbone,
    AffinityRefiner,
    DenseCRFRefiner,
    ParallelRefiner,
    RefinementChain,
    ThresholdRefiner,
)


def fake_attention(label: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """(K, H, W) blurry, offset versions of the class masks, max-normalised."""
    size = label.shape[0]
    maps = []
    for c in range(1, num_classes + 1):
        m = shift((label == c).astype(np.float32), rng.normal(0, 0.03 * size, 2), order=1)
        m = gaussian_filter(m, 0.03 * size)
        maps.append(m / max(m.max(), 1e-6))
    return np.stack(maps).astype(np.float32)


def class_iou(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    return [
        float(((pred == c) & (label == c)).sum() / max(((pred == c) | (label == c)).sum(), 1))
        for c in range(1, num_classes + 1)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsrt-dir", default=os.environ.get("DIFFMASK_JSRT_DIR", "../shared/data/jsrt_scr"))
    parser.add_argument("--n", type=int, default=8, help="test images")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="CRF worker processes for the throughput row")
    parser.add_argument("--train-steps", type=int, default=50, help="AffinityNet training steps")
    parser.add_argument("--crf-bilateral-sxy", type=float, default=80.0)
    parser.add_argument("--crf-bilateral-compat", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    src = JSRTSource(args.jsrt_dir)
    k = len(src.class_names) - 1
    samples = []
    for sid in src.ids("test")[: args.n]:
        s = src.load(sid)
        image = np.asarray(Image.fromarray(s.image).resize((args.size, args.size), Image.BILINEAR))
        label = np.asarray(Image.fromarray(s.label).resize((args.size, args.size), Image.NEAREST))
        samples.append(
            {"id": sid, "image": image.copy(), "truth": label, "class_maps": fake_attention(label, k, rng)}
        )

    figures: dict[str, float] = {"n_images": len(samples), "size": args.size, "device": args.device}
    raw = [
        class_iou(np.where(s["class_maps"].max(0) >= 0.5, s["class_maps"].argmax(0) + 1, 0), s["truth"], k)
        for s in samples
    ]
    figures["iou_raw"] = float(np.mean(raw))

    threshold = ThresholdRefiner(method="otsu", ignore_band=0.0)
    t0 = time.perf_counter()
    th = [threshold(s) for s in samples]
    figures["threshold_s_per_image"] = (time.perf_counter() - t0) / len(samples)
    figures["iou_threshold"] = float(np.mean([class_iou(o["label"], o["truth"], k) for o in th]))

    crf = DenseCRFRefiner(bilateral_sxy=args.crf_bilateral_sxy, bilateral_compat=args.crf_bilateral_compat)
    t0 = time.perf_counter()
    crf_out = [crf(s) for s in samples]
    figures["crf_s_per_image"] = (time.perf_counter() - t0) / len(samples)
    figures["iou_crf"] = float(np.mean([class_iou(o["label"], o["truth"], k) for o in crf_out]))
    with ParallelRefiner(crf, num_workers=args.workers) as pool:
        list(pool.map(samples[:1]))  # start the workers outside the timing
        t0 = time.perf_counter()
        list(pool.map(samples))
        figures[f"crf_s_per_image_{args.workers}_workers"] = (time.perf_counter() - t0) / len(samples)

    # seeds from the images themselves (as in the stage): threshold with an ignore band
    seeder = RefinementChain([ThresholdRefiner(method="otsu", ignore_band=0.15)])
    seed_out = [seeder(s) for s in samples]
    batch_img = torch.stack([torch.from_numpy(o["image"].copy()).float()[None] / 255 for o in seed_out]).to(
        args.device
    )
    batch_seed = torch.stack([torch.from_numpy(o["label"].astype(np.int64)) for o in seed_out]).to(
        args.device
    )
    model = AffinityRefiner(
        AffinityBackbone(channels=(32, 64, 128), feature_dim=64), radius=5, beta=8, t=256
    ).to(args.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        loss = model.compute_loss(batch_img, batch_seed)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    figures["affinity_train_s_per_step"] = (time.perf_counter() - t0) / max(args.train_steps, 1)
    figures["affinity_train_batch"] = len(samples)
    figures["affinity_final_loss"] = float(loss.detach())
    model.eval()
    t0 = time.perf_counter()
    aff_out = [model.refine_sample(s) for s in samples]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    figures["affinity_refine_s_per_image"] = (time.perf_counter() - t0) / len(samples)
    figures["iou_affinity"] = float(np.mean([class_iou(o["label"], o["truth"], k) for o in aff_out]))

    for key, value in figures.items():
        print(f"{key:36s} {value:.4f}" if isinstance(value, float) else f"{key:36s} {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
