import pytest
from transformers import CLIPTokenizer

from diffmask.domains.chest import JSRTSource, PhantomSource, chest_prompt_builder
from diffmask.prompts import PromptBuilder, build_prompt_tokenizer, class_token_positions, prompt_vocabulary


def _decoded(tokenizer, text, positions):
    ids = tokenizer(text)["input_ids"]
    return [tokenizer.decode([ids[p] for p in pos]).strip() for pos in positions]


def test_prompt_from_metadata_names_each_class_at_its_span():
    builder = chest_prompt_builder()
    p = builder.build({"sex": "M", "age": "53", "finding": "lung nodule", "diagnosis": "lung cancer"})
    assert p.text == (
        "a chest x-ray of a 53 year old male, lung nodule, showing the left lung, right lung and heart"
    )
    assert [p.text[a:b] for a, b in p.class_spans] == ["left lung", "right lung", "heart"]


def test_missing_or_odd_metadata_gives_neutral_words():
    builder = chest_prompt_builder(templates=["{sex} {age} {finding} {diagnosis}: {classes}"])
    p = builder.build({"sex": "", "age": "unknown", "finding": None})
    assert p.text.startswith("patient adult unspecified finding unknown diagnosis: left lung")
    assert builder.build(None).text == p.text
    assert builder.build({"sex": "X"}).text == p.text


def test_real_jsrt_metadata_builds_prompts_that_fit_the_tokenizer(jsrt_dir):
    """JSRT's own words (its findings and diagnoses, e.g. 'pulmonary he matoma') keep the class phrases
    whole."""
    src = JSRTSource(jsrt_dir)
    metas = [src._rows[i] for i in src.ids("train")]
    builder = chest_prompt_builder()
    tok = build_prompt_tokenizer(prompt_vocabulary(builder.words(), metas), model_max_length=64)
    for meta in metas[:40]:
        built = builder.build(meta)
        decoded = _decoded(tok, built.text, class_token_positions(tok, built))
        assert decoded == ["left lung", "right lung", "heart"]


def test_scratch_tokenizer_keeps_words_whole_and_reloads(tmp_path):
    tok = build_prompt_tokenizer(prompt_vocabulary(["emphysema"]), model_max_length=32)
    ids = tok("Emphysema, left lung")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["emphysema</w>", ",</w>", "left</w>", "lung</w>"]
    # unknown words still tokenize (as pieces), nothing is lost
    assert tok.decode(tok("zyx")["input_ids"], skip_special_tokens=True).replace(" ", "") == "zyx"
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("Emphysema, left lung")["input_ids"] == ids
    assert again.model_max_length == 32


def test_multi_token_class_phrase_gives_all_its_positions():
    # a tokenizer that never saw "heart" splits it into pieces: all of them are returned
    tok = build_prompt_tokenizer(["left", "lung", "right"], model_max_length=64)
    builder = chest_prompt_builder(templates=["{classes}"])
    built = builder.build({})
    pos = class_token_positions(tok, built)
    assert len(pos[0]) == 2 and len(pos[1]) == 2
    assert len(pos[2]) > 1
    ids = tok(built.text)["input_ids"]
    assert "".join(tok.convert_ids_to_tokens([ids[i] for i in pos[2]])) == "heart</w>"


def test_prompt_longer_than_tokenizer_is_a_clear_error():
    tok = build_prompt_tokenizer(prompt_vocabulary(), model_max_length=12)
    built = chest_prompt_builder().build({"sex": "F", "age": "70"})
    with pytest.raises(ValueError, match="more than the tokenizer's maximum of 12"):
        class_token_positions(tok, built)


def test_bad_templates_and_missing_class_phrases_are_errors():
    with pytest.raises(ValueError, match=r"\{classes\}"):
        chest_prompt_builder(templates=["a chest x-ray of a {sex}"])
    with pytest.raises(ValueError, match="unknown field"):
        chest_prompt_builder(templates=["{weight} {classes}"])
    builder = chest_prompt_builder()
    spans = builder.locate("Heart and LEFT lung, right lung").class_spans
    assert list(spans) == [(10, 19), (21, 31), (0, 5)]
    with pytest.raises(ValueError, match="'heart' not found"):
        builder.locate("left lung and right lung")


def test_random_template_choice_and_custom_classes():
    builder = chest_prompt_builder(
        templates=["x-ray: {classes}", "{classes} on a chest x-ray"], class_names=["background", "heart"]
    )
    import random

    texts = {builder.build({}, rng=random.Random(s)).text for s in range(20)}
    assert texts == {"x-ray: heart", "heart on a chest x-ray"}
    meta = PhantomSource(size=16).load("train0000").meta
    assert builder.build(meta, template=1).class_spans == ((0, 5),)


def test_a_class_the_metadata_says_is_absent_is_not_named_and_has_no_token():
    from diffmask.prompts import build_prompt_tokenizer, class_token_positions

    builder = PromptBuilder(
        ["{modality}, {pathology}, showing the {classes}"], ["background", "organ", "lesion"],
        modality="a breast ultrasound image", fields={"pathology": {"neutral": "breast tissue"}},
        absent_when={"lesion": {"pathology": ["normal"]}}, none_phrase="normal tissue",
    )
    ill, normal = builder.build({"pathology": "Benign"}), builder.build({"pathology": "normal"})
    assert ill.text == "a breast ultrasound image, benign, showing the organ and lesion"
    assert normal.text == "a breast ultrasound image, normal, showing the organ"
    assert normal.class_spans[1] is None
    # a dropped field does not make the lesion reappear: absence is the image's own fact
    import random
    assert all(
        builder.build({"pathology": "normal"}, rng=random.Random(i), drop_fields=1.0).class_spans[1] is None
        for i in range(5)
    )
    assert builder.locate(normal.text).class_spans == normal.class_spans  # generation finds the same spans
    with pytest.raises(ValueError, match="'organ' not found"):
        # a class that is always there must be named
        builder.locate("a breast ultrasound image showing the lesion")
    tokenizer = build_prompt_tokenizer(builder.words())
    organ, lesion = class_token_positions(tokenizer, normal)
    assert organ and lesion == []
    only = PromptBuilder(
        ["{modality} with {classes}"],
        ["background", "lesion"],
        modality="a scan",
        fields={},
        absent_when={"lesion": {"finding": ["normal"]}},
        none_phrase="clear tissue",
    )
    assert only.build({"finding": "normal"}).text == "a scan with clear tissue"
    with pytest.raises(ValueError, match="none_phrase"):
        PromptBuilder(["{classes}"], ["background", "lesion"], "a scan", none_phrase="no lesion")
    restored = PromptBuilder(**builder.to_dict())
    assert restored.build({"pathology": "normal"}) == normal
    with pytest.raises(ValueError, match="absent_when"):
        chest_prompt_builder(absent_when={"tumour": {"finding": ["none"]}})
