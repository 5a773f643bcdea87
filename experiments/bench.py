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

from diffmask.data import SegmentationDataModule
from diffmask.domains.chest import auto_source


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench_data(size: int, n: int = 64) -> None:
    default_jsrt = Path(__file__).resolve().parents[2] / "shared/data/jsrt_scr"
    jsrt = os.environ.get("DIFFMASK_JSRT_DIR", str(default_jsrt))
    dm = SegmentationDataModule(auto_source(jsrt, size), size=size, batch_size=8, num_workers=0)
    ds = dm.train_dataset()
    start = time.perf_counter()
    for i in range(min(n, len(ds))):
        ds[i]
    per = (time.perf_counter() - start) / min(n, len(ds))
    print(f"data/load+augment@{size}px\t{1 / per:.1f}\timages/s (1 process)")


def bench_nets(size: int, batch: int = 8) -> None:
    from hydra import compose, initialize_config_dir

    from diffmask.config import CONFIG_PATH

    for name in ("unet", "transunet", "attention_unet"):
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            cfg = compose("train", overrides=[f"segmentation={name}", f"data.size={size}",
                                              "paths.output_dir=/tmp"])
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
        print(f"segmentation/{name}@{size}px train step (batch {batch})\t{sec:.2f}\ts "
              f"({params:.1f} M params)")


def bench_control(size: int = 64, batch: int = 8, steps: int = 10) -> None:
    """Images/s of the same pixel model sampling with and without a ControlNet beside it."""
    from diffmask.control import ConditionBuilder, build_controlnet
    from diffmask.diffusion import ControlledSampler, TextToImageSampler, build_scratch_components

    # pipeline_cpu's generator shape (1.7 M parameters, cross-attention only)
    comps = build_scratch_components(
        resolution=size, block_out_channels=(32, 64, 64), layers_per_block=1, attention_heads=4,
        cross_attention_dim=64, norm_num_groups=8, only_cross_attention=True, text_hidden_size=64,
        text_layers=2, text_intermediate_size=128,
    )
    prompts, seeds = ["left lung, right lung and heart"] * batch, list(range(batch))
    plain = TextToImageSampler(comps, size)
    condition = ConditionBuilder("mask", 4)
    controlled = ControlledSampler(comps, size, build_controlnet(comps.unet, condition.channels))
    cond = torch.rand(batch, condition.channels, size, size)
    for g in (1.0, 3.0):  # 1 = no classifier-free guidance (the EMIT-Diff CPU recipe), 3 = DiffMask's default
        for name, run in (
            ("plain", lambda g=g: plain(prompts, seeds, num_inference_steps=steps, guidance_scale=g)),
            ("controlnet", lambda g=g: controlled(prompts, seeds, num_inference_steps=steps, guidance_scale=g,
                                                  control=cond)),
        ):
            sec = _time(run, 1)
            print(f"generation/{name}@{size}px ({steps} steps, guidance {g:g}, batch {batch})"
                  f"\t{batch / sec:.2f}\timages/s")


def _interleaved(fns: dict, repeat: int, slow: float = 3.0) -> dict:
    """{name: (seconds of its fastest call, its last result)}: one warm-up call each, then ``repeat``
    rounds calling every function once in turn, so that load from other processes on the machine
    falls on every variant alike; the fastest call is the one least disturbed. A function whose
    warm-up took over ``slow`` times the first one's is not repeated (its warm-up is its figure)."""
    out, times = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        out[name] = fn()
        times[name] = [time.perf_counter() - start]
    first = next(iter(times.values()))[0]
    again = [name for name in fns if times[name][0] <= slow * first]
    for name in again:
        times[name] = []
    for _ in range(repeat):
        for name in again:
            start = time.perf_counter()
            out[name] = fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), out[name]) for name in fns}


