"""CPU micro-benchmarks (`make bench`): data loading, segmentation train steps, sampling with and
without a ControlNet (the same diffusion model).

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


def bench_control(size: int = 64, batch: int = 8, steps: int = 10) -> None:
    """Images/s of the same pixel model sampling with and without a ControlNet beside it."""
    from diffmask.control import ConditionBuilder, build_controlnet
    from diffmask.diffusion import DiffusionSampler, build_scratch_components

    # pipeline_cpu's generator shape (1.7 M parameters, cross-attention only)
    comps = build_scratch_components(
        resolution=size, block_out_channels=(32, 64, 64), layers_per_block=1, attention_heads=4,
        cross_attention_dim=64, norm_num_groups=8, only_cross_attention=True, text_hidden_size=64, text_layers=2,
        text_intermediate_size=128,
    )
    prompts, seeds = ["left lung, right lung and heart"] * batch, list(range(batch))
    plain = DiffusionSampler(comps, size)
    condition = ConditionBuilder("mask", 4)
    controlled = DiffusionSampler(comps, size, controlnet=build_controlnet(comps.unet, condition.channels))
    cond = torch.rand(batch, condition.channels, size, size)
    for g in (1.0, 3.0):  # 1 = no classifier-free guidance (the EMIT-Diff CPU recipe), 3 = DiffMask's default
        for name, run in (
            ("plain", lambda g=g: plain(prompts, seeds, num_inference_steps=steps, guidance_scale=g)),
            ("controlnet", lambda g=g: controlled(prompts, seeds, num_inference_steps=steps, guidance_scale=g, control=cond)),
        ):
            sec = _time(run, 1)
            print(f"generation/{name}@{size}px ({steps} steps, guidance {g:g}, batch {batch})\t{batch / sec:.2f}\timages/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_data(args.size)
    bench_nets(args.size)
    bench_control()


if __name__ == "__main__":
    main()
