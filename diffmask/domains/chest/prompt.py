"""The chest X-ray prompt: JSRT's metadata fields (sex, age, finding, diagnosis) as words.

:data:`CHEST_PROMPT` is what ``conf/data/base/chest.yaml``'s ``prompt`` block says (the configs
read that block; Python code, tests and old saved models read this one). :data:`SEX_WORDS` is the
one mapping of JSRT's raw ``sex`` values to words, shared by the prompt, the anatomy findings and
the attribute judge of ``diffmask-evaluate-synthesis``.
"""

from __future__ import annotations

from diffmask.domains.chest.labels import CHEST_CLASS_NAMES
from diffmask.prompts.builder import PromptBuilder

__all__ = ["CHEST_PROMPT", "SEX_WORDS", "chest_prompt_builder"]

# lower-cased raw metadata value -> word (JSRT writes M / F)
SEX_WORDS: dict[str, str] = {"m": "male", "male": "male", "f": "female", "female": "female"}

CHEST_PROMPT: dict = {
    "templates": ("{modality} of a {age} {sex}, {finding}, showing the {classes}",),
    "modality": "a chest x-ray",
    "fields": {
        "sex": {"neutral": "patient", "words": SEX_WORDS},
        "age": {"neutral": "adult", "format": "{value} year old", "numeric": True},
        "finding": {"neutral": "unspecified finding"},
        "diagnosis": {"neutral": "unknown diagnosis"},
    },
}


def chest_prompt_builder(**overrides) -> PromptBuilder:
    """A :class:`~diffmask.prompts.PromptBuilder` of the chest prompt and the chest class names;
    ``overrides`` replace any constructor argument (``templates=[...]``, ``class_names=[...]``)."""
    return PromptBuilder(**{**CHEST_PROMPT, "class_names": CHEST_CLASS_NAMES, **overrides})
