"""The parts of a text-conditioned diffusion model, built from scratch or loaded from a folder.

* :func:`build_scratch_components` — a ``UNet2DConditionModel`` + a small ``CLIPTextModel`` from
  a config + the offline prompt tokenizer, in pixel space (``diffusion=scratch``) or on the
  latents of the project's autoencoder (``diffusion=latent``).
* :func:`load_components` — a folder in diffusers format: a Stable Diffusion checkpoint
  (``diffusion=pretrained``, latent space with its ``AutoencoderKL``) or a model this project
  exported (pixel or latent). Both go through the same code.

Image channels: a model generates images of ``data.channels`` (1 grey, 3 colour). In pixel space
the UNet's in/out channels are those; in latent space the autoencoder must have been fitted on
such images (a Stable Diffusion VAE, 3 channels, also takes grey images, repeated to its channels
and averaged back: :mod:`diffmask.autoencoder.channels`). The export records ``channels`` in
``diffmask.json``; loading a model for data of other channels is a ValueError naming both and the
folder (grey and colour are never converted silently).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffmask.autoencoder.channels import channel_word, check_autoencoder_channels
from diffmask.autoencoder.module import downsampling_factor, load_autoencoder
from diffmask.prompts.tokenizer import build_prompt_tokenizer, prompt_vocabulary

__all__ = [
    "DiffusionComponents",
    "build_scratch_components",
    "load_components",
    "check_resolution",
    "check_model_channels",
    "METADATA_FILE",
]

log = logging.getLogger(__name__)
METADATA_FILE = "diffmask.json"
REQUIRED_FOLDERS = ("unet", "text_encoder", "tokenizer", "scheduler")


class DiffusionComponents:
    """Everything a diffusion model needs; ``vae`` is None in pixel space.

    A plain class, not a dataclass: Hydra would turn a dataclass passed to ``instantiate`` into
    a config node.

    Attributes:
        unet: noise predictor; ``in_channels`` the image channels (pixel) or the VAE's latent channels.
        text_encoder: CLIP text model giving (B, T, cross_attention_dim) states.
        tokenizer: CLIP tokenizer (fast, with offsets).
        noise_scheduler: the DDPM training scheduler (its config also seeds samplers).
        vae: latent-space autoencoder (frozen), or None for pixel space.
        metadata: contents of ``diffmask.json`` when loaded from an exported model, else {}.
        clues: visual clue conditioning (:class:`~diffmask.codebook.clues.VisualClues`) of a model
            fitted with ``diffusion.clues=codebook``: its tokens follow the text tokens; else None.
        channels: the image channels the model generates (``data.channels``: 1 grey, 3 colour).
            None = the recorded ``channels`` of an exported model (1 for one exported before they
            were recorded), else the pixel UNet's channels, else 1 (grey through a VAE, as before).

    Raises:
        ValueError: the UNet does not take the VAE's latents; a pixel UNet's channels differ from
            ``channels``; a VAE cannot take images of ``channels``; ``channels`` differ from the
            exported model's recorded channels.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        vae: AutoencoderKL | None = None,
        metadata: dict[str, Any] | None = None,
        clues: Any | None = None,
        channels: int | None = None,
    ):
        self.unet = unet
        self.clues = clues
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        self.metadata = metadata or {}
        if vae is not None and int(unet.config.in_channels) != int(vae.config.latent_channels):
            raise ValueError(
                f"autoencoder: its latents have {vae.config.latent_channels} channels, the UNet takes "
                f"{unet.config.in_channels}; the UNet was built for another autoencoder (or for pixels)"
            )
        recorded = model_channels(self.metadata)
        if channels is None:
            if recorded is not None:
                channels = recorded
            else:
                channels = int(unet.config.in_channels) if vae is None else 1
        channels = int(channels)
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
        if recorded is not None and recorded != channels:
            raise ValueError(
                f"channels: the model was fitted on {recorded}-channel ({channel_word(recorded)}) images, "
                f"{channels} ({channel_word(channels)}) asked for"
            )
        if vae is None and int(unet.config.in_channels) != channels:
            raise ValueError(
                f"channels: a pixel-space UNet with {unet.config.in_channels} input channels cannot generate "
                f"{channels}-channel ({channel_word(channels)}) images"
            )
        if vae is not None:
            check_autoencoder_channels(int(vae.config.in_channels), channels)
        self.channels = channels

    @property
    def latent(self) -> bool:
        """Whether the model is a latent one (it has a VAE); False for pixel space."""
        return self.vae is not None

    @property
    def intensity(self) -> str:
        """The ``data.intensity`` the exported model was trained on (``raw`` when not recorded)."""
        return str(self.metadata.get("intensity", "raw"))

    @property
    def vae_scale_factor(self) -> int:
        """Image side / UNet input side: the VAE's downsampling factor, 1 in pixel space."""
        return 1 if self.vae is None else downsampling_factor(self.vae)

    @property
    def image_channels(self) -> int:
        """The channels of the images the model generates (= :attr:`channels`)."""
        return self.channels


