"""Self-attention capture: the generator's own pixel-to-pixel affinity, read while it samples.

A transformer block's ``attn1`` attends from every pixel of its grid to every other one (when the
model was built with ``diffusion.components.only_cross_attention=false``); its probabilities,
averaged over heads, are an (HW x HW) row-stochastic affinity. Dataset Diffusion (NeurIPS 2023)
and DiffSegmenter refine cross-attention class maps by propagating them through it
(:mod:`diffmask.refine.self_affinity`).

The capturing processor *wraps* the layer's own processor: the layer's output is computed by the
original processor, untouched, so sampled images stay bit-identical; the probabilities are
computed beside it (again the query and key projections and a softmax per head), only for the
conditional half of a classifier-free-guidance batch, and only for the layers and steps the
store keeps. :class:`SelfAttentionStore` keeps one running sum per grid size (not one map per
step) and resamples to a common grid once, in :meth:`SelfAttentionStore.result`.

Typical use (beside a :class:`~diffmask.attention.CrossAttentionStore`, which forwards
``set_step`` and opens this capture in its own)::

    sa = SelfAttentionStore(batch_size=2, resolutions=[16, 32], grid=32)
    with sa.capture(unet):
        for i, t in enumerate(scheduler.timesteps):
            sa.set_step(i, int(t))
            unet(latents_in, t, encoder_hidden_states=emb)
    affinity = sa.result()        # (2, 1024, 1024), rows sum to 1
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from diffmask.attention.processor import grid_from_tokens
from diffmask.attention.store import check_windows, within_windows

__all__ = [
    "NO_SELF_ATTENTION",
    "SelfAttentionCaptureProcessor",
    "SelfAttentionStore",
    "resample_affinity",
    "has_self_attention",
    "self_attention_layers",
    "self_attention_probs",
]

NO_SELF_ATTENTION = (
    "this UNet has no self-attention in its down/up blocks: their attn1 layers attend to the text (a model "
    "built with diffusion.components.only_cross_attention=true; only the coarse mid block keeps one). The "
    "self_affinity refinement step needs the generator's self-attention: fit the model with "
    "diffusion.components.only_cross_attention=false (or false on some levels, e.g. [true,false,false]), "
    "or leave self_affinity out of the refinement steps"
)


def has_self_attention(unet: torch.nn.Module) -> bool:
    """Whether a down or up block of ``unet`` has a self-attention layer (the mid block alone does not count:
    diffusers keeps its self-attention whatever ``only_cross_attention`` says).

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
    """
    return any(not name.startswith("mid_block") for name in self_attention_layers(unet))


def self_attention_layers(unet: torch.nn.Module) -> list[str]:
    """Processor names (keys of ``unet.attn_processors``) of the UNet's self-attention layers.

    A layer counts when it is a transformer block's ``attn1`` that is not a cross-attention layer
    (with ``only_cross_attention=true`` every ``attn1`` attends to the text, and none counts).

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
    """
    names = []
    for name, module in unet.named_modules():
        if name.endswith("attn1") and hasattr(module, "processor") and not getattr(
            module, "is_cross_attention", False
        ):
            names.append(f"{name}.processor")
    return names


@torch.no_grad()
def self_attention_probs(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    keep: int | None = None,
    temb: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Head-averaged self-attention probabilities of a diffusers ``Attention`` layer's input.

    Recomputes the query/key projections (float32 softmax, one head at a time, so the transient
    memory is one (keep, Q, Q) map), never the layer's output.

    Args:
        attn: the ``Attention`` module (``attn1`` of a transformer block).
        hidden_states: its input, (B, Q, C) or (B, C, h, w).
        keep: the last ``keep`` batch items only (the conditional half under classifier-free
            guidance); None: all.
        temb: the time embedding, for layers with a spatial norm (not in UNet transformer blocks).

    Returns:
        ((keep, Q, Q) probabilities, rows summing to 1; (h, w) for a 4-D input, else None).
    """
    x = hidden_states
    if keep is not None and keep < x.shape[0]:
        x = x[-keep:]
        temb = None if temb is None else temb[-keep:]
    if getattr(attn, "spatial_norm", None) is not None:
        x = attn.spatial_norm(x, temb)
    spatial = None
    if x.ndim == 4:
        b, c, h, w = x.shape
        spatial = (h, w)
        x = x.reshape(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    query, key = attn.to_q(x), attn.to_k(x)
    b, q, _ = query.shape
    heads = int(attn.heads)
    query = query.view(b, q, heads, -1).transpose(1, 2)
    key = key.view(b, key.shape[1], heads, -1).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    scale = float(attn.scale)
    mean = None
    for h in range(heads):
        scores = torch.bmm(query[:, h].float(), key[:, h].float().transpose(1, 2)) * scale
        probs = scores.softmax(dim=-1)
        mean = probs if mean is None else mean.add_(probs)
    return mean / heads, spatial


def resample_affinity(
    affinity: torch.Tensor, source: tuple[int, int], target: tuple[int, int]
) -> torch.Tensor:
    """Resample (B, hw, hw) pixel-to-pixel maps from grid ``source`` to grid ``target``.

    Both the query and the key side are resampled (bilinear when enlarging, area averaging when
    shrinking); rows are re-normalised to sum to 1.

    Args:
        affinity: (B, h*w, h*w), rows = query pixels, columns = key pixels (row-major grids).
        source: (h, w) of ``affinity``'s grid.
        target: (H, W) of the result's grid.

    Returns:
        (B, H*W, H*W) float32, rows summing to 1.
    """
    b, q, k = affinity.shape
    h, w = source
    if q != h * w or k != h * w:
        raise ValueError(
            f"affinity: expected (B, {h * w}, {h * w}) for grid {source}, got {tuple(affinity.shape)}"
        )
    a = affinity.float()
    if tuple(target) != tuple(source):
        big, small = target[0] * target[1], h * w

        def _resize(x: torch.Tensor) -> torch.Tensor:
            if big > small:
                return F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
            return F.interpolate(x, size=tuple(target), mode="area")

        n = target[0] * target[1]
        a = _resize(a.reshape(b * q, 1, h, w)).reshape(b, q, n)  # key side
        a = _resize(a.transpose(1, 2).reshape(b * n, 1, h, w)).reshape(b, n, n).transpose(1, 2)  # query side
        a = a.clamp_min(0).contiguous()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class SelfAttentionCaptureProcessor:
    """Wraps a self-attention layer's processor: its output unchanged, its probabilities to a store.

    Args:
        name: the processor name (key of ``unet.attn_processors``).
        original: the layer's processor (it computes the output, so images stay bit-identical).
        sink: a :class:`SelfAttentionStore` (asked first whether it keeps this call).
    """

    def __init__(self, name: str, original, sink: SelfAttentionStore):
        self.name = name
        self.original = original
        self.sink = sink

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.original(attn, hidden_states, *args, **kwargs)
        if self.sink.wants(self.name, hidden_states):
            self.sink.record_layer(self.name, attn, hidden_states, kwargs.get("temb"))
        return out


class SelfAttentionStore:
    """Running mean of the generator's self-attention over heads, layers and steps, at one grid.

    Memory: one (B, hw, hw) float32 sum per grid size kept (e.g. B x 4096^2 floats for a 64x64
    layer), however many steps and layers; :meth:`result` resamples each to ``grid`` and averages
    them (every kept layer call weighs the same).

    Args:
        batch_size: the number of prompts B (a 2B batch is classifier-free guidance: the
            conditional, last half is kept). None: set with :meth:`set_batch_size`.
        resolutions: grid heights h of the layers to keep, or ``"all"``.
        layers: exact processor names to keep (None: every self-attention layer).
        name_contains: keep only layers whose name contains one of these strings (e.g.
            ``["up_blocks"]``); None: no name filter.
        grid: side (int) or (H, W) of the result's grid; None: the finest grid kept.
        step_window: ``[start, end)`` of step indices to keep (None: every step).
        timestep_window: ``[low, high]`` (inclusive) of timesteps to keep (None: every timestep).
        aspect: (H, W) ratio of the UNet input, to lay out the queries of 3-D inputs.

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    def __init__(
        self,
        batch_size: int | None = None,
        resolutions: Sequence[int] | str = "all",
        layers: Sequence[str] | None = None,
        name_contains: Sequence[str] | str | None = None,
        grid: int | Sequence[int] | None = None,
        step_window: Sequence[int] | None = None,
        timestep_window: Sequence[float] | None = None,
        aspect: Sequence[int] = (1, 1),
    ):
        if isinstance(resolutions, str):
            if resolutions != "all":
                raise ValueError(f"resolutions: expected 'all' or a list of grid sizes, got {resolutions!r}")
            self.resolutions: tuple[int, ...] | None = None
        else:
            self.resolutions = tuple(int(r) for r in resolutions)
            if not self.resolutions or min(self.resolutions) < 1:
                raise ValueError(
                    f"resolutions: expected a non-empty list of positive sizes, got {resolutions}"
                )
        if isinstance(grid, int):
            grid = (grid, grid)
        if grid is not None:
            grid = tuple(int(g) for g in grid)
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError(f"grid: expected None, a positive int or (H, W), got {grid}")
        step_window, timestep_window = check_windows(step_window, timestep_window)
        aspect = tuple(int(a) for a in aspect)
        if len(aspect) != 2 or min(aspect) < 1:
            raise ValueError(f"aspect: expected (H, W) of positive ints, got {aspect}")
        if isinstance(name_contains, str):
            name_contains = [name_contains]
        self.layers = None if layers is None else list(layers)
        self.name_contains = None if name_contains is None else [str(s) for s in name_contains]
        self.grid: tuple[int, int] | None = grid  # type: ignore[assignment]
        self.step_window = step_window
        self.timestep_window = timestep_window
        self.aspect: tuple[int, int] = aspect  # type: ignore[assignment]
        self.batch_size = None if batch_size is None else int(batch_size)
        self.seconds = 0.0  # time spent computing and adding the probabilities (GPU-synchronised)
        self.created = time.perf_counter()
        self._step: int | None = None
        self._timestep: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the accumulated maps and the time spent."""
        self._sums: dict[tuple[int, int], torch.Tensor] = {}  # grid -> (B, hw, hw) running sum
        self._counts: dict[tuple[int, int], int] = {}
        self._kept_layers: set[str] = set()
        self.seconds = 0.0

    def set_batch_size(self, batch_size: int) -> None:
        """Set the number of prompts B (a 2B attention batch keeps its last B items).

        Args:
            batch_size: B.
        """
        self.batch_size = int(batch_size)

    def set_step(self, step_index: int, timestep: float | None = None) -> None:
        """Tell the store which sampling step the next UNet call belongs to.

        Args:
            step_index: the step's index.
            timestep: its timestep (needed with ``timestep_window``).
        """
        self._step = int(step_index)
        self._timestep = None if timestep is None else float(timestep)

    def begin_step(self, step_index: int, timestep: float | None = None) -> None:
        """Alias of :meth:`set_step` (a sampler's ``on_step_begin`` hook).

        Args:
            step_index: the step's index.
            timestep: its timestep.
        """
        self.set_step(step_index, timestep)

    # ---------------------------------------------------------------- layers
    def select_layers(self, unet: torch.nn.Module) -> list[str]:
        """The self-attention layers of ``unet`` this store captures (by ``layers`` and ``name_contains``).

        Args:
            unet: a diffusers ``UNet2DConditionModel``.

        Raises:
            ValueError: the UNet has no self-attention in its down/up blocks (built with
                ``only_cross_attention=true``: diffusers keeps one in the mid block only), a configured
                layer is not one of its self-attention layers, or the filters leave none.
        """
        available = self_attention_layers(unet)
        if not has_self_attention(unet):
            raise ValueError(f"self-attention capture: {NO_SELF_ATTENTION}")
        chosen = list(available)
        if self.layers is not None:
            unknown = [n for n in self.layers if n not in available]
            if unknown:
                raise ValueError(
                    f"layers: {unknown} are not self-attention layers of this UNet; available: {available}"
                )
            chosen = list(self.layers)
        if self.name_contains is not None:
            chosen = [n for n in chosen if any(s in n for s in self.name_contains)]
        if not chosen:
            raise ValueError(
                f"name_contains={self.name_contains}: no self-attention layer left (available: {available})"
            )
        return chosen

    @contextlib.contextmanager
    def capture(self, unet: torch.nn.Module) -> Iterator[list[str]]:
        """Wrap the chosen self-attention processors of ``unet``; restore the originals on exit.

        Args:
            unet: a diffusers ``UNet2DConditionModel``.

        Yields:
            The captured layer names.
        """
        chosen = self.select_layers(unet)
        original = dict(unet.attn_processors)
        procs = dict(original)  # set_attn_processor pops from the dict it gets: pass a copy
        for name in chosen:
            procs[name] = SelfAttentionCaptureProcessor(name, original[name], self)
        unet.set_attn_processor(procs)
        try:
            yield chosen
        finally:
            unet.set_attn_processor(dict(original))

    # ---------------------------------------------------------------- sink
    def _grid_of(self, hidden_states: torch.Tensor) -> tuple[int, int]:
        if hidden_states.ndim == 4:
            return int(hidden_states.shape[-2]), int(hidden_states.shape[-1])
        return grid_from_tokens(int(hidden_states.shape[1]), self.aspect)

    def wants(self, layer: str, hidden_states: torch.Tensor) -> bool:
        """Whether this call (layer, current step, its grid) is kept; cheap, before any computation.

        Args:
            layer: processor name.
            hidden_states: the layer's input.
        """
        if self.layers is not None and layer not in self.layers:
            return False
        if self.resolutions is not None and self._grid_of(hidden_states)[0] not in self.resolutions:
            return False
        return within_windows(self.step_window, self.timestep_window, self._step, self._timestep)

    def record_layer(
        self, layer: str, attn: torch.nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor | None = None
    ) -> None:
        """Compute one layer call's head-averaged probabilities and add them to the running sum.

        Args:
            layer: processor name.
            attn: the ``Attention`` module.
            hidden_states: its input (B or 2B items).
            temb: its time embedding (only for layers with a spatial norm).
        """
        cuda = hidden_states.is_cuda
        if cuda:
            torch.cuda.synchronize(hidden_states.device)
        start = time.perf_counter()
        b = hidden_states.shape[0] if self.batch_size is None else self.batch_size
        if hidden_states.shape[0] not in (b, 2 * b):
            raise ValueError(
                f"{layer}: attention batch {hidden_states.shape[0]} matches neither the batch size {b} "
                "nor 2x (classifier-free guidance)"
            )
        grid = self._grid_of(hidden_states)
        probs, _ = self_attention_probs(attn, hidden_states, keep=b, temb=temb)
        self.record(layer, probs, grid)
        if cuda:
            torch.cuda.synchronize(hidden_states.device)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def record(self, layer: str, probs: torch.Tensor, spatial: tuple[int, int]) -> None:
        """Add (B, Q, Q) head-averaged probabilities of one layer call on grid ``spatial``.

        Args:
            layer: processor name.
            probs: (B, Q, Q), Q = h * w.
            spatial: (h, w).
        """
        grid = (int(spatial[0]), int(spatial[1]))
        if probs.ndim != 3 or probs.shape[1] != grid[0] * grid[1] or probs.shape[2] != probs.shape[1]:
            raise ValueError(
                f"{layer}: expected (B, {grid[0] * grid[1]}, same) probabilities, got {tuple(probs.shape)}"
            )
        probs = probs.float()
        if grid in self._sums:
            if self._sums[grid].shape[0] != probs.shape[0]:
                raise ValueError(
                    f"{layer}: batch {probs.shape[0]}, earlier calls had {self._sums[grid].shape[0]}"
                )
            self._sums[grid] += probs
            self._counts[grid] += 1
        else:
            self._sums[grid] = probs.clone()
            self._counts[grid] = 1
        self._kept_layers.add(layer)

    # ---------------------------------------------------------------- output
    @property
    def kept_layers(self) -> list[str]:
        """Names of the layers whose probabilities were added since the last reset."""
        return sorted(self._kept_layers)

    def result_grid(self) -> tuple[int, int]:
        """(H, W) of :meth:`result`'s grid: ``grid``, or the finest grid kept.

        Raises:
            ValueError: nothing was kept and no ``grid`` is set.
        """
        if self.grid is not None:
            return self.grid
        if not self._sums:
            raise ValueError(self._nothing_kept())
        return max(self._sums, key=lambda g: g[0] * g[1])

    def _nothing_kept(self) -> str:
        return (
            f"no self-attention was kept: resolutions={self.resolutions}, layers={self.layers}, "
            f"name_contains={self.name_contains}, step_window={self.step_window}, "
            f"timestep_window={self.timestep_window}"
        )

    @torch.no_grad()
    def result(self) -> torch.Tensor:
        """The mean self-attention, (B, H*W, H*W) float32 on the recording device, rows summing to 1.

        Raises:
            ValueError: nothing was kept (no layer or step matched).
        """
        if not self._sums:
            raise ValueError(self._nothing_kept())
        target = self.result_grid()
        total = None
        count = 0
        for grid, acc in self._sums.items():
            n = self._counts[grid]
            part = resample_affinity(acc / n, grid, target) * n
            total = part if total is None else total + part
            count += n
        return total / count
