"""Text-conditioned diffusion: model parts, training module with attention alignment, samplers."""

from diffmask.diffusion.alignment import AttentionAlignment, attention_alignment_loss, class_token_index
from diffmask.diffusion.components import (
    DiffusionComponents,
    build_scratch_components,
    check_resolution,
    load_components,
)
from diffmask.diffusion.module import DiffusionLitModule, encode_prompts
from diffmask.diffusion.sampler import (
    ControlledSampler,
    GenerationOutput,
    Sampler,
    TextToImageSampler,
    VariationSampler,
)

__all__ = [
    "AttentionAlignment",
    "attention_alignment_loss",
    "class_token_index",
    "DiffusionComponents",
    "build_scratch_components",
    "check_resolution",
    "load_components",
    "DiffusionLitModule",
    "encode_prompts",
    "GenerationOutput",
    "Sampler",
    "TextToImageSampler",
    "ControlledSampler",
    "VariationSampler",
]
