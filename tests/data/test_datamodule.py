"""Real/synthetic mixing, reproducible fractions, no horizontal flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffmask.data import SegmentationDataModule, select_fraction
from diffmask.data.transforms import build_augmentation
from diffmask.domains.chest import JSRTSource, PhantomSource
from tests.conftest import write_synthetic_folder


def test_select_fraction_reproducible_and_nested():
    ids = [f"{i:04d}" for i in range(173)]
    small = select_fraction(ids, 0.1, seed=0)
    assert len(small) == 17 and small == select_fraction(ids, 0.1, seed=0)
    assert set(small) <= set(select_fraction(ids, 0.25, seed=0))
    assert select_fraction(ids, 0.0, 0) == [] and select_fraction(ids, 1.0, 0) == ids
    assert small != select_fraction(ids, 0.1, seed=1)
    with pytest.raises(ValueError, match="real_fraction"):
        select_fraction(ids, 1.5, 0)


def test_real_fraction_and_synthetic_ratio(real_dir, tmp_path):
    syn = write_synthetic_folder(tmp_path / "syn")
    real = JSRTSource(real_dir)
    three = 3 / len(real.ids("train"))  # 3 of JSRT's 173 training images, or of the phantom folder's
    dm = SegmentationDataModule(
        real, size=32, batch_size=4, real_fraction=three, synthetic_dir=str(syn), synthetic_ratio=2
    )
    assert len(dm.real_train_ids) == 3 and len(dm.synthetic_ids) == 6
    assert set(dm.real_train_ids) <= set(real.ids("train"))
    assert len(dm.train_dataset()) == 9
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["label"].dtype == torch.int64
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1
    assert set(batch["source"]) <= {"real", "synthetic"}
    # absolute count overrides the ratio; synthetic only uses all synthetic samples
    dm2 = SegmentationDataModule(real, size=32, real_fraction=0.0, synthetic_dir=str(syn))
    assert dm2.real_train_ids == [] and len(dm2.synthetic_ids) == 12
    dm3 = SegmentationDataModule(real, size=32, real_fraction=0.1, synthetic_dir=str(syn), synthetic_count=5)
    assert len(dm3.synthetic_ids) == 5
    with pytest.raises(ValueError, match="has only 12"):
        SegmentationDataModule(real, size=32, synthetic_dir=str(syn), synthetic_count=50).setup("fit")
    with pytest.raises(ValueError, match="training set is empty"):
        SegmentationDataModule(real, size=32, real_fraction=0.0).setup("fit")


def test_a_list_of_synthetic_sets_is_read_as_one(tmp_path, monkeypatch):
    """data.synthetic_dir=[a, b] (e.g. an EMIT-Diff set and a DiffMask set): the same ids in both
    do not collide, counts draw from the union, and sets made from other intensities are refused."""
    from omegaconf import OmegaConf

    a = write_synthetic_folder(tmp_path / "emit", n=5, made_with="equalize")
    write_synthetic_folder(tmp_path / "dm", n=7, made_with="equalize")
    real = PhantomSource(size=32, num_train=8, seed=3)
    monkeypatch.chdir(tmp_path)  # folders given relative to the working folder, as on a command line
    dirs = OmegaConf.create(["emit", "dm"])  # as Hydra passes a list override
    dm = SegmentationDataModule(real, size=32, real_fraction=0.25, synthetic_dir=dirs, synthetic_count=12,
                                intensity="equalize")
    assert len(dm.synthetic_ids) == 12 and len(set(dm.synthetic_ids)) == 12
    assert {i.split("/")[0] for i in dm.synthetic_ids} == {"emit", "dm"} and dm.synthetic.name == "emit+dm"
    assert dm.synthetic_intensity == "raw"  # made from equalized images: served as they are
    data = dm._synthetic_dataset()
    items = [data[0], data[len(data) - 1]]  # one of each set
    assert all(it["image"].shape == (1, 32, 32) and it["source"] == "synthetic" for it in items)
    with pytest.raises(ValueError, match="has only 12"):
        SegmentationDataModule(real, size=32, synthetic_dir=dirs, synthetic_count=13,
                               intensity="equalize").setup("fit")
    raw = write_synthetic_folder(tmp_path / "raw", n=3, made_with="raw")
    with pytest.raises(ValueError, match="different data.intensity"):
        SegmentationDataModule(real, size=32, synthetic_dir=[str(a), str(raw)], synthetic_count=4,
                               intensity="equalize").setup("fit")
    with pytest.raises(ValueError, match="share a name"):
        SegmentationDataModule(real, size=32, synthetic_dir=[str(a), str(a)], synthetic_count=4).setup("fit")


def test_external_test_set_by_path(real_dir, tmp_path):
    ext = write_synthetic_folder(tmp_path / "ext")
    real = JSRTSource(real_dir)
    dm = SegmentationDataModule(real, size=32, test_sets={"other": str(ext)})
    assert dm.test_set_names == ["jsrt", "other"]
    loaders = dm.test_dataloader()
    assert (
        len(loaders) == 2
        and len(loaders[0].dataset) == len(real.ids("test"))
        and len(loaders[1].dataset) == 12
    )


@pytest.mark.parametrize("size", [64, 128])
def test_resolution(real_dir, size):
    dm = SegmentationDataModule(JSRTSource(real_dir), size=size, batch_size=2)
    item = dm.val_dataloader().dataset[0]
    assert item["image"].shape == item["label"].shape == (1, size, size)


def test_augmentation_keeps_sides():
    """Augmentation must never mirror: the left lung (1) stays on the image's right."""
    src = PhantomSource(size=64, num_train=4)
    aug = build_augmentation(size=64, affine_prob=1.0, prob=1.0)
    for sid in src.ids("train"):
        s = src.load(sid)
        for _ in range(5):
            out = aug(
                {
                    "image": torch.from_numpy(s.image[None] / 255.0).float(),
                    "label": torch.from_numpy(s.label[None]).float(),
                }
            )
            lab = np.asarray(out["label"])[0].round()
            assert np.nonzero(lab == 1)[1].mean() > np.nonzero(lab == 2)[1].mean()


