"""Cross-attention capture (processor, recorder, aggregating store)."""

from diffmask.attention.processor import (
    AttentionRecorder,
    AttentionSink,
    CrossAttentionCaptureProcessor,
    capture_cross_attention,
    cross_attention_layers,
    grid_from_tokens,
)

__all__ = [
    "AttentionRecorder",
    "AttentionSink",
    "CrossAttentionCaptureProcessor",
    "capture_cross_attention",
    "cross_attention_layers",
    "grid_from_tokens",
]
