"""A visual codebook of image patches: k-means over the project autoencoder's patch features.

The anatomy-pathology paper pre-defines a visual codebook for the radiology dataset and aligns its
codes with report words. Here the encoder is the project's own autoencoder
(``diffmask-fit-autoencoder``, trained on the real images, no hub weights): a ``patch`` x ``patch``
pixel window is the (patch / factor)^2 cells of its latent posterior mean, flattened and
standardised; k-means (k-means++ seeding, Lloyd iterations, empty codes re-seeded from the worst
fitted patches) gives ``K`` codes. Every patch of an image is assigned to its nearest code, so an
image becomes a (S / patch) x (S / patch) grid of codes.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from diffmask.artifacts import atomic_write_bytes, atomic_write_json
from diffmask.autoencoder import downsampling_factor, load_autoencoder, to_autoencoder_channels

log = logging.getLogger(__name__)

__all__ = ["CODEBOOK_FILE", "VisualCodebook", "codebook_usage", "kmeans"]

CODEBOOK_FILE = "codebook.json"
CENTROIDS_FILE = "codebook.pt"


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared distances."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min(0)


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """K-means of the rows of ``x`` (N, D): k-means++ seeding, then Lloyd iterations.

    A code that gets no point in an iteration is moved to the point farthest from its code (so
    every code is used when there are at least ``k`` distinct points). Returns (k, D) centroids.
    """
    n = x.shape[0]
    if n < k:
        raise ValueError(
            f"codebook.size: {k} codes need at least {k} patches, got {n} (fewer images or a larger patch?)"
        )
    gen = torch.Generator().manual_seed(seed)
    centroids = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = _sq_dist(x, centroids[0][None])[:, 0]
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        nxt = x[torch.multinomial(probs, 1, generator=gen)].squeeze(0)
        centroids.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, nxt[None])[:, 0])
    c = torch.stack(centroids)
    for _ in range(iters):
        dist = _sq_dist(x, c)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            worst = dist.gather(1, assign[:, None])[:, 0].argsort(descending=True)[: len(empty)]
            new[empty] = x[worst]
        if torch.allclose(new, c) and not len(empty):
            break
        c = new
    return c


def codebook_usage(codes: np.ndarray, k: int) -> dict:
    """Usage of ``k`` codes by the assigned ``codes``: counts, dead codes, perplexity."""
    counts = np.bincount(np.asarray(codes).ravel(), minlength=k)
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {
        "counts": counts.tolist(),
        "dead_codes": np.flatnonzero(counts == 0).tolist(),
        "n_dead": int((counts == 0).sum()),
        "perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
    }


class VisualCodebook:
    """K codes of ``patch`` x ``patch`` pixel windows at ``resolution`` px, on an autoencoder's features.

    Args:
        vae: the project autoencoder (its posterior mean is the patch feature).
        centroids: (K, D) codes in standardised feature space.
        mean, std: (D,) feature standardisation.
        patch: window side in pixels (a multiple of the autoencoder's factor).
        resolution: image side the codebook is for.
        autoencoder_dir: where ``vae`` came from (recorded on save).
    """

    def __init__(self, vae, centroids: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, patch: int,
                 resolution: int, autoencoder_dir: str | os.PathLike | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.factor = downsampling_factor(vae)
        check_patch(patch, resolution, self.factor)
        self.centroids = centroids.float()
        self.mean, self.std = mean.float(), std.float()
        self.patch = int(patch)
        self.resolution = int(resolution)
        self.grid = resolution // patch
        self.autoencoder_dir = None if autoencoder_dir is None else str(autoencoder_dir)

    @property
    def size(self) -> int:
        """The number of codes K."""
        return int(self.centroids.shape[0])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (B, G*G, D) raw patch features (row-major cells); C = the data's
        channels (grey repeated to a 3-channel autoencoder's, :mod:`diffmask.autoencoder.channels`)."""
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            raise ValueError(
                f"image: the codebook is for {self.resolution} px images, got {tuple(images.shape[-2:])}; "
                "build the codebook at the diffusion model's data.size"
            )
        x = to_autoencoder_channels(images * 2 - 1, int(self.vae.config.in_channels))
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()  # (B, C, S/f, S/f)
        cell = self.patch // self.factor
        b, c = z.shape[:2]
        z = z.unfold(2, cell, cell).unfold(3, cell, cell)  # (B, C, G, G, cell, cell)
        return z.permute(0, 2, 3, 1, 4, 5).reshape(b, self.grid * self.grid, c * cell * cell)

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        """Patch features scaled by the fitted per-dimension mean and standard deviation."""
        return (feats - self.mean) / self.std

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, G, G) index of each patch's nearest code."""
        f = self.standardise(self.features(images))
        b = f.shape[0]
        codes = _sq_dist(f.reshape(-1, f.shape[-1]), self.centroids).argmin(1)
        return codes.reshape(b, self.grid, self.grid)

    @classmethod
    def fit(cls, vae, images: torch.Tensor, size: int, patch: int, iters: int = 50, seed: int = 0,
            autoencoder_dir: str | os.PathLike | None = None, batch_size: int = 32) -> VisualCodebook:
        """K-means codebook of the patches of ``images`` (N, C, S, S)."""
        resolution = int(images.shape[-1])
        book = cls(vae, torch.zeros(1, 1), torch.zeros(1), torch.ones(1), patch, resolution, autoencoder_dir)
        feats = torch.cat(
            [book.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        )
        feats = feats.reshape(-1, feats.shape[-1])
        book.mean, book.std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        book.centroids = kmeans(book.standardise(feats), size, iters=iters, seed=seed)
        return book

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the centroids and feature statistics and ``codebook.json`` to ``path`` (created).

        Args:
            path: the folder (the codebook stage's folder).
            extra: further JSON-able entries for ``codebook.json``.

        Returns:
            ``path``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save({"centroids": self.centroids, "mean": self.mean, "std": self.std}, buf)
        atomic_write_bytes(path / CENTROIDS_FILE, buf.getvalue())
        atomic_write_json(path / CODEBOOK_FILE, {
            "size": self.size, "patch": self.patch, "resolution": self.resolution, "grid": self.grid,
            "feature_dim": int(self.centroids.shape[1]), "autoencoder_dir": self.autoencoder_dir,
            **(extra or {}),
        })
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, resolution: int | None = None, channels: int | None = None
    ) -> VisualCodebook:
        """A saved codebook (its autoencoder from the recorded ``autoencoder_dir``).

        Raises:
            FileNotFoundError: no codebook in ``path``.
            ValueError: the codebook was built at another size than ``resolution``, or its
                autoencoder was fitted on images of other channels than ``channels``.
        """
        path = Path(path)
        if not (path / CODEBOOK_FILE).is_file():
            raise FileNotFoundError(
                f"codebook_dir: {path} has no {CODEBOOK_FILE}; run diffmask-fit-codebook first"
            )
        info = json.loads((path / CODEBOOK_FILE).read_text())
        if resolution is not None and int(info["resolution"]) != int(resolution):
            raise ValueError(
                f"codebook_dir: {path} was built at {info['resolution']} px, the diffusion model is at "
                f"{resolution} px; "
                "build the codebook at the model's data.size"
            )
        if channels is not None and int(info.get("channels", channels)) != int(channels):
            raise ValueError(
                f"codebook_dir: {path} was built on {info['channels']}-channel images, the diffusion "
                f"model's data has {channels} (data.channels); build the codebook on the same data"
            )
        state = torch.load(path / CENTROIDS_FILE, map_location="cpu", weights_only=True)
        vae = load_autoencoder(info["autoencoder_dir"], resolution=int(info["resolution"]), channels=channels)
        return cls(
            vae, state["centroids"], state["mean"], state["std"], int(info["patch"]), int(info["resolution"]),
            info["autoencoder_dir"],
        )


def check_patch(patch: int, resolution: int, factor: int) -> None:
    """Check that the patch side is a multiple of the autoencoder's factor that divides the image side.

    Args:
        patch: ``codebook.patch``, the patch side in px.
        resolution: the image side in px.
        factor: the autoencoder's downsampling factor.

    Raises:
        ValueError: it is not.
    """
    if patch < factor or patch % factor or resolution % patch:
        raise ValueError(
            f"codebook.patch: expected a multiple of the autoencoder's factor {factor} that divides the "
            f"image side {resolution}, got {patch}"
        )
