import json
import logging

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import open_dict

from diffmask.cli.fit_diffusion import run
from diffmask.config import CONFIG_PATH
from diffmask.diffusion import TextToImageSampler
from diffmask.diffusion.throughput import TrainingThroughput

TINY = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0", "data.real.num_train=4",
    "data.real.num_val=2", "data.real.num_test=2",
    "diffusion.components.block_out_channels=[16,32]", "diffusion.components.layers_per_block=1",
    "diffusion.components.attention_heads=2", "diffusion.components.cross_attention_dim=32",
    "diffusion.components.norm_num_groups=8", "diffusion.components.text_hidden_size=32",
    "diffusion.components.text_layers=2", "diffusion.components.text_heads=2",
    "diffusion.components.text_intermediate_size=64", "diffusion.components.max_prompt_tokens=48",
    "trainer.max_steps=3", "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false", "logger=csv",
]


def compose_fit(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("fit_diffusion", overrides=[*TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_fit_diffusion_cli_writes_a_complete_diffusers_model(tmp_path):
    cfg = compose_fit(tmp_path, "diffusion.align.label_fraction=0.5", "name=tiny", "data.intensity=equalize")
    metrics = run(cfg)
    out = tmp_path / "artifacts" / "diffusion" / "tiny"
    info = json.loads((out / "stage.json").read_text())
    assert info["status"] == "complete" and info["counts"]["steps"] == 3 and info["counts"]["n_labelled"] == 2
    assert not (out / "checkpoints").exists()
    meta = json.loads((out / "diffmask.json").read_text())
    assert meta["resolution"] == 32 and len(meta["labelled_ids"]) == 2 and meta["intensity"] == "equalize"
    # the metadata values it was fitted with: others get neutral words at mask evaluation
    assert set(meta["prompt_builder"]["known_values"]["sex"]) <= {"male", "female"}
    assert meta["prompt_builder"]["known_values"]["finding"]
    assert "train/align_loss" in metrics or "train/mse" in metrics
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3
    images = TextToImageSampler.from_pretrained(out)([meta["prompt_builder"]["templates"][0].format(
        modality="a chest x-ray", age="adult", sex="patient", finding="none", diagnosis="",
        classes="left lung, right lung and heart")], [0],
        num_inference_steps=1).images
    assert images.shape == (1, 1, 32, 32)
    # a complete stage is skipped
    assert run(cfg) == {}


def test_fit_diffusion_cli_rejects_a_resolution_the_unet_cannot_take(tmp_path):
    cfg = compose_fit(tmp_path, "data.size=48", "diffusion.components.block_out_channels=[16,32,32,32,32,32]")
    # Hydra wraps the builder's ValueError; the message names the field and the rule
    with pytest.raises((ValueError, InstantiationException), match="resolution: 48 px .* multiple of 32"):
        run(cfg)


def test_fit_diffusion_cli_measures_a_run_shorter_than_the_warm_up(tmp_path, caplog):
    # 3 steps < the throughput callback's 5 warm-up batches: measured over all batches, never NaN
    with caplog.at_level(logging.INFO, logger="diffmask"):
        run(compose_fit(tmp_path, "name=warm"))
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    info = json.loads((tmp_path / "artifacts" / "diffusion" / "warm" / "stage.json").read_text(), **strict)
    assert info["counts"]["images_per_s"] > 0
    written = json.loads((tmp_path / "run" / "metrics.json").read_text(), **strict)
    assert (
        written["images_per_s"] == info["counts"]["images_per_s"] == written["metrics"]["train/images_per_s"]
    )
    assert written["data"]["real"] == info["data"]["real"] == "phantom"
    assert "nan" not in caplog.text.lower()


def test_throughput_without_a_training_batch_is_none():
    assert TrainingThroughput().images_per_s is None


def test_fit_diffusion_cli_refuses_a_fit_that_trains_nothing(tmp_path):
    for setting in ("trainer.max_epochs=0", "trainer.max_steps=0", "trainer.limit_train_batches=0"):
        with pytest.raises(ValueError, match=rf"{setting}: the fit would train nothing"):
            run(compose_fit(tmp_path, setting, "name=untrained"))
    assert not (tmp_path / "artifacts" / "diffusion" / "untrained").exists()


def test_fit_diffusion_cli_rejects_the_retrieval_prompts_group(tmp_path):
    with pytest.raises(ValueError, match="prompts=retrieval is for diffmask-generate"):
        run(compose_fit(tmp_path, "prompts=retrieval", "name=bad"))
