import json

import pytest
import pytorch_lightning as pl
import torch

from diffmask.data import select_fraction
from diffmask.diffusion import AttentionAlignment, TextToImageSampler, load_components
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder
from tests.conftest import quiet_trainer


def _fixed_loss(module, batch, align_all=False):
    module.eval()
    with torch.no_grad():
        losses = [
            module.denoising_loss(
                batch, train=False, generator=torch.Generator().manual_seed(s), align_all=align_all
            )
            for s in range(4)
        ]
    module.train()
    key = "align_loss" if align_all else "mse"
    return float(torch.stack([out[key] for out in losses]).mean())


def test_short_overfit_lowers_a_finite_denoising_loss(phantom_dm, make_module):
    torch.manual_seed(0)
    module = make_module(lr=3e-3)
    batch = next(iter(phantom_dm.train_dataloader()))
    before = _fixed_loss(module, batch)
    quiet_trainer(40).fit(module, datamodule=phantom_dm)
    after = _fixed_loss(module, batch)
    assert torch.isfinite(torch.tensor([before, after])).all()
    assert after < 0.8 * before, (before, after)


def test_v_prediction_trains_with_ema_and_clipping(phantom_dm, make_module):
    module = make_module(
        tiny_scratch_components(32, prediction_type="v_prediction"), ema_decay=0.9, cond_dropout=0.5
    )
    start = [p.clone() for p in module.ema_unet.parameters()]
    quiet_trainer(3, gradient_clip_val=1.0).fit(module, datamodule=phantom_dm)
    assert module.prediction_type == "v_prediction"
    moved = sum(not torch.equal(a, b) for a, b in zip(start, module.ema_unet.parameters(), strict=True))
    assert moved > 0  # the EMA copy follows the trained weights
    assert not all(
        torch.equal(a, b) for a, b in zip(module.ema_unet.parameters(), module.unet.parameters(), strict=True)
    )


def test_alignment_loss_drops_after_overfit_on_one_labelled_image(make_module):
    from diffmask.data import SegmentationDataModule
    from diffmask.domains.chest import PhantomSource

    torch.manual_seed(0)
    # one training phantom of four (real_fraction), one per batch
    phantom_dm = SegmentationDataModule(PhantomSource(size=32, num_train=4, num_val=2, num_test=2), size=32,
                                        batch_size=1, real_fraction=0.25)
    labelled = phantom_dm.real_train_ids
    assert len(labelled) == 1
    module = make_module(
        lr=3e-3, align=AttentionAlignment(label_fraction=1.0, weight=1.0), labelled_ids=labelled
    )
    batch = next(iter(phantom_dm.train_dataloader()))
    before = _fixed_loss(module, batch, align_all=True)
    trainer = quiet_trainer(40)
    trainer.fit(module, datamodule=phantom_dm)
    after = _fixed_loss(module, batch, align_all=True)
    assert "train/align_loss" in trainer.callback_metrics
    assert after < 0.8 * before, (before, after)


def test_labelled_subset_is_the_segmentation_stages_real_fraction_draw(phantom_dm, make_module):
    module = make_module(align=AttentionAlignment(label_fraction=0.5, weight=0.1))
    trainer = quiet_trainer(1)
    trainer.fit(module, datamodule=phantom_dm)
    ids = phantom_dm.real_ids("train")
    assert module.labelled_ids == set(select_fraction(ids, 0.5, phantom_dm.seed))
    assert len(module.labelled_ids) == 2


