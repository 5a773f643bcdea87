"""Anatomy-pathology prompting (issue 17): findings from masks and metadata, reports, dropout, errors."""

import random
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from diffmask.config import CONFIG_PATH
from diffmask.domains.chest import (
    AnatomyPathologyPrompts,
    FindingsSource,
    PhantomSource,
    chest_prompt_builder,
    derive_findings,
    measure_mask,
)
from diffmask.domains.recorded import prompt_builder_from_dict
from diffmask.synthesis.requests import draw_requests

CLASSES = ["left lung", "right lung", "heart"]


def _builder(**overrides) -> AnatomyPathologyPrompts:
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("fit_diffusion", overrides=["prompts=anatomy_pathology", "prompts.embedder=null",
                                                  *[f"prompts.{k}={v}" for k, v in overrides.items()]])
    return instantiate(cfg.prompts, class_names=list(cfg.data.class_names))


def _phantom_label(heart_width: int, size: int = 100) -> np.ndarray:
    """Lungs spanning columns 10..89 (thoracic width 80), a heart of the given width at the centre."""
    label = np.zeros((size, size), np.uint8)
    label[20:80, 10:45] = 2  # the patient's right lung: the image's left
    label[20:80, 55:90] = 1  # left lung
    x0 = 50 - heart_width // 2 + 4  # a little toward the patient's left
    label[55:85, x0:x0 + heart_width] = 3
    return label


@pytest.mark.parametrize("width, word", [(32, "normal"), (42, "borderline"), (48, "enlarged")])
def test_heart_size_word_from_a_phantom_mask_with_a_known_heart_width(width, word):
    m = measure_mask(_phantom_label(width))
    assert m.ctr == pytest.approx(width / 80)
    assert m.lung_height == pytest.approx(0.6)
    assert 0.8 < m.area_ratio < 1.0  # the heart covers more of the left lung
    assert m.heart_offset > 0  # toward the patient's left (image right)
    builder = _builder()
    assert builder.derive({}, _phantom_label(width))["heart_size"] == word
    assert derive_findings({"sex": "F", "age": "67", "finding": "lung nodule",
                            "diagnosis": "metastasis o f colon cancer"}, builder.rules) == {
        "sex": "female", "age_group": "elderly", "nodule": "nodule", "diagnosis": "metastasis"}


def test_reports_name_every_class_once_and_are_the_same_for_the_same_seed():
    a, b, c = _builder(), _builder(), _builder(seed=1)
    meta = {
        "sex": "M",
        "age": "45",
        "finding": "no nodule",
        "heart_size": "enlarged",
        "lung_symmetry": "symmetric",
    }
    reports_a = [a.build(meta, rng=random.Random(i)).text for i in range(6)]
    assert reports_a == [b.build(meta, rng=random.Random(i)).text for i in range(6)]
    sentences_a = [r.sentences for r in a.candidates(a.findings(meta))]
    assert sentences_a != [r.sentences for r in c.candidates(c.findings(meta))]
    for i in range(6):
        built = a.build(meta, rng=random.Random(i))
        assert [built.text[s:e] for s, e in built.class_spans] == CLASSES
        assert built.text.count("heart") == 1 and built.text.startswith(("chest", "frontal", "pa "))
        assert any(w in built.text for w in ("cardiomegaly", "enlarged cardiac", "increased cardiothoracic"))
    assert a.build(meta).text == a.build(meta).text  # no rng: the best-ranked candidate


def test_dropout_at_one_gives_the_neutral_prompt_and_no_metadata_is_the_neutral_prompt():
    builder = _builder()
    neutral = builder.neutral_prompt().text
    assert neutral == builder.build({"sex": "", "age": "", "finding": ""}).text  # a folder without metadata
    meta = {"sex": "F", "age": "30", "finding": "lung nodule", "heart_position": "midline"}
    rng = random.Random(0)
    all_dropped = {f: True for f in builder.findings(meta)}
    assert {builder.build(meta, rng=rng, drop_fields=1.0).text for _ in range(20)} <= {
        builder._text(r, all_dropped)[0] for r in builder.candidates(builder.findings(meta))
    }
    for _ in range(5):
        dropped = builder.build(meta, rng=rng, drop_fields=1.0).text
        assert "female" not in dropped and "woman" not in dropped and "nodul" not in dropped
    # the neutral prompt holds only the opener and the class sentence
    assert neutral.count(".") == 2


def test_ranking_puts_the_candidate_closest_to_the_findings_first():
    class WordOverlap:  # a stand-in embedder: bag of words, unit rows
        def encode(self, texts):
            vocab = sorted({w for t in texts for w in t.replace(".", " ").replace(";", " ").split()})
            x = np.array([[t.replace(".", " ").split().count(w) for w in vocab] for t in texts], float)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    builder = _builder()
    builder.embedder = WordOverlap()
    findings = {"heart_size": "enlarged", "lung_volume": "low"}
    ranked = builder.candidates(findings)
    emb = WordOverlap().encode([builder.statement(findings)] + [builder._text(r, {})[0] for r in ranked])
    scores = emb[1:] @ emb[0]
    assert list(scores) == sorted(scores, reverse=True) and len(ranked) == 8


