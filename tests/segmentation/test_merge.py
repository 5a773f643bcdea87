"""Random merging masks (EMIT-Diff): the patch mask, the merged loss, paired data, a train run with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from monai.networks.nets import UNet

from diffmask.data import ManifestRow, SegmentationDataModule, write_manifest
from diffmask.domains.chest import JSRTSource
from diffmask.segmentation import SegmentationLitModule
from diffmask.segmentation.merge import MergeSettings, merge_pair, patch_merge_mask
from diffmask.segmentation.module import DiceCELossWithIgnore
from tests.conftest import compose_config, write_phantom_folder

CLASSES = ["background", "left_lung", "right_lung", "heart"]
SPLITS = {"train": 6, "val": 2, "test": 2}


def _tiny_net() -> UNet:
    return UNet(2, 1, len(CLASSES), channels=(4, 8), strides=(2,))


@pytest.fixture(scope="module")
def phantom_real(tmp_path_factory):
    """A real folder in JSRT's layout: 6 / 2 / 2 phantom images of 32 px."""
    return write_phantom_folder(tmp_path_factory.mktemp("merge_real"), size=32, splits=SPLITS)


def _write_variants(root, real_dir, variants: dict[str, int], extra_unpaired: int = 0):
    """A synthetic set whose ``n`` variants of real id ``r`` are copies of ``r``'s image and mask,
    with ``pair_id = r``; ``extra_unpaired`` rows (copies of the first real image) have no pair_id."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for rid, n in variants.items():
        for k in range(n):
            sid = f"syn_{rid}_{k}"
            shutil.copy(real_dir / "images" / f"{rid}.png", root / "images" / f"{sid}.png")
            shutil.copy(real_dir / "masks" / f"{rid}.png", root / "masks" / f"{sid}.png")
            rows.append(ManifestRow(sid, f"images/{sid}.png", f"masks/{sid}.png", "p", "synthetic", seed=k,
                                    pair_id=rid))
    first = next(iter(variants), None) or JSRTSource(real_dir).ids("train")[0]
    for k in range(extra_unpaired):
        sid = f"free_{k}"
        shutil.copy(real_dir / "images" / f"{first}.png", root / "images" / f"{sid}.png")
        shutil.copy(real_dir / "masks" / f"{first}.png", root / "masks" / f"{sid}.png")
        rows.append(ManifestRow(sid, f"images/{sid}.png", f"masks/{sid}.png", "p", "synthetic", seed=k))
    write_manifest(root, rows)
    return root


def test_merging_with_alpha_one_or_zero_gives_the_real_or_the_synthetic_loss():
    torch.manual_seed(0)
    loss_fn = DiceCELossWithIgnore()
    real_logits, syn_logits = torch.randn(3, 4, 32, 32), torch.randn(3, 4, 32, 32)
    real_label, syn_label = torch.randint(0, 4, (3, 1, 32, 32)), torch.randint(0, 4, (3, 1, 32, 32))
    real_label[:, :, :2] = 255  # ignored pixels follow their own image too
    for alpha, want in ((1.0, loss_fn(real_logits, real_label)), (0.0, loss_fn(syn_logits, syn_label))):
        mask = patch_merge_mask(real_logits.shape, 5, alpha)
        logits, label = merge_pair(real_logits, syn_logits, real_label, syn_label, mask)
        assert torch.equal(loss_fn(logits, label), want)
    # in between: every pixel from one of the two, logits and label from the same one
    mask = patch_merge_mask(real_logits.shape, 8, 0.5, generator=torch.Generator().manual_seed(1))
    logits, label = merge_pair(real_logits, syn_logits, real_label, syn_label, mask)
    assert 0 < mask.float().mean() < 1
    assert torch.equal(logits, torch.where(mask, real_logits, syn_logits))
    assert torch.equal(label, torch.where(mask, real_label, syn_label))
    flat, _ = merge_pair(real_logits, syn_logits, real_label[:, 0], syn_label[:, 0], mask)  # (B, H, W) labels
    assert torch.equal(flat, logits)


def test_module_training_step_merges_the_pair():
    """alpha = 1 / 0 in the module: ``train/loss`` is the loss on the real / the paired images alone."""
    torch.manual_seed(0)
    batch = {
        "image": torch.rand(2, 1, 32, 32), "label": torch.randint(0, 4, (2, 1, 32, 32)),
        "pair_image": torch.rand(2, 1, 32, 32), "pair_label": torch.randint(0, 4, (2, 1, 32, 32)),
    }
    net = _tiny_net().eval()  # instance norm: a joint forward equals two separate ones
    with torch.no_grad():
        for alpha, image, label in ((1.0, "image", "label"), (0.0, "pair_image", "pair_label")):
            module = SegmentationLitModule(net, CLASSES, optimizer=None, merge={"alpha": alpha, "patch": 4})
            want = module.loss_fn(net(batch[image]), batch[label])
            assert module.training_step(batch, 0) == pytest.approx(float(want), abs=1e-5)
        module = SegmentationLitModule(net, CLASSES, optimizer=None, merge={"alpha": 0.6, "patch": 4})
        with pytest.raises(ValueError, match="data must be paired"):
            module.training_step({"image": batch["image"], "label": batch["label"]}, 0)
        # seeded runs repeat: the mask follows torch's global RNG
        torch.manual_seed(3)
        first = module.training_step(batch, 0)
        torch.manual_seed(3)
        assert torch.equal(module.training_step(batch, 0), first)
    assert not SegmentationLitModule(net, CLASSES, optimizer=None).merge.enabled


def test_patch_mask_is_constant_per_block_with_mean_alpha():
    gen = torch.Generator().manual_seed(0)
    mask = patch_merge_mask((2, 4, 30, 37), 8, 0.6, generator=gen)
    assert mask.shape == (2, 1, 30, 37) and mask.dtype == torch.bool
    for top in range(0, 30, 8):
        for left in range(0, 37, 8):  # the last row and column of blocks are cut short
            block = mask[:, :, top : top + 8, left : left + 8]
            assert (block == block[:, :, :1, :1]).all()
    draws = patch_merge_mask((400, 1, 64, 64), 16, 0.6, generator=gen)  # 6400 blocks
    assert draws.float().mean().item() == pytest.approx(0.6, abs=0.02)
    assert patch_merge_mask((1, 1, 5, 5), 1, 0.3, generator=gen).shape == (1, 1, 5, 5)
    assert torch.equal(patch_merge_mask((2, 1, 8, 8), 3, 0.0), torch.zeros(2, 1, 8, 8, dtype=torch.bool))


@pytest.mark.parametrize(
    ("merge", "match"),
    [
        ({"alpha": 1.5}, "segmentation.merge.alpha"),
        ({"alpha": -0.1}, "segmentation.merge.alpha"),
        ({"alpha": 0.6, "patch": 0}, "segmentation.merge.patch"),
        ({"alpha": 0.6, "patch": 2.5}, "segmentation.merge.patch"),
        ({"alpha": 0.6, "size": 4}, "unknown key"),
    ],
)
def test_bad_merge_settings_name_the_field(merge, match):
    with pytest.raises(ValueError, match=match):
        SegmentationLitModule(_tiny_net(), CLASSES, optimizer=None, merge=merge)
    with pytest.raises(ValueError, match=match):
        MergeSettings.from_config(merge)


def test_patch_merge_mask_checks_its_arguments():
    with pytest.raises(ValueError, match="segmentation.merge.alpha"):
        patch_merge_mask((1, 1, 8, 8), 4, 2.0)
    with pytest.raises(ValueError, match="segmentation.merge.patch"):
        patch_merge_mask((1, 1, 8, 8), 0, 0.5)


def test_paired_datamodule_serves_each_real_image_with_a_variant_of_it(phantom_real, tmp_path):
    real = JSRTSource(phantom_real)
    ids = real.ids("train")
    # two variants of each of the first three real images, none of the others, and rows without pair_id
    syn = _write_variants(tmp_path / "syn", phantom_real, {rid: 2 for rid in ids[:3]}, extra_unpaired=2)
    dm = SegmentationDataModule(real, size=32, batch_size=6, synthetic_dir=str(syn), augment=None,
                                synthetic_augment=None, paired=True, synthetic_min_class_presence=None)
    assert dm.real_train_ids == ids and len(dm.synthetic_ids) == 8  # paired, ratio 0: every synthetic sample
    assert dm.pair_info == {"n_pairs": 6, "n_real_with_variants": 3, "n_real_self_paired": 3,
                            "n_synthetic_unmatched": 2}
    assert dm.train_sampler() is None
    seen = set()
    for _ in range(24):  # each of 2 variants missed in all draws: 3 * 2**-24 (6 draws flaked about 1 in 20)
        batch = next(iter(dm.train_dataloader()))
        assert batch["pair_image"].shape == batch["image"].shape == (6, 1, 32, 32)
        assert batch["pair_label"].shape == batch["label"].shape and batch["pair_label"].dtype == torch.int64
        assert set(batch["source"]) == {"real"}
        for i, (rid, pid) in enumerate(zip(batch["id"], batch["pair_sample_id"], strict=True)):
            # copies of their real image: a pair is its own real image's variant, or itself
            assert torch.equal(batch["pair_image"][i], batch["image"][i])
            assert torch.equal(batch["pair_label"][i], batch["label"][i])
            assert pid.startswith(f"syn_{rid}_") if rid in ids[:3] else pid == rid
            seen.add(pid)
    assert {f"syn_{rid}_{k}" for rid in ids[:3] for k in range(2)} <= seen  # drawn afresh each fetch


def test_paired_datamodule_applies_the_synthetic_settings_to_the_pair(phantom_real, tmp_path):
    real = JSRTSource(phantom_real)
    rid = real.ids("train")[0]
    syn = _write_variants(tmp_path / "syn", phantom_real, {rid: 1})
    dm = SegmentationDataModule(real, size=32, real_fraction=1.0, synthetic_dir=str(syn), augment=None,
                                synthetic_augment=None, synthetic_ignore_margin=1, paired=True,
                                synthetic_min_class_presence=None)
    item = dm.train_dataset()[0]
    assert item["pair_sample_id"] == f"syn_{rid}_0"
    assert (item["pair_label"] == 255).any() and not (item["label"] == 255).any()


def test_paired_augmentation_is_drawn_independently(phantom_real, tmp_path):
    """Equal transforms on a real image and its identical variant still give two different views."""
    from diffmask.data.transforms import build_augmentation

    real = JSRTSource(phantom_real)
    syn = _write_variants(tmp_path / "syn", phantom_real, {rid: 1 for rid in real.ids("train")})

    def augment():
        return build_augmentation(size=32, affine_prob=1.0, prob=1.0, noise_std=0.0)

    dm = SegmentationDataModule(real, size=32, synthetic_dir=str(syn), augment=augment(),
                                synthetic_augment=augment(), paired=True, synthetic_min_class_presence=None)
    ds = dm.train_dataset()
    torch.manual_seed(0)
    items = [ds[i] for i in range(len(ds))]
    assert not any(torch.equal(it["image"], it["pair_image"]) for it in items)


def test_paired_datamodule_errors(phantom_real, tmp_path):
    real = JSRTSource(phantom_real)
    ids = real.ids("train")
    common = {"size": 32, "synthetic_min_class_presence": None, "paired": True}
    syn = _write_variants(tmp_path / "syn", phantom_real, {ids[0]: 1})
    with pytest.raises(ValueError, match="needs data.synthetic_dir"):
        SegmentationDataModule(real, **common)
    with pytest.raises(ValueError, match="real_fraction=0"):
        SegmentationDataModule(real, real_fraction=0.0, synthetic_dir=str(syn), **common)
    with pytest.raises(ValueError, match="real_share"):
        SegmentationDataModule(real, synthetic_dir=str(syn), real_share=0.5, **common)
    unpaired = _write_variants(tmp_path / "unpaired", phantom_real, {}, extra_unpaired=3)
    dm = SegmentationDataModule(real, synthetic_dir=str(unpaired), **common)
    with pytest.raises(ValueError, match="synthetic_dir.*pair_id"):  # the sets are opened in setup
        dm.setup("fit")
    # the only variant belongs to a real image left out by real_fraction
    half = SegmentationDataModule(real, size=32, real_fraction=0.5)
    left_out = next(i for i in ids if i not in half.real_train_ids)
    other = _write_variants(tmp_path / "other", phantom_real, {left_out: 2})
    dm = SegmentationDataModule(real, real_fraction=0.5, synthetic_dir=str(other), **common)
    with pytest.raises(ValueError, match="pair_id"):
        dm.setup("fit")


def test_train_run_with_random_merging_masks(phantom_real, tmp_path):
    from diffmask.cli.train import run

    ids = JSRTSource(phantom_real).ids("train")
    syn = _write_variants(tmp_path / "syn", phantom_real, {rid: 1 for rid in ids[:4]})
    out = tmp_path / "run"
    cfg = compose_config("train", [
        "data=jsrt", f"paths.jsrt_dir={phantom_real}", "data.size=32", "data.batch_size=3",
        "data.num_workers=0",
        f"data.synthetic_dir={syn}", "data.synthetic_min_class_presence=null",
        "segmentation.net.channels=[4,8]", "segmentation.net.strides=[2]", "segmentation.net.num_res_units=0",
        "segmentation.merge.alpha=0.6", "segmentation.merge.patch=8",
        "trainer.max_epochs=1", "trainer.limit_test_batches=1",
    ], out)
    assert cfg.segmentation.merge.alpha == 0.6 and "paired" not in cfg.data
    run(cfg)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["paired"] == {"n_pairs": 4, "n_real_with_variants": 4, "n_real_self_paired": 2,
                                         "n_synthetic_unmatched": 0}
    assert 0.0 <= metrics["metrics"]["test/jsrt/miou"] <= 1.0
