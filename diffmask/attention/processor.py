"""A diffusers attention processor that exposes cross-attention probabilities.

``AttnProcessor2_0`` (SDPA) never materialises the probabilities, so the capturing processor
computes them explicitly (as diffusers' ``AttnProcessor`` does) and hands them to a sink; its
output matches the default processor. Only cross-attention layers (``attn2``) are replaced, and
:func:`capture_cross_attention` restores the original processors on exit. A sink that carries a
self-attention store (its ``self_attention`` attribute, a
:class:`~diffmask.attention.self_attention.SelfAttentionStore`, as a refinement chain with a
``self_affinity`` step sets) has that store's capture opened too, on the ``attn1`` layers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

__all__ = [
    "AttentionSink",
    "CrossAttentionCaptureProcessor",
    "cross_attention_layers",
    "capture_cross_attention",
    "AttentionRecorder",
]


class AttentionSink(Protocol):
    """Anything that receives the attention probabilities a capturing processor computes."""

    def record(self, layer: str, probs: torch.Tensor, spatial: tuple[int, int] | None) -> None:
        """Receive one layer's probabilities.

        Args:
            layer: processor name, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor``.
            probs: (B, heads, Q, T) attention probabilities over T text tokens for Q pixels.
            spatial: (h, w) of the pixel grid when the layer saw a 4-D input, else None
                (then Q = h*w with the aspect ratio of the UNet input).
        """


class CrossAttentionCaptureProcessor:
    """Same computation as diffusers' ``AttnProcessor``, plus ``sink.record(...)`` of the probabilities."""

    def __init__(self, name: str, sink: AttentionSink):
        self.name = name
        self.sink = sink

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        spatial = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            spatial = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, Q, T)
        heads_probs = probs.view(batch_size, attn.heads, probs.shape[1], probs.shape[2])
        self.sink.record(self.name, heads_probs, spatial)

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Names (keys of ``unet.attn_processors``) of every cross-attention layer (``attn2``)."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextlib.contextmanager
def capture_cross_attention(
    unet: torch.nn.Module,
    sink: AttentionSink,
    layers: list[str] | None = None,
    layer_filter: Callable[[str], bool] | None = None,
) -> Iterator[list[str]]:
    """Install capturing processors on cross-attention layers; restore the originals on exit.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (scratch or Stable Diffusion).
        sink: receives the probabilities (see :class:`AttentionSink`).
        layers: exact processor names to capture (default: every ``attn2`` layer).
        layer_filter: optional predicate on names, applied after ``layers``.

    When ``sink`` has a ``self_attention`` attribute that is not None (a
    :class:`~diffmask.attention.self_attention.SelfAttentionStore`), its capture of the
    self-attention layers is opened as well (it leaves their outputs unchanged).

    Yields:
        The captured cross-attention layer names.

    Raises:
        ValueError: a requested layer does not exist or is not a cross-attention layer, nothing
            is left to capture, or a self-attention store is attached to a UNet without
            self-attention (``only_cross_attention=true``).
    """
    original = dict(unet.attn_processors)
    available = cross_attention_layers(unet)
    if layers is None:
        chosen = list(available)
    else:
        unknown = [n for n in layers if n not in available]
        if unknown:
            raise ValueError(
                f"attention layers {unknown} are not cross-attention layers of this UNet; "
                f"available: {available}"
            )
        chosen = list(layers)
    if layer_filter is not None:
        chosen = [n for n in chosen if layer_filter(n)]
    if not chosen:
        raise ValueError(f"no cross-attention layer selected for capture (available: {available})")
    procs = dict(original)  # set_attn_processor pops from the dict it gets: pass a copy
    for name in chosen:
        procs[name] = CrossAttentionCaptureProcessor(name, sink)
    self_store = getattr(sink, "self_attention", None)
    if self_store is not None:
        self_store.select_layers(unet)  # a clear error before anything is replaced
    unet.set_attn_processor(procs)
    try:
        with contextlib.nullcontext() if self_store is None else self_store.capture(unet):
            yield chosen
    finally:
        unet.set_attn_processor(dict(original))


class AttentionRecorder:
    """A sink that keeps, for each layer, the head-averaged maps of chosen token positions.

    Keeps the autograd graph, so it serves the attention-alignment loss during training.
    Call :meth:`clear` between steps.

    The token positions, a (B, K) long tensor giving for each batch item the position of each
    of K classes' tokens, are set before each forward pass with :meth:`set_tokens`.

    Args:
        aspect: (H, W) of the UNet input, used to recover the grid of 3-D inputs.
    """

    def __init__(self, aspect: tuple[int, int] = (1, 1)):
        self.aspect = aspect
        self.token_index: torch.Tensor | None = None
        self.maps: dict[str, torch.Tensor] = {}

    def set_tokens(self, token_index: torch.Tensor) -> None:
        """Choose the token positions whose maps the next forward pass keeps.

        Args:
            token_index: (B, K) long tensor: for each batch item, the token position of each
                of K classes.
        """
        self.token_index = token_index

    def clear(self) -> None:
        """Drop the recorded maps (and with them their autograd graph)."""
        self.maps = {}

    def record(self, layer: str, probs: torch.Tensor, spatial: tuple[int, int] | None) -> None:
        """Keep the head-averaged maps of the chosen tokens as ``maps[layer]``, (B, K, h, w).

        Args:
            layer: processor name of the layer.
            probs: (B', heads, Q, T) attention probabilities; with classifier-free guidance
                B' = 2B and only the conditional (last) half is kept.
            spatial: (h, w) of the pixel grid, or None to derive it from Q and ``aspect``.

        Raises:
            RuntimeError: :meth:`set_tokens` was not called.
        """
        if self.token_index is None:
            raise RuntimeError("AttentionRecorder: call set_tokens(token_index) before the forward pass")
        b, _, q, _ = probs.shape
        h, w = spatial if spatial is not None else grid_from_tokens(q, self.aspect)
        mean = probs.mean(dim=1)  # (B, Q, T), averaged over heads
        idx = self.token_index.to(probs.device)
        if idx.shape[0] != b:  # classifier-free guidance doubles the batch: keep the conditional half
            mean = mean[-idx.shape[0] :]
        picked = torch.gather(mean, 2, idx[:, None, :].expand(-1, q, -1))  # (B, Q, K)
        self.maps[layer] = picked.permute(0, 2, 1).reshape(idx.shape[0], idx.shape[1], h, w)


def grid_from_tokens(q: int, aspect: tuple[int, int]) -> tuple[int, int]:
    """(h, w) with h*w = q and h/w = aspect[0]/aspect[1]."""
    ah, aw = aspect
    h = round((q * ah / aw) ** 0.5)
    if h == 0 or q % h:
        raise ValueError(f"cannot lay {q} attention queries on a grid with aspect {ah}:{aw}")
    return h, q // h
