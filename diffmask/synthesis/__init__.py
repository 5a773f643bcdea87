"""Synthesis: sample a trained diffusion model into a dataset folder (PNGs + manifest).

The generate stage's logic lives here: :mod:`~diffmask.synthesis.kinds` plans a run (sampler +
requests, one function per kind), :mod:`~diffmask.synthesis.labels` builds its mask maker, quality
filter and affinity pass, :mod:`~diffmask.synthesis.stage` samples it into the stage folder
(:func:`~diffmask.synthesis.generate.generate_samples`) and commits it.
"""

from diffmask.synthesis.generate import generate_samples
from diffmask.synthesis.module import MaskMaker, SynthesisLitModule
from diffmask.synthesis.quality import MaskQualityFilter
from diffmask.synthesis.requests import (
    GenerationRequest,
    RequestDataset,
    collate_requests,
    draw_requests,
    requests_from_prompts,
)
from diffmask.synthesis.writer import SyntheticWriter, load_class_maps, read_done_rows, read_dropped

__all__ = [
    "generate_samples",
    "MaskMaker",
    "SynthesisLitModule",
    "GenerationRequest",
    "RequestDataset",
    "collate_requests",
    "draw_requests",
    "requests_from_prompts",
    "MaskQualityFilter",
    "SyntheticWriter",
    "load_class_maps",
    "read_done_rows",
    "read_dropped",
]
