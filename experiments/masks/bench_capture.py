"""Overhead of attention capture + CrossAttentionStore vs plain UNet calls (same inputs).

    .venv/bin/python experiments/masks/bench_capture.py --steps 20 --size 32 --batch 4

Uses a tiny scratch UNet (diffusers test-size); run it with the real model on the GPU for the
stage's figure.
"""

from __future__ import annotations

import argparse
import time

import torch

from diffmask.attention import CrossAttentionStore
from diffmask.diffusion.tiny_models import tiny_latent_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="UNet input side")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    unet = tiny_latent_unet(args.size).to(args.device)
    x = torch.randn(2 * args.batch, 4, args.size, args.size, device=args.device)  # guidance batch
    emb = torch.randn(2 * args.batch, 16, 32, device=args.device)

    def run(store: CrossAttentionStore | None) -> float:
        with torch.no_grad():
            unet(x, 10, encoder_hidden_states=emb)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(args.steps):
                if store is not None:
                    store.begin_step(i, 999 - i)
                unet(x, 999 - i, encoder_hidden_states=emb)
            if store is not None:
                store.result()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

    plain = min(run(None) for _ in range(3))
    store = CrossAttentionStore(output_size=8 * args.size)
    store.set_tokens([[[1], [2, 3], [4]]] * args.batch)
    with store.capture(unet):
        captured = min(run(store) for _ in range(3))
    print(f"plain {plain:.3f} s  captured {captured:.3f} s  overhead {100 * (captured / plain - 1):+.1f} %")


if __name__ == "__main__":
    main()