def test_real_share_balances_real_and_synthetic_draws(tmp_path):
    syn = write_synthetic_folder(tmp_path / "syn", n=24)
    real = PhantomSource(size=32, num_train=8, seed=3)

    def real_fraction_drawn(**kw):
        dm = SegmentationDataModule(real, size=32, batch_size=8, real_fraction=0.25, synthetic_dir=str(syn),
                                    synthetic_count=24, num_workers=0, **kw)
        assert len(dm.real_train_ids) == 2
        sources = [s for _ in range(40) for batch in dm.train_dataloader() for s in batch["source"]]
        assert len(sources) == 40 * 26  # an epoch keeps its length
        return sources.count("real") / len(sources)

    assert abs(real_fraction_drawn() - 2 / 26) < 1e-9  # by count: each sample once per epoch
    assert abs(real_fraction_drawn(real_share=0.5) - 0.5) < 0.05
    with pytest.raises(ValueError, match="real_share"):
        SegmentationDataModule(real, size=32, real_share=1.0)


def test_augmentation_repeats_with_the_seed_and_differs_across_seeds():
    src = PhantomSource(size=32, num_train=4, seed=1)

    def augmented(seed):
        torch.manual_seed(seed)
        dm = SegmentationDataModule(src, size=32, batch_size=4, num_workers=0,
                                    augment=build_augmentation(size=32, prob=1.0, affine_prob=1.0))
        ds = dm.train_dataset()
        return torch.stack([ds[i]["image"] for i in range(4)] + [ds[0]["image"]])

    a, b, c = augmented(0), augmented(0), augmented(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[4])  # the same image twice in a run is augmented afresh


