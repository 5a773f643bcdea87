"""Visual clues: key patches of the codebook as extra cross-attention tokens (``diffusion.clues=codebook``).

A clue token is the embedding of a code plus the embedding of its cell in the G x G grid. While
fitting, an image's clues are its own patch codes at ``num_tokens`` random cells (thinned); when
sampling, the codes and cells come from the prompt through the word-code PMI
(:meth:`~diffmask.codebook.WordCodePMI.key_patches`). The clue tokens follow the text tokens in
``encoder_hidden_states``, so the class words keep their token positions and DiffMask's attention
capture reads them as before. A prompt dropped for classifier-free guidance gets the null clue
(a learned code of its own) at every slot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffmask.artifacts import atomic_write_json
from diffmask.codebook.alignment import WordCodePMI
from diffmask.codebook.codebook import VisualCodebook
from diffmask.data.image_cache import ImageCache

__all__ = ["CLUES_DIR", "ClueEncoder", "VisualClues"]

CLUES_DIR = "clues"


class ClueEncoder(nn.Module):
    """(codes, cells) -> clue tokens: code embedding + cell embedding, layer-normed.

    Args:
        size: codebook size K (index K is the null clue).
        grid: code grid side G.
        dim: token width (the UNet's ``cross_attention_dim``).
    """

    def __init__(self, size: int, grid: int, dim: int):
        super().__init__()
        self.size, self.grid, self.dim = int(size), int(grid), int(dim)
        self.code = nn.Embedding(self.size + 1, self.dim)
        self.cell = nn.Embedding(self.grid * self.grid, self.dim)
        self.norm = nn.LayerNorm(self.dim)
        nn.init.normal_(self.code.weight, std=0.02)
        nn.init.normal_(self.cell.weight, std=0.02)

    def forward(self, codes: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Embed (code, cell) pairs as clue tokens.

        Args:
            codes: (B, M) code indices in [0, K] (K: the null clue).
            cells: (B, M) cell indices in [0, G * G), the same shape.

        Returns:
            (B, M, D) tokens.
        """
        return self.norm(self.code(codes) + self.cell(cells))


class VisualClues(nn.Module):
    """The clue conditioning of a diffusion model: codebook, encoder, PMI, token count.

    Args:
        codebook: the visual codebook (assigns training images' patches).
        dim: token width (the UNet's ``cross_attention_dim``).
        num_tokens: clue tokens per image.
        pmi: word-code PMI for sampling (fitted from the training reports in ``fit_alignment``).
        codebook_dir: recorded on export.
    """

    CACHE_LIMIT = 4096  # distinct images whose codes are kept

    def __init__(
        self,
        codebook: VisualCodebook,
        dim: int,
        num_tokens: int = 8,
        pmi: WordCodePMI | None = None,
        codebook_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        if not 1 <= num_tokens <= codebook.grid * codebook.grid:
            raise ValueError(
                f"clue_tokens: expected 1..{codebook.grid ** 2} (the codebook's cells), got {num_tokens}"
            )
        self.codebook = codebook
        self.encoder = ClueEncoder(codebook.size, codebook.grid, dim)
        self.num_tokens = int(num_tokens)
        self.pmi = pmi
        self.codebook_dir = None if codebook_dir is None else str(codebook_dir)
        self._codes = ImageCache(self.CACHE_LIMIT)

    # ---- codes -----------------------------------------------------------------------------
    def image_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, G*G) patch codes (each distinct image assigned once, then cached)."""
        return torch.stack(
            self._codes.get(images, lambda x: self.codebook.assign(x.detach().cpu().float()).flatten(1))
        )

    def fit_alignment(
        self, reports: Sequence[str], images: Sequence[torch.Tensor], batch_size: int = 32
    ) -> WordCodePMI:
        """Fit the word-code PMI from the training images' reports and their codes."""
        grids = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack(list(images[start:start + batch_size]))
            g = self.codebook.grid
            grids += [c.reshape(g, g).numpy() for c in self.image_codes(batch)]
        self.pmi = WordCodePMI.fit(list(reports), grids, self.codebook.size)
        return self.pmi

    # ---- tokens ------------------------------------------------------------------------------
    def null(self, n: int, device) -> torch.Tensor:
        """(n, M, D) null clue tokens (the null code at cell 0 in every slot), for dropped prompts.

        Args:
            n: how many token sets.
            device: where the codes are made (the encoder's device).
        """
        codes = torch.full((n, self.num_tokens), self.codebook.size, dtype=torch.long, device=device)
        return self.encoder(codes, torch.zeros_like(codes))

    def training_tokens(
        self, images: torch.Tensor, keep: Sequence[bool], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, M, D) clue tokens of images' own codes at M random cells; null where ``keep`` is False."""
        codes = self.image_codes(images)  # (B, G*G) on the CPU
        b, cells = codes.shape
        pick = torch.stack([torch.randperm(cells, generator=generator)[: self.num_tokens] for _ in range(b)])
        chosen = codes.gather(1, pick)
        keep_t = torch.as_tensor(list(keep), dtype=torch.bool)[:, None]
        chosen = torch.where(keep_t, chosen, torch.full_like(chosen, self.codebook.size))
        pick = torch.where(keep_t, pick, torch.zeros_like(pick))
        device = self.encoder.code.weight.device
        return self.encoder(chosen.to(device), pick.to(device))

    def prompt_tokens(self, prompts: Sequence[str], device=None) -> torch.Tensor:
        """(B, M, D) clue tokens retrieved for prompts (key patches by PMI; "" -> null clues)."""
        if self.pmi is None:
            raise ValueError("clues: no word-code alignment fitted (fit the model with clues=codebook first)")
        device = device or self.encoder.code.weight.device
        codes = torch.full((len(prompts), self.num_tokens), self.codebook.size, dtype=torch.long)
        cells = torch.zeros_like(codes)
        for i, p in enumerate(prompts):
            if not p:
                continue
            for j, (code, cell) in enumerate(self.pmi.key_patches(p, self.num_tokens)):
                codes[i, j], cells[i, j] = code, cell
        return self.encoder(codes.to(device), cells.to(device))

    # ---- export ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the encoder weights, the PMI (if fitted) and ``clues.json`` to ``path`` (created).

        Args:
            path: the folder (a diffusion stage's ``clues/``).

        Returns:
            ``path``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.encoder.state_dict(), path / "clue_encoder.pt")
        if self.pmi is not None:
            self.pmi.save(path)
        atomic_write_json(path / "clues.json", {
            "codebook_dir": self.codebook_dir, "num_tokens": self.num_tokens, "dim": self.encoder.dim,
            "size": self.codebook.size, "grid": self.codebook.grid, "resolution": self.codebook.resolution,
        })
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, resolution: int | None = None, channels: int | None = None
    ) -> VisualClues:
        """Saved clues, with the codebook they were fitted with (from the recorded ``codebook_dir``).

        Args:
            path: the folder :meth:`save` wrote.
            resolution: the model's image side, checked against the codebook's (None: not checked).
            channels: the model's image channels, checked against the codebook's autoencoder
                (None: not checked).
        """
        path = Path(path)
        info = json.loads((path / "clues.json").read_text())
        codebook = VisualCodebook.load(info["codebook_dir"], resolution=resolution, channels=channels)
        pmi = WordCodePMI.load(path) if (path / "pmi.json").is_file() else None
        clues = cls(codebook, int(info["dim"]), int(info["num_tokens"]), pmi, info["codebook_dir"])
        state = torch.load(path / "clue_encoder.pt", map_location="cpu", weights_only=True)
        clues.encoder.load_state_dict(state)
        return clues

