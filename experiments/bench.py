"""CPU micro-benchmarks (`make bench`): data loading and segmentation train steps.

Speed targets live here, not in tests. GPU figures: the recipes in experiments/*/README.md.
Prints one line per measurement: name, value, unit.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from diffmask.data import SegmentationDataModule, auto_source


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_data(size: int, n: int = 64) -> None:
    jsrt = os.environ.get("DIFFMASK_JSRT_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/jsrt_scr"))
    dm = SegmentationDataModule(auto_source(jsrt, size), size=size, batch_size=8, num_workers=0)
    ds = dm.train_dataset()
    start = time.perf_counter()
    for i in range(min(n, len(ds))):
        ds[i]
    per = (time.perf_counter() - start) / min(n, len(ds))
    print(f"data/load+augment@{size}px\t{1 / per:.1f}\timages/s (1 process)")


def bench_nets(size: int, batch: int = 8) -> None:
    from hydra import compose, initialize_config_dir

    from diffmask.cli.common import CONFIG_PATH

    for name in ("unet", "transunet", "attention_unet"):
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            cfg = compose("train", overrides=[f"segmentation={name}", f"data.size={size}", "paths.output_dir=/tmp"])
        import hydra

        module = hydra.utils.instantiate(cfg.segmentation)
        opt = torch.optim.AdamW(module.parameters(), 1e-3)
        x = torch.rand(batch, 1, size, size)
        y = torch.randint(0, 4, (batch, 1, size, size))

        def step(module=module, opt=opt, x=x, y=y):
            opt.zero_grad()
            module.loss_fn(module(x), y).backward()
            opt.step()

        sec = _time(step, 3)
        params = sum(p.numel() for p in module.parameters()) / 1e6
        print(f"segmentation/{name}@{size}px train step (batch {batch})\t{sec:.2f}\ts ({params:.1f} M params)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_data(args.size)
    bench_nets(args.size)


if __name__ == "__main__":
    main()
