"""LightningModule that fine-tunes (or trains from scratch) a text-conditioned diffusion model."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from diffmask.artifacts import atomic_write_json
from diffmask.attention import AttentionRecorder, capture_cross_attention
from diffmask.autoencoder.channels import channel_word, check_datamodule_channels, to_autoencoder_channels
from diffmask.data.datamodule import select_fraction
from diffmask.data.image_cache import ImageCache
from diffmask.diffusion.alignment import (
    AttentionAlignment,
    LabelledBatches,
    attention_alignment_loss,
    class_token_index,
)
from diffmask.diffusion.components import METADATA_FILE, DiffusionComponents, check_resolution
from diffmask.prompts.builder import PromptBuilder, class_token_positions

__all__ = ["DiffusionLitModule", "encode_conditioning", "encode_images", "encode_prompts"]

log = logging.getLogger(__name__)


def encode_prompts(
    tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """CLIP text states (B, T, D) of prompts padded to the tokenizer's ``model_max_length``.

    Raises:
        ValueError: a prompt is longer than ``model_max_length`` tokens.
    """
    limit = tokenizer.model_max_length
    enc = tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=False)
    too_long = [(p, len(ids)) for p, ids in zip(prompts, enc["input_ids"], strict=True) if len(ids) > limit]
    if too_long:
        p, n = too_long[0]
        raise ValueError(
            f"prompt {p!r} has {n} tokens, more than the tokenizer's maximum of {limit}; "
            "shorten the template or raise the tokenizer's model_max_length"
        )
    ids = torch.as_tensor(enc["input_ids"], device=device)
    return text_encoder(ids)[0]


def encode_conditioning(components, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` for prompts: text states, then the visual clue tokens
    retrieved for each prompt when the model has clues (``diffusion.clues=codebook``)."""
    states = encode_prompts(components.tokenizer, components.text_encoder, prompts, device)
    if getattr(components, "clues", None) is None:
        return states
    return torch.cat([states, components.clues.prompt_tokens(prompts, device).to(states.dtype)], dim=1)


def _check_size(image: torch.Tensor, resolution: int) -> torch.Tensor:
    if image.shape[-1] != resolution or image.shape[-2] != resolution:
        raise ValueError(
            f"image: expected {resolution}x{resolution} px (the model's resolution), "
            f"got {tuple(image.shape[-2:])}; set data.size to the diffusion resolution"
        )
    return image * 2.0 - 1.0


def encode_posterior(
    image: torch.Tensor, vae: torch.nn.Module, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S, S) in [0, 1] → the VAE posterior's mean and std (unscaled latents, fp32); grey
    images are repeated to a 3-channel VAE's channels
    (:func:`~diffmask.autoencoder.to_autoencoder_channels`)."""
    x = to_autoencoder_channels(_check_size(image, resolution), int(vae.config.in_channels))
    with torch.no_grad():
        dist = vae.encode(x.to(vae.dtype)).latent_dist
    # bf16 autocast makes the VAE return bf16; noise targets are kept in fp32
    return dist.mean.float(), dist.std.float()


def encode_images(image: torch.Tensor, vae: torch.nn.Module | None, resolution: int) -> torch.Tensor:
    """(B, C, S, S) in [0, 1] → a UNet's clean input: pixels in [-1, 1] or scaled VAE latents."""
    if vae is None:
        return _check_size(image, resolution)
    mean, std = encode_posterior(image, vae, resolution)
    return (mean + std * torch.randn_like(mean)) * vae.config.scaling_factor


def _check_clues(clues: str, codebook_dir) -> None:
    """The clue settings' values (the codebook itself is read in :meth:`DiffusionLitModule.load_clues`)."""
    if clues not in ("none", "codebook"):
        raise ValueError(f"clues: expected none or codebook, got {clues!r}")
    if clues == "codebook" and not codebook_dir:
        raise ValueError("codebook_dir: clues=codebook needs a diffmask-fit-codebook stage folder")