def test_export_reloads_in_diffusers_format_with_identical_outputs(tmp_path, phantom_dm, make_module):
    module = make_module(ema_decay=0.5)
    quiet_trainer(2).fit(module, datamodule=phantom_dm)
    out = module.export(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == [
        "diffmask.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
    ]
    meta = json.loads((out / "diffmask.json").read_text())
    assert meta["space"] == "pixel" and meta["resolution"] == 32 and meta["class_names"][1] == "left_lung"

    prompts = [chest_prompt_builder().build({"sex": "F"}).text] * 2
    reloaded = TextToImageSampler.from_pretrained(out)
    comps = module.components
    comps.unet = module.ema_unet  # the export holds the EMA weights
    here = TextToImageSampler(comps, 32, prompt_builder=chest_prompt_builder())
    a = here(prompts, [1, 2], num_inference_steps=2, guidance_scale=2.0)
    b = reloaded(prompts, [1, 2], num_inference_steps=2, guidance_scale=2.0)
    assert torch.equal(a.images, b.images)
    assert a.token_positions == b.token_positions and len(b.token_positions[0]) == 3


def test_bad_resolution_and_missing_component_are_clear_errors(tmp_path, make_module, phantom_dm):
    with pytest.raises(ValueError, match="multiple of 2"):
        make_module(resolution=33)
    module = make_module()
    with pytest.raises(ValueError, match="expected 32x32"):
        module.encode_images(torch.zeros(1, 1, 64, 64))
    out = module.export(tmp_path / "m")
    import shutil

    shutil.rmtree(out / "text_encoder")
    with pytest.raises(FileNotFoundError, match=r"\['text_encoder'\]"):
        load_components(out)


def test_labelled_batches_visit_every_item_before_repeating(phantom_dm):
    from diffmask.data import SegmentationDataset
    from diffmask.diffusion.alignment import LabelledBatches

    ids = phantom_dm.real.ids("train")
    ds = SegmentationDataset(phantom_dm.real, ids, 32)
    stream = LabelledBatches(ds, batch_size=3, seed=5)
    seen = [sid for _ in range(4) for sid in stream.next()["id"]]
    assert sorted(seen[:4]) == sorted(ids) and sorted(seen[4:8]) == sorted(ids)
    again = LabelledBatches(ds, batch_size=3, seed=5)
    assert [sid for _ in range(4) for sid in again.next()["id"]] == seen
    assert stream.next()["image"].shape == (3, 1, 32, 32)


def test_every_step_gets_an_alignment_signal_and_labelled_items_skip_the_denoising_loss(
    phantom_dm, make_module
):
    # one labelled phantom of four: without its own stream most batches of 1 would not hold it
    phantom_dm.batch_size = 1
    ids = phantom_dm.real.ids("train")
    module = make_module(
        tiny_scratch_components(32, prediction_type="v_prediction"),
        align=AttentionAlignment(label_fraction=1.0, weight=1.0, batch_size=2),
        labelled_ids=ids[:1],
    )
    steps = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append("train/align_loss" in trainer.callback_metrics and batch["id"][0])

    quiet_trainer(4, callbacks=[Spy()]).fit(module, datamodule=phantom_dm)
    assert len(steps) == 4 and all(steps)
    # v-prediction's target grows with the image: a huge labelled image would dominate the mse
    batch = next(iter(phantom_dm.train_dataloader()))
    huge = module._labelled.next()
    huge["image"] = huge["image"] * 0 + 1e4
    with torch.no_grad():
        out = module.denoising_loss(batch, train=True, align_batch=huge)
    assert torch.isfinite(out["align_loss"]) and float(out["mse"]) < 10.0


def test_labelled_ids_outside_the_train_split_are_a_clear_error(phantom_dm, make_module):
    module = make_module(align=AttentionAlignment(label_fraction=0.5), labelled_ids=["nope"])
    with pytest.raises(ValueError, match=r"labelled_ids: \['nope'\]"):
        quiet_trainer(1).fit(module, datamodule=phantom_dm)


def test_a_model_fitted_on_one_kind_of_image_refuses_the_other_by_name(tmp_path, make_module):
    from tests.autoencoder.colour_data import colour_datamodule, write_colour_folder

    grey = make_module().export(tmp_path / "grey")
    assert json.loads((grey / "diffmask.json").read_text())["channels"] == 1
    with pytest.raises(
        ValueError,
        match=rf"data.channels=3 \(colour\), but the diffusion model in {grey} was fitted on "
        r"1-channel \(grey\)",
    ):
        load_components(grey, channels=3)
    # a colour model, fitted two steps on RGB discs, the reverse
    root = write_colour_folder(tmp_path / "colour")
    dm = colour_datamodule(root)
    module = make_module(tiny_scratch_components(32, channels=3))
    quiet_trainer(2).fit(module, datamodule=dm)
    colour = module.export(tmp_path / "colour_model")
    assert json.loads((colour / "diffmask.json").read_text())["channels"] == 3
    with pytest.raises(
        ValueError,
        match=rf"data.channels=1 \(grey\), but the diffusion model in {colour} was fitted on "
        r"3-channel \(colour\)",
    ):
        TextToImageSampler.from_pretrained(colour, channels=1)
    out = TextToImageSampler.from_pretrained(colour, channels=3)(["a lesion"], [0], num_inference_steps=2)
    assert out.images.shape == (1, 3, 32, 32)
    # a grey model fitting on colour batches (and the reverse) fails before its first step
    with pytest.raises(
        ValueError, match=r"data.channels=3 \(colour\), but the diffusion model takes 1-channel"
    ):
        quiet_trainer(1).fit(make_module(), datamodule=dm)
    with pytest.raises(ValueError, match="image: 1 channel"):
        module.encode_images(torch.zeros(1, 1, 32, 32))
