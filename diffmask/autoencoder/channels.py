"""Images in and out of an autoencoder whose channels may differ from the data's: the one place
where grey images meet a 3-channel VAE.

Stable Diffusion's VAE reads and writes 3 channels. Grey data (``data.channels=1``) is repeated
to the autoencoder's channels on the way in (:func:`to_autoencoder_channels`) and the decoded
channels are averaged back to grey on the way out (:func:`from_autoencoder_channels`); colour data
(``data.channels=3``) on a 3-channel autoencoder, and grey data on the project's grey autoencoder,
pass as they are. Nothing else is converted: colour into a grey autoencoder, or colour asked of a
grey decoder, is an error, never a silent drop or invention of colour.

Which autoencoder may serve which data is decided by :func:`check_autoencoder_channels` (and, for
the project's own autoencoder, by the channels it was fitted on: :func:`~diffmask.autoencoder.
module.load_autoencoder`).
"""

from __future__ import annotations

import torch

__all__ = [
    "channel_word",
    "check_autoencoder_channels",
    "check_datamodule_channels",
    "from_autoencoder_channels",
    "to_autoencoder_channels",
]


def channel_word(channels: int) -> str:
    """``grey`` for 1 channel, ``colour`` for 3 (for messages)."""
    return {1: "grey", 3: "colour"}.get(int(channels), f"{channels}-channel")


def check_datamodule_channels(trainer, channels: int, model: str) -> None:
    """A ValueError when the trainer's datamodule serves images of other channels than ``channels``.

    Args:
        trainer: the Lightning trainer (or None: nothing to check).
        channels: the channels the model takes.
        model: what the model is, for the message ("the diffusion model").
    """
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data_channels = getattr(dm, "channels", None)
    if data_channels is not None and int(data_channels) != int(channels):
        raise ValueError(
            f"data.channels={data_channels} ({channel_word(data_channels)}), but {model} takes "
            f"{channels}-channel ({channel_word(channels)}) images; grey and colour are never converted "
            "silently"
        )


def check_autoencoder_channels(autoencoder_channels: int, channels: int, where: str = "autoencoder") -> None:
    """A ValueError unless images of ``channels`` can go through an autoencoder of ``autoencoder_channels``:
    the same number, or grey images (repeated to the autoencoder's channels, averaged back)."""
    if int(channels) == int(autoencoder_channels) or int(channels) == 1:
        return
    raise ValueError(
        f"{where}: the autoencoder reads {autoencoder_channels}-channel images, the data has {channels} "
        f"channel(s) ({channel_word(channels)}); only grey images are repeated to an autoencoder's channels, "
        "colour is never dropped silently"
    )


def to_autoencoder_channels(images: torch.Tensor, autoencoder_channels: int) -> torch.Tensor:
    """(B, C, H, W) images -> (B, autoencoder_channels, H, W): unchanged when C matches, grey (C = 1)
    repeated to the autoencoder's channels; any other C is a ValueError."""
    c = int(images.shape[1])
    check_autoencoder_channels(autoencoder_channels, c, where=f"image ({c} channel(s))")
    return images if c == int(autoencoder_channels) else images.repeat(1, int(autoencoder_channels), 1, 1)


def from_autoencoder_channels(decoded: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, D, H, W) decoder output -> (B, channels, H, W): unchanged when D = ``channels``, averaged
    over D for grey (``channels`` = 1, the inverse of the repeat); any other pair is a ValueError."""
    d = int(decoded.shape[1])
    if d == int(channels):
        return decoded
    if int(channels) == 1:
        return decoded.mean(dim=1, keepdim=True)  # the autoencoder saw grey repeated; average back
    raise ValueError(
        f"decoded images have {d} channel(s), {channels} ({channel_word(channels)}) were asked for; "
        "a colour image cannot be made from a grey autoencoder"
    )
