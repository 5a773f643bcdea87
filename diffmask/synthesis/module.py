"""``trainer.predict`` over generation requests, with an optional mask maker (the mask stage's hook)."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pytorch_lightning as pl
import torch

from diffmask.attention import AttentionSink, capture_cross_attention
from diffmask.diffusion.sampler import Sampler
from diffmask.refine.images import to_uint8_images

__all__ = ["MaskMaker", "SynthesisLitModule", "attention_agreement"]


def attention_agreement(
    attention_mask: np.ndarray, condition_mask: np.ndarray, class_names: tuple[str, ...]
) -> dict[str, float]:
    """Per foreground class, the IoU of a controlled image's attention mask with its condition mask
    (1.0 when the class is in neither): how far DiffMask's labels would agree with the true ones.

    Args:
        attention_mask: (S, S) label map made from the image's attention.
        condition_mask: (S, S) label map the image was conditioned on.
        class_names: the label classes, background first (background is not scored).
    """
    out = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        a, b = attention_mask == c, condition_mask == c
        union = int((a | b).sum())
        out[name] = 1.0 if union == 0 else float((a & b).sum()) / union
    return out



@runtime_checkable
class MaskMaker(Protocol):
    """Turns generated images + recorded cross-attention into label maps (the mask stage plugs in here).

    For each batch, :meth:`new_sink` gives a sink that records during sampling; then
    :meth:`__call__` makes the masks.
    """

    def new_sink(
        self, prompts: list[str], token_positions: list[list[list[int]]], resolution: int
    ) -> AttentionSink:
        """A fresh sink for one batch of prompts.

        Args:
            prompts: the batch's prompts.
            token_positions: ``token_positions[i][k]`` = token positions of class k in prompt i (BOS at 0).
            resolution: image side in pixels.
        """

    def __call__(
        self, images: torch.Tensor, sink: AttentionSink, token_positions: list[list[list[int]]]
    ) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Label maps (B, S, S) uint8 (0 = background) and per-image ``{class_name: score in [0, 1]}``.

        Args:
            images: (B, C, S, S) generated images in [0, 1].
            sink: the sink from :meth:`new_sink`, after sampling.
            token_positions: as given to :meth:`new_sink`.
        """


