"""``trainer.predict`` over generation requests, with an optional mask maker (the mask stage's hook)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import pytorch_lightning as pl
import torch

from diffmask.attention import AttentionSink
from diffmask.diffusion.sampler import DiffusionSampler

__all__ = ["MaskMaker", "SynthesisLitModule"]


@runtime_checkable
class MaskMaker(Protocol):
    """Turns generated images + recorded cross-attention into label maps (the mask stage plugs in here).

    For each batch, :meth:`new_sink` gives a sink that records during sampling; then
    :meth:`__call__` makes the masks.
    """

    def new_sink(self, prompts: list[str], token_positions: list[list[list[int]]], resolution: int) -> AttentionSink:
        """A fresh sink for one batch of ``prompts``; ``token_positions[i][k]`` = token positions
        of class k in prompt i (BOS at 0); ``resolution`` = image side in pixels."""

    def __call__(
        self, images: torch.Tensor, sink: AttentionSink, token_positions: list[list[list[int]]]
    ) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Label maps (B, S, S) uint8 (0 = background) and per-image ``{class_name: score in [0, 1]}``."""


class SynthesisLitModule(pl.LightningModule):
    """Generates the images of a batch of requests in ``predict_step``.

    Args:
        sampler: the diffusion sampler (its models become submodules, so Lightning places them).
        num_inference_steps: denoising steps.
        guidance_scale: classifier-free guidance scale.
        eta: DDIM noise (0 = deterministic).
        mask_maker: optional; makes masks and scores from recorded attention.
        save_class_maps: also return the sink's class maps (the sink needs a ``result()``
            method, as :class:`~diffmask.attention.CrossAttentionStore` has), so the writer can
            store them (``attn/<id>.npz``) and refinement can be redone offline.
        quality_filter: optional ``reason(mask, scores) -> str | None`` (e.g.
            :class:`~diffmask.synthesis.quality.MaskQualityFilter`); a non-None reason drops
            the sample (the writer records it as dropped).

    Predictions are dicts with ``id, prompt, seed, meta`` (lists), ``images`` (B, S, S) uint8 and,
    with a mask maker, ``masks`` (B, S, S) uint8, ``scores`` (list of dicts), ``dropped`` (list of
    reasons or None) and, with ``save_class_maps``, ``class_maps`` (B, K, S, S) float16. Ids listed in
    :attr:`skip_ids` (set by :class:`SyntheticWriter` from what is already on disk) are not
    generated again.
    """

    def __init__(
        self,
        sampler: DiffusionSampler,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        mask_maker: MaskMaker | None = None,
        save_class_maps: bool = False,
        quality_filter: Any | None = None,
    ):
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        if (save_class_maps or quality_filter is not None) and mask_maker is None:
            raise ValueError("save_class_maps/quality_filter: need a mask_maker (they act on its masks and maps)")
        self.sampler = sampler
        self.unet = sampler.components.unet
        self.text_encoder = sampler.components.text_encoder
        self.vae = sampler.components.vae
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.mask_maker = mask_maker
        self.save_class_maps = bool(save_class_maps)
        self.quality_filter = quality_filter
        self.skip_ids: set[str] = set()

    def predict_step(self, batch: dict[str, list], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any] | None:
        keep = [i for i, sid in enumerate(batch["id"]) if sid not in self.skip_ids]
        if not keep:
            return None
        rows = {k: [v[i] for i in keep] for k, v in batch.items()}
        self.sampler.device = self.device
        sink = positions = None
        if self.mask_maker is not None:
            positions = self.sampler.token_positions(rows["prompt"])
            if not positions:
                raise ValueError("mask_maker: the sampler has no prompt builder, so class tokens cannot be found")
            sink = self.mask_maker.new_sink(rows["prompt"], positions, self.sampler.resolution)
        out = self.sampler(
            rows["prompt"], rows["seed"], num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale, attention_sink=sink, eta=self.eta,
        )
        pred: dict[str, Any] = dict(rows)
        pred["images"] = (out.images[:, 0].numpy() * 255.0).round().astype(np.uint8)
        if self.mask_maker is not None:
            masks, scores = self.mask_maker(out.images, sink, positions)
            masks = np.asarray(masks, dtype=np.uint8)
            if masks.shape != pred["images"].shape or len(scores) != len(keep):
                raise ValueError(
                    f"mask_maker: expected masks of shape {pred['images'].shape} and {len(keep)} score dicts, "
                    f"got {masks.shape} and {len(scores)}"
                )
            pred["masks"], pred["scores"] = masks, list(scores)
            pred["dropped"] = [
                None if self.quality_filter is None else self.quality_filter.reason(m, sc)
                for m, sc in zip(masks, scores, strict=True)
            ]
            if self.save_class_maps:
                if not hasattr(sink, "result"):
                    raise ValueError(f"save_class_maps: the sink {type(sink).__name__} has no result() to read maps from")
                pred["class_maps"] = sink.result().to(torch.float16).cpu().numpy()
        return pred
