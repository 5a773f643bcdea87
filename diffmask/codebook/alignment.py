"""Fine-grained alignment of report words and codebook patches (train-free: pointwise mutual information).

From the (report, image codes) pairs of the real training images: a word w and a code c co-occur
in an image when w is in its report and c among its patch codes. With image counts n_w, n_c, n_wc
of N images,

    PMI(w, c) = log( (n_wc + a) * N / ((n_w + a) * (n_c + a)) )

(``a`` a small smoothing count): a code that occurs in every image scores ~0 with every word, one
that occurs only with a word scores log(N / n_w) > 0. Positions are kept: ``cells[w, c]`` counts
where c sits in the images that have w, so a key patch is a code and the cell it is most often
found at under the prompt's words. For a prompt, :meth:`WordCodePMI.key_patches` ranks codes by
their mean PMI with the prompt's words and returns the top-k (code, cell) pairs, one per cell.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diffmask.artifacts import atomic_write_bytes, atomic_write_json

__all__ = ["WordCodePMI", "report_words"]

PMI_FILE = "pmi.json"
STOPWORDS = frozenset("a an the of in on and or to is are with at no not for by as".split())


def report_words(text: str) -> list[str]:
    """Distinct content words of a report, in order (lower case, letters only, no stop words)."""
    seen: dict[str, None] = {}
    for w in re.findall(r"[a-z]+", text.lower()):
        if w not in STOPWORDS:
            seen.setdefault(w, None)
    return list(seen)


class WordCodePMI:
    """Word-code PMI with code positions, from paired reports and code grids.

    Args:
        vocabulary: the words (rows).
        size: number of codes K.
        grid: code grid side G (cells = G * G).
        smoothing: the count ``a`` added in the PMI.
    """

    def __init__(self, vocabulary: Sequence[str], size: int, grid: int, smoothing: float = 0.5):
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.size, self.grid, self.smoothing = int(size), int(grid), float(smoothing)
        v, k, cells = len(self.vocabulary), self.size, self.grid * self.grid
        self.n_images = 0
        self.n_word = np.zeros(v)
        self.n_code = np.zeros(k)
        self.n_joint = np.zeros((v, k))
        self.cells = np.zeros((v, k, cells), np.float32)

    @classmethod
    def fit(
        cls, reports: Sequence[str], codes: Sequence[np.ndarray], size: int, smoothing: float = 0.5
    ) -> WordCodePMI:
        """PMI of the words of ``reports`` and the (G, G) code grids ``codes`` of the same images."""
        if len(reports) != len(codes) or not reports:
            raise ValueError(
                "reports and codes: expected the same non-zero number of images, got "
                f"{len(reports)}, {len(codes)}"
            )
        words = [report_words(r) for r in reports]
        vocab = sorted({w for ws in words for w in ws})
        grid = int(np.asarray(codes[0]).shape[-1])
        pmi = cls(vocab, size, grid, smoothing)
        for ws, grid_codes in zip(words, codes, strict=True):
            flat = np.asarray(grid_codes).ravel()
            if flat.size != grid * grid or flat.min() < 0 or flat.max() >= size:
                raise ValueError(
                    f"codes: expected ({grid}, {grid}) grids of codes in [0, {size}), "
                    f"got {np.asarray(grid_codes).shape}"
                )
            present = np.unique(flat)
            rows = [pmi.index[w] for w in ws]
            pmi.n_images += 1
            pmi.n_word[rows] += 1
            pmi.n_code[present] += 1
            pmi.n_joint[np.ix_(rows, present)] += 1
            for r in rows:
                np.add.at(pmi.cells[r], (flat, np.arange(flat.size)), 1)
        return pmi

    def table(self) -> np.ndarray:
        """(V, K) PMI."""
        a = self.smoothing
        marginals = (self.n_word[:, None] + a) * (self.n_code[None, :] + a)
        return np.log((self.n_joint + a) * self.n_images / marginals)

    def scores(self, text: str) -> np.ndarray:
        """(K,) mean PMI of each code with the known words of ``text`` (zeros when none is known)."""
        rows = [self.index[w] for w in report_words(text) if w in self.index]
        if not rows:
            return np.zeros(self.size)
        return self.table()[rows].mean(0)

    def key_patches(self, text: str, k: int) -> list[tuple[int, int]]:
        """The top-``k`` (code, cell) pairs for a prompt: codes by mean PMI, each at its most
        frequent free cell under the prompt's words (cells row-major in the G x G grid)."""
        rows = [self.index[w] for w in report_words(text) if w in self.index]
        scores = self.scores(text)
        where = self.cells[rows].sum(0) if rows else self.cells.sum(0)  # (K, cells)
        out, used = [], set()
        for code in np.argsort(-scores, kind="stable"):
            if where[code].sum() == 0:
                continue  # never seen under these words: no position to put it at
            for cell in np.argsort(-where[code], kind="stable"):
                if where[code, cell] == 0:
                    break
                if int(cell) not in used:
                    used.add(int(cell))
                    out.append((int(code), int(cell)))
                    break
            if len(out) == k:
                break
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the counts to ``path`` (created): ``pmi.json`` (vocabulary, sizes) and ``pmi.npz``.

        Args:
            path: the folder (a codebook-conditioned model's clues folder).

        Returns:
            ``path``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / PMI_FILE, {
            "vocabulary": self.vocabulary, "size": self.size, "grid": self.grid, "smoothing": self.smoothing,
            "n_images": self.n_images,
        })
        buf = io.BytesIO()
        np.savez_compressed(
            buf, n_word=self.n_word, n_code=self.n_code, n_joint=self.n_joint, cells=self.cells
        )
        atomic_write_bytes(path / "pmi.npz", buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordCodePMI:
        """The PMI that :meth:`save` wrote to ``path``.

        Args:
            path: the folder holding ``pmi.json`` and ``pmi.npz``.

        Raises:
            FileNotFoundError: ``path`` has no ``pmi.json``.
        """
        path = Path(path)
        if not (path / PMI_FILE).is_file():
            raise FileNotFoundError(f"{path}: no {PMI_FILE} (the word-code alignment of a codebook stage)")
        info = json.loads((path / PMI_FILE).read_text())
        pmi = cls(info["vocabulary"], info["size"], info["grid"], info["smoothing"])
        pmi.n_images = int(info["n_images"])
        with np.load(path / "pmi.npz") as z:
            pmi.n_word, pmi.n_code = z["n_word"], z["n_code"]
            pmi.n_joint, pmi.cells = z["n_joint"], z["cells"]
        return pmi
