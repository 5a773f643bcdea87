"""An offline CLIP-BPE tokenizer whose merges spell the prompt vocabulary as whole words.

No download: the vocabulary holds every single character (so any text tokenizes) plus BPE
merges trained on the known words, so prompt words become single tokens. It is a transformers
``CLIPTokenizer`` — the class Stable Diffusion uses — so scratch and pretrained models share one
code path and an exported scratch model reloads with plain ``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Mapping

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

__all__ = ["PROMPT_WORDS", "build_prompt_tokenizer", "prompt_vocabulary"]

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words likely in chest X-ray prompts beyond the templates; more can be passed in.
PROMPT_WORDS = (
    "a an the of with and showing chest x ray radiograph frontal pa view patient male female adult "
    "year old left right lung lungs heart nodule no normal cancer benign malignant mass granuloma "
    "unknown diagnosis finding unspecified"
).split()
# CLIP's pre-tokenizer splits letters, single digits and punctuation apart; merges act inside letter runs.
_PIECE = re.compile(r"[a-z]+")


def prompt_vocabulary(words: Iterable[str] = (), metas: Iterable[Mapping[str, object]] = ()) -> list[str]:
    """Sorted lower-case words from ``words``, :data:`PROMPT_WORDS` and the values of ``metas``."""
    found = set(PROMPT_WORDS)
    for w in words:
        found.update(_PIECE.findall(str(w).lower()))
    for meta in metas:
        for v in meta.values():
            found.update(_PIECE.findall(str(v).lower()))
    return sorted(found)


def build_prompt_tokenizer(words: Iterable[str], model_max_length: int = 64) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over single characters plus whole-word merges of ``words``.

    Args:
        words: words to keep whole (letters only are merged; other characters stay single tokens).
        model_max_length: padded sequence length, BOS and EOS included.

    Returns:
        A tokenizer that saves/reloads with ``save_pretrained``/``from_pretrained``.
    """
    if model_max_length < 4:
        raise ValueError(f"model_max_length: expected at least 4 tokens, got {model_max_length}")
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = sorted({p for w in words for p in _PIECE.findall(str(w).lower())})
    # Merges are learnt by BPE training on the word list (each word once): BPE applies merges by
    # global rank, so hand-made per-word merge chains would break each other; trained merges
    # run until no pair is left, i.e. every listed word ends as one token.
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=0, initial_alphabet=list(chars), end_of_word_suffix="</w>",
        show_progress=False, special_tokens=[],
    )
    bpe.train_from_iterator(pieces, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for c in chars:  # every character, alone and word-final, so any text tokenizes
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    vocab.setdefault(BOS, len(vocab))
    vocab.setdefault(EOS, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
