import functools
import json
from unittest.mock import patch

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from diffmask.artifacts import StageDir
from diffmask.control import ConditionBuilder, ControlLitModule, build_controlnet
from diffmask.data import ManifestRow, read_manifest, write_manifest
from diffmask.diffusion import ControlledSampler
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import PhantomSource, chest_prompt_builder
from diffmask.synthesis.writer import SyntheticWriter
from tests.conftest import compose_config


def _batch(n=4, size=32, seed=0):
    src = PhantomSource(size=size, num_train=n, seed=seed)
    samples = [src.load(i) for i in src.ids("train")]
    return {
        "image": torch.stack([torch.from_numpy(s.image.astype(np.float32) / 255)[None] for s in samples]),
        "label": torch.stack([torch.from_numpy(s.label.astype(np.int64))[None] for s in samples]),
        "meta": [s.meta for s in samples], "id": [s.id for s in samples],
    }


def test_zero_initialised_controlnet_leaves_the_base_output_unchanged():
    comps = tiny_scratch_components(32, seed=2)
    controlnet = build_controlnet(comps.unet, conditioning_channels=3)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 500])
    states = torch.randn(2, 48, 32)
    cond = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        base = comps.unet(x, t, encoder_hidden_states=states).sample
        down, mid = controlnet(x, t, encoder_hidden_states=states, controlnet_cond=cond, return_dict=False)
        ctrl = comps.unet(x, t, encoder_hidden_states=states, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
    assert all(float(r.abs().max()) == 0.0 for r in (*down, mid))
    assert torch.equal(base, ctrl)
    # the encoder is a copy of the UNet's, the conditioning embedding keeps the pixel grid
    assert torch.equal(
        controlnet.down_blocks[0].resnets[0].conv1.weight, comps.unet.down_blocks[0].resnets[0].conv1.weight
    )
    with pytest.raises(ValueError, match="conditioning_embedding_out_channels"):
        build_controlnet(comps.unet, 3, vae_scale_factor=8, conditioning_embedding_out_channels=[16, 32])


def test_tiny_controlnet_loss_falls_and_the_base_stays_frozen():
    torch.manual_seed(0)
    comps = tiny_scratch_components(32, seed=3)
    base_before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    condition = ConditionBuilder("mask", 4)
    module = ControlLitModule(
        comps, build_controlnet(comps.unet, condition.channels), condition, chest_prompt_builder(),
        optimizer=functools.partial(torch.optim.AdamW, lr=2e-3), resolution=32, cond_dropout=0.0,
    )
    batch = _batch()
    opt = module.configure_optimizers()

    def fixed_loss():
        with torch.no_grad():
            return float(
                module.denoising_loss(batch, train=False, generator=torch.Generator().manual_seed(0))
            )

    before = fixed_loss()
    for _ in range(25):
        opt.zero_grad()
        loss = module.denoising_loss(batch, train=False, generator=torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(v, base_before[k]), f"base UNet weight {k} changed"
    with pytest.raises(ValueError, match="condition channels"):
        ControlLitModule(
            comps,
            build_controlnet(comps.unet, 1),
            condition,
            chest_prompt_builder(),
            optimizer=None,
            resolution=32,
        )


def _fit_control(tmp_path, model_dir, name="ctl", *overrides):
    from diffmask.cli.fit_control import run

    cfg = compose_config(
        "fit_control",
        [
            f"input_dir={model_dir}",
            f"name={name}",
            "data=phantom",
            "data.size=32",
            "data.intensity=raw",
            "data.real.num_train=8",
            "data.real.num_val=2",
            "data.real.num_test=2",
            "data.batch_size=4",
            "data.real_fraction=0.5",
            "trainer.max_steps=2",
            *overrides,
        ],
        tmp_path / f"run_{name}",
    )
    run(cfg)
    return cfg.output_dir


def _generate(tmp_path, model_dir, control_dir, name, *overrides):
    from diffmask.cli.generate import run

    cfg = compose_config(
        "generate",
        [
            f"input_dir={model_dir}",
            f"name={name}",
            "data=phantom",
            "data.size=32",
            "data.intensity=raw",
            "data.real.num_train=8",
            "data.real.num_val=2",
            "data.real.num_test=2",
            "steps=2",
            "batch_size=3",
            "synthesis=controlled",
            f"synthesis.control_dir={control_dir}",
            *overrides,
        ],
        tmp_path / f"gen_{name}",
    )
    return run(cfg), cfg.output_dir


def test_fit_control_exports_a_plain_controlnet_and_generation_keeps_its_masks(tmp_path, model_dir):
    control_dir = _fit_control(tmp_path, model_dir, "ctl", "control.condition.type=edges+mask")
    meta = json.loads((StageDir(control_dir).path / "control.json").read_text())
    assert meta["condition"]["type"] == "edges+mask" and len(meta["labelled_ids"]) == 4
    assert meta["base_model"] == str(model_dir.resolve())
    net = ControlNetModel.from_pretrained(control_dir)  # plain diffusers loading
    assert net.config.conditioning_channels == 4

    info, out = _generate(tmp_path, model_dir, control_dir, "real", "synthesis.augment_ratio=2")
    rows = read_manifest(out)
    assert info["rows"] == 8 and len(rows) == 8
    assert sorted({r.pair_id for r in rows}) == sorted(meta["labelled_ids"])
    src = PhantomSource(size=32, num_train=8, num_val=2, num_test=2)
    for r in rows:
        assert r.id.startswith(f"{r.pair_id}_v") and r.source == "synthetic"
        mask = np.asarray(Image.open(f"{out}/{r.sem_seg_file_name}"))
        assert np.array_equal(mask, src.load(r.pair_id).label)  # exactly its condition's mask
    stage = json.loads((StageDir(out).path / "stage.json").read_text())
    assert stage["inputs"]["control"]["path"] == str(control_dir)

    # attention capture beside the condition: class maps saved, agreement with the condition mask scored
    _, out_a = _generate(tmp_path, model_dir, control_dir, "attn", "synthesis.augment_ratio=1",
                         "synthesis.capture_attention=true")
    rows_a = read_manifest(out_a)
    assert all(r.attn_file and set(r.scores) == {"left_lung", "right_lung", "heart"} for r in rows_a)
    assert all(0.0 <= v <= 1.0 for r in rows_a for v in r.scores.values())
    agreement = json.loads((StageDir(out_a).path / "stage.json").read_text())["attention_agreement"]
    assert set(agreement) == {"left_lung", "right_lung", "heart"}
    for r in rows_a:  # the written mask is still the condition's, not the attention's
        assert np.array_equal(
            np.asarray(Image.open(f"{out_a}/{r.sem_seg_file_name}")), src.load(r.pair_id).label
        )

    # deformed conditions: each variant's mask is a warp of its real mask, and differs between variants
    _, out_d = _generate(tmp_path, model_dir, control_dir, "deformed", "synthesis.source=deformed",
                         "synthesis.augment_ratio=2")
    rows_d = read_manifest(out_d)
    masks = {r.id: np.asarray(Image.open(f"{out_d}/{r.sem_seg_file_name}")) for r in rows_d}
    pair = [r.id for r in rows_d if r.pair_id == rows_d[0].pair_id]
    assert not np.array_equal(masks[pair[0]], masks[pair[1]])
    assert not np.array_equal(masks[pair[0]], src.load(rows_d[0].pair_id).label)

    # a DiffMask-style synthesis folder's masks re-rendered (its own rows' prompts)
    _, out_f = _generate(tmp_path, model_dir, control_dir, "folder", "synthesis.source=folder",
                         f"synthesis.condition_dir={out}", "synthesis.augment_ratio=1")
    rows_f = read_manifest(out_f)
    assert len(rows_f) == 8 and {r.pair_id for r in rows_f} == {r.id for r in rows}
    for r in rows_f:
        mask = np.asarray(Image.open(f"{out_f}/{r.sem_seg_file_name}"))
        assert np.array_equal(mask, np.asarray(Image.open(f"{out}/masks/{r.pair_id}.png")))


def test_controlled_generation_resumes_after_a_crash_without_duplicates(tmp_path, model_dir):
    control_dir = _fit_control(tmp_path, model_dir, "ctl", "control.condition.type=mask")
    real_write = SyntheticWriter.write_on_batch_end
    calls = {"n": 0}

    def crash_on_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        return real_write(self, *args, **kwargs)

    with patch.object(SyntheticWriter, "write_on_batch_end", crash_on_second_batch), \
            pytest.raises(RuntimeError, match="simulated crash"):
        _generate(tmp_path, model_dir, control_dir, "resume", "synthesis.augment_ratio=2")
    info, out = _generate(tmp_path, model_dir, control_dir, "resume", "synthesis.augment_ratio=2")
    rows = read_manifest(out)
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) == 8 and info["skipped"] == 3 and info["written"] == 5


def test_controlled_generation_bad_input(tmp_path, model_dir):
    control_dir = _fit_control(tmp_path, model_dir, "ctl", "control.condition.type=mask")
    # a ControlNet made from another base model
    other = tmp_path / "other_model"
    from diffmask.diffusion import DiffusionLitModule

    stage = StageDir(other)
    DiffusionLitModule(
        tiny_scratch_components(32, seed=9),
        chest_prompt_builder(),
        optimizer=None,
        resolution=32,
        ema_decay=0,
    ).export(stage.begin())
    stage.commit(config={"test": True})
    with pytest.raises(ValueError, match="is not the diffusion model the ControlNet"):
        _generate(tmp_path, other, control_dir, "wrong_base")
    with pytest.raises(ValueError, match="synthesis.source: expected one of"):
        _generate(tmp_path, model_dir, control_dir, "bad_source", "synthesis.source=hed")
    with pytest.raises(FileNotFoundError, match="has no control.json"):
        _generate(tmp_path, model_dir, model_dir, "not_control")
    # a condition folder without masks
    folder = tmp_path / "nomasks"
    (folder / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "images" / "a.png")
    write_manifest(folder, [ManifestRow("a", "images/a.png", None, "p", "synthetic", seed=0)])
    with pytest.raises(ValueError, match=r"rows without a mask \(sem_seg_file_name\)"):
        _generate(tmp_path, model_dir, control_dir, "nomask", "synthesis.source=folder",
                  f"synthesis.condition_dir={folder}")
    # a condition whose mask and image differ in size
    (folder / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "masks" / "a.png")
    write_manifest(folder, [ManifestRow("a", "images/a.png", "masks/a.png", "p", "synthetic", seed=0)])
    with pytest.raises(ValueError, match="a.png"):
        _generate(tmp_path, model_dir, control_dir, "size", "synthesis.source=folder",
                  f"synthesis.condition_dir={folder}")
    # a sampler with a ControlNet refuses to run without conditions
    comps = tiny_scratch_components(32)
    sampler = ControlledSampler(comps, 32, build_controlnet(comps.unet, 3))
    with pytest.raises(ValueError, match="needs condition images"):
        sampler(["p"], [0], num_inference_steps=1)


def test_control_on_a_local_stable_diffusion_folder(tmp_path):
    """A ControlNet made from a Stable Diffusion folder (latent space, VAE factor 2 here) with
    EMIT-Diff's fixed prompt; loaded back and sampled through the same code."""
    from diffmask.control import load_controlled
    from diffmask.diffusion.tiny_models import save_tiny_stable_diffusion

    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    control_dir = _fit_control(
        tmp_path, sd, "sd", "control.prompt='Lung, Xray'", "control.condition.type=edges"
    )
    meta = json.loads((StageDir(control_dir).path / "control.json").read_text())
    assert meta["prompt"] == "Lung, Xray" and meta["base_model"] == str(sd.resolve())
    comps, net, _ = load_controlled(control_dir, sd)
    assert comps.vae is not None and tuple(net.config.conditioning_embedding_out_channels) == (16, 32)
    sampler = ControlledSampler(comps, 32, net)
    out = sampler(["Lung, Xray"] * 2, [0, 1], num_inference_steps=2, control=torch.rand(2, 1, 32, 32))
    assert out.images.shape == (2, 1, 32, 32) and torch.isfinite(out.images).all()


def test_colour_controlnet_fits_on_rgb_batches_and_refuses_grey_data(tmp_path):
    from diffmask.control.module import load_controlled
    from diffmask.diffusion import DiffusionLitModule
    from tests.autoencoder.colour_data import colour_image

    pairs = [colour_image(i) for i in range(2)]
    batch = {"image": torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in pairs]),
             "label": torch.stack([torch.from_numpy(lb.astype(np.int64))[None] for _, lb in pairs]),
             "meta": [{}, {}], "id": ["a", "b"]}
    comps = tiny_scratch_components(32, seed=3, channels=3)
    condition = ConditionBuilder("edges+mask", 2)
    module = ControlLitModule(comps, build_controlnet(comps.unet, condition.channels), condition, None,
                              optimizer=None, resolution=32, prompt="a lesion", cond_dropout=0.0)
    cond = module.conditions(batch, train=False)
    assert cond.shape == (2, 2, 32, 32)  # one edge channel (luminance) + one mask channel
    loss = module.denoising_loss(batch, train=False, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    grey_batch = {**batch, "image": batch["image"][:, :1]}
    with pytest.raises(ValueError, match="image: 1 channel"):
        module.denoising_loss(grey_batch, train=False)
    # exported with its base; loading them for grey data is a named error
    base = DiffusionLitModule(
        comps, chest_prompt_builder(), optimizer=None, resolution=32, ema_decay=0
    ).export(tmp_path / "b")
    module.export(tmp_path / "c", base)
    assert json.loads((tmp_path / "c" / "control.json").read_text())["channels"] == 3
    assert load_controlled(tmp_path / "c", base, channels=3)[0].channels == 3
    with pytest.raises(
        ValueError,
        match=rf"data.channels=1 \(grey\), but the ControlNet in {tmp_path / 'c'} was "
        r"fitted on 3-channel \(colour\)",
    ):
        load_controlled(tmp_path / "c", base, channels=1)
