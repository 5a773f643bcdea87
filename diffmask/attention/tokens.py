"""Find the token positions of class phrases in a tokenised prompt (for the attention store)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["phrase_positions", "class_token_positions"]


def phrase_positions(token_ids: Sequence[int], phrase_ids: Sequence[int]) -> list[int]:
    """Positions of the first occurrence of ``phrase_ids`` as a contiguous run in ``token_ids``.

    Raises:
        ValueError: the phrase is empty or does not occur in the prompt.
    """
    ids, sub = list(token_ids), list(phrase_ids)
    if not sub:
        raise ValueError("phrase_ids: empty phrase")
    for start in range(len(ids) - len(sub) + 1):
        if ids[start : start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"phrase tokens {sub} do not occur in the prompt tokens {ids}")


def class_token_positions(tokenizer, prompt: str, phrases: Sequence[str]) -> tuple[list[list[int]], int]:
    """Token positions of each class phrase in ``prompt`` and the prompt's real token count.

    Args:
        tokenizer: a Hugging Face tokenizer (adds BOS/EOS like CLIP's).
        prompt: the full prompt.
        phrases: one phrase per class, e.g. ``["left lung", "right lung", "heart"]``.

    Returns:
        (positions, prompt_length): ``positions[k]`` lists the token positions of phrase k in the
        encoded prompt; ``prompt_length`` counts the prompt's tokens including BOS/EOS, to pass
        as ``prompt_lengths`` to :meth:`CrossAttentionStore.set_tokens`.

    Raises:
        ValueError: a phrase is not in the prompt (the message names it).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    positions = []
    for phrase in phrases:
        phrase_ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        try:
            positions.append(phrase_positions(prompt_ids, phrase_ids))
        except ValueError as err:
            raise ValueError(f"class phrase {phrase!r} is not in the prompt {prompt!r}: {err}") from None
    return positions, len(prompt_ids)
