"""A model's recorded prompt builder, rebuilt: the generic one, or the domain builder it names.

A diffusion model records its prompt builder in ``diffmask.json`` (``to_dict``). Rebuilding it may
need a domain's builder (the chest anatomy-pathology reports) or a domain's defaults (a chest model
recorded before prompts came from the dataset config), so this lookup sits above the domain
packages; the generic :mod:`diffmask.prompts` does not import any domain.
"""

from __future__ import annotations

from collections.abc import Mapping

from diffmask.domains.chest.anatomy import AnatomyPathologyPrompts
from diffmask.domains.chest.prompt import CHEST_PROMPT
from diffmask.prompts.builder import PromptBuilder

__all__ = ["legacy_builder_spec", "prompt_builder_from_dict"]


def legacy_builder_spec(spec: Mapping[str, object]) -> dict:
    """Today's :class:`PromptBuilder` arguments for a recorded ``to_dict``.

    A spec recorded before prompts were described by the dataset config (keys ``neutral``,
    ``sex_words``, ``age_format``: always a chest X-ray model) gets the chest prompt's fields and
    modality for what it lacks; today's specs are returned unchanged.

    Args:
        spec: the recorded ``to_dict`` of a :class:`PromptBuilder`.

    Returns:
        Keyword arguments of :class:`PromptBuilder`.
    """
    spec = dict(spec)
    if "fields" in spec or not {"neutral", "sex_words", "age_format"} & set(spec):
        return spec
    chest = CHEST_PROMPT["fields"]
    neutral = {**{k: v["neutral"] for k, v in chest.items()}, **dict(spec.pop("neutral", None) or {})}
    fields = {k: {"neutral": v} for k, v in neutral.items()}
    fields["sex"]["words"] = dict(spec.pop("sex_words", None) or chest["sex"]["words"])
    age_format = str(spec.pop("age_format", "{age} year old")).replace("{age}", "{value}")
    fields["age"].update(format=age_format, numeric=True)
    return {"modality": CHEST_PROMPT["modality"], **spec, "fields": fields}


def prompt_builder_from_dict(spec: Mapping[str, object]) -> PromptBuilder | AnatomyPathologyPrompts:
    """The prompt builder recorded in a model's ``diffmask.json``.

    Args:
        spec: the recorded ``to_dict`` of a :class:`PromptBuilder`, or of the chest
            :class:`~diffmask.domains.chest.anatomy.AnatomyPathologyPrompts` (``type`` names it).

    Returns:
        The builder, ready to fill prompts as the model was fitted with.
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == AnatomyPathologyPrompts.TYPE:
        from diffmask.prompts.retrieval import MiniLMEmbedder  # noqa: PLC0415 - loads a text model when ranking

        rank = spec.pop("rank", False)
        return AnatomyPathologyPrompts(**spec, embedder=MiniLMEmbedder() if rank else None)
    return PromptBuilder(**legacy_builder_spec(spec))
