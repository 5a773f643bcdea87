import json
from unittest.mock import patch

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffmask.artifacts import StageDir
from diffmask.cli.generate import run
from diffmask.config import CONFIG_PATH
from diffmask.data import ManifestSource, read_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST


def compose_generate(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("generate", overrides=[
            "data=phantom", "data.size=32", "trainer.enable_progress_bar=false", "steps=2", "batch_size=2",
            *overrides,
        ])
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / "run")
    return cfg


def test_generate_cli_writes_a_complete_synthetic_stage(tmp_path, model_dir, caplog):
    cfg = compose_generate(tmp_path, f"input_dir={model_dir}", "num_samples=3", "name=s1", "synthesis=none")
    info = run(cfg)
    out = tmp_path / "artifacts" / "synthesis" / "s1"
    assert info["rows"] == 3 and StageDir(out).is_complete()
    stage = json.loads((out / "stage.json").read_text())
    assert stage["inputs"]["diffusion"]["path"] == str(model_dir)
    assert stage["intensity"] == "raw"  # the model's input normalisation (older exports: raw)
    rows = read_manifest(out)
    assert [r.source for r in rows] == ["synthetic"] * 3 and all("left lung" in r.prompt for r in rows)
    assert len(ManifestSource(out, CHEST).ids("train")) == 3
    assert run(cfg) == {}  # complete: skipped
    # a complete stage is not redone with other settings, but the run says so
    changed = compose_generate(
        tmp_path, f"input_dir={model_dir}", "num_samples=3", "name=s1", "synthesis=none", "guidance_scale=2.0"
    )
    with caplog.at_level("WARNING"):
        assert run(changed) == {}
    assert "NOT redone" in caplog.text and "guidance_scale: 3.0 -> 2.0" in caplog.text
    # segmentation on these images (a raw model's): normalised like the real images, whatever the setting
    from diffmask.data import SegmentationDataModule
    from diffmask.domains.chest import PhantomSource

    for setting in ("raw", "equalize"):
        dm = SegmentationDataModule(PhantomSource(size=32, num_train=2), size=32, synthetic_dir=str(out),
                                    intensity=setting)
        assert dm.synthetic_intensity == setting


def test_generate_cli_with_given_prompts_and_bad_input(tmp_path, model_dir):
    cfg = compose_generate(tmp_path, f"input_dir={model_dir}", "name=s2",
                           "prompt_list=['heart, left lung and right lung']", "num_per_prompt=2")
    assert run(cfg)["rows"] == 2
    rows = read_manifest(tmp_path / "artifacts" / "synthesis" / "s2")
    assert [r.seed for r in rows] == [0, 1]
    with pytest.raises(FileNotFoundError, match="not a complete stage folder"):
        run(compose_generate(tmp_path, f"input_dir={tmp_path / 'missing'}", "name=s3"))
    # a prompt without a class word cannot give attention masks
    with pytest.raises(
        ValueError, match=r"prompt_list\[1\]: prompt 'a chest x-ray': class phrase 'left lung' not found"
    ):
        run(compose_generate(tmp_path, f"input_dir={model_dir}", "name=s4", "synthesis=attention_masks",
                             "prompt_list=['heart, left lung and right lung','a chest x-ray']"))


def test_generate_cli_attention_masks_with_affinity_second_pass(tmp_path, model_dir):
    cfg = compose_generate(
        tmp_path,
        f"input_dir={model_dir}",
        "num_samples=3",
        "name=m1",
        "synthesis=attention_masks",
        "synthesis.refine=[threshold,densecrf,affinity]",
        "synthesis.mask_maker.refiner.steps.densecrf.iterations=2",
        "synthesis.affinity.train_steps=2",
        "synthesis.affinity.batch_size=2",
        "synthesis.affinity.refiner.t=4",
        "synthesis.affinity.refiner.backbone.channels=[8,16]",
        "synthesis.affinity.refiner.radius=3",
        "synthesis.filter_masks=true",
        "synthesis.quality_filter.require_all_classes=false",
    )
    info = run(cfg)
    out = tmp_path / "artifacts" / "synthesis" / "m1"
    assert StageDir(out).is_complete() and info["rows"] == 3 and info["dropped_total"] == 0
    assert info["affinity_refined"] == 3 and info["affinity_trained"] is True
    stage = json.loads((out / "stage.json").read_text())
    assert stage["counts"]["dropped_total"] == 0 and stage["config"]["synthesis"]["refine"][-1] == "affinity"
    rows = read_manifest(out)
    for r in rows:
        assert r.sem_seg_file_name == f"masks_affinity/{r.id}.png" and r.attn_file == f"attn/{r.id}.npz"
        assert (out / f"masks/{r.id}.png").is_file() and set(r.scores) == {"left_lung", "right_lung", "heart"}
    assert (out / "affinity.pt").is_file()
    assert ManifestSource(out, CHEST).load(rows[0].id).label.shape == (32, 32)