class SynthesisLitModule(pl.LightningModule):
    """Generates the images of a batch of requests in ``predict_step``.

    Args:
        sampler: the sampler (its models become submodules, so Lightning places them): a
            :class:`~diffmask.diffusion.TextToImageSampler` for plain requests, a
            :class:`~diffmask.diffusion.ControlledSampler` for batches with ``condition`` images, a
            :class:`~diffmask.diffusion.VariationSampler` for batches with ``init`` images.
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
        control_scale: ControlNet residual multiplier, for batches carrying ``condition`` images
            (controlled generation, :mod:`diffmask.synthesis.controlled`). Their ``masks`` are the
            condition masks; a mask maker then only scores how far the image's own attention
            agrees with them (per-class IoU in ``scores``).
        strength: for batches carrying ``init`` images (variations of real images,
            :mod:`diffmask.synthesis.variations`): the share of the schedule run from them.

    Predictions are dicts with ``id, prompt, seed, meta`` (lists), ``images`` (B, S, S) uint8 (grey)
    or (B, S, S, 3) uint8 (RGB, a colour model's) and,
    with a mask maker, ``masks`` (B, S, S) uint8, ``scores`` (list of dicts), ``dropped`` (list of
    reasons or None) and, with ``save_class_maps``, ``class_maps`` (B, K, S, S) float16. Ids listed in
    :attr:`skip_ids` (set by :class:`SyntheticWriter` from what is already on disk) are not
    generated again.
    """

    def __init__(
        self,
        sampler: Sampler,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        eta: float = 0.0,
        mask_maker: MaskMaker | None = None,
        save_class_maps: bool = False,
        quality_filter: Any | None = None,
        control_scale: float = 1.0,
        strength: float = 1.0,
    ):
        super().__init__()
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        if (save_class_maps or quality_filter is not None) and mask_maker is None:
            raise ValueError(
                "save_class_maps/quality_filter: need a mask_maker (they act on its masks and maps)"
            )
        self.sampler = sampler
        self.unet = sampler.components.unet
        self.text_encoder = sampler.components.text_encoder
        self.vae = sampler.components.vae
        self.controlnet = getattr(sampler, "controlnet", None)  # placed by Lightning with the UNet
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.eta = eta
        self.mask_maker = mask_maker
        self.save_class_maps = bool(save_class_maps)
        self.quality_filter = quality_filter
        self.control_scale = float(control_scale)
        self.strength = float(strength)
        self.skip_ids: set[str] = set()

    def predict_step(
        self, batch: dict[str, list], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any] | None:
        """Generate the batch's requests not in :attr:`skip_ids` (None when there are none).

        Args:
            batch: collated requests (``id``, ``prompt``, ``seed``, ``meta``; ``condition`` and
                ``mask`` for controlled generation, ``init`` for variations).
            batch_idx: the batch's index (unused).
            dataloader_idx: the loader's index (unused).
        """
        keep = [i for i, sid in enumerate(batch["id"]) if sid not in self.skip_ids]
        if not keep:
            return None
        rows = {k: [v[i] for i in keep] for k, v in batch.items()}
        self.sampler.device = self.device
        # controlled generation: condition images in, and the masks they were made from out
        control = torch.stack(rows.pop("condition")) if "condition" in rows else None
        init = torch.stack(rows.pop("init")) if "init" in rows else None
        cond_masks = (
            np.stack([np.asarray(m, dtype=np.uint8) for m in rows.pop("mask")]) if "mask" in rows else None
        )
        sink = positions = None
        if self.mask_maker is not None:
            positions = self.sampler.token_positions(rows["prompt"])
            if not positions:
                raise ValueError(
                    "mask_maker: the sampler has no prompt builder, so class tokens cannot be found"
                )
            sink = self.mask_maker.new_sink(rows["prompt"], positions, self.sampler.resolution)
        out = self._sample(rows["prompt"], rows["seed"], sink, control=control, init=init)
        pred: dict[str, Any] = dict(rows)
        pred["images"] = to_uint8_images(out.images)  # (B, S, S) grey, (B, S, S, 3) RGB
        if cond_masks is not None:
            # the label of a controlled image is its condition's mask; attention masks, when made,
            # are kept as class maps and agreement scores only
            pred["masks"] = cond_masks
            pred["scores"] = [{} for _ in keep]
            pred["dropped"] = [None] * len(keep)
            if self.mask_maker is not None:
                attn_masks, _ = self.mask_maker(out.images, sink, positions)
                pred["scores"] = [attention_agreement(a, m, tuple(self.mask_maker.class_names))
                                  for a, m in zip(np.asarray(attn_masks), cond_masks, strict=True)]
                if self.save_class_maps:
                    pred["class_maps"] = sink.result().to(torch.float16).cpu().numpy()
            return pred
        if self.mask_maker is not None:
            masks, scores = self.mask_maker(out.images, sink, positions)
            masks = np.asarray(masks, dtype=np.uint8)
            if masks.shape != pred["images"].shape[:3] or len(scores) != len(keep):
                raise ValueError(
                    f"mask_maker: expected masks of shape {pred['images'].shape[:3]} and {len(keep)} "
                    f"score dicts, got {masks.shape} and {len(scores)}"
                )
            pred["masks"], pred["scores"] = masks, list(scores)
            pred["dropped"] = [
                None if self.quality_filter is None else self.quality_filter.reason(m, sc)
                for m, sc in zip(masks, scores, strict=True)
            ]
            if self.save_class_maps:
                if not hasattr(sink, "result"):
                    raise ValueError(
                        f"save_class_maps: the sink {type(sink).__name__} has no result() to read maps from"
                    )
                pred["class_maps"] = sink.result().to(torch.float16).cpu().numpy()
        return pred

    def _sample(self, prompts: list[str], seeds: list[int], sink: AttentionSink | None,
                control: torch.Tensor | None, init: torch.Tensor | None):
        """Run the sampler on one batch, with ``sink`` capturing cross-attention when given.

        Args:
            prompts: the batch's prompts.
            seeds: the batch's seeds.
            sink: receives every cross-attention layer's probabilities (told each step through its
                ``begin_step`` when it has one); None = no capture.
            control: condition images (a ``ControlledSampler``'s batch), or None.
            init: init images (a ``VariationSampler``'s batch), or None.
        """
        kwargs: dict[str, Any] = {"num_inference_steps": self.num_inference_steps,
                                  "guidance_scale": self.guidance_scale, "eta": self.eta,
                                  "on_step_begin": getattr(sink, "begin_step", None)}
        if control is not None:  # controlled generation
            kwargs.update(control=control, control_scale=self.control_scale)
        if init is not None:  # variations of real images
            kwargs.update(init_images=init, strength=self.strength)
        unet = self.sampler.components.unet
        with contextlib.nullcontext() if sink is None else capture_cross_attention(unet, sink):
            return self.sampler(prompts, seeds, **kwargs)
