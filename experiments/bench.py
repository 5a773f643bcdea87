"""CPU micro-benchmarks (`make bench`): data loading, segmentation train steps, sampling with and
without a ControlNet (the same diffusion model), and the CPU speed options of the 128 px latent
generator (`--only speed`).

Speed targets live here, not in tests. GPU figures: the recipes in experiments/*/README.md.
Prints one line per measurement: name, value, unit (the speed section adds "x<ratio> vs plain":
the plain run's time over this one's, so above 1 is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
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


def _best(fn, repeat: int):
    """(seconds of the fastest of ``repeat`` calls after a warm-up, the last result): the fastest call
    is the one least disturbed by other load on the machine."""
    out = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def latent_generator(size: int = 128, seed: int = 0):
    """The planned 128 px latent generator, random weights: a scratch cross-attention-only UNet on the
    32x32x4 latents of a gray AutoencoderKL with 4x downsampling (1.7 M + 1.0 M parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffmask.diffusion import build_scratch_components

    torch.manual_seed(seed)
    comps = build_scratch_components(
        resolution=size // 4, block_out_channels=(32, 64, 64), layers_per_block=1, attention_heads=4,
        cross_attention_dim=64, norm_num_groups=8, only_cross_attention=True, text_hidden_size=64, text_layers=2,
        text_intermediate_size=128,
    )
    cfg = dict(comps.unet.config)
    cfg.update(in_channels=4, out_channels=4, sample_size=size // 4)
    comps.unet = UNet2DConditionModel.from_config(cfg)
    comps.vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
        norm_num_groups=8,
    )
    return comps


def bench_speed(size: int = 128, batch: int = 8, steps: int = 10, guidance: float = 3.0, repeat: int = 2) -> None:
    """CPU speed options of the latent generator, each against plain sampling of the same model in this run:
    attention capture (as the generate stage makes it), channels_last, bf16 autocast, torch.compile of
    the UNet, thread counts; then seconds per training step (UNet forward + backward + AdamW)."""
    import torch.nn.functional as F

    from diffmask.attention.store import CrossAttentionStore
    from diffmask.diffusion import DiffusionSampler
    from diffmask.diffusion.module import encode_prompts
    from diffmask.prompts import PromptBuilder
    from diffmask.refine.mask_maker import AttentionMaskMaker

    comps = latent_generator(size)
    builder = PromptBuilder()
    prompts = [builder.build({"sex": "MF"[i % 2], "age": str(30 + i)}).text for i in range(batch)]
    seeds = list(range(batch))
    threads = torch.get_num_threads()
    tag = f"@{size}px latent ({steps} dpmpp steps, guidance {guidance:g}, batch {batch}, {threads} threads)"

    def sampler_of(c):
        return DiffusionSampler(c, size, scheduler="dpmpp", prompt_builder=builder)

    def with_unet(unet, vae=None):
        c = copy.copy(comps)
        c.unet, c.vae = unet, vae if vae is not None else comps.vae
        return c

    def sample(sampler, context=contextlib.nullcontext, maker=None):
        sink = None
        if maker is not None:  # the generate stage's capture: a CrossAttentionStore per batch, class maps at the end
            sink = maker.new_sink(prompts, sampler.token_positions(prompts), size)
        with context():
            out = sampler(prompts, seeds, num_inference_steps=steps, guidance_scale=guidance, attention_sink=sink)
        if sink is not None:
            sink.result()
        return out.images

    plain = sampler_of(comps)
    ref, ref_images = _best(lambda: sample(plain), repeat)

    def line(name: str, timed: tuple | None, note: str = "") -> None:
        if timed is None:
            print(f"generation/{name}{tag}\t-\tpairs/s\t{note}")
            return
        sec, images = timed
        d = float((images - ref_images).abs().max())
        print(f"generation/{name}{tag}\t{batch / sec:.2f}\tpairs/s\tx{ref / sec:.2f} vs plain"
              f" (max abs image diff {d:.2g})")

    line("plain", (ref, ref_images))
    maker = AttentionMaskMaker(functools.partial(CrossAttentionStore))
    line("attention capture", _best(lambda: sample(plain, maker=maker), repeat))

    cl = sampler_of(with_unet(copy.deepcopy(comps.unet).to(memory_format=torch.channels_last),
                              copy.deepcopy(comps.vae).to(memory_format=torch.channels_last)))
    line("channels_last", _best(lambda: sample(cl), repeat))

    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    line("bf16 autocast", _best(lambda: sample(plain, bf16), repeat))

    for n in sorted({1, 2, threads}):
        torch.set_num_threads(n)
        try:
            line(f"set_num_threads({n})", _best(lambda: sample(plain), repeat))
        finally:
            torch.set_num_threads(threads)

    try:
        compiled = sampler_of(with_unet(torch.compile(copy.deepcopy(comps.unet))))
        start = time.perf_counter()
        sample(compiled)
        first = time.perf_counter() - start
        print(f"generation/torch.compile(unet) first call (compiles){tag}\t{first:.1f}\ts\tx{ref / first:.2f} vs plain")
        line("torch.compile(unet) steady", _best(lambda: sample(compiled), repeat))
    except Exception as err:  # noqa: BLE001 - a compiler missing on this machine is a result, not a crash
        line("torch.compile(unet)", None, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    # training: one optimiser step of the denoising loss on latents (the VAE encode is not timed)
    states = encode_prompts(comps.tokenizer, comps.text_encoder, prompts, torch.device("cpu")).detach()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, 4, size // 4, size // 4, generator=gen)
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noisy = comps.noise_scheduler.add_noise(clean, noise, t)

    def train_step_time(channels_last: bool = False, context=contextlib.nullcontext) -> float:
        unet = copy.deepcopy(comps.unet).train()
        x = noisy
        if channels_last:
            unet, x = unet.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(unet.parameters(), 1e-4)

        def step():
            opt.zero_grad()
            with context():
                pred = unet(x, t, encoder_hidden_states=states).sample
            F.mse_loss(pred.float(), noise).backward()
            opt.step()

        return _best(step, 3)[0]

    train_tag = f"@{size}px latent (batch {batch}, {threads} threads)"
    train_ref = train_step_time()
    for name, sec in (
        ("plain", train_ref),
        ("channels_last", train_step_time(channels_last=True)),
        ("bf16 autocast", train_step_time(context=bf16)),
    ):
        print(f"diffusion/train step {name}{train_tag}\t{sec:.3f}\ts\tx{train_ref / sec:.2f} vs plain")


SECTIONS = ("data", "nets", "control", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections (default: all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.get_num_interop_threads()} interop threads")
    if "data" in args.only:
        bench_data(args.size)
    if "nets" in args.only:
        bench_nets(args.size)
    if "control" in args.only:
        bench_control()
    if "speed" in args.only:
        bench_speed()


if __name__ == "__main__":
    main()