def model_channels(metadata: dict[str, Any] | None) -> int | None:
    """The image channels recorded in an exported model's ``diffmask.json``: its ``channels``, 1 for
    a model exported before they were recorded (all were grey); None without a ``diffmask.json``."""
    if not metadata:
        return None
    return int(metadata.get("channels", 1))


def check_model_channels(model_dir: str | os.PathLike, recorded: int | None, channels: int,
                         what: str = "diffusion model", record: str = METADATA_FILE) -> None:
    """A ValueError naming both values and the folder when the ``what`` in ``model_dir`` was fitted on
    images of other channels than ``channels`` (``data.channels``); None (no record) passes."""
    if recorded is not None and int(recorded) != int(channels):
        raise ValueError(
            f"data.channels={channels} ({channel_word(channels)}), but the {what} in {model_dir} was "
            f"fitted on {recorded}-channel ({channel_word(recorded)}) images ({record} channels={recorded}); "
            f"grey and colour are never converted silently: use data with channels={recorded}, or fit a "
            "model on this data"
        )


def check_resolution(components: DiffusionComponents, resolution: int, field: str = "resolution") -> int:
    """The UNet input side for images of ``resolution`` px; a ValueError if the UNet cannot take it."""
    n_down = len(components.unet.config.block_out_channels) - 1
    factor = components.vae_scale_factor
    multiple = factor * 2**n_down
    if resolution < multiple or resolution % multiple:
        raise ValueError(
            f"{field}: {resolution} px cannot pass this model: it must be a multiple of {multiple} "
            f"(2**{n_down} UNet downsamplings x VAE factor {factor})"
        )
    return resolution // factor


