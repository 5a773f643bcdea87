"""Cross-attention capture (processor, recorder, aggregating store)."""

from diffmask.attention.extract import extract_class_maps
from diffmask.attention.processor import (
    AttentionRecorder,
    AttentionSink,
    CrossAttentionCaptureProcessor,
    capture_cross_attention,
    cross_attention_layers,
    grid_from_tokens,
)
from diffmask.attention.store import CrossAttentionStore

__all__ = [
    "AttentionRecorder",
    "AttentionSink",
    "CrossAttentionCaptureProcessor",
    "CrossAttentionStore",
    "extract_class_maps",
    "capture_cross_attention",
    "cross_attention_layers",
    "grid_from_tokens",
]
