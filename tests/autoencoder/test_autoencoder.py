"""The latent autoencoder stage and ``diffusion=latent`` (issue 16), on 32 px phantoms."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import open_dict

from diffmask.attention import CrossAttentionStore
from diffmask.autoencoder import (
    AutoencoderLitModule,
    build_autoencoder,
    load_autoencoder,
    psnr,
    reconstruct,
    ssim,
)
from diffmask.config import CONFIG_PATH
from diffmask.data import ManifestSource
from diffmask.data.dataset import SegmentationDataset
from diffmask.diffusion import TextToImageSampler, VariationSampler, build_scratch_components
from diffmask.diffusion.components import DiffusionComponents
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import PhantomSource, chest_prompt_builder

TINY_AE = [
    "autoencoder.vae.block_out_channels=[16,32,32]",
    "autoencoder.vae.norm_num_groups=8",
    "autoencoder.crop=16",
]
TINY_DATA = [
    "data=phantom",
    "data.size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.real.num_train=4",
    "data.real.num_val=2",
    "data.real.num_test=3",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
]
TINY_UNET = [
    "diffusion.components.block_out_channels=[16,32]", "diffusion.components.layers_per_block=1",
    "diffusion.components.attention_levels=[true,true]",
    "diffusion.components.attention_heads=2", "diffusion.components.cross_attention_dim=32",
    "diffusion.components.norm_num_groups=8", "diffusion.components.text_hidden_size=32",
    "diffusion.components.text_layers=2", "diffusion.components.text_heads=2",
    "diffusion.components.text_intermediate_size=64", "diffusion.components.max_prompt_tokens=48",
]


def _phantoms(n=2, size=32):
    source = PhantomSource(size=size, num_train=n, num_val=1, num_test=1)
    dataset = SegmentationDataset(source, source.ids("train"), size)
    return torch.stack([dataset[i]["image"] for i in range(n)])


def _module(lr=3e-3, **kwargs):
    vae = build_autoencoder(factor=4, block_out_channels=(16, 32, 32), norm_num_groups=8)
    return AutoencoderLitModule(vae, lambda p: torch.optim.Adam(p, lr=lr), resolution=32, **kwargs)



def _small_components(**kw):
    """A small scratch diffusion model at 32 px (pixel space, or on ``autoencoder_dir``'s latents)."""
    return build_scratch_components(resolution=32, block_out_channels=(16, 32), attention_heads=2,
                                    cross_attention_dim=32, norm_num_groups=8, text_hidden_size=32,
                                    text_layers=1, text_heads=2, text_intermediate_size=32, **kw)

def test_metrics_on_known_images():
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert ssim(x, torch.rand(2, 1, 32, 32)).max() < 0.2
    # MSE 0.01 -> 20 dB
    assert torch.allclose(
        psnr(torch.full((1, 1, 8, 8), 0.6), torch.full((1, 1, 8, 8), 0.5)), torch.tensor([20.0]), atol=1e-3
    )


def test_autoencoder_learns_to_round_trip_a_phantom():
    torch.manual_seed(0)
    module = _module()
    image = _phantoms(2)
    before = float(psnr(reconstruct(module.vae, image), image).mean())
    optimizer = module.optimizer_factory(module.vae.parameters())
    for _ in range(150):
        optimizer.zero_grad()
        module.losses(image)["loss"].backward()
        optimizer.step()
    after = float(psnr(reconstruct(module.vae, image), image).mean())
    assert after > 24.0 and after > before + 10.0, (before, after)
    assert float(ssim(reconstruct(module.vae, image), image).mean()) > 0.6


def test_export_loads_with_plain_from_pretrained_and_records_the_scaling_factor(tmp_path):
    torch.manual_seed(0)
    module = _module().eval()
    image = _phantoms(3)
    stats = module.latent_statistics([{"image": image}])
    module.export(tmp_path / "ae", stats)
    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    x = image * 2 - 1
    with torch.no_grad():
        z0 = module.vae.encode(x).latent_dist.mean
        z1 = loaded.encode(x).latent_dist.mean
    assert torch.equal(z0, z1)
    assert loaded.config.scaling_factor == pytest.approx(
        1.0 / float(z0.double().std(unbiased=False)), rel=1e-4
    )
    info = json.loads((tmp_path / "ae" / "autoencoder.json").read_text())
    assert info["resolution"] == 32 and info["factor"] == 4 and info["latent_channels"] == 4


def test_sizes_that_do_not_fit_are_clear_errors(tmp_path):
    module = _module()
    module.export(tmp_path / "ae", {"latent_mean": 0.0, "latent_std": 1.0})
    with pytest.raises(ValueError, match="trained at 32 px, the diffusion model is at 64 px"):
        load_autoencoder(tmp_path / "ae", resolution=64)
    with pytest.raises(FileNotFoundError, match="autoencoder_dir: .* no config.json"):
        load_autoencoder(tmp_path)
    with pytest.raises(ValueError, match="factor 8 needs 4 levels"):
        build_autoencoder(factor=8, block_out_channels=(16, 32, 32))
    # a UNet built for another autoencoder (8 latent channels) does not take these 4-channel latents
    pixel = _small_components()
    other = build_autoencoder(factor=4, latent_channels=8, block_out_channels=(16, 32, 32))
    with pytest.raises(ValueError, match="latents have 8 channels, the UNet takes 1"):
        DiffusionComponents(pixel.unet, pixel.text_encoder, pixel.tokenizer, pixel.noise_scheduler, vae=other)


def _compose(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(name, overrides=[*TINY_DATA, *overrides])
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / f"run_{name}")
    return cfg


def test_autoencoder_stage_then_a_latent_diffusion_model_with_capture_at_the_image_size(tmp_path):
    from diffmask.cli.fit_autoencoder import run as fit_autoencoder
    from diffmask.cli.fit_diffusion import run as fit_diffusion

    fit_autoencoder(_compose("fit_autoencoder", tmp_path, *TINY_AE, "trainer.max_steps=4", "name=ae",
                             "reconstructions=true"))
    ae = tmp_path / "artifacts" / "autoencoder" / "ae"
    info = json.loads((ae / "stage.json").read_text())
    assert info["status"] == "complete" and info["counts"]["steps"] == 4 and info["counts"]["factor"] == 4
    assert info["test"]["phantom"]["n"] == 3 and info["test"]["phantom"]["psnr"] > 0
    assert (ae / "grid.png").is_file() and (ae / "test_metrics.json").is_file()
    assert AutoencoderKL.from_pretrained(ae).config.scaling_factor == pytest.approx(
        info["counts"]["scaling_factor"]
    )
    # the reconstructions: a set a segmenter trains on, one per real training image, with its mask
    recon = ManifestSource(ae / "reconstructions", CHEST)
    assert len(recon.ids("train")) == 4 and recon.load(recon.ids("train")[0]).label is not None

    with pytest.raises((ValueError, InstantiationException), match="trained at 32 px"):
        fit_diffusion(_compose("fit_diffusion", tmp_path, "diffusion=latent", *TINY_UNET, "data.size=64",
                               f"diffusion.components.autoencoder_dir={ae}", "name=bad"))
    fit_diffusion(_compose("fit_diffusion", tmp_path, "diffusion=latent", *TINY_UNET, "trainer.max_steps=2",
                           f"diffusion.components.autoencoder_dir={ae}", "diffusion.align.label_fraction=0.5",
                           "name=latent"))
    model = tmp_path / "artifacts" / "diffusion" / "latent"
    meta = json.loads((model / "diffmask.json").read_text())
    assert meta["space"] == "latent" and meta["autoencoder_dir"] == str(ae)
    assert (model / "vae" / "config.json").is_file()
    sampler = TextToImageSampler.from_pretrained(model, scheduler="dpmpp")
    assert sampler.latent_size == 8 and sampler.components.unet.config.in_channels == 4
    prompt = "a chest x-ray of an adult patient, left lung, right lung and heart"
    store = CrossAttentionStore(output_size=32)
    store.set_tokens(sampler.token_positions([prompt]))
    with store.capture(sampler.components.unet):
        out = sampler(
            [prompt], [0], num_inference_steps=2, guidance_scale=1.0, on_step_begin=store.begin_step
        )
    assert out.images.shape == (1, 1, 32, 32)
    maps = store.result()
    assert maps.shape == (1, 3, 32, 32) and torch.isfinite(maps).all()
    # a variation of a real image (SDEdit) starts from the autoencoder's latent of it
    init = torch.linspace(0, 1, 32)[None, None, :, None].expand(1, 1, 32, 32)
    variations = VariationSampler.from_pretrained(model, scheduler="dpmpp")
    out = variations([prompt], [0], init_images=init, strength=0.5, num_inference_steps=4, guidance_scale=1.0)
    assert out.images.shape == (1, 1, 32, 32) and torch.isfinite(out.images).all()


def test_training_crops_are_windows_of_the_image():
    module = _module(crop=16)
    image = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    crops = module.random_crop(image)
    assert crops.shape == (2, 1, 16, 16)
    for i in range(2):  # each crop is a contiguous window of its own image
        y, x = divmod(int(crops[i, 0, 0, 0]) - i * 1024, 32)
        assert torch.equal(crops[i], image[i, :, y : y + 16, x : x + 16])
    with pytest.raises(ValueError, match="crop: expected null or a multiple of the factor 4"):
        _module(crop=18)


def test_stable_diffusion_vae_fits_the_same_slot_and_f8_composes(tmp_path):
    from diffmask.diffusion.tiny_models import save_tiny_stable_diffusion

    # a Stable Diffusion folder's vae/ (RGB, 2x here) as diffusion.components.autoencoder_dir
    tiny_sd_dir = save_tiny_stable_diffusion(tmp_path / "sd")
    comps = _small_components(autoencoder_dir=tiny_sd_dir / "vae")
    assert comps.latent and comps.unet.config.in_channels == 4 and comps.unet.config.sample_size == 16
    sampler = TextToImageSampler(comps, 32)
    out = sampler(["left lung, right lung and heart"], [0], num_inference_steps=1)
    assert out.images.shape == (1, 1, 32, 32)
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("fit_autoencoder", overrides=["autoencoder=f8", "data.size=64"])
    from hydra.utils import instantiate

    vae = instantiate(cfg.autoencoder.vae)
    assert len(vae.config.block_out_channels) == 4  # 8x: 64 px -> 8 x 8
    assert vae.encode(torch.zeros(1, 1, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)


def test_latent_fit_encodes_each_training_image_once_and_draws_from_its_posterior(tmp_path):
    from diffmask.diffusion import DiffusionLitModule
    from diffmask.diffusion.module import encode_posterior

    _module().export(tmp_path / "ae", {"latent_mean": 0.0, "latent_std": 2.0})
    comps = _small_components(autoencoder_dir=tmp_path / "ae")
    vae, images = comps.vae, _phantoms(n=2)
    module = DiffusionLitModule(
        comps, chest_prompt_builder(), torch.optim.Adam, resolution=32, latent_cache=4
    )
    calls, encode = [], vae.encode
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    draws = torch.stack([module.encode_images(images) for _ in range(200)])
    assert calls == [2] and len(module._posteriors) == 2  # encoded once, then drawn from the cache
    vae.encode = encode
    mean, std = encode_posterior(images, vae, 32)
    vae.encode = lambda x: calls.append(len(x)) or encode(x)
    scale = vae.config.scaling_factor
    assert scale == 0.5
    assert torch.allclose(draws.mean(0), mean * scale, atol=5 * float(std.max()) * scale / 200**0.5)
    assert torch.allclose(draws.std(0), std * scale, rtol=0.3)
    module.encode_images(images.flip(-1))  # two new images: encoded and kept (4 now, the limit)
    module.encode_images(torch.rand(3, 1, 32, 32))  # encoded, not kept
    assert calls == [2, 2, 3] and len(module._posteriors) == 4
    with pytest.raises(ValueError, match="latent_cache: expected a number of images >= 0"):
        DiffusionLitModule(comps, chest_prompt_builder(), torch.optim.Adam, resolution=32, latent_cache=-1)


# ---- colour (RGB) data ------------------------------------------------------------------------
COLOUR_RUN = ["trainer.enable_progress_bar=false", "logger=csv", "trainer.limit_val_batches=1",
              "trainer.check_val_every_n_epoch=1"]


def _compose_colour(name, tmp_path, root, *overrides):
    from tests.autoencoder.colour_data import colour_overrides

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(name, overrides=[*colour_overrides(root), *COLOUR_RUN, *overrides])
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / f"run_{name}")
    return cfg


def test_colour_autoencoder_round_trip_writes_rgb_and_refuses_grey_data(tmp_path):
    from PIL import Image

    from diffmask.cli.fit_autoencoder import run as fit_autoencoder
    from diffmask.cli.fit_diffusion import run as fit_diffusion
    from tests.autoencoder.colour_data import COLOUR_CLASSES, write_colour_folder

    root = write_colour_folder(tmp_path / "colour")
    fit_autoencoder(
        _compose_colour(
            "fit_autoencoder",
            tmp_path,
            root,
            *TINY_AE,
            "trainer.max_steps=2",
            "name=rgb",
            "reconstructions=true",
        )
    )
    ae = tmp_path / "artifacts" / "autoencoder" / "rgb"
    vae = AutoencoderKL.from_pretrained(ae)
    assert vae.config.in_channels == 3 and vae.config.out_channels == 3
    assert json.loads((ae / "autoencoder.json").read_text())["channels"] == 3
    info = json.loads((ae / "stage.json").read_text())
    assert info["channels"] == 3 and info["counts"]["channels"] == 3
    with Image.open(ae / "grid.png") as grid:
        assert grid.mode == "RGB"
    # 3 channels in, 3 out
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in
                          (ManifestSource(ae / "reconstructions", COLOUR_CLASSES, channels=3).load(i)
                           for i in ("c000", "c001"))])
    assert images.shape == (2, 3, 32, 32) and reconstruct(vae, images).shape == (2, 3, 32, 32)
    recon = ManifestSource(ae / "reconstructions", COLOUR_CLASSES, channels=3)
    sample = recon.load(recon.ids("train")[0])
    assert sample.image.shape == (32, 32, 3) and sample.label is not None
    with Image.open(ae / "reconstructions" / "images" / f"{sample.id}.png") as png:
        assert png.mode == "RGB"
    assert json.loads((ae / "reconstructions" / "stage.json").read_text())["channels"] == 3
    with pytest.raises(ValueError, match="grey data"):  # the set refuses to be read as grey
        ManifestSource(ae / "reconstructions", COLOUR_CLASSES).load(sample.id)
    # the colour autoencoder refuses grey data, by name
    with pytest.raises(ValueError, match=r"fitted on 3-channel \(colour\) images, but data.channels=1"):
        load_autoencoder(ae, 32, channels=1)
    with pytest.raises((ValueError, InstantiationException), match="data.channels=1"):
        fit_diffusion(
            _compose(
                "fit_diffusion",
                tmp_path,
                "diffusion=latent",
                *TINY_UNET,
                "trainer.max_steps=1",
                f"diffusion.components.autoencoder_dir={ae}",
                "name=grey_on_rgb",
            )
        )
    # a latent diffusion model on it generates colour images
    fit_diffusion(
        _compose_colour(
            "fit_diffusion",
            tmp_path,
            root,
            "diffusion=latent",
            *TINY_UNET,
            "trainer.max_steps=1",
            f"diffusion.components.autoencoder_dir={ae}",
            "name=latent",
        )
    )
    model = tmp_path / "artifacts" / "diffusion" / "latent"
    assert json.loads((model / "diffmask.json").read_text())["channels"] == 3
    sampler = TextToImageSampler.from_pretrained(model, channels=3)
    out = sampler(["a breast ultrasound image, benign, showing the lesion"], [0], num_inference_steps=1,
                  guidance_scale=1.0)
    assert out.images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=f"data.channels=1 .*{model}.* 3-channel"):
        TextToImageSampler.from_pretrained(model, channels=1)


