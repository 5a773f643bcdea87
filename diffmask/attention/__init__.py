"""Attention capture: cross-attention (processor, recorder, aggregating store) and self-attention."""

from diffmask.attention.extract import extract_class_maps
from diffmask.attention.processor import (
    AttentionRecorder,
    AttentionSink,
    CrossAttentionCaptureProcessor,
    capture_cross_attention,
    cross_attention_layers,
    grid_from_tokens,
)
from diffmask.attention.self_attention import SelfAttentionStore, self_attention_layers
from diffmask.attention.store import CrossAttentionStore

__all__ = [
    "AttentionRecorder",
    "AttentionSink",
    "CrossAttentionCaptureProcessor",
    "CrossAttentionStore",
    "SelfAttentionStore",
    "extract_class_maps",
    "capture_cross_attention",
    "cross_attention_layers",
    "grid_from_tokens",
    "self_attention_layers",
]
