"""The visual codebook, word-code PMI and clue tokens (issue 17), on 32 px phantoms."""

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffmask.attention import CrossAttentionStore
from diffmask.autoencoder import AutoencoderLitModule, build_autoencoder, load_autoencoder
from diffmask.codebook import VisualCodebook, WordCodePMI, codebook_usage, kmeans
from diffmask.config import CONFIG_PATH
from diffmask.data.dataset import SegmentationDataset
from diffmask.diffusion import TextToImageSampler
from diffmask.domains.chest import PhantomSource


def _autoencoder(tmp_path, resolution=32):
    vae = build_autoencoder(factor=4, block_out_channels=(16, 32, 32), norm_num_groups=8)
    module = AutoencoderLitModule(vae, lambda p: torch.optim.Adam(p), resolution=resolution)
    return module.export(tmp_path / f"ae{resolution}", {"latent_mean": 0.0, "latent_std": 1.0})


def _phantoms(n=4, size=32):
    source = PhantomSource(size=size, num_train=n, num_val=1, num_test=1)
    dataset = SegmentationDataset(source, source.ids("train"), size)
    return torch.stack([dataset[i]["image"] for i in range(n)])


def test_codebook_assigns_every_patch_to_its_nearest_code_and_reports_usage(tmp_path):
    ae = _autoencoder(tmp_path)
    images = _phantoms()
    book = VisualCodebook.fit(load_autoencoder(ae, 32), images, size=8, patch=8, iters=20, autoencoder_dir=ae)
    assert book.grid == 4 and book.centroids.shape == (8, 4 * 2 * 2)
    codes = book.assign(images)
    assert codes.shape == (4, 4, 4)
    feats = book.standardise(book.features(images)).reshape(-1, book.centroids.shape[1])
    brute = torch.cdist(feats.double(), book.centroids.double()).argmin(1)
    assert torch.equal(codes.flatten(), brute)
    usage = codebook_usage(codes.numpy(), 8)
    assert (
        sum(usage["counts"]) == 64 and usage["n_dead"] == len(usage["dead_codes"]) and usage["perplexity"] > 1
    )
    # save / load round trip; another size is a clear error
    book.save(tmp_path / "cb")
    again = VisualCodebook.load(tmp_path / "cb", resolution=32)
    assert torch.equal(again.assign(images), codes)
    with pytest.raises(ValueError, match="was built at 32 px, the diffusion model is at 64 px"):
        VisualCodebook.load(tmp_path / "cb", resolution=64)
    with pytest.raises(ValueError, match="codebook.patch: expected a multiple of the autoencoder's factor 4"):
        VisualCodebook.fit(book.vae, images, size=4, patch=6)
    with pytest.raises(ValueError, match="codebook.size: 100 codes need at least 100 patches"):
        VisualCodebook.fit(book.vae, images[:1], size=100, patch=8)


def test_kmeans_uses_every_code_on_separated_clusters():
    x = torch.cat([torch.randn(20, 2) * 0.01 + torch.tensor(c) for c in ([0, 0], [5, 0], [0, 5], [5, 5])])
    c = kmeans(x, 4, seed=1)
    assert codebook_usage(torch.cdist(x, c).argmin(1).numpy(), 4)["n_dead"] == 0
    assert sorted(map(tuple, c.round().tolist())) == [(0, 0), (0, 5), (5, 0), (5, 5)]


def test_pmi_ranks_a_code_seen_only_with_a_word_above_one_seen_everywhere():
    grid = np.zeros((2, 2), int)  # code 0 everywhere
    with_nodule = grid.copy()
    with_nodule[1, 0] = 1  # code 1 at cell 2, only in images whose report says nodule
    reports = ["nodule present", "nodule present", "clear lungs", "clear lungs", "clear lungs"]
    codes = [with_nodule, with_nodule, grid, grid, grid]
    pmi = WordCodePMI.fit(reports, codes, size=3)
    table = pmi.table()
    row = pmi.index["nodule"]
    assert table[row, 1] > table[row, 0] and abs(table[row, 0]) < 0.2
    assert pmi.key_patches("a nodule", 1) == [(1, 2)]
    assert pmi.key_patches("clear lungs", 2)[0][0] == 0
    with pytest.raises(ValueError, match="the same non-zero number of images"):
        WordCodePMI.fit(reports, codes[:2], size=3)