def test_the_grey_to_autoencoder_channel_helper_round_trips_and_refuses_colour_into_grey():
    from diffmask.autoencoder import (
        check_autoencoder_channels,
        from_autoencoder_channels,
        to_autoencoder_channels,
    )

    grey = torch.rand(2, 1, 8, 8)
    rgb = to_autoencoder_channels(grey, 3)
    assert rgb.shape == (2, 3, 8, 8) and all(torch.equal(rgb[:, c:c + 1], grey) for c in range(3))
    assert torch.allclose(from_autoencoder_channels(rgb, 1), grey)
    colour = torch.rand(2, 3, 8, 8)
    assert to_autoencoder_channels(colour, 3) is colour and from_autoencoder_channels(colour, 3) is colour
    assert to_autoencoder_channels(grey, 1) is grey
    with pytest.raises(ValueError, match="only grey images are repeated"):
        to_autoencoder_channels(colour, 1)
    with pytest.raises(ValueError, match="cannot be made from a grey autoencoder"):
        from_autoencoder_channels(grey, 3)
    check_autoencoder_channels(3, 1)
    with pytest.raises(ValueError, match="3 channel"):
        check_autoencoder_channels(1, 3)
    # the exact grey behaviour of before: reconstruct through a 3-channel VAE averages back to grey
    vae = build_autoencoder(factor=2, block_out_channels=(8, 8), norm_num_groups=8, in_channels=3).eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        latent = vae.encode(x.repeat(1, 3, 1, 1) * 2 - 1).latent_dist.mode()
        expected = vae.decode(latent).sample.mean(1, keepdim=True)
    assert torch.allclose(reconstruct(vae, x), ((expected.clamp(-1, 1) + 1) / 2))