def test_synthetic_ignore_margin_masks_borders_of_synthetic_labels_only(tmp_path):
    syn = write_synthetic_folder(tmp_path / "syn", n=4)
    real = PhantomSource(size=32, num_train=4, seed=3)
    dm = SegmentationDataModule(real, size=32, batch_size=8, real_fraction=1.0, synthetic_dir=str(syn),
                                synthetic_count=4, synthetic_ignore_margin=1, num_workers=0,
                                augment=None, synthetic_augment=None)
    items = [dm.train_dataset()[i] for i in range(8)]
    real_items = [it for it in items if it["source"] == "real"]
    syn_items = [it for it in items if it["source"] == "synthetic"]
    assert len(real_items) == len(syn_items) == 4
    assert all(not (it["label"] == 255).any() for it in real_items)
    for it in syn_items:
        label = it["label"][0]
        clean = syn / "masks" / f"{it['id']}.png"
        original = torch.from_numpy(np.asarray(Image.open(clean)).astype(np.int64))
        ignored = label == 255
        assert ignored.any()
        assert torch.equal(label[~ignored], original[~ignored])  # kept pixels keep their class
        # every ignored pixel touches another class (3x3) in the original mask
        padded = torch.nn.functional.pad(original[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
        windows = padded.unfold(0, 3, 1).unfold(1, 3, 1)
        mixed = windows.amax((-1, -2)) != windows.amin((-1, -2))
        assert torch.equal(ignored, mixed)
    with pytest.raises(ValueError, match="synthetic_ignore_margin"):
        SegmentationDataModule(real, size=32, synthetic_ignore_margin=-1)


def test_equalize_removes_a_monotone_grey_level_change(real_dir):
    """``data.intensity=equalize``: the same X-ray under another window/gamma gives (almost) the same
    input."""
    from diffmask.data.dataset import normalize_intensity

    real = JSRTSource(real_dir)
    first = real.load(real.ids("train")[0])
    img = first.image
    shifted = np.round(255 * (0.15 + 0.7 * (img / 255.0) ** 0.6)).astype(np.uint8)  # brighter, lower contrast
    assert np.abs(img.astype(int) - shifted).mean() > 15
    a, b = normalize_intensity(img, "equalize"), normalize_intensity(shifted, "equalize")
    assert np.abs(a.astype(int) - b).mean() < 3
    # a wider field of view (the chest shrunk to 80 % on a dark border) moves the map little:
    # the histogram is the centre's, not the border's
    from PIL import Image

    def shrink(x):
        out = np.full(x.shape, 10, np.uint8)
        out[26:231, 26:231] = np.asarray(Image.fromarray(x).resize((205, 205), Image.BILINEAR))
        return out

    lungs = shrink((first.label > 0).astype(np.uint8) * 255) > 127
    moved = np.abs(normalize_intensity(shrink(img), "equalize").astype(int) - shrink(a))[lungs].mean()
    assert moved < 15, moved
    p = normalize_intensity(img, "percentile")
    assert p.dtype == np.uint8 and p.min() == 0 and p.max() == 255
    assert normalize_intensity(img, "raw") is img
    with pytest.raises(ValueError, match="intensity: expected one of"):
        normalize_intensity(img, "zscore")

    dm = SegmentationDataModule(real, size=32, intensity="equalize")
    item = dm.test_dataloader()[0].dataset[0]
    assert item["image"].min() == 0.0 and item["image"].max() == 1.0
    # the centre's grey levels spread evenly
    assert abs(float(item["image"][:, 8:24, 8:24].mean()) - 0.5) < 0.05
    with pytest.raises(ValueError, match="intensity: expected one of"):
        SegmentationDataModule(real, size=32, intensity="none")


def test_a_dataset_config_asking_for_a_class_the_masks_never_hold_is_a_named_error():
    from diffmask.data import ShapesSource

    names = ["background", "organ", "lesion", "cyst"]  # label 3 is in no mask
    source = ShapesSource(32, ["background", "organ", "lesion"], num_train=4, num_val=2, num_test=4)
    source.class_names = tuple(names)  # a config that claims a fourth class
    with pytest.raises(ValueError, match=r"data.class_names asks for \['cyst'\] \(labels \[3\]\)"):
        SegmentationDataModule(source, names, size=32).setup("fit")


def test_the_constructor_reads_no_file_and_setup_runs_once(tmp_path):
    """Lightning's contract: ``__init__`` only stores and checks settings; ``setup`` reads (once)."""
    gone = tmp_path / "gone"
    dm = SegmentationDataModule(PhantomSource(size=32, num_train=4), size=32, synthetic_dir=str(gone),
                                test_sets={"other": str(gone)}, external_sets=[str(tmp_path / "ext")])
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")
    dm = SegmentationDataModule(PhantomSource(size=32, num_train=4), size=32, real_fraction=0.5)
    dm.setup("fit")
    ids = dm.real_train_ids
    dm.setup("test")  # a no-op: the draws stay
    assert dm.real_train_ids is ids and len(ids) == 2 and dm.real_ids("train") == dm.real.ids("train")
    assert dm.split_name("test") == "test" and len(dm.real_dataset(ids)) == 2
