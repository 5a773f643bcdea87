"""TransUNet for 2-D images (Chen et al., 2021, "TransUNet: Transformers Make Strong Encoders for
Medical Image Segmentation").

Layout: a ResNet-like CNN encoder (no pretrained weights) brings the image to 1/16 scale; a ViT
runs on that feature map with patch size 1 (one token per 1/16-scale pixel) and learnable position
embeddings; a cascaded upsampler goes back to full resolution, taking skip connections from the
encoder at 1/8, 1/4 and 1/2 scale; a 3x3 convolution gives per-class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock, UnetResBlock
from torch import nn

__all__ = ["TransUNet"]

# The encoder halves the resolution four times before the transformer.
_DOWNSAMPLE = 16


def _as_pair(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, bool):
        raise ValueError(f"img_size must be an int or a pair of ints, got {img_size!r}")
    if isinstance(img_size, int):
        return img_size, img_size
    if isinstance(img_size, Sequence) and not isinstance(img_size, str) and len(img_size) == 2:
        # OmegaConf ListConfig is a Sequence too, so configs can give `img_size: [256, 256]`.
        h, w = img_size
        if isinstance(h, int) and isinstance(w, int) and not isinstance(h, bool) and not isinstance(w, bool):
            return h, w
    raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")


class _DecoderBlock(nn.Module):
    """Upsample x2 (bilinear), concatenate the skip (if any), then two conv-BN-ReLU layers."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            Convolution(
                2, in_channels + skip_channels, out_channels, kernel_size=3, norm="batch", act="relu"
            ),
            Convolution(2, out_channels, out_channels, kernel_size=3, norm="batch", act="relu"),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class TransUNet(nn.Module):
    """TransUNet: CNN encoder, ViT bottleneck at 1/16 scale, cascaded upsampler with skips.

    Channel widths follow ``base_channels`` (``b``): encoder ``b`` at 1/2, ``2b`` at 1/4, ``4b`` at
    1/8, ``8b`` at 1/16; decoder ``4b, 2b, b, b // 2`` at 1/8, 1/4, 1/2, 1/1. With ``b = 64`` the
    skip widths match the paper's R50 hybrid up to the 1/8 level (which is 256 here, 512 there).

    The position embeddings are learned for an ``img_size // 16`` token grid. An input of another
    size (still divisible by 16) gets the embeddings resized bicubically, as ViT does when it is
    fine-tuned at a new resolution.

    Args:
        in_channels: channels of the input image (``data.channels``: 1 grey, 3 colour).
        out_channels: number of classes; the output holds one logit map per class.
        img_size: training image size, an int (square) or ``(H, W)``; each divisible by 16.
        base_channels: width of the first encoder stage (``b`` above); at least 2.
        hidden_size: transformer token width; divisible by ``num_heads``.
        num_layers: number of transformer blocks (0 turns the bottleneck into a plain CNN, for
            ablations).
        num_heads: attention heads per transformer block.
        mlp_dim: hidden width of each transformer MLP.
        dropout: dropout rate in the transformer (embeddings, attention, MLP), in ``[0, 1)``.

    Examples::

        # 4 classes (background, left lung, right lung, heart) on 256 px grayscale images
        net = TransUNet(in_channels=1, out_channels=4, img_size=256)
        logits = net(torch.rand(2, 1, 256, 256))  # (2, 4, 256, 256)

        # a small one for tests
        net = TransUNet(1, 4, img_size=64, base_channels=8, hidden_size=32, num_layers=1,
                        num_heads=2, mlp_dim=64)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int | Sequence[int],
        base_channels: int = 32,
        hidden_size: int = 384,
        num_layers: int = 6,
        num_heads: int = 6,
        mlp_dim: int = 1536,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("base_channels", base_channels, 2),
            ("hidden_size", hidden_size, 1),
            ("num_layers", num_layers, 0),
            ("num_heads", num_heads, 1),
            ("mlp_dim", mlp_dim, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        size = _as_pair(img_size)
        if any(s < _DOWNSAMPLE or s % _DOWNSAMPLE for s in size):
            raise ValueError(
                f"img_size must be a positive multiple of {_DOWNSAMPLE} on each side, got {img_size!r}"
            )
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = size
        self.grid_size = (size[0] // _DOWNSAMPLE, size[1] // _DOWNSAMPLE)
        b = base_channels

        # --- CNN encoder: stem to 1/2, then three residual stages to 1/4, 1/8, 1/16.
        # Batch norm throughout, as in the paper's decoder; the R50 there uses GroupNorm only
        # because it loads BiT weights, which this network does not.
        self.stem = Convolution(2, in_channels, b, strides=2, kernel_size=7, norm="batch", act="relu")
        self.stages = nn.ModuleList(
            nn.Sequential(
                UnetResBlock(2, c_in, c_out, kernel_size=3, stride=2, norm_name="batch", act_name="relu"),
                UnetResBlock(2, c_out, c_out, kernel_size=3, stride=1, norm_name="batch", act_name="relu"),
            )
            for c_in, c_out in ((b, 2 * b), (2 * b, 4 * b), (4 * b, 8 * b))
        )

        # --- ViT on the 1/16-scale map: patch size 1, so the "patch embedding" is a 1x1 conv.
        self.patch_embed = nn.Conv2d(8 * b, hidden_size, kernel_size=1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.embed_dropout = nn.Dropout(dropout)
        # use_flash_attention stays False: MONAI's SDPA path passes dropout_p even in eval mode,
        # which would make inference random; the token grid is small (256 tokens at 256 px), so
        # the explicit attention matrix costs little.
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate=dropout, qkv_bias=True)
            for _ in range(num_layers)
        )
        for block in self.blocks:
            # MONAI builds this LayerNorm even without cross-attention; left in, it never gets a
            # gradient and DDP (find_unused_parameters=False) fails on the second step.
            block.norm_cross_attn = nn.Identity()
        self.encoder_norm = nn.LayerNorm(hidden_size)

        # --- Cascaded upsampler ("CUP").
        self.conv_more = Convolution(2, hidden_size, 8 * b, kernel_size=3, norm="batch", act="relu")
        last = max(b // 2, 1)
        self.decoder = nn.ModuleList(
            [
                _DecoderBlock(8 * b, 4 * b, 4 * b),  # 1/16 -> 1/8, skip from stage 2
                _DecoderBlock(4 * b, 2 * b, 2 * b),  # 1/8 -> 1/4, skip from stage 1
                _DecoderBlock(2 * b, b, b),  # 1/4 -> 1/2, skip from the stem
                _DecoderBlock(b, 0, last),  # 1/2 -> 1/1, no skip at full resolution
            ]
        )
        self.head = nn.Conv2d(last, out_channels, kernel_size=3, padding=1)

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a ``grid`` of tokens: ``(1, grid_h * grid_w, hidden_size)``."""
        if grid == self.grid_size:
            return self.pos_embed
        hidden = self.pos_embed.shape[-1]
        pos = self.pos_embed.reshape(1, *self.grid_size, hidden).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=grid, mode="bicubic", align_corners=False)
        return pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of images.

        Args:
            x: images ``(B, in_channels, H, W)``, H and W multiples of 16 (any value range; the
                data module gives [0, 1]).

        Returns:
            Logits ``(B, out_channels, H, W)`` (no softmax).
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"TransUNet expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % _DOWNSAMPLE or w % _DOWNSAMPLE:
            raise ValueError(
                f"TransUNet input height and width must be multiples of {_DOWNSAMPLE}, got {h}x{w}"
            )

        skips = [self.stem(x)]  # 1/2
        feats = skips[0]
        for stage in self.stages:
            feats = stage(feats)
            skips.append(feats)  # 1/4, 1/8, 1/16
        feats = skips.pop()

        tokens = self.patch_embed(feats)  # (B, hidden, h/16, w/16)
        grid = (tokens.shape[-2], tokens.shape[-1])
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, N, hidden)
        tokens = self.embed_dropout(tokens + self._position_embedding(grid))
        for block in self.blocks:
            tokens = block(tokens)
        tokens = self.encoder_norm(tokens)
        feats = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

        feats = self.conv_more(feats)
        for block, skip in zip(self.decoder, [*reversed(skips), None], strict=True):
            feats = block(feats, skip)
        return self.head(feats)