TINY = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0", "data.real.num_train=4",
    "data.real.num_val=2", "data.real.num_test=2", "trainer.enable_progress_bar=false", "logger=csv",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
    "diffusion.components.block_out_channels=[16,32]", "diffusion.components.layers_per_block=1",
    "diffusion.components.attention_levels=[true,true]",
    "diffusion.components.attention_heads=2", "diffusion.components.cross_attention_dim=32",
    "diffusion.components.norm_num_groups=8", "diffusion.components.text_hidden_size=32",
    "diffusion.components.text_layers=1", "diffusion.components.text_heads=2",
    "diffusion.components.text_intermediate_size=32",
]


def _compose(name, tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / f"run_{name}")
    return cfg


def test_codebook_stage_then_a_unet_with_clue_tokens_trains_and_its_capture_returns_class_maps(tmp_path):
    from hydra.errors import InstantiationException

    from diffmask.cli.fit_codebook import run as fit_codebook
    from diffmask.cli.fit_diffusion import run as fit_diffusion

    ae = _autoencoder(tmp_path)
    fit_codebook(_compose("fit_codebook", tmp_path, "data=phantom", "data.size=32", "data.real.num_train=4",
                          "data.real.num_val=1", "data.real.num_test=2", f"codebook.autoencoder_dir={ae}",
                          "codebook.size=8", "name=cb"))
    cb = tmp_path / "artifacts" / "codebook" / "cb"
    info = json.loads((cb / "codebook.json").read_text())
    assert info["size"] == 8 and info["grid"] == 4 and "test/phantom" in info["usage"]
    assert len(json.loads((cb / "codes.json").read_text())) == 4
    with pytest.raises(
        (ValueError, InstantiationException), match="was built at 32 px, the diffusion model is at 64 px"
    ):
        fit_diffusion(_compose("fit_diffusion", tmp_path, *TINY, "data.size=64", "diffusion.clues=codebook",
                               f"diffusion.codebook_dir={cb}", "name=bad"))
    fit_diffusion(
        _compose(
            "fit_diffusion",
            tmp_path,
            *TINY,
            "diffusion.clues=codebook",
            f"diffusion.codebook_dir={cb}",
            "diffusion.clue_tokens=4",
            "prompts=anatomy_pathology",
            "prompts.embedder=null",
            "diffusion.align.label_fraction=0.5",
            "name=clued",
        )
    )
    model = tmp_path / "artifacts" / "diffusion" / "clued"
    meta = json.loads((model / "diffmask.json").read_text())
    assert meta["clues"] == "clues" and (model / "clues" / "pmi.json").is_file()
    sampler = TextToImageSampler.from_pretrained(model)
    assert sampler.components.clues is not None and sampler.components.clues.pmi.n_images == 4
    prompt = sampler.prompt_builder.neutral_prompt().text
    tokens = sampler.components.clues.prompt_tokens([prompt, ""])
    assert tokens.shape == (2, 4, 32)
    store = CrossAttentionStore(output_size=32)
    store.set_tokens(sampler.token_positions([prompt]))
    with store.capture(sampler.components.unet):
        out = sampler(
            [prompt], [0], num_inference_steps=2, guidance_scale=2.0, on_step_begin=store.begin_step
        )
    maps = store.result()
    assert out.images.shape == (1, 1, 32, 32) and maps.shape == (1, 3, 32, 32) and torch.isfinite(maps).all()
    # a ControlNet on a clued model is refused up front
    from diffmask.cli.fit_control import run as fit_control

    with pytest.raises(ValueError, match="a ControlNet on a model with visual clue tokens is not supported"):
        fit_control(_compose("fit_control", tmp_path, *TINY[:6], f"input_dir={model}", "name=ctl"))
