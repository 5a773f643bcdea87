"""Colour (RGB) data end to end: a tiny pixel model fitted on 3-channel images generates RGB sets
(attention masks, re-masking, variations, ControlNet variants) that ManifestSource(channels=3) reads;
grey data is refused by name at every door."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmask.data import ManifestSource, read_manifest
from tests.autoencoder.colour_data import COLOUR_CLASSES, colour_overrides, write_colour_folder
from tests.conftest import compose_config

TINY_UNET = [
    "diffusion.components.block_out_channels=[16,32]", "diffusion.components.layers_per_block=1",
    "diffusion.components.attention_heads=2", "diffusion.components.cross_attention_dim=32",
    "diffusion.components.norm_num_groups=8", "diffusion.components.text_hidden_size=32",
    "diffusion.components.text_layers=2", "diffusion.components.text_heads=2",
    "diffusion.components.text_intermediate_size=64", "diffusion.components.max_prompt_tokens=48",
]
FIT = ["trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1", "logger=csv"]
AFFINITY = ["synthesis.mask_maker.refiner.steps.densecrf.iterations=2", "synthesis.affinity.train_steps=2",
            "synthesis.affinity.batch_size=2", "synthesis.affinity.refiner.t=4",
            "synthesis.affinity.refiner.backbone.channels=[8,16]", "synthesis.affinity.refiner.radius=3"]


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """(the colour folder, a 2-step pixel model fitted on it with attention alignment, its tmp folder)."""
    from diffmask.cli.fit_diffusion import run

    tmp = tmp_path_factory.mktemp("colour_synthesis")
    root = write_colour_folder(tmp / "colour")
    cfg = compose_config("fit_diffusion", [*colour_overrides(root), *TINY_UNET, *FIT, "trainer.max_steps=2",
                                           "diffusion.align.label_fraction=0.5", "name=rgb"], tmp / "run_fit")
    run(cfg)
    return root, Path(cfg.output_dir), tmp


def _generate(root, model, tmp, name, *overrides, data=None):
    from diffmask.cli.generate import run

    cfg = compose_config("generate", [*(data or colour_overrides(root)), f"input_dir={model}", f"name={name}",
                                      "steps=2", "batch_size=3", *overrides], tmp / f"gen_{name}")
    return run(cfg), Path(cfg.output_dir)


def _assert_rgb_set(folder, n):
    stage = json.loads((folder / "stage.json").read_text())
    assert stage["channels"] == 3
    source = ManifestSource(folder, COLOUR_CLASSES, channels=3)
    ids = source.ids("train")
    assert len(ids) == n
    for sid in ids:
        sample = source.load(sid)
        assert sample.image.shape == (32, 32, 3) and sample.image.dtype == np.uint8
        with Image.open(source._resolve(source._rows[sid].file_name)) as png:
            assert png.mode == "RGB"
    return source


def test_colour_model_generates_rgb_sets_with_attention_masks_and_remasks_them(colour_model):
    from diffmask.cli import remask
    from diffmask.diffusion import TextToImageSampler

    root, model, tmp = colour_model
    meta = json.loads((model / "diffmask.json").read_text())
    assert meta["channels"] == 3 and meta["class_names"] == COLOUR_CLASSES
    assert json.loads((model / "stage.json").read_text())["counts"]["channels"] == 3
    out = TextToImageSampler.from_pretrained(model, channels=3)(
        ["a breast ultrasound image, benign, showing the lesion"], [0], num_inference_steps=2
    )
    assert out.images.shape == (1, 3, 32, 32)

    info, folder = _generate(root, model, tmp, "masks", "num_samples=3", "synthesis=attention_masks",
                             "synthesis.refine=[threshold,densecrf,affinity]", *AFFINITY)
    assert info["rows"] == 3 and info["affinity_refined"] == 3
    source = _assert_rgb_set(folder, 3)
    assert all(source.load(i).label is not None for i in source.ids("train"))
    with pytest.raises(ValueError, match="grey dataset"):  # never read back as grey
        ManifestSource(folder, COLOUR_CLASSES).load(source.ids("train")[0])

    # re-masked offline from the saved class maps: the set's channels follow it
    def compose_remask(name, *overrides):
        return compose_config(
            "remask",
            [f"input_dir={folder}", f"name={name}", *overrides],
            tmp / f"re_{name}",
            quiet_trainer=False,
        )

    cfg = compose_remask("re", "synthesis.refine=[threshold,densecrf]")
    remask.run(cfg)
    _assert_rgb_set(Path(cfg.output_dir), 3)
    with pytest.raises(ValueError, match=rf"data.channels=1, but the set in {folder} holds 3-channel"):
        remask.run(compose_remask("re_grey", "synthesis.refine=[threshold]", "data.channels=1"))

    # the colour model refuses grey data, by name: generation and the mask evaluation on real images
    with pytest.raises(
        ValueError, match=rf"data.channels=1 \(grey\), but the diffusion model in {model} was fitted"
    ):
        _generate(root, model, tmp, "grey", "num_samples=1", "synthesis=none",
                  data=["data=phantom", "data.size=32"])
    from diffmask.cli.evaluate_masks import run as evaluate_masks

    with pytest.raises(
        ValueError, match=rf"data.channels=1 \(grey\), but the diffusion model in {model} was fitted"
    ):
        evaluate_masks(
            compose_config(
                "evaluate_masks", ["data=phantom", "data.size=32", f"input_dir={model}"], tmp / "eval_grey"
            )
        )


def test_colour_variations_and_controlnet_variants_are_rgb(colour_model):
    from diffmask.cli.fit_control import run as fit_control

    root, model, tmp = colour_model
    info, folder = _generate(root, model, tmp, "var", "num_samples=2", "synthesis=none", "init_images=train",
                             "strength=0.5")
    assert info["rows"] == 2
    _assert_rgb_set(folder, 2)
    assert {r.meta["source_id"] for r in read_manifest(folder)} <= {f"c{i:03d}" for i in range(4)}

    cfg = compose_config("fit_control", [*colour_overrides(root), f"input_dir={model}", "name=ctl", *FIT,
                                         "data.real_fraction=0.5", "trainer.max_steps=1",
                                         "control.condition.type=edges+mask"], tmp / "run_ctl")
    fit_control(cfg)
    control = json.loads((Path(cfg.output_dir) / "control.json").read_text())
    assert control["channels"] == 3 and len(control["labelled_ids"]) == 2
    info, folder = _generate(
        root,
        model,
        tmp,
        "ctl",
        "synthesis=controlled",
        f"synthesis.control_dir={cfg.output_dir}",
        "synthesis.augment_ratio=2",
        "synthesis.source=deformed",
    )
    assert info["rows"] == 4
    source = _assert_rgb_set(folder, 4)
    row = read_manifest(folder)[0]
    assert row.pair_id in control["labelled_ids"] and source.load(row.id).label is not None
    # a grey fit of a ControlNet on the colour model is refused by name
    grey = compose_config("fit_control", ["data=phantom", "data.size=32", f"input_dir={model}", "name=grey",
                                          "trainer.max_steps=1"], tmp / "run_grey")
    with pytest.raises(
        ValueError, match=r"data.channels=1 \(grey\), but the diffusion model in .* 3-channel"
    ):
        fit_control(grey)


def test_fid_features_need_a_segmenter_of_the_sets_channels(tmp_path):
    import torch
    from omegaconf import OmegaConf

    from diffmask.evaluation.synthesis_quality import check_feature_channels, small_classifier

    def run_cfg(channels, in_channels="${data.channels}"):
        return OmegaConf.create(
            {"data": {"channels": channels}, "segmentation": {"net": {"in_channels": in_channels}}}
        )

    assert check_feature_channels("run", run_cfg(3), tmp_path, 3) == 3
    unrecorded = OmegaConf.create({"data": {}, "segmentation": {"net": {}}})
    assert check_feature_channels("run", unrecorded, tmp_path, 1) == 1
    with pytest.raises(
        ValueError, match=rf"{tmp_path}: the set holds 1-channel .* model run reads 3-channel"
    ):
        check_feature_channels("run", run_cfg(3), tmp_path, 1)
    with pytest.raises(ValueError, match="reads 1-channel"):
        check_feature_channels("run", run_cfg(1), tmp_path, 3)
    with pytest.raises(ValueError, match="in_channels=1 but data.channels=3"):
        check_feature_channels("run", run_cfg(3, 1), tmp_path, 3)
    assert small_classifier(2, in_channels=3)(torch.rand(2, 3, 32, 32)).shape == (2, 2)
