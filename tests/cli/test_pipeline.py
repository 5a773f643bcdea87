"""The pipeline driver: stages wired through artifact folders, each runnable alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffmask.pipeline import stage_commands
from tests.cli.test_cli import ENV
from tests.conftest import REPO, compose_config


def test_stage_commands_wire_artifacts(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_demo", "name=x"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    assert list(cmds) == ["fit_diffusion", "generate", "evaluate_masks", "train"]
    art = tmp_path / "artifacts"
    assert "name=x" in cmds["fit_diffusion"]
    assert f"input_dir={art}/diffusion/x" in cmds["generate"]
    assert "synthesis=attention_masks" in cmds["generate"]
    assert f"input_dir={art}/diffusion/x" in cmds["evaluate_masks"]
    assert f"data.synthetic_dir={art}/synthesis/x" in cmds["train"]
    assert f"hydra.run.dir={tmp_path}/logs/pipeline/x/T/train" in cmds["train"]
    assert all(c[1:3] == ["-m", f"diffmask.cli.{s}"] for s, c in cmds.items())


def test_control_stage_feeds_controlled_generation(tmp_path):
    cfg = compose_config("pipeline", ["name=x", "stages=[fit_diffusion,fit_control,generate_control,train]"],
                         tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    art = tmp_path / "artifacts"
    assert cmds["fit_control"][1:3] == ["-m", "diffmask.cli.fit_control"]
    assert f"input_dir={art}/diffusion/x" in cmds["fit_control"] and "name=x" in cmds["fit_control"]
    control = cmds["generate_control"]
    assert control[1:3] == ["-m", "diffmask.cli.generate"] and "synthesis=controlled" in control
    assert f"synthesis.control_dir={art}/control/x" in control and "name=x_control" in control
    assert f"data.synthetic_dir={art}/synthesis/x_control" in cmds["train"]
    # the EMIT-Diff CPU recipe composes from pipeline_cpu and wires the same way
    emit = compose_config("pipeline", ["experiment=pipeline_emit_cpu"], tmp_path, quiet_trainer=False)
    emit_cmds = dict(stage_commands(emit, stamp="T"))
    assert list(emit_cmds) == ["fit_diffusion", "fit_control", "generate_control", "train", "finetune"]
    assert f"synthesis.control_dir={art}/control/emit64" in emit_cmds["generate_control"]
    assert "diffusion.align.label_fraction=0.1" in emit_cmds["fit_diffusion"]  # pipeline_cpu's generator
    generate_cfg = compose_config("generate", emit_cmds["generate_control"][3:], tmp_path)
    assert generate_cfg.synthesis.augment_ratio == 20
    # attention-mask generation is not given a ControlNet, and asking it for controlled samples names
    # the stage
    plain = compose_config("pipeline", ["name=x", "stages=[fit_diffusion,generate]"], tmp_path,
                           quiet_trainer=False)
    assert not any("control_dir" in c for c in dict(stage_commands(plain, stamp="T"))["generate"])
    bad = compose_config("pipeline", ["stages=[generate]", "generate=['synthesis=controlled']"], tmp_path,
                         quiet_trainer=False)
    with pytest.raises(ValueError, match="generate_control stage"):
        stage_commands(bad)


def test_union_recipe_runs_seeds_against_a_baseline(tmp_path):
    """pipeline_cpu128_union: both sets in one mix, 3 training seeds per segmentation stage, a paired
    comparison."""
    cfg = compose_config("pipeline", ["experiment=pipeline_cpu128_union"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    art, runs = tmp_path / "artifacts", tmp_path / "logs" / "pipeline" / "cpu128u" / "T"
    assert list(cmds) == ["fit_autoencoder", "fit_diffusion", "fit_control", "generate", "generate_control",
                          "evaluate_masks", "baseline", "train", "finetune", "compare"]
    both = f"data.synthetic_dir=[{art}/synthesis/cpu128u,{art}/synthesis/cpu128u_control]"
    assert both in cmds["train"] and "data.synthetic_count=1032" in cmds["train"]
    for stage in ("baseline", "train", "finetune"):
        cmd = cmds[stage]
        assert cmd[1:4] == ["-m", "diffmask.cli.train", "--multirun"]
        assert "seed=0,1,2" in cmd and "data.seed=0" in cmd  # seeds vary; the labelled subset stays
        assert f"hydra.sweep.dir={runs}/{stage}" in cmd and "hydra.sweep.subdir=seed${seed}" in cmd
    assert not any("synthetic_dir" in o or "init_weights" in o for o in cmds["baseline"])
    assert f"segmentation.init_weights={runs}/train/seed${{seed}}" in cmds["finetune"]
    # the baseline is the fine-tuning run from scratch: the same settings
    def settings(cmd):
        return [o for o in cmd[cmd.index("data=auto"):] if not o.startswith("hydra.sweep.dir=")]

    assert settings(cmds["baseline"]) == settings(cmds["finetune"])
    assert cmds["compare"][1:3] == ["-m", "diffmask.cli.compare"]
    assert cmds["compare"][3:] == ["--a", f"{runs}/finetune", "--b", f"{runs}/baseline",
                                   "--name-a", "finetune", "--name-b", "baseline",
                                   "--out", f"{runs}/compare.md"]
    for stage in ("fit_control", "generate", "generate_control", "train"):  # every stage's overrides compose
        module = cmds[stage][2].rsplit(".", 1)[-1]
        overrides = [o for o in cmds[stage][3:]
                     if o != "--multirun" and not o.startswith(("seed=", "hydra.sweep"))]
        assert compose_config(module, overrides, tmp_path, quiet_trainer=False).task_name == module
    # the generator is pipeline_cpu128's, so one fitted for it is reused (complete stages are skipped)
    single_cfg = compose_config("pipeline", ["experiment=pipeline_cpu128", "name=cpu128u"], tmp_path,
                                quiet_trainer=False)
    single_cfg.paths.log_dir = cfg.paths.log_dir
    single = dict(stage_commands(single_cfg, stamp="T"))
    assert cmds["fit_diffusion"] == single["fit_diffusion"]
    assert cmds["fit_autoencoder"] == single["fit_autoencoder"]
    # the data seed follows common's data.seed (else seed)
    for common, expected in ((["seed=4"], "data.seed=4"), (["seed=4", "data.seed=2"], "data.seed=2")):
        c = compose_config("pipeline", ["stages=[train]", "seeds=[1]", f"common={common}"], tmp_path,
                           quiet_trainer=False)
        assert expected in dict(stage_commands(c, stamp="T"))["train"]


def test_resumed_invocation_runs_only_unfinished_segmentation_runs(tmp_path):
    cfg = compose_config("pipeline", ["name=x", "stages=[baseline,train,finetune,compare]", "seeds=[0,1,2]",
                                      "stamp=S"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    runs = tmp_path / "logs" / "pipeline" / "x" / "S"
    for stage, seed in (("baseline", 0), ("baseline", 1), ("baseline", 2), ("train", 1)):
        (runs / stage / f"seed{seed}").mkdir(parents=True)
        (runs / stage / f"seed{seed}" / "metrics.json").write_text("{}")
    (runs / "train" / "seed2").mkdir()  # started, never finished: run again
    cmds = dict(stage_commands(cfg))
    assert list(cmds) == ["train", "finetune", "compare"]
    assert "seed=0,2" in cmds["train"] and "seed=0,1,2" in cmds["finetune"]
    assert cmds["compare"][4] == f"{runs}/finetune"
    single = compose_config("pipeline", ["name=x", "stages=[train,finetune]", "stamp=S1"], tmp_path,
                            quiet_trainer=False)
    single.paths.log_dir = cfg.paths.log_dir
    (runs.parent / "S1" / "train").mkdir(parents=True)
    (runs.parent / "S1" / "train" / "metrics.json").write_text("{}")
    assert list(dict(stage_commands(single))) == ["finetune"]


def test_pipeline_order_and_seed_errors(tmp_path):
    for stages in ("[train,compare]", "[baseline,compare]", "[compare,baseline,train]"):
        cfg = compose_config("pipeline", [f"stages={stages}"], tmp_path, quiet_trainer=False)
        with pytest.raises(ValueError, match="put baseline and train"):
            stage_commands(cfg)
    launched = compose_config("pipeline", ["stages=[train]", "seeds=[0,1]", "launcher=joblib"], tmp_path,
                              quiet_trainer=False)
    assert "hydra/launcher=joblib" in dict(stage_commands(launched, stamp="T"))["train"]
    unseeded = compose_config("pipeline", ["stages=[train]", "launcher=joblib"], tmp_path,
                              quiet_trainer=False)
    with pytest.raises(ValueError, match="launcher=joblib runs the seeds"):
        stage_commands(unseeded)
    for seeds in ("[]", "3", "[0,x]"):
        cfg = compose_config("pipeline", ["stages=[train]", f"seeds={seeds}"], tmp_path, quiet_trainer=False)
        with pytest.raises(ValueError, match="seeds: expected null or a non-empty list"):
            stage_commands(cfg)


def test_finetune_stage_starts_from_the_train_stage(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_demo", "name=x", "stages=[train,finetune]",
                                      "finetune=['data.real_fraction=0.1']"], tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    cmds = dict(stage_commands(cfg, stamp="T"))
    runs = tmp_path / "logs" / "pipeline" / "x" / "T"
    assert cmds["finetune"][1:3] == ["-m", "diffmask.cli.train"]
    assert f"segmentation.init_weights={runs}/train" in cmds["finetune"]
    assert f"hydra.run.dir={runs}/finetune" in cmds["finetune"]
    assert cmds["finetune"][-1] == "data.real_fraction=0.1"
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
    """fit (few steps) -> generate with attention masks -> baseline, segmentation on real + synthetic and
    fine-tuning, two seeds each -> the paired comparison."""
    def hydra_list(key, items):  # list overrides: quote items holding '=' (Hydra grammar)
        return f"{key}=[" + ",".join(f"'{i}'" for i in items) + "]"

    tiny_seg = ["segmentation.net.channels=[8,16]", "segmentation.net.strides=[2]", "trainer.max_epochs=1",
                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    cmd = [
        sys.executable, "-m", "diffmask.cli.pipeline", "experiment=pipeline_demo", "name=t",
        f"paths.artifact_dir={tmp_path}/artifacts", f"paths.log_dir={tmp_path}/logs",
        "stages=[fit_diffusion,generate,baseline,train,finetune,compare]", "seeds=[0,1]",
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
        # a 6-step generator's attention masks miss classes: train on them anyway (the wiring is what
        # is tested)
        hydra_list("train", ["data.real_fraction=0.1", "data.synthetic_ratio=1",
                             "data.synthetic_min_class_presence=null", *tiny_seg]),
        hydra_list("finetune", ["data.real_fraction=0.1", "data.synthetic_count=0", *tiny_seg]),
    ]
    res = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    synth = tmp_path / "artifacts" / "synthesis" / "t"
    made = json.loads((synth / "stage.json").read_text())
    assert made["status"] == "complete"
    assert set(made["class_presence"]) == {"left_lung", "right_lung", "heart"}
    rows = [json.loads(line) for line in (synth / "manifest.jsonl").read_text().splitlines()]
    assert rows and all(r["sem_seg_file_name"] and (synth / r["sem_seg_file_name"]).is_file() for r in rows)
    (invocation,) = (tmp_path / "logs" / "pipeline" / "t").iterdir()
    for seed in (0, 1):
        out = json.loads((invocation / "train" / f"seed{seed}" / "metrics.json").read_text())
        assert out["data"]["n_synthetic_train"] == out["data"]["n_real_train"] == 5
        assert "test/phantom/miou" in out["metrics"] and f"seed={seed}" in out["overrides"]
        tuned = json.loads((invocation / "finetune" / f"seed{seed}" / "metrics.json").read_text())
        assert tuned["data"]["n_synthetic_train"] == 0 and "test/phantom/miou" in tuned["metrics"]
        assert tuned["init_weights"] == f"{invocation}/train/seed{seed}"  # seed k fine-tunes train's seed k
        base = json.loads((invocation / "baseline" / f"seed{seed}" / "metrics.json").read_text())
        assert base["data"]["n_synthetic_train"] == 0
        real_ids = out["data"]["real_train_ids"]
        assert base["data"]["real_train_ids"] == tuned["data"]["real_train_ids"] == real_ids
        assert base["init_weights"] is None
    compared = json.loads((invocation / "compare.json").read_text())
    (row,) = [r for r in compared["results"] if r["test_set"] == "phantom"]
    assert row["n_runs_a"] == row["n_runs_b"] == 2 and (invocation / "compare.md").is_file()


def test_autoencoder_stage_feeds_the_latent_diffusion_fit(tmp_path):
    cfg = compose_config("pipeline", ["experiment=pipeline_cpu128"], tmp_path, quiet_trainer=False)
    cmds = dict(stage_commands(cfg, stamp="T"))
    art = tmp_path / "artifacts"
    assert list(cmds) == ["fit_autoencoder", "fit_diffusion", "generate", "evaluate_masks", "train",
                          "finetune"]
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


def _recorded_run(cfg, monkeypatch):
    """``run(cfg)`` as inside ``hydra.main`` (GlobalHydra set up), with stage processes recorded, not started.

    Returns:
        The commands that would have been started, and the error ``run`` raised (None if none).
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from diffmask import pipeline
    from diffmask.config import CONFIG_PATH

    started = []
    monkeypatch.setattr(pipeline.subprocess, "run",
                        lambda cmd: started.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        app = GlobalHydra.instance().hydra
        try:
            pipeline.run(cfg)
            error = None
        except ValueError as e:
            error = e
        assert GlobalHydra.instance().hydra is app  # the app's Hydra is put back after the check
    return started, error


def test_a_typo_in_the_last_stage_fails_before_the_first_stage_runs(tmp_path, monkeypatch):
    cfg = compose_config("pipeline", ["experiment=pipeline_demo", "name=x",
                                      "stages=[fit_diffusion,generate,train,finetune]",
                                      "finetune=['data.real_fraction=0.1','segmentaton.net.channels=[8]']"],
                         tmp_path, quiet_trainer=False)
    cfg.paths.log_dir = str(tmp_path / "logs")
    started, error = _recorded_run(cfg, monkeypatch)
    assert started == [] and not (tmp_path / "artifacts").exists() and not (tmp_path / "logs").exists()
    assert ("stage finetune: override 'segmentaton.net.channels=[8]': Key 'segmentaton' is not in struct"
            in str(error))
    assert "no stage was run" in str(error) and "fit_diffusion" not in str(error)
    # fixed, every stage composes (input_dir and synthetic_dir name folders not written yet) and all run
    # in order
    cfg.finetune = ["data.real_fraction=0.1", "segmentation.net.channels=[8,16]"]
    started, error = _recorded_run(cfg, monkeypatch)
    assert error is None
    assert [c[2] for c in started] == ["diffmask.cli.fit_diffusion", "diffmask.cli.generate",
                                       "diffmask.cli.train", "diffmask.cli.train"]


def test_bad_group_option_and_common_typo_fail_in_a_dry_run(tmp_path, monkeypatch):
    cfg = compose_config("pipeline", ["name=x", "stages=[fit_diffusion,train]", "dry_run=true",
                                      "common=['data=phantom','datta.size=32']",
                                      "train=['segmentation=unett']"],
                         tmp_path, quiet_trainer=False)
    started, error = _recorded_run(cfg, monkeypatch)
    assert started == [] and error is not None
    lines = str(error).splitlines()
    assert lines[0].startswith("pipeline: 2 stage config(s) do not compose")
    assert lines[1] == ("  stage fit_diffusion: override 'datta.size=32' (from common): "
                        "Key 'datta' is not in struct")
    assert lines[2].startswith("  stage train: override 'segmentation=unett': In 'train': Could not find "
                               "'segmentation/unett'; Available options in 'segmentation': ")
    assert "unet" in lines[2].split(": ")[-1].split(", ")


def test_stage_configs_compose_with_hydra_add_forms_and_each_swept_value(tmp_path):
    from diffmask.pipeline import check_stage_configs

    def check(*overrides):
        fixed = ["name=x", "stages=[generate,train]", f"paths.log_dir={tmp_path}/logs"]
        cfg = compose_config("pipeline", [*fixed, *overrides], tmp_path, quiet_trainer=False)
        check_stage_configs(cfg, stage_commands(cfg, stamp="T"))

    check("train=['+data.new_key=1','++data.size=32']")  # added keys compose
    with pytest.raises(ValueError,
                       match=r"stage train: override 'data.new_key=1': Key 'new_key' is not in struct"):
        check("train=['data.new_key=1']")
    # a multirun stage: each value of the user's sweeps is composed (the pipeline's seeds once)
    check("seeds=[0,1,2]", "train=['segmentation=unet,transunet']")
    with pytest.raises(ValueError,
                       match=r"stage train: override 'segmentation=unet,unett': .*'segmentation/unett'"):
        check("seeds=[0,1]", "train=['segmentation=unet,unett']")
    with pytest.raises(ValueError, match=r"stage generate: override 'steps=3,4': Ambiguous value"):
        check("generate=['steps=3,4']")  # not a multirun: a sweep is an error, as in the stage itself


def test_override_reader_follows_hydra_grammar(tmp_path):
    from diffmask.pipeline import _chooses, _data_seed, _override_values

    def pipeline(common, extra=(), **stages):
        lists = [f"{k}=[" + ",".join(f"'{o}'" for o in v) + "]"
                 for k, v in {"common": common, **stages}.items()]
        return compose_config("pipeline", [*lists, *extra], tmp_path, quiet_trainer=False)

    cfg = pipeline(["+data.new_key=1", "++data.seed=3", "seed=4", "data=phantom", "data.size=32"],
                   train=["~data.seed", "~data"],
                   fit_diffusion=["+diffusion=latent", "diffusion.clues=codebook"])
    common = _override_values(cfg)
    # '+'/'++' are not part of the key
    assert common["data.new_key"].value() == 1 and common["data.seed"].value() == 3
    assert _data_seed(cfg) == "3"
    after_train = _override_values(cfg, "train")  # ~data.seed deletes it; ~data everything below data
    assert "data.seed" not in after_train and "data" not in after_train and "data.size" not in after_train
    assert after_train["seed"].value() == 4
    assert _chooses(cfg, "fit_diffusion", "diffusion=latent")
    assert _chooses(cfg, "fit_diffusion", "diffusion.clues=codebook")
    removed = pipeline([], fit_diffusion=["diffusion=latent", "~diffusion"])
    assert not _chooses(removed, "fit_diffusion", "diffusion=latent")
    assert _chooses(pipeline([], generate=['synthesis="controlled"']), "generate", "synthesis=controlled")
    assert _data_seed(pipeline(["data.seed=2", "~data.seed", "seed=5"])) == "5"
    with pytest.raises(ValueError, match=r"common: override 'data.size=\[1' is not a Hydra override"):
        stage_commands(pipeline(["data.size=[1"]))
    with pytest.raises(ValueError, match=r"common: 'data.seed=0,1': the labelled subset"):
        stage_commands(pipeline(["data.seed=0,1"], extra=["stages=[train]", "seeds=[0]"]))