def test_bad_findings_and_grammar_are_clear_errors():
    builder = _builder()
    with pytest.raises(ValueError, match="findings: unknown finding 'heart_sise'"):
        builder.check_findings({"heart_sise": "enlarged"})
    with pytest.raises(ValueError, match=r"findings.heart_size: unknown value 'huge'; expected one of"):
        builder.check_findings({"heart_size": "huge"})
    with pytest.raises(ValueError, match="findings: unknown finding"):
        draw_requests(3, 0, builder, findings={"colour": "red"})
    with pytest.raises(InstantiationException, match="uses a class phrase"):
        _builder(**{"grammar.heart_size.normal": "[normal heart.]"})
    with pytest.raises(InstantiationException, match="every variant must contain"):
        _builder(**{"grammar.classes": "[lungs shown.]"})
    with pytest.raises(ValueError, match="anatomy findings need the classes"):
        measure_mask(np.zeros((8, 8)), ["background", "lung", "heart"])

    with pytest.raises(ValueError, match="asked findings need a model fitted with prompts=anatomy_pathology"):
        draw_requests(2, 0, chest_prompt_builder(), findings={"heart_size": "enlarged"})


def test_generation_draws_findings_from_the_training_images_and_takes_asked_ones():
    builder = _builder()
    source = PhantomSource(size=64, num_train=6, num_val=1, num_test=1)
    ids = source.ids("train")
    labelled = {sid: {k: v for k, v in builder.derive(source.load(sid).meta, source.load(sid).label).items()
                      if k == "heart_size"} for sid in ids[:2]}
    wrapped = FindingsSource(source, labelled)
    assert wrapped.load(ids[0]).meta["heart_size"] and "heart_size" not in wrapped.load(ids[3]).meta
    builder.learn_values([wrapped.load(s).meta for s in ids])
    assert len(builder.findings_table) == 6 and sum("heart_size" in f for f in builder.findings_table) == 2
    requests = draw_requests(12, 0, builder, findings={"heart_size": "enlarged"})
    assert all(r.meta["heart_size"] == "enlarged" for r in requests)
    assert all(any(w in r.prompt for w in ("cardiomegaly", "enlarged cardiac", "increased cardiothoracic"))
               for r in requests)
    assert {r.meta.get("sex") for r in draw_requests(30, 1, builder)} == {"male", "female"}
    # what diffmask.json records rebuilds the same builder
    again = prompt_builder_from_dict(builder.to_dict())
    assert isinstance(again, AnatomyPathologyPrompts) and again.findings_table == builder.findings_table
    assert again.build(requests[0].meta).text == builder.build(requests[0].meta).text
    assert Path(CONFIG_PATH, "prompts", "anatomy_pathology.yaml").is_file()


TINY_FIT = [
    "data=phantom", "data.size=32", "data.batch_size=4", "data.num_workers=0", "data.real.num_train=4",
    "data.real.num_val=2", "data.real.num_test=2", "trainer.enable_progress_bar=false", "logger=csv",
    "trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.check_val_every_n_epoch=1",
    "diffusion.components.block_out_channels=[16,32]", "diffusion.components.layers_per_block=1",
    "diffusion.components.attention_heads=2", "diffusion.components.cross_attention_dim=32",
    "diffusion.components.norm_num_groups=8", "diffusion.components.text_hidden_size=32",
    "diffusion.components.text_layers=1", "diffusion.components.text_heads=2",
    "diffusion.components.text_intermediate_size=32",
    "prompts=anatomy_pathology", "prompts.embedder=null", "diffusion.align.label_fraction=0.5",
]


def test_fit_with_anatomy_prompts_then_generate_with_asked_findings(tmp_path):
    import json

    from omegaconf import open_dict

    from diffmask.cli.fit_diffusion import run as fit_diffusion
    from diffmask.cli.generate import run as generate
    from diffmask.data import read_manifest

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        fit_cfg = compose("fit_diffusion", overrides=[*TINY_FIT, "name=ap"])
        gen_cfg = compose("generate", overrides=[
            "data=phantom", "data.size=32", "trainer.enable_progress_bar=false", "steps=2", "batch_size=2",
            f"input_dir={tmp_path}/artifacts/diffusion/ap", "num_samples=3", "name=big_heart",
            "findings={heart_size: enlarged}"])
    for cfg in (fit_cfg, gen_cfg):
        with open_dict(cfg):
            cfg.paths.artifact_dir = str(tmp_path / "artifacts")
            cfg.paths.output_dir = str(tmp_path / "run")
    fit_diffusion(fit_cfg)
    exported = tmp_path / "artifacts" / "diffusion" / "ap" / "diffmask.json"
    spec = json.loads(exported.read_text())["prompt_builder"]
    assert spec["type"] == "anatomy_pathology" and spec["mask_findings"] == "labelled"
    # the masks of the 2 labelled images (label_fraction 0.5 of 4) gave findings; the others metadata only
    assert len(spec["findings_table"]) == 4 and sum("heart_size" in f for f in spec["findings_table"]) == 2
    generate(gen_cfg)
    rows = read_manifest(tmp_path / "artifacts" / "synthesis" / "big_heart" / "manifest.jsonl")
    assert len(rows) == 3 and all(r.meta["heart_size"] == "enlarged" for r in rows)
    assert all("left lung" in r.prompt and "heart" in r.prompt for r in rows)


def test_the_longest_report_fits_the_default_scratch_text_encoder_and_a_short_one_is_a_clear_error():
    from diffmask.prompts import build_prompt_tokenizer

    builder = _builder()
    text, n = builder.longest_report(build_prompt_tokenizer(builder.words(), model_max_length=64))
    assert n <= 64 and all(w in text for w in CLASSES)
    with pytest.raises(ValueError, match=rf"the longest report has {n} tokens, the text encoder takes 32"):
        builder.check_length(build_prompt_tokenizer(builder.words(), model_max_length=32))
