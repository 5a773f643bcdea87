"""AttentionMaskMaker: store per batch -> refiner chain -> masks and scores."""

from __future__ import annotations

import functools

import numpy as np
import torch
from blob_images import iou, make_blob

from diffmask.attention import CrossAttentionStore
from diffmask.refine import DenseCRFRefiner, RefinementChain, ThresholdRefiner
from diffmask.refine.mask_maker import AttentionMaskMaker


def test_mask_maker_turns_recorded_attention_into_masks():
    blob = make_blob(0, size=32)
    maker = AttentionMaskMaker(
        functools.partial(CrossAttentionStore, upsample="bilinear"),
        RefinementChain({"threshold": ThresholdRefiner(ignore_band=0.1), "densecrf": DenseCRFRefiner()}),
        class_names=["background", "disk"],
    )
    sink = maker.new_sink(["a disk", "a disk"], [[[2]], [[2]]], resolution=32)
    # the attention of token 2 follows the blurry, offset blob map at a 16x16 grid, under guidance
    grid = torch.nn.functional.interpolate(
        torch.from_numpy(blob["class_maps"])[None], size=(16, 16), mode="area"
    )[0, 0]
    probs = torch.full((4, 2, 256, 5), 0.01)
    probs[..., 2] = grid.flatten() * 0.9 + 0.01
    for step in range(2):
        sink.begin_step(step, 900 - step)
        sink.record("layer", probs, (16, 16))
    images = torch.from_numpy(blob["image"]).float()[None, None].expand(2, 1, 32, 32) / 255
    masks, scores = maker(images, sink, [[[2]], [[2]]])
    assert masks.shape == (2, 32, 32) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert iou(masks[0] == 1, blob["disk"]) >= 0.85
    assert len(scores) == 2 and 0.3 < scores[0]["disk"] <= 1


def test_mask_maker_gives_the_crf_the_rgb_image_of_a_colour_model():
    from blob_images import make_colour_blob

    blob = make_colour_blob(0)
    seen = []

    def spy(sample):
        seen.append(sample["image"])
        return DenseCRFRefiner()(sample)

    maker = AttentionMaskMaker(
        functools.partial(CrossAttentionStore), spy, class_names=["background", "disk"]
    )
    images = torch.from_numpy(blob["image"]).permute(2, 0, 1).float()[None] / 255  # (1, 3, S, S)
    masks, _ = maker.from_maps(
        (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8), blob["class_maps"][None]
    )
    assert seen[0].shape == (64, 64, 3) and np.array_equal(seen[0], blob["image"])
    assert masks.shape == (1, 64, 64) and iou(masks[0] == 1, blob["disk"]) >= 0.9
