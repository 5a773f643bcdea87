"""Aggregate cross-attention into per-class maps on the fly (a sink for the capture processor).

The store keeps, per captured layer, a running sum of the class maps at the layer's own grid
and a count of the steps it saw: memory is B*K*h*w floats per layer, however many steps run.
Averaging over steps, upsampling, clamping, layer/resolution averaging and normalisation happen
once, in :meth:`CrossAttentionStore.result`. Upsampling is linear, so averaging before
upsampling gives the same maps as upsampling every step (up to the negative-clamp, which DAAM
and DiffuMask apply after upsampling too).

Typical use (the sampler calls ``set_step`` before each UNet call)::

    store = CrossAttentionStore(output_size=256, resolutions=[16, 32])
    store.set_tokens([[[5], [6, 7]]], prompt_lengths=[9])   # batch 1, K=2 classes
    with store.capture(unet):
        for i, t in enumerate(scheduler.timesteps):
            store.set_step(i, int(t))
            unet(latents_in, t, encoder_hidden_states=emb)
    maps = store.result()                                     # (1, 2, 256, 256) in [0, 1]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from diffmask.attention.processor import capture_cross_attention, cross_attention_layers, grid_from_tokens

__all__ = ["CrossAttentionStore", "check_windows", "within_windows"]

_UPSAMPLE = ("bicubic", "bilinear")
_NORMALIZE = ("max", "minmax", "none")
_HEAD_REDUCE = ("mean", "max")
_LAYER_REDUCE = ("mean", "resolution_mean")


def check_windows(
    step_window: Sequence[int] | None, timestep_window: Sequence[float] | None
) -> tuple[tuple[int, int] | None, tuple[float, float] | None]:
    """Check and normalise an attention store's step and timestep windows.

    Args:
        step_window: ``[start, end)`` sampling steps kept, or None for every step.
        timestep_window: ``[low, high]`` timesteps kept, or None for every timestep.

    Returns:
        The two windows as tuples (or None).

    Raises:
        ValueError: a window that is not two numbers in order.
    """
    if step_window is not None:
        step_window = tuple(int(s) for s in step_window)
        if len(step_window) != 2 or step_window[0] < 0 or step_window[1] <= step_window[0]:
            raise ValueError(f"step_window: expected [start, end) with 0 <= start < end, got {step_window}")
    if timestep_window is not None:
        timestep_window = tuple(float(s) for s in timestep_window)
        if len(timestep_window) != 2 or timestep_window[1] < timestep_window[0]:
            raise ValueError(
                f"timestep_window: expected [low, high] with low <= high, got {timestep_window}"
            )
    return step_window, timestep_window


def within_windows(step_window: tuple[int, int] | None, timestep_window: tuple[float, float] | None,
                   step: int | None, timestep: float | None) -> bool:
    """Whether the current sampling step falls in a store's step and timestep windows.

    Args:
        step_window: ``[start, end)`` steps kept (None: every step).
        timestep_window: ``[low, high]`` timesteps kept (None: every timestep).
        step: the current step index (``set_step``), or None if it was not set.
        timestep: the current timestep, or None if it was not given.

    Raises:
        ValueError: a window is set but the step (or timestep) it needs was never set.
    """
    if step_window is not None:
        if step is None:
            raise ValueError(
                "step_window is set but set_step(step_index, timestep) was not called before the UNet"
            )
        if not step_window[0] <= step < step_window[1]:
            return False
    if timestep_window is not None:
        if timestep is None:
            raise ValueError("timestep_window is set but set_step(..., timestep) got no timestep")
        if not timestep_window[0] <= timestep <= timestep_window[1]:
            return False
    return True


class CrossAttentionStore:
    """A sink (``record(layer, probs, spatial)``) that turns cross-attention into class maps.

    Args:
        output_size: (H, W) or a single int: size of the returned class maps (the image size).
        resolutions: grid heights h of the layers to keep (e.g. ``[16, 32]`` for a 64x64 latent),
            or ``"all"``.
        layers: exact processor names to keep (default: every layer the capture hands over).
        step_window: ``[start, end)`` of step indices to keep (``None``: every step). Needs
            :meth:`set_step` before each UNet call.
        timestep_window: ``[low, high]`` (inclusive) of scheduler timesteps to keep (``None``:
            every timestep). Needs :meth:`set_step` with a timestep.
        head_reduce: ``"mean"`` (average heads, DiffuMask/DAAM) or ``"max"``.
        layer_reduce: ``"mean"`` (every layer weighs the same) or ``"resolution_mean"`` (mean
            over layers of a resolution, then mean over resolutions, as in DiffuMask).
        upsample: ``"bicubic"`` or ``"bilinear"``.
        normalize: ``"max"`` (divide each class map by its max), ``"minmax"``, or ``"none"``.
        aspect: (H, W) ratio of the UNet input, to lay out queries of 3-D inputs on a grid.

    Raises:
        ValueError: an argument is out of range (the message names it).

    Examples::

        store = CrossAttentionStore(output_size=64, resolutions="all", step_window=[0, 10])
    """

    def __init__(
        self,
        output_size: int | Sequence[int] = 64,
        resolutions: Sequence[int] | str = "all",
        layers: Sequence[str] | None = None,
        step_window: Sequence[int] | None = None,
        timestep_window: Sequence[float] | None = None,
        head_reduce: str = "mean",
        layer_reduce: str = "mean",
        upsample: str = "bicubic",
        normalize: str = "max",
        aspect: Sequence[int] = (1, 1),
    ):
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        output_size = tuple(int(s) for s in output_size)
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError(f"output_size: expected a positive int or (H, W), got {output_size}")
        if isinstance(resolutions, str):
            if resolutions != "all":
                raise ValueError(f"resolutions: expected 'all' or a list of grid sizes, got {resolutions!r}")
            res: tuple[int, ...] | None = None
        else:
            res = tuple(int(r) for r in resolutions)
            if not res or min(res) < 1:
                raise ValueError(
                    f"resolutions: expected a non-empty list of positive grid sizes, got {list(res)}"
                )
        step_window, timestep_window = check_windows(step_window, timestep_window)
        for field, value, allowed in (
            ("head_reduce", head_reduce, _HEAD_REDUCE),
            ("layer_reduce", layer_reduce, _LAYER_REDUCE),
            ("upsample", upsample, _UPSAMPLE),
            ("normalize", normalize, _NORMALIZE),
        ):
            if value not in allowed:
                raise ValueError(f"{field}: expected one of {allowed}, got {value!r}")
        aspect = tuple(int(a) for a in aspect)
        if len(aspect) != 2 or min(aspect) < 1:
            raise ValueError(f"aspect: expected (H, W) of positive ints, got {aspect}")

        self.output_size: tuple[int, int] = output_size  # type: ignore[assignment]
        self.resolutions = res
        self.layers = None if layers is None else list(layers)
        self.step_window = step_window
        self.timestep_window = timestep_window
        self.head_reduce = head_reduce
        self.layer_reduce = layer_reduce
        self.upsample = upsample
        self.normalize = normalize
        self.aspect: tuple[int, int] = aspect  # type: ignore[assignment]
        # an optional SelfAttentionStore filled during the same UNet calls (a self_affinity step
        # needs it): set_step is forwarded to it and capture() opens its capture too
        self.self_attention = None

        self._token_weights: torch.Tensor | None = None  # (B, K, T_max) averaging weights per class
        self._max_position = -1
        self._step: int | None = None
        self._timestep: float | None = None
        self.reset()

    # ----------------------------------------------------------------- setup
    def reset(self) -> None:
        """Forget the accumulated maps (keeps the token positions)."""
        self._sums: dict[str, torch.Tensor] = {}  # layer -> (B, K, h, w) running sum over steps
        self._counts: dict[str, int] = {}
        self._seen: dict[str, tuple[int, int]] = {}  # every layer recorded, kept or not -> grid
        self._step = None
        self._timestep = None

    def set_tokens(
        self,
        token_positions: Sequence[Sequence[Sequence[int]]],
        prompt_lengths: Sequence[int] | None = None,
    ) -> None:
        """Set which text tokens make each class, and reset the accumulated maps.

        Args:
            token_positions: per batch item, per class, the token positions of the class phrase
                (its maps are averaged). Every item has the same number K of classes. An empty
                list is a class the prompt does not name (an image without a lesion): its map is 0.
            prompt_lengths: per batch item, the number of real tokens of the prompt (BOS, words,
                EOS); positions at or beyond it are padding and rejected.

        Raises:
            ValueError: no item or no class, negative positions, different K per item, or a
                position outside the prompt.
        """
        if len(token_positions) == 0:
            raise ValueError("token_positions: expected one entry per batch item, got none")
        k = len(token_positions[0])
        if k == 0:
            raise ValueError("token_positions: item 0 has no class")
        if prompt_lengths is not None and len(prompt_lengths) != len(token_positions):
            raise ValueError(
                f"prompt_lengths: expected {len(token_positions)} lengths (one per batch item), "
                f"got {len(prompt_lengths)}"
            )
        max_pos = -1
        for b, classes in enumerate(token_positions):
            if len(classes) != k:
                raise ValueError(f"token_positions: item {b} has {len(classes)} classes, item 0 has {k}")
            for c, positions in enumerate(classes):
                for p in positions:
                    if int(p) < 0:
                        raise ValueError(f"token_positions: item {b} class {c}: negative position {p}")
                    if prompt_lengths is not None and int(p) >= int(prompt_lengths[b]):
                        raise ValueError(
                            f"token_positions: item {b} class {c}: position {p} is not in the prompt "
                            f"(it has {prompt_lengths[b]} tokens incl. BOS/EOS)"
                        )
                    max_pos = max(max_pos, int(p))
        weights = torch.zeros(len(token_positions), k, max(max_pos, 0) + 1)
        for b, classes in enumerate(token_positions):
            for c, positions in enumerate(classes):
                for p in positions:
                    weights[b, c, int(p)] += 1.0 / len(positions)
        self._token_weights = weights
        self._max_position = max_pos
        self.reset()

    @property
    def batch_size(self) -> int:
        """Batch size of the token positions last set (0 before :meth:`set_tokens`)."""
        return 0 if self._token_weights is None else self._token_weights.shape[0]

    @property
    def num_classes(self) -> int:
        """Number of classes K of the token positions last set (0 before :meth:`set_tokens`)."""
        return 0 if self._token_weights is None else self._token_weights.shape[1]

    def set_step(self, step_index: int, timestep: float | None = None) -> None:
        """Tell the store (and an attached :attr:`self_attention` store) which sampling step the next
        UNet call belongs to.

        Args:
            step_index: the step's index.
            timestep: its timestep (needed with ``timestep_window``).
        """
        self._step = int(step_index)
        self._timestep = None if timestep is None else float(timestep)
        if self.self_attention is not None:
            self.self_attention.set_step(step_index, timestep)

    def begin_step(self, step_index: int, timestep: float | None = None) -> None:
        """Alias of :meth:`set_step`, to pass as a sampler's ``on_step_begin`` hook
        (:mod:`diffmask.diffusion.sampler`).

        Args:
            step_index: the sampling step the next UNet call belongs to.
            timestep: its timestep (needed with ``timestep_window``).
        """
        self.set_step(step_index, timestep)

    def validate_layers(self, unet: torch.nn.Module) -> list[str]:
        """Check the configured ``layers`` against a UNet; return the layer names to capture.

        Raises:
            ValueError: a configured layer is not a cross-attention layer of ``unet``.
        """
        available = cross_attention_layers(unet)
        if self.layers is None:
            return available
        unknown = [n for n in self.layers if n not in available]
        if unknown:
            raise ValueError(
                f"layers: {unknown} are not cross-attention layers of this UNet; available: {available}"
            )
        return list(self.layers)

    @contextlib.contextmanager
    def capture(self, unet: torch.nn.Module) -> Iterator[list[str]]:
        """Install capturing processors on ``unet`` feeding this store (and the attached
        :attr:`self_attention` store, if any); restore them on exit.

        Args:
            unet: a diffusers ``UNet2DConditionModel``.
        """
        with capture_cross_attention(unet, self, layers=self.validate_layers(unet)) as names:
            yield names

    # ----------------------------------------------------------------- sink
    def _step_kept(self) -> bool:
        return within_windows(self.step_window, self.timestep_window, self._step, self._timestep)

    @torch.no_grad()
    def record(self, layer: str, probs: torch.Tensor, spatial: tuple[int, int] | None) -> None:
        """Add one layer's probabilities (B or 2B, heads, Q, T) to the running class sums."""
        if self._token_weights is None:
            raise ValueError("CrossAttentionStore: call set_tokens(...) before running the UNet")
        _, _, q, t = probs.shape
        h, w = spatial if spatial is not None else grid_from_tokens(q, self.aspect)
        self._seen[layer] = (h, w)
        if self._max_position >= t:
            raise ValueError(
                f"token_positions: position {self._max_position} is outside the text sequence (length {t}) "
                f"seen by {layer}"
            )
        if self.layers is not None and layer not in self.layers:
            return
        if self.resolutions is not None and h not in self.resolutions:
            return
        if not self._step_kept():
            return
        b = self.batch_size
        if probs.shape[0] == 2 * b:  # classifier-free guidance batch is [uncond, cond]: keep cond
            probs = probs[b:]
        elif probs.shape[0] != b:
            raise ValueError(
                f"{layer}: attention batch {probs.shape[0]} matches neither the {b} prompts of set_tokens "
                f"nor 2x (classifier-free guidance)"
            )
        weights = self._token_weights
        if weights.device != probs.device:  # move once, not per layer and step
            weights = self._token_weights = weights.to(probs.device)
        # slice the used tokens before upcasting: fp16 maps of a 64x64 layer are large
        probs = probs[..., : weights.shape[2]].float()
        per_token = probs.mean(dim=1) if self.head_reduce == "mean" else probs.amax(dim=1)  # (B, Q, T')
        maps = torch.einsum("bqt,bkt->bkq", per_token, weights)
        maps = maps.reshape(b, weights.shape[1], h, w)
        if layer in self._sums:
            self._sums[layer] += maps
            self._counts[layer] += 1
        else:
            self._sums[layer] = maps.clone()
            self._counts[layer] = 1

    # ----------------------------------------------------------------- output
    def result(self) -> torch.Tensor:
        """The class maps, (B, K, H, W) float32 in [0, 1], on the device the maps were recorded on.

        Raises:
            ValueError: nothing was recorded (no layer matched ``resolutions``/``layers``, or no
                step fell in the window), or a class map is empty (all zero or NaN).
        """
        if not self._sums:
            seen = sorted({hw[0] for hw in self._seen.values()})
            raise ValueError(
                f"no attention map was kept: resolutions={self.resolutions}, layers={self.layers}, "
                f"step_window={self.step_window}, timestep_window={self.timestep_window}; "
                f"grid sizes seen: {seen}, layers seen: {len(self._seen)}"
            )
        if self.layers is not None:
            missing = [n for n in self.layers if n not in self._seen]
            if missing:
                raise ValueError(
                    f"layers: {missing} never reported attention; layers seen: {sorted(self._seen)}"
                )
        per_res: dict[int, list[torch.Tensor]] = {}
        for layer, total in self._sums.items():
            mean = total / self._counts[layer]
            up = F.interpolate(mean, size=self.output_size, mode=self.upsample, align_corners=False)
            per_res.setdefault(total.shape[-2], []).append(up.clamp_min(0.0))
        if self.layer_reduce == "mean":
            maps = torch.stack([m for ms in per_res.values() for m in ms]).mean(dim=0)
        else:
            maps = torch.stack([torch.stack(ms).mean(dim=0) for ms in per_res.values()]).mean(dim=0)
        return self._normalise(maps)

    def _normalise(self, maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(2)
        peak = flat.amax(dim=2)
        # (B, K): False for a class the prompt leaves out
        named = self._token_weights.sum(-1).to(peak.device) > 0
        flat = torch.where(named[..., None], flat, torch.zeros_like(flat))  # its map stays 0: an empty mask
        peak = torch.where(named, peak, torch.ones_like(peak))
        bad = ~torch.isfinite(flat).all(dim=2) | (peak <= 0)
        if bad.any():
            b, k = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"class map of batch item {b}, class {k} is empty (all zero or NaN): "
                "check its token positions and the attention layers/steps kept"
            )
        if self.normalize == "max":
            flat = flat / peak[..., None]
        elif self.normalize == "minmax":
            low = flat.amin(dim=2, keepdim=True)
            span = (peak[..., None] - low).clamp_min(torch.finfo(flat.dtype).eps)
            flat = (flat - low) / span
        # bicubic overshoot can leave values just above 1
        return flat.clamp(0.0, 1.0).reshape(maps.shape)