def build_scratch_components(
    vocabulary: Sequence[str] = (),
    resolution: int = 128,
    block_out_channels: Sequence[int] = (64, 128, 256, 256),
    layers_per_block: int = 2,
    attention_levels: Sequence[bool] | None = None,
    attention_heads: int = 8,
    cross_attention_dim: int = 256,
    norm_num_groups: int = 32,
    only_cross_attention: bool | Sequence[bool] = False,
    text_hidden_size: int = 256,
    text_layers: int = 4,
    text_heads: int = 4,
    text_intermediate_size: int = 1024,
    max_prompt_tokens: int = 64,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "epsilon",
    autoencoder_dir: str | os.PathLike | None = None,
    channels: int = 1,
) -> DiffusionComponents:
    """A text-conditioned diffusion model with random weights (no download), in pixel space or,
    with ``autoencoder_dir``, on a trained autoencoder's latent grid (``diffusion=latent``).

    Args:
        vocabulary: extra words the tokenizer keeps whole, on top of
            :data:`diffmask.prompts.PROMPT_WORDS` (the fit entry adds the templates' and the
            training metadata's words).
        resolution: image side; checked against the number of downsamplings.
        block_out_channels: channels per UNet level (its length = number of levels).
        layers_per_block: ResNet (+ attention) layers per level.
        attention_levels: which levels have (self + cross) attention; default all but the first
            (the full-resolution level, where self-attention is quadratic in the pixel count).
        attention_heads: heads per attention layer (diffusers' ``attention_head_dim`` acts as the
            head count for this UNet in diffusers 0.42).
        cross_attention_dim: width of the text states (= ``text_hidden_size`` is typical).
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        only_cross_attention: drop self-attention in transformer blocks (much faster at 128 px); one
            flag per resolution level (finest first) keeps it on the coarser grids only, e.g.
            ``[true, false, false]`` (the self-attention affinity refiner reads it).
        text_hidden_size, text_layers, text_heads, text_intermediate_size: the CLIP text encoder.
        max_prompt_tokens: the tokenizer's padded length (BOS and EOS included).
        num_train_timesteps, beta_schedule, prediction_type: the DDPM training scheduler.
        autoencoder_dir: a ``diffmask-fit-autoencoder`` stage folder (or a Stable Diffusion
            folder's ``vae/``): the UNet then works on its latents (``resolution`` / factor per
            side, its latent channels) and the autoencoder is kept frozen beside it.
        channels: image channels (``data.channels``: 1 grey, 3 colour): the pixel UNet's in/out
            channels; in latent space the autoencoder must have been fitted on such images (a
            Stable Diffusion VAE also takes grey ones).
    """
    levels = len(block_out_channels)
    if levels < 2:
        raise ValueError(f"block_out_channels: expected at least 2 levels, got {list(block_out_channels)}")
    if attention_levels is None:
        attention_levels = [False] + [True] * (levels - 1)
    attention_levels = list(attention_levels)
    if len(attention_levels) != levels or not any(attention_levels):
        raise ValueError(
            f"attention_levels: expected {levels} booleans with at least one True, got {attention_levels}"
        )
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"block_out_channels: {bad} not divisible by norm_num_groups={norm_num_groups}")
    if text_hidden_size % text_heads:
        raise ValueError(f"text_hidden_size: {text_hidden_size} not divisible by text_heads={text_heads}")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
    tokenizer = build_prompt_tokenizer(prompt_vocabulary(vocabulary), model_max_length=max_prompt_tokens)
    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (grey) or 3 (colour), got {channels}")
    vae = None
    unet_channels, sample_size = int(channels), resolution
    if autoencoder_dir is not None:
        vae = load_autoencoder(autoencoder_dir, resolution, channels=channels)
        unet_channels = int(vae.config.latent_channels)
        sample_size = resolution // downsampling_factor(vae)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=unet_channels,
        out_channels=unet_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_heads,
        norm_num_groups=norm_num_groups,
        only_cross_attention=(only_cross_attention if isinstance(only_cross_attention, bool)
                              else tuple(bool(x) for x in only_cross_attention)),
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_hidden_size,
        intermediate_size=text_intermediate_size,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        max_position_embeddings=max_prompt_tokens,
        projection_dim=cross_attention_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    if text_hidden_size != cross_attention_dim:
        raise ValueError(
            f"cross_attention_dim: must equal text_hidden_size ({text_hidden_size}), "
            f"got {cross_attention_dim}"
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
    comps = DiffusionComponents(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=scheduler,
        vae=vae, channels=channels,
    )
    check_resolution(comps, resolution)
    return comps


def load_components(
    model_path: str | os.PathLike,
    prediction_type: str | None = None,
    torch_dtype: torch.dtype | None = None,
    channels: int | None = None,
) -> DiffusionComponents:
    """Load a diffusers-format folder: ``unet/ text_encoder/ tokenizer/ scheduler/`` (+ ``vae/``).

    A Stable Diffusion 1.x/2.x folder (e.g. SD 1.5 downloaded once with ``save_pretrained``) and a
    model exported by :meth:`DiffusionLitModule.export` load the same way. Without ``vae/`` the
    model is pixel-space.

    Args:
        model_path: the folder.
        prediction_type: override the scheduler's prediction type (e.g. ``v_prediction`` when
            fine-tuning an epsilon model to v); None keeps the folder's.
        torch_dtype: dtype to load the weights in (default float32).
        channels: the data's image channels (``data.channels``); None = the model's own. An
            exported model must have been fitted on such images (its ``diffmask.json``
            ``channels``; 1 when not recorded); a Stable Diffusion folder takes colour images or
            grey ones (repeated to its VAE's 3 channels).

    Raises:
        FileNotFoundError: the folder or a required component folder is missing (named).
        ValueError: ``channels`` differ from the exported model's (both values and the folder named).
    """
    root = Path(model_path)
    if not root.is_dir():
        raise FileNotFoundError(f"model_path: {root} is not a folder (expected a diffusers-format model)")
    missing = [name for name in REQUIRED_FOLDERS if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model_path: {root} lacks the component folder(s) {missing}; a diffusers-format model needs "
            f"{list(REQUIRED_FOLDERS)} (+ vae/ for latent models)"
        )
    meta_file = root / METADATA_FILE
    metadata = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if channels is not None:  # before any weights are read
        check_model_channels(root, model_channels(metadata), channels)
        if not metadata:  # a foreign folder: its UNet (pixel) or VAE must take these images
            image_in = (AutoencoderKL.load_config(root / "vae") if (root / "vae").is_dir()
                        else UNet2DConditionModel.load_config(root / "unet"))["in_channels"]
            if not (root / "vae").is_dir() and int(image_in) != int(channels):
                raise ValueError(
                    f"data.channels={channels} ({channel_word(channels)}), but the pixel-space model in "
                    f"{root} takes {image_in}-channel images"
                )
            check_autoencoder_channels(int(image_in), int(channels), where=f"model_path {root}")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    unet = UNet2DConditionModel.from_pretrained(root / "unet", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    sched_cfg = DDPMScheduler.load_config(root / "scheduler")
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}"
            )
        sched_cfg["prediction_type"] = prediction_type
    noise_scheduler = DDPMScheduler.from_config(sched_cfg)
    vae = AutoencoderKL.from_pretrained(root / "vae", **kwargs) if (root / "vae").is_dir() else None
    clues = None
    if metadata.get("clues"):
        from diffmask.codebook.clues import VisualClues  # noqa: PLC0415 - the codebook needs the autoencoder module

        clues = VisualClues.load(root / metadata["clues"], resolution=metadata.get("resolution"),
                                 channels=model_channels(metadata))
    log.info("diffusion: loaded %s model from %s", "latent" if vae is not None else "pixel", root)
    return DiffusionComponents(
        unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=noise_scheduler,
        vae=vae, metadata=metadata, clues=clues, channels=channels,
    )