def latent_generator(size: int = 128, seed: int = 0):
    """The planned 128 px latent generator, random weights: a scratch cross-attention-only UNet on the
    32x32x4 latents of a gray AutoencoderKL with 4x downsampling (1.7 M + 1.0 M parameters)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from diffmask.diffusion import build_scratch_components

    torch.manual_seed(seed)
    comps = build_scratch_components(
        resolution=size // 4, block_out_channels=(32, 64, 64), layers_per_block=1, attention_heads=4,
        cross_attention_dim=64, norm_num_groups=8, only_cross_attention=True, text_hidden_size=64,
        text_layers=2, text_intermediate_size=128,
    )
    cfg = dict(comps.unet.config)
    cfg.update(in_channels=4, out_channels=4, sample_size=size // 4)
    comps.unet = UNet2DConditionModel.from_config(cfg)
    comps.vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8,
    )
    return comps


def bench_speed(
    size: int = 128, batch: int = 8, steps: int = 10, guidance: float = 3.0, repeat: int = 2
) -> None:
    """CPU speed options of the latent generator, each against plain sampling of the same model in this
    run: attention capture (as the generate stage makes it), channels_last (UNet and VAE), bf16 autocast,
    torch.compile of the UNet, thread counts; then seconds per training step (UNet forward + backward +
    AdamW on latents) plain, channels_last and bf16 autocast. Variants are timed in interleaved rounds
    (:func:`_interleaved`). The compile time is that of this run: inductor's on-disk cache, warm after
    a first run, shortens it."""
    import torch.nn.functional as F

    from diffmask.attention import capture_cross_attention
    from diffmask.attention.store import CrossAttentionStore
    from diffmask.diffusion import TextToImageSampler
    from diffmask.diffusion.module import encode_prompts
    from diffmask.domains.chest import chest_prompt_builder
    from diffmask.refine.mask_maker import AttentionMaskMaker

    comps = latent_generator(size)
    builder = chest_prompt_builder()
    prompts = [builder.build({"sex": "MF"[i % 2], "age": str(30 + i)}).text for i in range(batch)]
    seeds = list(range(batch))
    threads = torch.get_num_threads()
    tag = f"@{size}px latent ({steps} dpmpp steps, guidance {guidance:g}, batch {batch}, {threads} threads)"
    bf16 = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)

    def sampler_of(unet=None, vae=None):
        c = copy.copy(comps)
        c.unet, c.vae = unet if unet is not None else comps.unet, vae if vae is not None else comps.vae
        return TextToImageSampler(c, size, scheduler="dpmpp", prompt_builder=builder)

    def sample(sampler, context=contextlib.nullcontext, maker=None, num_threads=None):
        sink = None
        # the generate stage's capture: a CrossAttentionStore per batch, class maps at the end
        if maker is not None:
            sink = maker.new_sink(prompts, sampler.token_positions(prompts), size)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        try:
            # as the generate stage captures: every cross-attention layer into the store
            unet = sampler.components.unet
            capture = contextlib.nullcontext() if sink is None else capture_cross_attention(unet, sink)
            with context(), capture:
                out = sampler(prompts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                              on_step_begin=None if sink is None else sink.begin_step)
            if sink is not None:
                sink.result()
        finally:
            torch.set_num_threads(threads)
        return out.images

    plain = sampler_of()
    cl = sampler_of(copy.deepcopy(comps.unet).to(memory_format=torch.channels_last),
                    copy.deepcopy(comps.vae).to(memory_format=torch.channels_last))
    maker = AttentionMaskMaker(functools.partial(CrossAttentionStore), class_names=builder.class_names)
    variants = {
        "plain": lambda: sample(plain),
        "attention capture": lambda: sample(plain, maker=maker),
        "channels_last": lambda: sample(cl),
        "bf16 autocast": lambda: sample(plain, bf16),
    }
    for n in sorted({1, 2} - {threads}):
        variants[f"set_num_threads({n})"] = functools.partial(sample, plain, num_threads=n)
    compile_note = None
    try:
        compiled = sampler_of(torch.compile(copy.deepcopy(comps.unet)))
        start = time.perf_counter()
        sample(compiled)  # compiles; its warm-up in _interleaved is then a steady call
        first = time.perf_counter() - start
        variants["torch.compile(unet) steady"] = lambda: sample(compiled)
    except Exception as err:  # noqa: BLE001 - a compiler missing on this machine is a result, not a crash
        compile_note = f"failed: {type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    timed = _interleaved(variants, repeat)
    ref, ref_images = timed["plain"]
    for name, (sec, images) in timed.items():
        d = float((images - ref_images).abs().max())
        print(f"generation/{name}{tag}\t{batch / sec:.2f}\tpairs/s\tx{ref / sec:.2f} vs plain "
              f"(max abs image diff {d:.2g})")
        if name == "plain":
            print(f"generation/set_num_threads({threads}){tag}\t{batch / sec:.2f}\tpairs/s"
                  "\tx1.00 vs plain (= plain)")
    if compile_note is None:
        print(f"generation/torch.compile(unet) first call (compiling){tag}\t{first:.1f}\ts"
              f"\tx{ref / first:.2f} vs plain")
    else:
        print(f"generation/torch.compile(unet){tag}\t-\tpairs/s\t{compile_note}")

    # training: one optimiser step of the denoising loss on latents (the VAE encode is not timed)
    states = encode_prompts(comps.tokenizer, comps.text_encoder, prompts, torch.device("cpu")).detach()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(batch, 4, size // 4, size // 4, generator=gen)
    noise = torch.randn(clean.shape, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    noisy = comps.noise_scheduler.add_noise(clean, noise, t)

    def train_step(channels_last: bool = False, context=contextlib.nullcontext):
        unet = copy.deepcopy(comps.unet).train()
        x = noisy
        if channels_last:
            unet = unet.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(unet.parameters(), 1e-4)

        def step():
            opt.zero_grad()
            with context():
                pred = unet(x, t, encoder_hidden_states=states).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    train_tag = f"@{size}px latent (batch {batch}, {threads} threads)"
    timed = _interleaved({"plain": train_step(), "channels_last": train_step(channels_last=True),
                          "bf16 autocast": train_step(context=bf16)}, 3)
    train_ref = timed["plain"][0]
    for name, (sec, _) in timed.items():
        print(f"diffusion/train step {name}{train_tag}\t{sec:.3f}\ts\tx{train_ref / sec:.2f} vs plain")

    # the latent fit encodes its batch (+ the aligned items) every step unless the posteriors are cached
    from diffmask.diffusion import DiffusionLitModule
    from diffmask.domains.chest import chest_prompt_builder

    images = torch.rand(batch + 4, 1, size, size, generator=gen)

    def encode(cache: int):
        module = DiffusionLitModule(comps, chest_prompt_builder(), torch.optim.AdamW, resolution=size,
                                    ema_decay=0, latent_cache=cache)
        return lambda: module.encode_images(images)

    enc = _interleaved({"every step": encode(0), "cached": encode(4096)}, 3)
    every, cached = enc["every step"][0], enc["cached"][0]
    print(f"diffusion/latent fit step + encoding {batch + 4} images every step{train_tag}"
          f"\t{train_ref + every:.3f}\ts")
    print(f"diffusion/latent fit step + cached posteriors (latent_cache){train_tag}"
          f"\t{train_ref + cached:.3f}\ts"
          f"\tx{(train_ref + every) / (train_ref + cached):.2f} vs encoding every step")


SECTIONS = ("data", "nets", "control", "speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads first (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.get_num_interop_threads()} interop threads")
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
