"""Write appearance-shifted copies of a real test split, as stand-ins for other hospitals.

Each set is an ``images/`` + ``masks/`` folder with the samples' ``metadata.csv`` (prompts for
mask evaluation are built from it), which ``data.test_sets`` reads by path. The
shifts are the usual differences between sites, applied to the JSRT test images:

* ``window``: another exposure / display window (gamma 0.6, grey levels squeezed into 15-85 %);
* ``fov``: a wider field of view (the image shrunk to 80 % on a dark border);
* ``detector``: a blurrier, noisier detector (Gaussian blur sigma 1.5 px, noise 4 %);
* ``mixed``: all three.

They are proxies, not a real external test set: they show what the model is sensitive to.

    python experiments/robustness/make_shifted_sets.py ../shared/data/jsrt_scr /tmp/shifted
    diffmask-train ... 'data.test_sets={window: /tmp/shifted/window, fov: /tmp/shifted/fov, ...}'
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from diffmask.artifacts import atomic_write_bytes
from diffmask.domains.chest import JSRTSource

SHIFTS = ("window", "fov", "detector", "mixed")


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def window(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float64) / 255.0
    return np.round(255 * (0.15 + 0.70 * x**0.6)).astype(np.uint8)


def fov(
    image: np.ndarray, label: np.ndarray, scale: float = 0.8, border: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape
    nh, nw = round(h * scale), round(w * scale)
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    small_label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    out = np.full((h, w), border, np.uint8)
    out_label = np.zeros((h, w), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top : top + nh, left : left + nw] = small
    out_label[top : top + nh, left : left + nw] = small_label
    return out, out_label


def detector(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
    noisy = blurred + rng.normal(0, 0.04 * 255, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def shifted(name: str, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    if name == "window":
        return window(image), label
    if name == "fov":
        return fov(image, label)
    if name == "detector":
        return detector(image, rng), label
    if name == "mixed":
        image, label = fov(window(image), label)
        return detector(image, rng), label
    raise ValueError(f"shift: expected one of {SHIFTS}, got {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsrt_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=SHIFTS)
    args = parser.parse_args()
    src = JSRTSource(args.jsrt_dir)
    for name in args.shifts:
        rng = np.random.default_rng(0)
        folder = Path(args.out_dir) / name
        for sub in ("images", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # the samples' metadata too: mask evaluation builds each image's prompt from it
        lines = io.StringIO()
        writer = csv.writer(lines, lineterminator="\n")
        writer.writerow(["id", "split", *src.META_COLUMNS])
        for sid in src.ids(args.split):
            sample = src.load(sid)
            image, label = shifted(name, sample.image, sample.label, rng)
            atomic_write_bytes(folder / "images" / f"{sid}.png", _png_bytes(image))
            atomic_write_bytes(folder / "masks" / f"{sid}.png", _png_bytes(label))
            writer.writerow([sid, "test", *(sample.meta.get(c, "") for c in src.META_COLUMNS)])
        atomic_write_bytes(folder / "metadata.csv", lines.getvalue().encode())
        print(f"{folder}: {len(src.ids(args.split))} images")


if __name__ == "__main__":
    main()
