"""The self-attention affinity step: a walk through an image-built affinity moves a blurred mask to the
edge."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from diffmask.attention.self_attention import SelfAttentionStore, resample_affinity
from diffmask.refine import RefinementChain, SelfAffinityRefiner, ThresholdRefiner, affinity_walk
from diffmask.refine.self_affinity import self_attention_step

SIZE = 40


def disk_scene(shift: int = 3, blur: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sharp-edged bright disk, its true mask, and a blurred, shifted class map of it."""
    ys, xs = np.mgrid[:SIZE, :SIZE]
    disk = (ys - SIZE / 2) ** 2 + (xs - SIZE / 2) ** 2 <= 10**2
    image = np.where(disk, 0.8, 0.2).astype(np.float32)
    moved = np.roll(disk, (shift, shift), axis=(0, 1)).astype(np.float32)
    k = np.arange(-8, 9)
    g = np.exp(-(k**2) / (2 * blur**2))
    g /= g.sum()
    blurred = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 0, moved)
    blurred = np.apply_along_axis(lambda r: np.convolve(r, g, mode="same"), 1, blurred)
    return image, disk, (blurred / blurred.max())[None].astype(np.float32)


def image_affinity(image: np.ndarray, radius: int = 3, scale: float = 0.01) -> torch.Tensor:
    """exp(-|I_i - I_j|^2 / scale) between pixels within ``radius`` (a stand-in for self-attention)."""
    h, w = image.shape
    pos = np.stack(np.mgrid[:h, :w], -1).reshape(-1, 2).astype(np.float32)
    near = ((pos[:, None] - pos[None]) ** 2).sum(-1) <= radius**2
    v = image.reshape(-1)
    return torch.from_numpy(
        np.where(near, np.exp(-((v[:, None] - v[None]) ** 2) / scale), 0.0).astype(np.float32)
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_walk_moves_a_blurred_mask_towards_the_disk_edge():
    image, disk, maps = disk_scene()
    before = ThresholdRefiner()({"class_maps": maps})["label"] == 1
    affinity = image_affinity(image)
    step = SelfAffinityRefiner(power=40)
    out = step({"class_maps": maps, "self_attention": affinity.numpy()})
    after = out["label"] == 1
    assert iou(after, disk) > iou(before, disk) + 0.05, (iou(before, disk), iou(after, disk))
    assert out["class_maps"].shape == maps.shape and out["class_maps"].max() == pytest.approx(1.0)
    assert out["self_affinity_seconds"] >= 0 and out["confidence"].shape == (1,)
    # argmax labels, and an affinity at a coarser grid than the image (as a 16x16 layer of a 32 px image)
    argmax = SelfAffinityRefiner(power=40, labels="argmax")({"class_maps": maps, "self_attention": affinity})
    assert iou(argmax["label"] == 1, disk) > iou(before, disk)
    coarse = resample_affinity(affinity[None], (SIZE, SIZE), (SIZE // 2, SIZE // 2))[0]
    half = SelfAffinityRefiner(power=20)({"class_maps": maps, "self_attention": coarse})
    assert half["label"].shape == (SIZE, SIZE) and iou(half["label"] == 1, disk) > iou(before, disk) + 0.05


def test_power_zero_returns_the_input_unchanged():
    maps = torch.rand(2, 5, 6)
    assert affinity_walk(maps, torch.rand(30, 30), 0) is maps
    step = SelfAffinityRefiner(power=0)
    image, _, blurred = disk_scene()
    out = step({"class_maps": blurred, "self_attention": image_affinity(image).numpy()})
    assert np.array_equal(out["class_maps"], blurred)
    assert np.array_equal(out["label"], ThresholdRefiner()({"class_maps": blurred})["label"])


def test_walk_algebra_and_errors():
    a = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    maps = torch.tensor([[[1.0, 0.0, 0.0]]])
    one = affinity_walk(maps, a, 1)  # each pixel: the mean of the pixels it attends to
    assert torch.allclose(one, torch.tensor([[[0.5, 0.0, 0.0]]]))
    two = affinity_walk(maps, a, 2)
    trans = a / a.sum(1, keepdim=True)
    assert torch.allclose(two.reshape(1, 3), (trans @ trans @ maps.reshape(3, 1)).T)
    with pytest.raises(ValueError, match="power"):
        affinity_walk(maps, a, -1)
    with pytest.raises(ValueError, match="power"):
        SelfAffinityRefiner(power=1.5)
    with pytest.raises(ValueError, match="affinity"):
        affinity_walk(maps, torch.ones(4, 4), 1)
    with pytest.raises(ValueError, match="no positive"):
        affinity_walk(maps, torch.zeros(3, 3), 1)
    with pytest.raises(KeyError, match="self-attention captured"):
        SelfAffinityRefiner()({"class_maps": maps.numpy()})


def test_an_unnamed_class_stays_empty_and_the_chain_finds_the_step():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 2:5, 2:5] = 1.0
    out = SelfAffinityRefiner(power=2)(
        {"class_maps": maps, "self_attention": np.eye(64, dtype=np.float32) + 0.01}
    )
    assert not (out["label"] == 2).any() and (out["label"] == 1).any()
    step = SelfAffinityRefiner(capture=functools.partial(SelfAttentionStore, grid=8))
    chain = RefinementChain(
        {"threshold": ThresholdRefiner(), "self_affinity": step}, use=["threshold", "self_affinity"]
    )
    assert self_attention_step(chain) is step
    assert (
        self_attention_step(RefinementChain({"threshold": ThresholdRefiner(), "sa": step}, use=["threshold"]))
        is None
    )
    store = step.new_self_attention_store(batch_size=3)
    assert isinstance(store, SelfAttentionStore) and store.batch_size == 3 and store.grid == (8, 8)


def test_generation_with_the_self_affinity_step_keeps_the_images_and_logs_its_cost(caplog):
    import logging

    from diffmask.attention import CrossAttentionStore
    from diffmask.diffusion import TextToImageSampler
    from diffmask.diffusion.tiny_models import tiny_scratch_components
    from diffmask.domains.chest import CHEST_CLASS_NAMES, chest_prompt_builder
    from diffmask.refine.mask_maker import AttentionMaskMaker
    from diffmask.synthesis.module import SynthesisLitModule

    builder = chest_prompt_builder()
    sampler = TextToImageSampler(tiny_scratch_components(32, seed=3), 32, prompt_builder=builder)
    store = functools.partial(CrossAttentionStore, upsample="bilinear")
    batch = {
        "id": ["a", "b"],
        "prompt": [builder.build({}).text, builder.build({"sex": "F"}).text],
        "seed": [1, 2],
        "meta": [{}, {}],
    }
    preds = {}
    for steps in (["threshold"], ["threshold", "self_affinity"]):
        chain = RefinementChain(
            {"threshold": ThresholdRefiner(), "self_affinity": SelfAffinityRefiner(power=3)}, use=steps
        )
        maker = AttentionMaskMaker(store, chain, class_names=CHEST_CLASS_NAMES)
        module = SynthesisLitModule(
            sampler, num_inference_steps=3, guidance_scale=2.0, mask_maker=maker, save_class_maps=True
        )
        with caplog.at_level(logging.INFO, logger="diffmask.refine.mask_maker"):
            preds[len(steps)] = module.predict_step(batch, 0)
            maker.close()
    plain, walked = preds[1], preds[2]
    assert np.array_equal(plain["images"], walked["images"])  # the capture leaves the images bit-identical
    assert np.array_equal(plain["class_maps"], walked["class_maps"])
    assert walked["masks"].shape == (2, 32, 32) and walked["masks"].dtype == np.uint8
    assert maker.timing["images"] == 2 and maker.timing["capture_seconds"] > 0
    assert maker.timing["capture_seconds"] < maker.timing["sampling_seconds"]
    logged = [r.getMessage() for r in caplog.records if "self-attention capture" in r.getMessage()]
    assert len(logged) == 2 and "of" in logged[0] and "sampling" in logged[0]  # the batch, then the totals


def test_synthesis_config_wires_the_self_affinity_step(tmp_path):
    from hydra import compose, initialize_config_dir

    from diffmask.config import CONFIG_PATH
    from diffmask.synthesis.labels import build_synthesis

    def compose_config(name, overrides, out):
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            return compose(config_name=name, overrides=[f"paths.output_dir={out}", *overrides])

    cfg = compose_config(
        "generate",
        [
            "synthesis=attention_masks",
            "synthesis.refine=[threshold,self_affinity]",
            "synthesis.mask_maker.refiner.steps.self_affinity.power=6",
            "synthesis.mask_maker.refiner.steps.self_affinity.capture.resolutions=[16]",
        ],
        tmp_path,
    )
    maker, _, affinity = build_synthesis(cfg.synthesis)
    assert maker.refiner.names == ["threshold", "self_affinity"] and affinity is None
    assert isinstance(maker.self_affinity, SelfAffinityRefiner) and maker.self_affinity.power == 6
    store = maker.new_sink(["x"], [[[1], [2], [3]]], 32).self_attention
    assert isinstance(store, SelfAttentionStore) and store.resolutions == (16,) and store.batch_size == 1
    # the default chain does not capture self-attention
    default, _, _ = build_synthesis(
        compose_config("generate", ["synthesis=attention_masks"], tmp_path).synthesis
    )
    assert (
        default.self_affinity is None
        and default.new_sink(["x"], [[[1], [2], [3]]], 32).self_attention is None
    )


def test_the_config_instantiates_with_its_documented_defaults():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "refine" / "self_affinity.yaml"
    step = instantiate(OmegaConf.load(conf))
    assert isinstance(step, SelfAffinityRefiner) and step.power == 4 and step.labels == "threshold"
    store = step.new_self_attention_store(batch_size=2)
    assert store.resolutions == (16, 32) and store.grid is None and store.step_window is None
