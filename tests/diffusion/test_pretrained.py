import json

import pytest
import torch
from diffusers import StableDiffusionPipeline

from diffmask.diffusion import TextToImageSampler, check_resolution, load_components
from tests.conftest import quiet_trainer


def test_tiny_stable_diffusion_folder_fine_tunes_exports_and_reloads(
    tmp_path, tiny_sd_dir, phantom_dm, make_module
):
    comps = load_components(tiny_sd_dir)
    assert comps.latent and comps.vae_scale_factor == 2
    assert check_resolution(comps, 32) == 16
    module = make_module(comps, train_text_encoder=False, ema_decay=0.9)
    text_before = [p.clone() for p in module.text_encoder.parameters()]
    unet_before = [p.clone() for p in module.unet.parameters()]
    quiet_trainer(2).fit(module, datamodule=phantom_dm)
    assert all(torch.equal(a, b) for a, b in zip(text_before, module.text_encoder.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(unet_before, module.unet.parameters(), strict=True))

    out = module.export(tmp_path / "export")
    assert json.loads((out / "diffmask.json").read_text())["space"] == "latent"
    # a plain diffusers pipeline loads the export
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    img = pipe(
        "a chest x-ray showing the left lung, right lung and heart",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert img.shape == (1, 32, 32, 3)
    # and so does our sampler: grayscale out
    gen = TextToImageSampler.from_pretrained(out)(
        ["a chest x-ray of the left lung, right lung and heart"],
        [0],
        num_inference_steps=2,
        guidance_scale=2.0,
    )
    assert gen.images.shape == (1, 1, 32, 32)
    assert len(gen.token_positions[0]) == 3


def test_pretrained_errors_name_the_problem(tmp_path, tiny_sd_dir, make_module):
    comps = load_components(tiny_sd_dir)
    with pytest.raises(ValueError, match="multiple of 4"):
        make_module(comps, resolution=30)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_components(tmp_path / "nowhere")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"\['text_encoder', 'tokenizer', 'scheduler'\]"):
        load_components(tmp_path / "partial")
    with pytest.raises(ValueError, match="resolution"):
        TextToImageSampler.from_pretrained(tiny_sd_dir)  # a bare SD folder has no diffmask.json
    assert TextToImageSampler.from_pretrained(tiny_sd_dir, resolution=32).latent_size == 16
    v = load_components(tiny_sd_dir, prediction_type="v_prediction")
    assert v.noise_scheduler.config.prediction_type == "v_prediction"


def test_a_stable_diffusion_folder_serves_grey_and_colour_data_through_the_one_channel_helper(
    tmp_path, tiny_sd_dir, make_module
):
    from tests.autoencoder.colour_data import colour_datamodule, write_colour_folder

    grey, colour = load_components(tiny_sd_dir, channels=1), load_components(tiny_sd_dir, channels=3)
    # grey by default
    assert grey.channels == 1 and colour.channels == 3 and load_components(tiny_sd_dir).channels == 1
    prompt = ["a lesion"]
    g = TextToImageSampler(grey, 32)(prompt, [0], num_inference_steps=1, guidance_scale=1.0).images
    c = TextToImageSampler(colour, 32)(prompt, [0], num_inference_steps=1, guidance_scale=1.0).images
    assert g.shape == (1, 1, 32, 32) and c.shape == (1, 3, 32, 32)
    inside = ((c > 0) & (c < 1)).all(1, keepdim=True)  # pixels no channel was clipped at
    assert inside.float().mean() > 0.5  # grey = the VAE's channels averaged back (then clipped)
    assert torch.allclose(g[inside], c.mean(1, keepdim=True)[inside], atol=1e-5)
    # fine-tuned on colour images, the export records it and refuses grey data by name
    root = write_colour_folder(tmp_path / "colour")
    dm = colour_datamodule(root)
    module = make_module(colour, train_text_encoder=False)
    quiet_trainer(1).fit(module, datamodule=dm)
    out = module.export(tmp_path / "export")
    assert json.loads((out / "diffmask.json").read_text())["channels"] == 3
    with pytest.raises(ValueError, match=rf"data.channels=1 \(grey\), but the diffusion model in {out}"):
        load_components(out, channels=1)