class DiffusionLitModule(pl.LightningModule):
    """Trains ``components.unet`` (and optionally the text encoder) to denoise images given prompts.

    Batches come from :class:`~diffmask.data.SegmentationDataModule`: ``image`` (B, C, S, S) in
    [0, 1] with C = ``components.channels`` = ``data.channels`` (scaled to [-1, 1]; in latent space
    encoded, grey repeated to a 3-channel VAE's channels; other channels are an error),
    ``label`` (B, 1, S, S), ``meta`` (list of dicts), ``id`` (list of str). Prompts are built from
    ``meta`` by ``prompt_builder``; with probability ``cond_dropout`` a prompt is replaced by ""
    (classifier-free guidance). bf16 autocast and gradient clipping come from the Trainer
    (``precision``, ``gradient_clip_val``).

    Args:
        components: the model (see :func:`build_scratch_components`, :func:`load_components`).
        prompt_builder: makes prompts and the class-phrase spans.
        optimizer: partial optimizer (``_partial_: true``), called with the trained parameters.
        lr_scheduler: optional partial LR scheduler, stepped every optimizer step.
        resolution: training image side in pixels (checked against the UNet/VAE).
        train_text_encoder: also train the text encoder (required from scratch; optional when
            fine-tuning Stable Diffusion).
        cond_dropout: probability of dropping a prompt to "" for classifier-free guidance.
        field_dropout: probability of each metadata field's word becoming its neutral word while
            fitting, so a prompt without metadata (another hospital's images) is in-distribution.
        ema_decay: EMA decay of the UNet weights (0 = no EMA); the export uses the EMA weights.
        ema_warmup: ramp the decay as min(decay, (1 + step) / (10 + step)).
        align: attention alignment settings (None or ``label_fraction=0`` = off).
        labelled_ids: ids (of the datamodule's real train split) whose masks the alignment loss
            uses; None = drawn at fit start (see :class:`AttentionAlignment`). Every training
            step draws ``align.batch_size`` of them beside the main batch.
        gradient_checkpointing: trade compute for memory in the UNet.
        latent_cache: latent space only: keep the autoencoder's posterior (mean, std) of up to
            this many distinct training images and draw each step's latents from it instead of
            encoding again (the data has no augmentation while fitting, so an image recurs every
            epoch; keyed by the image's bytes, so augmented images only miss). 0 = encode every
            step. Encoding is a sizeable share of a 128 px latent step on CPU
            (experiments/history/settings.md).
        clues: ``none`` or ``codebook``: the visual codebook's key patches (code + cell) as extra
            cross-attention tokens after the text tokens (:mod:`diffmask.codebook.clues`); fitted
            with each image's own codes at ``clue_tokens`` random cells, sampled with the codes the
            word-code PMI (fitted at fit start from the training reports) retrieves for a prompt.
        codebook_dir: a ``diffmask-fit-codebook`` stage folder (``clues=codebook``).
        clue_tokens: clue tokens per image.

    Examples::

        comps = build_scratch_components(resolution=64)
        optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)
        module = DiffusionLitModule(comps, chest_prompt_builder(), optimizer, resolution=64)
        pl.Trainer(max_steps=1000).fit(module, datamodule=dm)
        module.export("artifacts/diffusion/run1")
    """

    def __init__(
        self,
        components: DiffusionComponents,
        prompt_builder: PromptBuilder,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        resolution: int = 128,
        train_text_encoder: bool = True,
        cond_dropout: float = 0.1,
        field_dropout: float = 0.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        align: AttentionAlignment | None = None,
        labelled_ids: Sequence[str] | None = None,
        gradient_checkpointing: bool = False,
        latent_cache: int = 4096,
        clues: str = "none",
        codebook_dir: str | os.PathLike | None = None,
        clue_tokens: int = 8,
    ):
        super().__init__()
        if not 0.0 <= cond_dropout < 1.0:
            raise ValueError(f"cond_dropout: expected a probability in [0, 1), got {cond_dropout}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay: expected 0 (off) or a decay in (0, 1), got {ema_decay}")
        self.save_hyperparameters(
            ignore=["components", "prompt_builder", "optimizer", "lr_scheduler", "align"]
        )
        self.latent_size = check_resolution(components, resolution)
        self.components = components
        self.channels = int(components.channels)
        self.unet = components.unet
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.tokenizer = components.tokenizer
        self.noise_scheduler = components.noise_scheduler
        self.prompt_builder = prompt_builder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.resolution = resolution
        self.train_text_encoder = train_text_encoder
        self.cond_dropout = cond_dropout
        if not 0.0 <= field_dropout <= 1.0:
            raise ValueError(f"field_dropout: expected a probability in [0, 1], got {field_dropout}")
        self.field_dropout = field_dropout
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.align = align or AttentionAlignment(label_fraction=0.0)
        # label values of the aligned classes (None = all); a held-out class gets no alignment loss
        self.align_class_values = self.align.class_values(prompt_builder.class_names)
        self.labelled_ids: set[str] | None = set(labelled_ids) if labelled_ids is not None else None
        self._prompt_rng = random.Random(0)
        self._labelled: LabelledBatches | None = None  # built in setup("fit") when aligning
        if latent_cache < 0:
            raise ValueError(f"latent_cache: expected a number of images >= 0 (0 = off), got {latent_cache}")
        self.latent_cache = latent_cache
        self._posteriors = ImageCache(latent_cache)
        _check_clues(clues, codebook_dir)
        self._clue_settings = (codebook_dir, clue_tokens) if clues == "codebook" else None
        self.clues = None  # loaded from codebook_dir in setup (no file is read here): load_clues()
        components.clues = None  # a loaded model's own clues are not fitted on (clues=none)
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()
        self.text_encoder.requires_grad_(train_text_encoder)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        # A frozen copy of the UNet registered as a submodule: Lightning moves it between devices
        # and stores it in checkpoints; DDP ignores it (no trainable parameters).
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False).eval() if ema_decay > 0 else None
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type: the scheduler's {self.prediction_type!r} is not supported (epsilon, "
                "v_prediction)"
            )

    def load_clues(self) -> None:
        """Load the visual clues of ``codebook_dir`` (``clues=codebook``; once, at the first call).

        :meth:`setup` calls it, so the clue encoder exists before the optimizer is configured and
        a checkpoint is restored; nothing happens with ``clues=none``.

        Raises:
            ValueError: the codebook was built at another resolution or channels than this model's.
        """
        if self._clue_settings is None or self.clues is not None:
            return
        from diffmask.codebook import VisualCodebook  # noqa: PLC0415
        from diffmask.codebook.clues import VisualClues  # noqa: PLC0415

        codebook_dir, clue_tokens = self._clue_settings
        codebook = VisualCodebook.load(codebook_dir, resolution=self.resolution, channels=self.channels)
        dim = int(self.unet.config.cross_attention_dim)
        self.clues = VisualClues(codebook, dim, clue_tokens, codebook_dir=codebook_dir)
        self.components.clues = self.clues

    def fit_clue_alignment(self, dm) -> None:
        """The word-code PMI of the training images' reports (this model's prompts) and codes.

        Args:
            dm: the :class:`~diffmask.data.SegmentationDataModule` (its selected real training images).
        """
        ids = list(dm.real_train_ids)
        dataset = dm.real_dataset(ids)
        items = [dataset[i] for i in range(len(ids))]
        reports = [self.prompt_builder.build(it["meta"]).text for it in items]
        pmi = self.clues.fit_alignment(reports, [it["image"] for it in items])
        log.info(
            "clues: word-code PMI of %d images, %d words, %d codes",
            pmi.n_images,
            len(pmi.vocabulary),
            pmi.size,
        )

    # ---- setup ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Seed the prompt draws, check the data's channels, load the clues; when fitting, fit the
        clues' word-code PMI and draw the alignment's labelled images.

        Args:
            stage: Lightning's stage; the data work is done for ``fit`` only.

        Raises:
            ValueError: the datamodule serves other channels, is no
                :class:`~diffmask.data.SegmentationDataModule` where clues or alignment need one, or
                ``labelled_ids`` are not real training ids.
        """
        # templates and prompt dropout differ per rank (and follow the run's seed)
        self._prompt_rng = random.Random(torch.initial_seed() * 1009 + self.global_rank)
        check_datamodule_channels(
            self.trainer if self._trainer is not None else None, self.channels, "the diffusion model"
        )
        self.load_clues()
        if stage == "fit" and self.clues is not None and self.clues.pmi is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not hasattr(dm, "real_dataset"):
                raise ValueError(
                    "clues=codebook needs a SegmentationDataModule (the training images and their reports)"
                )
            self.fit_clue_alignment(dm)
        if stage != "fit" or not self.align.enabled:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "real_dataset"):
            raise ValueError(
                "align.label_fraction > 0 needs a SegmentationDataModule (its real source holds the "
                "labelled images)"
            )
        self._labelled = self.labelled_batches(dm)

    def labelled_batches(self, dm) -> LabelledBatches:
        """Batches of the alignment's labelled images (drawn now when ``labelled_ids`` is None).

        Args:
            dm: the :class:`~diffmask.data.SegmentationDataModule` whose real training split holds them.

        Raises:
            ValueError: ``labelled_ids`` are not in the real training split.
        """
        train_ids = dm.real_ids("train")
        if self.labelled_ids is None:
            self.labelled_ids = set(self.draw_labelled_ids(dm))
            log.info(
                "align: %d labelled images (fraction %.3g)", len(self.labelled_ids), self.align.label_fraction
            )
        unknown = sorted(self.labelled_ids - set(train_ids))
        if unknown:
            raise ValueError(
                f"labelled_ids: {unknown[:5]} are not in the {dm.real.name} source's "
                f"{dm.split_name('train')!r} split ({len(unknown)} unknown)"
            )
        dataset = dm.real_dataset(sorted(self.labelled_ids))
        return LabelledBatches(
            dataset, self.align.batch_size, seed=torch.initial_seed() * 1013 + self.global_rank
        )

    def draw_labelled_ids(self, dm) -> list[str]:
        """The real training images whose masks this fit may use (the alignment's labelled images).

        ``labelled_ids`` when given, else ``align.label_fraction`` of the datamodule's real training
        split drawn with ``align.seed`` (None = the datamodule's seed: the segmentation stage's draw).

        Args:
            dm: the :class:`~diffmask.data.SegmentationDataModule` (its ``real_ids`` and ``seed``).
        """
        if self.labelled_ids is not None:
            return sorted(self.labelled_ids)
        train_ids = dm.real_ids("train")
        seed = dm.seed if self.align.seed is None else self.align.seed
        return select_fraction(train_ids, self.align.label_fraction, seed, field="align.label_fraction")

    def configure_optimizers(self):
        """The optimizer over the trained parameters, with the LR scheduler stepped every step if set.

        The trained parameters are the UNet's, the text encoder's with ``train_text_encoder`` and the
        clue encoder's with visual clues.
        """
        params = list(self.unet.parameters())
        if self.train_text_encoder:
            params += list(self.text_encoder.parameters())
        if self.clues is not None:
            params += list(self.clues.encoder.parameters())
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- the loss ------------------------------------------------------------------------
    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] → the UNet's clean input: pixels in [-1, 1] or scaled VAE latents.

        In latent space with ``latent_cache`` > 0 the posterior of each distinct image is computed
        once and a fresh latent is drawn from it on every call (same distribution as encoding).

        Raises:
            ValueError: C is not the model's channels (``data.channels`` of its fit).
        """
        if image.shape[1] != self.channels:
            raise ValueError(
                f"image: {image.shape[1]} channel(s), the diffusion model takes {self.channels} "
                f"({channel_word(self.channels)}; data.channels); grey and colour are never converted "
                "silently"
            )
        if self.vae is None or self.latent_cache == 0:
            return encode_images(image, self.vae, self.resolution)

        def posterior(images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return list(zip(*encode_posterior(images, self.vae, self.resolution), strict=True))

        mean, std = (torch.stack(x) for x in zip(*self._posteriors.get(image, posterior), strict=True))
        latents = mean + std * torch.randn_like(mean)
        return (latents * self.vae.config.scaling_factor).float()

    def make_prompts(
        self, metas: Sequence[dict], train: bool, dropout: bool = True
    ) -> tuple[list[str], list[list[list[int]] | None]]:
        """Prompts of a batch and their class-token positions (None for dropped prompts)."""
        texts, positions = [], []
        for meta in metas:
            built = self.prompt_builder.build(
                meta,
                rng=self._prompt_rng if train else None,
                drop_fields=self.field_dropout if train else 0.0,
            )
            if train and dropout and self.cond_dropout > 0 and self._prompt_rng.random() < self.cond_dropout:
                texts.append("")
                positions.append(None)
                continue
            positions.append(class_token_positions(self.tokenizer, built))
            texts.append(built.text)
        return texts, positions

    def denoising_loss(
        self,
        batch: dict,
        train: bool,
        generator: torch.Generator | None = None,
        align_all: bool = False,
        align_batch: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Denoising loss of a batch (+ the attention alignment loss).

        Args:
            batch: a datamodule batch (see the class docstring).
            train: random templates and prompt dropout; gradients into the text encoder if trained.
            generator: CPU generator for noise and timesteps (fixed evaluation); None = global RNG.
            align_all: compute the alignment loss on every labelled item of ``batch`` (evaluation).
            align_batch: labelled items (no prompt dropout) run in the same UNet call; they give
                the alignment loss only, not the denoising loss (training).

        Returns:
            ``mse`` (over ``batch``), ``loss`` and, when computed, ``align_loss`` (scalars).
        """
        n_main = batch["image"].shape[0]
        texts, positions = self.make_prompts(batch["meta"], train)
        num_classes = len(self.prompt_builder.class_names)
        # items whose label map is real (unlabelled items are all ignore_index)
        labelled = (batch["label"].flatten(1) < num_classes).all(1).tolist()
        aligned = [
            i
            for i, (pos, ok) in enumerate(zip(positions, labelled, strict=True))
            if align_all and ok and pos is not None
        ]
        images, labels = batch["image"], batch["label"]
        if align_batch is not None:
            a_texts, a_positions = self.make_prompts(align_batch["meta"], train, dropout=False)
            aligned += range(n_main, n_main + len(a_texts))
            texts, positions = texts + a_texts, positions + a_positions
            images = torch.cat([images, align_batch["image"].to(images)])
            labels = torch.cat([labels, align_batch["label"].to(labels)])
        clean = self.encode_images(images)
        b = clean.shape[0]
        noise = torch.randn(clean.shape, generator=generator, device="cpu" if generator else clean.device)
        noise = noise.to(clean)
        t = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (b,),
            generator=generator,
            device="cpu" if generator else clean.device,
        ).to(clean.device)
        noisy = self.noise_scheduler.add_noise(clean, noise, t)
        target = (
            noise if self.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(clean, noise, t)
        )

        text_ctx = torch.enable_grad() if (train and self.train_text_encoder) else torch.no_grad()
        with text_ctx:
            states = encode_prompts(self.tokenizer, self.text_encoder, texts, clean.device)
        if self.clues is not None:
            # the images' own codes at random cells; a prompt dropped for guidance gets null clues
            tokens = self.clues.training_tokens(images, [bool(t) for t in texts], generator=generator)
            states = torch.cat([states, tokens.to(states)], dim=1)
        out: dict[str, torch.Tensor] = {}
        if aligned:
            index, weight = class_token_index(
                [positions[i] if i in aligned else positions[aligned[0]] for i in range(b)]
            )
            recorder = AttentionRecorder(aspect=(1, 1))
            recorder.set_tokens(index.to(clean.device))
            with capture_cross_attention(self.unet, recorder):
                pred = self.unet(noisy, t, encoder_hidden_states=states).sample
            keep = torch.as_tensor(aligned, device=clean.device)
            maps = {k: v[keep] for k, v in recorder.maps.items()}
            align_loss, _ = attention_alignment_loss(
                maps,
                weight[keep.cpu()],
                labels[keep],
                self.align.resolutions,
                classes=self.align_class_values,
            )
            out["align_loss"] = align_loss
        else:
            pred = self.unet(noisy, t, encoder_hidden_states=states).sample
        out["mse"] = F.mse_loss(pred[:n_main].float(), target[:n_main].float())
        out["loss"] = out["mse"] + (self.align.weight * out["align_loss"] if "align_loss" in out else 0.0)
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The denoising loss, plus the weighted attention-alignment loss when alignment is on.

        The alignment loss comes from the next batch of labelled items, run in the same UNet call.
        Logs ``train/loss``, ``train/mse`` and ``train/align_loss``.

        Args:
            batch: a datamodule batch.
            batch_idx: the batch's index (unused).

        Returns:
            The total loss.
        """
        align_batch = self._labelled.next() if self._labelled is not None else None
        out = self.denoising_loss(batch, train=True, align_batch=align_batch)
        b = batch["image"].shape[0]
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=b)
        self.log("train/mse", out["mse"], batch_size=b)
        if "align_loss" in out:
            self.log("train/align_loss", out["align_loss"], prog_bar=True, batch_size=b)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Logs ``val/mse`` and ``val/align_loss`` over the batch's labelled items (even without alignment).

        Args:
            batch: a datamodule batch.
            batch_idx: the batch's index, the seed of its noise and timesteps.
        """
        # fixed noise and timesteps per batch, so the validation loss is comparable across epochs
        gen = torch.Generator().manual_seed(batch_idx)
        # align_all: how well the class words' attention matches held-out masks (also without alignment)
        out = self.denoising_loss(batch, train=False, generator=gen, align_all=True)
        b = batch["image"].shape[0]
        self.log("val/mse", out["mse"], prog_bar=True, batch_size=b, sync_dist=True)
        if "align_loss" in out:
            self.log("val/align_loss", out["align_loss"], batch_size=b, sync_dist=True)

    # ---- EMA -------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Update the EMA UNet after each optimizer step (decay warmed up when ``ema_warmup``).

        Args:
            outputs: the training step's output (unused).
            batch: the batch (unused).
            batch_idx: the batch's index; with gradient accumulation only every
                ``accumulate_grad_batches``-th batch ends an optimizer step.
        """
        if self.ema_unet is None or (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return  # update only after optimizer steps (gradient accumulation)
        step = self.global_step
        decay = min(self.ema_decay, (1 + step) / (10 + step)) if self.ema_warmup else self.ema_decay
        with torch.no_grad():
            ema = [p for p in self.ema_unet.parameters()]
            cur = [p.detach() for p in self.unet.parameters()]
            torch._foreach_lerp_(ema, cur, 1.0 - decay)

    # ---- export ----------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write the model in diffusers format (UNet with EMA weights when EMA is on).

        Layout: ``unet/ text_encoder/ tokenizer/ scheduler/`` (+ ``vae/`` and a
        ``model_index.json`` for ``StableDiffusionPipeline`` in latent space) and
        ``diffmask.json`` (space, resolution, class names, prompt settings).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        unet = self.ema_unet if self.ema_unet is not None else self.unet
        unet.save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.noise_scheduler.save_pretrained(path / "scheduler")
        if self.vae is not None:
            self.vae.save_pretrained(path / "vae")
            atomic_write_json(
                path / "model_index.json",
                {
                    "_class_name": "StableDiffusionPipeline",
                    "_diffusers_version": __import__("diffusers").__version__,
                    "feature_extractor": [None, None],
                    "requires_safety_checker": False,
                    "safety_checker": [None, None],
                    "scheduler": ["diffusers", type(self.noise_scheduler).__name__],
                    "text_encoder": ["transformers", type(self.text_encoder).__name__],
                    "tokenizer": ["transformers", type(self.tokenizer).__name__],
                    "unet": ["diffusers", type(unet).__name__],
                    "vae": ["diffusers", type(self.vae).__name__],
                },
            )
        meta = {
            "format": 1,
            "space": "latent" if self.vae is not None else "pixel",
            "resolution": self.resolution,
            "channels": self.channels,  # data.channels: loading it for other data is refused
            "class_names": list(self.prompt_builder.class_names),
            "prompt_builder": self.prompt_builder.to_dict(),
            "prediction_type": self.prediction_type,
            "ema": self.ema_unet is not None,
            # which classes the attention was aligned to (the rest are zero-shot)
            "align_classes": list(self.align.classes)
            if self.align.classes is not None
            else list(self.prompt_builder.class_names[1:]),
            "global_step": int(self.global_step),
            **(extra or {}),
        }
        if self.clues is not None:
            from diffmask.codebook.clues import CLUES_DIR  # noqa: PLC0415

            self.clues.save(path / CLUES_DIR)
            meta["clues"] = CLUES_DIR
        atomic_write_json(path / METADATA_FILE, json.loads(json.dumps(meta, default=str)))
        return path
