"""Prompts for images from another hospital: field dropout at fit, unseen metadata values made neutral."""

from __future__ import annotations

import random

import pytest

from diffmask.domains.chest import chest_prompt_builder
from diffmask.prompts import PromptBuilder

NEUTRAL = "a chest x-ray of a adult patient, unspecified finding, showing the left lung, right lung and heart"


def test_field_dropout_at_one_gives_the_neutral_prompt_and_is_seeded():
    builder = chest_prompt_builder()
    meta = {"sex": "F", "age": "61", "finding": "lung nodule"}
    assert builder.build(meta, rng=random.Random(0), drop_fields=1.0).text == NEUTRAL
    assert builder.build(meta, rng=random.Random(0), drop_fields=0.0).text == (
        "a chest x-ray of a 61 year old female, lung nodule, showing the left lung, right lung and heart")
    draws = [builder.build(meta, rng=random.Random(5), drop_fields=0.5).text for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same prompt
    rng = random.Random(1)
    texts = {builder.build(meta, rng=rng, drop_fields=0.5).text for _ in range(40)}
    assert NEUTRAL in texts and len(texts) > 2  # fields drop independently
    assert builder.build(meta, drop_fields=1.0).text != NEUTRAL  # no rng (evaluation): nothing dropped
    with pytest.raises(ValueError, match="drop_fields"):
        builder.build(meta, rng=random.Random(0), drop_fields=1.5)


def test_values_the_model_never_saw_become_neutral_words():
    builder = chest_prompt_builder()
    builder.learn_values(
        [{"sex": "M", "age": "53", "finding": "lung nodule"}, {"sex": "F", "age": "", "finding": "no nodule"}]
    )
    assert builder.known_values["sex"] == ["female", "male"]
    assert builder.known_values["finding"] == ["lung nodule", "no nodule"]
    # Montgomery's metadata: no sex or age, a finding JSRT never had
    assert builder.build({"sex": "", "age": "", "finding": "tuberculosis"}).text == NEUTRAL
    assert builder.build({"sex": "M", "age": "53", "finding": "tuberculosis"}).text.startswith(
        "a chest x-ray of a 53 year old male, unspecified finding")
    # an unseen age
    assert builder.build({"sex": "M", "age": "70"}).text.startswith("a chest x-ray of a adult male")
    restored = PromptBuilder(**builder.to_dict())
    assert restored.known_values == builder.known_values
    unrestricted = PromptBuilder(**{**builder.to_dict(), "known_values": None})
    assert unrestricted.build({"finding": "tuberculosis"}).text != NEUTRAL
    with pytest.raises(ValueError, match="known_values: unknown field"):
        chest_prompt_builder(known_values={"colour": ["red"]})
