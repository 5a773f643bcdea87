"""Prompts: text built from metadata and class words, with the token positions of each class.

The chest anatomy-pathology reports are in :mod:`diffmask.domains.chest.anatomy`."""

from diffmask.prompts.builder import (
    BuiltPrompt,
    PromptBuilder,
    class_token_positions,
    locate_class_words,
)
from diffmask.prompts.retrieval import (
    CLIPTextEmbedder,
    MiniLMEmbedder,
    PromptCorpus,
    PromptRetriever,
    RetrievedPrompt,
    TextEmbedder,
)
from diffmask.prompts.tokenizer import PROMPT_WORDS, build_prompt_tokenizer, prompt_vocabulary

__all__ = [
    "BuiltPrompt",
    "PromptBuilder",
    "class_token_positions",
    "locate_class_words",
    "PROMPT_WORDS",
    "build_prompt_tokenizer",
    "prompt_vocabulary",
    "CLIPTextEmbedder",
    "MiniLMEmbedder",
    "PromptCorpus",
    "PromptRetriever",
    "RetrievedPrompt",
    "TextEmbedder",
]
