"""AffinityRefiner: loss, training lowers it, random-walk refinement recovers a known blob."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from blob_images import iou, make_blob
from torch.utils.data import DataLoader

from diffmask.refine import (
    IGNORE_INDEX,
    AffinityBackbone,
    AffinityRefiner,
    DenseCRFRefiner,
    RefinementChain,
    ThresholdRefiner,
    affinity_loss,
    local_offsets,
)
from diffmask.refine.affinity import pair_affinities, seed_grid


def _seed_batch(seeds: range, size: int, seeder) -> dict[str, torch.Tensor]:
    samples = [seeder(make_blob(s, size)) for s in seeds]
    return {
        "image": torch.stack([torch.from_numpy(s["image"]).float()[None] / 255 for s in samples]),
        "label": torch.stack([torch.from_numpy(s["label"].astype(np.int64)) for s in samples]),
    }


def test_offsets_and_loss_parts():
    offs = local_offsets(5)
    assert len(offs) == 34 and (0, 0) not in offs and all(dy >= 0 for dy, _ in offs)
    feats = torch.randn(1, 4, 6, 6)
    aff, valid = pair_affinities(feats, offs)
    assert aff.shape == (1, 34, 6, 6) and ((aff > 0) & (aff <= 1)).all()
    same = affinity_loss(aff, valid, torch.zeros(1, 6, 6, dtype=torch.long), offs)
    assert same["cross"] == 0 and same["fg"] == 0 and same["bg"] > 0
    split = torch.zeros(1, 6, 6, dtype=torch.long)
    split[:, :, 3:] = 2
    split[:, 0] = IGNORE_INDEX
    parts = affinity_loss(aff, valid, split, offs)
    assert parts["cross"] > 0 and parts["fg"] > 0
    torch.testing.assert_close(parts["loss"], parts["bg"] / 4 + parts["fg"] / 4 + parts["cross"] / 2)


def test_seed_grid_ignores_mixed_cells():
    seed = torch.zeros(1, 8, 8, dtype=torch.long)
    seed[:, :, 5:] = 1  # the boundary falls inside the second column of 4x4 cells
    seed[:, 0, 0] = IGNORE_INDEX
    grid = seed_grid(seed, (2, 2))
    assert grid.tolist() == [[[IGNORE_INDEX, IGNORE_INDEX], [0, IGNORE_INDEX]]]


def test_training_a_few_steps_lowers_the_loss(tmp_path):
    batch = _seed_batch(range(3), 48, ThresholdRefiner(ignore_band=0.2))
    torch.manual_seed(0)
    model = AffinityRefiner(
        AffinityBackbone(channels=(8, 16), feature_dim=8),
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        radius=4,
    )
    with torch.no_grad():
        before = model.compute_loss(batch["image"], batch["label"])["loss"].item()
    loader = DataLoader([{k: v[i] for k, v in batch.items()} for i in range(3)], batch_size=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        after = model.compute_loss(batch["image"], batch["label"])["loss"].item()
    assert after < 0.7 * before


def test_random_walk_recovers_the_blob_from_crf_seeds():
    """Seeds come from the synthetic images themselves (threshold -> CRF, ignore where the CRF is
    unsure), as in the mask stage. The walk spreads the offset attention (IoU ~0.54 with the
    disk) inside the regions the learned affinities connect. On this 32x32 grid an oracle
    region affinity reaches ~0.93 (cells on the edge are mixed), so we ask >= 0.8."""
    seeder = RefinementChain([ThresholdRefiner(ignore_band=0.1), DenseCRFRefiner(ignore_below=0.9)])
    batch = _seed_batch(range(4), 64, seeder)
    torch.manual_seed(0)
    model = AffinityRefiner(AffinityBackbone(channels=(8, 16), feature_dim=8), radius=5, beta=8, t=256)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(20):
        loss = model.compute_loss(batch["image"], batch["label"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for walk_background in (True, False):
        model.walk_background = walk_background
        for seed in range(4):
            s = make_blob(seed)
            out = model.refine_sample(s)  # uint8 image and numpy maps, as in a chain
            assert out["label"].dtype == np.uint8 and out["affinity_scores"].shape == (2, 64, 64)
            raw = iou(s["class_maps"][0] >= 0.5, s["disk"])
            assert iou(out["label"] == 1, s["disk"]) >= max(0.8, raw + 0.2), (walk_background, seed)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="radius"):
        AffinityRefiner(AffinityBackbone(), radius=1)
    with pytest.raises(ValueError, match="beta"):
        AffinityRefiner(AffinityBackbone(), beta=0)
    with pytest.raises(ValueError, match="channels"):
        AffinityBackbone(channels=())
    with pytest.raises(ValueError, match="share H, W"):
        AffinityRefiner(AffinityBackbone()).refine(torch.rand(1, 16, 16), torch.rand(1, 8, 8))


def test_affinity_reads_rgb_images_channel_last_and_refuses_the_other_kind():
    from blob_images import make_colour_blob

    s = make_colour_blob(0, size=32)
    torch.manual_seed(0)
    refiner = AffinityRefiner(AffinityBackbone(in_channels=3, channels=(8, 16), feature_dim=8), radius=3, t=4)
    out = refiner.refine_sample({"image": s["image"], "class_maps": s["class_maps"]})  # (H, W, 3) uint8
    assert out["label"].shape == (32, 32) and out["label"].dtype == np.uint8
    chw = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255
    np.testing.assert_array_equal(out["label"], refiner.refine(chw, torch.from_numpy(s["class_maps"]))[0])
    grey = AffinityRefiner(AffinityBackbone(in_channels=1, channels=(8, 16), feature_dim=8), radius=3, t=4)
    with pytest.raises(ValueError, match=r"image: 3 channel\(s\), AffinityNet reads 1"):
        grey.refine_sample({"image": s["image"], "class_maps": s["class_maps"]})