def test_generate_cli_rejects_inconsistent_synthesis_settings(tmp_path, model_dir):
    with pytest.raises(ValueError, match="affinity must come last"):
        run(compose_generate(tmp_path, f"input_dir={model_dir}", "name=m2", "synthesis=attention_masks",
                             "synthesis.refine=[affinity,threshold]"))
    with pytest.raises(ValueError, match="not configured"):
        run(compose_generate(tmp_path, f"input_dir={model_dir}", "name=m3", "synthesis=attention_masks",
                             "synthesis.refine=[threshold,crf]"))
    with pytest.raises(ValueError, match="save_class_maps"):
        run(compose_generate(tmp_path, f"input_dir={model_dir}", "name=m4", "synthesis=attention_masks",
                             "synthesis.refine=[threshold,affinity]", "synthesis.save_class_maps=false"))
    with pytest.raises(ValueError, match="raw .* stands alone"):
        run(compose_generate(tmp_path, f"input_dir={model_dir}", "name=m5", "synthesis=attention_masks",
                             "synthesis.refine=[raw,densecrf]"))


def test_generate_cli_raw_attention_masks(tmp_path, model_dir):
    """The first row of the refinement ablation: unrefined attention masks."""
    cfg = compose_generate(tmp_path, f"input_dir={model_dir}", "num_samples=2", "name=r1",
                           "synthesis=attention_masks", "synthesis.refine=[raw]")
    assert run(cfg)["rows"] == 2
    out = tmp_path / "artifacts" / "synthesis" / "r1"
    rows = read_manifest(out)
    assert all((out / r.sem_seg_file_name).is_file() for r in rows)
    assert ManifestSource(out, CHEST).load(rows[0].id).label.max() <= 3


def test_generate_cli_extends_a_complete_stage_with_more_samples(tmp_path, model_dir):
    """1N today, 4N tomorrow: the samples on disk are kept, and equal a fresh run's first ones."""
    common = [f"input_dir={model_dir}", "synthesis=attention_masks", "synthesis.refine=[threshold]"]
    run(compose_generate(tmp_path, *common, "num_samples=2", "name=grow"))
    out = tmp_path / "artifacts" / "synthesis" / "grow"
    first = {r.id: (out / r.file_name).read_bytes() for r in read_manifest(out)}
    # a set made before a setting existed (now with a null default) still grows
    info = json.loads((out / "stage.json").read_text())
    assert info["config"].pop("findings", "absent") is None
    (out / "stage.json").write_text(json.dumps(info))
    # data settings that generation does not read (the segmentation mix) do not stop it
    grow = compose_generate(tmp_path, *common, "num_samples=4", "name=grow", "data.real_share=0.5")
    with patch("diffmask.synthesis.stage.generate_samples", side_effect=RuntimeError("killed")):
        with pytest.raises(RuntimeError, match="killed"):
            run(grow)
    # a crash while growing leaves the complete set in place, readable
    assert StageDir(out).is_complete() and len(read_manifest(out)) == 2
    info = run(grow)
    assert info["rows"] == 4 and info["written"] == info["made"] == 2 and StageDir(out).is_complete()
    assert json.loads((out / "stage.json").read_text())["config"]["num_samples"] == 4
    rows = read_manifest(out)
    assert all((out / r.file_name).read_bytes() == first[r.id] for r in rows if r.id in first)
    run(compose_generate(tmp_path, *common, "num_samples=4", "name=fresh"))
    fresh = tmp_path / "artifacts" / "synthesis" / "fresh"
    assert [r.id for r in read_manifest(fresh)] == [r.id for r in rows]
    assert all((fresh / r.file_name).read_bytes() == (out / r.file_name).read_bytes() for r in rows)
    # a stray work folder that is not an interrupted extension is refused, not merged
    (fresh.with_name("fresh.tmp") / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="lacks 4 samples of the complete set"):
        run(compose_generate(tmp_path, *common, "num_samples=5", "name=fresh"))
    # anything else changed: not extended, not redone
    assert run(compose_generate(tmp_path, *common, "num_samples=6", "name=grow", "steps=3")) == {}
    assert len(read_manifest(out)) == 4


def test_generate_cli_variations_of_the_real_training_images(tmp_path, model_dir):
    """init_images=train: each sample is a real training image noised part-way and denoised with its
    own prompt; its labels are attention masks, and the source is named but not paired (its mask is
    never read)."""
    common = [
        f"input_dir={model_dir}",
        "synthesis=attention_masks",
        "synthesis.refine=[threshold]",
        "steps=4",
    ]
    info = run(
        compose_generate(tmp_path, *common, "init_images=train", "strength=0.5", "num_samples=3", "name=var")
    )
    out = tmp_path / "artifacts" / "synthesis" / "var"
    rows = read_manifest(out)
    assert info["rows"] == 3 and [r.id for r in rows] == ["syn000000", "syn000001", "syn000002"]
    sources = [r.meta["source_id"] for r in rows]
    assert len(set(sources)) == 3 and all(r.pair_id is None and r.sem_seg_file_name for r in rows)
    from diffmask.domains.chest import PhantomSource

    train_ids = set(PhantomSource(size=32).ids("train"))
    assert set(sources) <= train_ids
    for bad, match in (("init_images=val", "expected null or train"), ("strength=0", "strength"),
                       ("prompt_list=[a chest x-ray of the left lung, right lung and heart]", "prompt_list")):
        with pytest.raises(ValueError, match=match):
            run(compose_generate(tmp_path, *common, "init_images=train", bad, "num_samples=2", "name=bad"))
