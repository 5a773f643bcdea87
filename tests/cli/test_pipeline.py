"""The pipeline driver: stages wired through artifact folders, each runnable alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffmask.cli.pipeline import stage_commands
from tests.cli.test_cli import ENV
from tests.conftest import REPO, compose_config


def test_stage_commands_wire_artifacts(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_demo", "name=x"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    assert list(cmds) == ["fit_diffusion", "generate", "evaluate_masks", "train"]
    art = tmp_path / "artifacts"
    assert "name=x" in cmds["fit_diffusion"]
    assert f"input_dir={art}/diffusion/x" in cmds["generate"] and "synthesis=attention_masks" in cmds["generate"]
    assert f"input_dir={art}/diffusion/x" in cmds["evaluate_masks"]
    assert f"data.synthetic_dir={art}/synthesis/x" in cmds["train"]
    assert f"hydra.run.dir={tmp_path}/logs/pipeline/x/T/train" in cmds["train"]
    assert all(c[1:3] == ["-m", f"diffmask.cli.{s}"] for s, c in cmds.items())


def test_control_stage_feeds_controlled_generation(tmp_path):
    cfg = compose_config("pipeline", ["name=x", "stages=[fit_diffusion,fit_control,generate,train]",
                                      "generate=['synthesis=controlled']"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    art = tmp_path / "artifacts"
    assert cmds["fit_control"][1:3] == ["-m", "diffmask.cli.fit_control"]
    assert f"input_dir={art}/diffusion/x" in cmds["fit_control"] and "name=x" in cmds["fit_control"]
    assert f"synthesis.control_dir={art}/control/x" in cmds["generate"]
    # the EMIT-Diff CPU recipe composes from pipeline_cpu and wires the same way
    emit = compose_config("pipeline", ["experiment=pipeline_emit_cpu"], tmp_path, quiet_trainer=False)
    emit_cmds = dict(stage_commands(emit, stamp="T"))
    assert list(emit_cmds) == ["fit_diffusion", "fit_control", "generate", "train", "finetune"]
    assert f"synthesis.control_dir={art}/control/emit64" in emit_cmds["generate"]
    assert "diffusion.align.label_fraction=0.1" in emit_cmds["fit_diffusion"]  # pipeline_cpu's generator
    # attention-mask generation is not given a ControlNet
    plain = compose_config("pipeline", ["name=x", "stages=[fit_diffusion,generate]"], tmp_path, quiet_trainer=False)
    assert not any("control_dir" in c for c in dict(stage_commands(plain, stamp="T"))["generate"])


def test_finetune_stage_starts_from_the_train_stage(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_demo", "name=x", "stages=[train,finetune]",
                                      "finetune=['data.real_fraction=0.1']"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    runs = tmp_path / "logs" / "pipeline" / "x" / "T"
    assert cmds["finetune"][1:3] == ["-m", "diffmask.cli.train"]
    assert f"segmentation.init_weights={runs}/train" in cmds["finetune"]
    assert f"hydra.run.dir={runs}/finetune" in cmds["finetune"] and cmds["finetune"][-1] == "data.real_fraction=0.1"
    for stages in ("[finetune]", "[finetune,train]"):
        bad = compose_config("pipeline", [f"stages={stages}"], tmp_path, quiet_trainer=False)
        with pytest.raises(ValueError, match="put train before it"):
            stage_commands(bad)


def test_unknown_stage_is_a_clear_error(tmp_path):
    cfg = compose_config("pipeline", ["stages=[fit_diffusion,segment]"], tmp_path, quiet_trainer=False)
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['segment'\]"):
        stage_commands(cfg)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
    """fit (few steps) -> generate with attention masks -> segmentation on real + synthetic."""
    def hydra_list(key, items):  # list overrides: quote items holding '=' (Hydra grammar)
        return f"{key}=[" + ",".join(f"'{i}'" for i in items) + "]"

    cmd = [
        sys.executable, "-m", "diffmask.cli.pipeline", "experiment=pipeline_demo", "name=t",
        f"paths.artifact_dir={tmp_path}/artifacts", f"paths.log_dir={tmp_path}/logs",
        "stages=[fit_diffusion,generate,train,finetune]",
        hydra_list("common", ["data=phantom", "data.size=32", "data.num_workers=0", "trainer=cpu",
                              "trainer.enable_progress_bar=false"]),
        hydra_list("fit_diffusion", [
            "diffusion.components.block_out_channels=[16,32]", "diffusion.components.attention_heads=2",
            "diffusion.components.norm_num_groups=8", "diffusion.components.layers_per_block=1",
            "diffusion.components.cross_attention_dim=32", "diffusion.components.text_hidden_size=32",
            "diffusion.components.text_intermediate_size=64", "diffusion.align.label_fraction=0.1",
            "data.batch_size=8", "trainer.max_steps=6"]),
        hydra_list("generate", ["num_samples=6", "steps=3", "batch_size=6", "synthesis=attention_masks",
                                "synthesis.refine=[threshold]"]),
        # a 6-step generator's attention masks miss classes: train on them anyway (the wiring is what is tested)
        hydra_list("train", ["data.real_fraction=0.1", "data.synthetic_ratio=1", "data.synthetic_min_class_presence=null",
                             "segmentation.net.channels=[8,16]",
                             "segmentation.net.strides=[2]", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
                             "trainer.limit_test_batches=1"]),
        hydra_list("finetune", ["data.real_fraction=0.1", "data.synthetic_count=0", "segmentation.net.channels=[8,16]",
                                "segmentation.net.strides=[2]", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
                                "trainer.limit_test_batches=1"]),
    ]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    synth = tmp_path / "artifacts" / "synthesis" / "t"
    made = json.loads((synth / "stage.json").read_text())
    assert made["status"] == "complete" and set(made["class_presence"]) == {"left_lung", "right_lung", "heart"}
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").read_text().splitlines()]
    assert rows and all(r["sem_seg_file_name"] and (synth / r["sem_seg_file_name"]).is_file() for r in rows)
    metrics = list((tmp_path / "logs").glob("pipeline/t/*/train/metrics.json"))
    assert len(metrics) == 1
    out = json.loads(metrics[0].read_text())
    assert out["data"]["n_synthetic_train"] == out["data"]["n_real_train"] == 5
    assert "test/phantom/miou" in out["metrics"]
    tuned = json.loads((metrics[0].parent.parent / "finetune" / "metrics.json").read_text())
    assert tuned["data"]["n_synthetic_train"] == 0 and "test/phantom/miou" in tuned["metrics"]
    assert f"segmentation.init_weights={metrics[0].parent}" in tuned["overrides"]


def test_autoencoder_stage_feeds_the_latent_diffusion_fit(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_cpu128"], tmp_path, quiet_trainer=False)
    cmds = dict(stage_commands(cfg, stamp="T"))
    art = tmp_path / "artifacts"
    assert list(cmds) == ["fit_autoencoder", "fit_diffusion", "generate", "evaluate_masks", "train", "finetune"]
    assert cmds["fit_autoencoder"][1:3] == ["-m", "diffmask.cli.fit_autoencoder"]
    assert "name=cpu128" in cmds["fit_autoencoder"] and "data.size=128" in cmds["fit_autoencoder"]
    assert f"diffusion.components.autoencoder_dir={art}/autoencoder/cpu128" in cmds["fit_diffusion"]
    assert "diffusion=latent" in cmds["fit_diffusion"]
    # a pixel model gets no autoencoder
    pixel = compose_config("pipeline", ["experiment=pipeline_cpu"], tmp_path, quiet_trainer=False)
    assert not any("autoencoder_dir" in c for c in dict(stage_commands(pixel, stamp="T"))["fit_diffusion"])


def test_codebook_stage_feeds_the_clued_diffusion_fit(tmp_path):
    cfg = compose_config("pipeline", ["experiment=anatomy_clues_cpu"], tmp_path, quiet_trainer=False)
    cmds = dict(stage_commands(cfg, stamp="T"))
    art = tmp_path / "artifacts"
    assert list(cmds)[:3] == ["fit_autoencoder", "fit_codebook", "fit_diffusion"]
    assert f"codebook.autoencoder_dir={art}/autoencoder/apc64" in cmds["fit_codebook"]
    assert f"diffusion.codebook_dir={art}/codebook/apc64" in cmds["fit_diffusion"]
    assert "prompts=anatomy_pathology" in cmds["fit_diffusion"] and "data.size=64" in cmds["fit_codebook"]
    # the pixel generator gets no autoencoder; without clues no codebook
    assert not any("autoencoder_dir" in c for c in cmds["fit_diffusion"])
    for stage in ("fit_autoencoder", "fit_codebook", "fit_diffusion"):  # every stage's overrides compose
        assert compose_config(stage, cmds[stage][3:], tmp_path, quiet_trainer=False).task_name == stage
    plain = compose_config("pipeline", ["experiment=anatomy_cpu"], tmp_path, quiet_trainer=False)
    assert not any("codebook_dir" in c for c in dict(stage_commands(plain, stamp="T"))["fit_diffusion"])
