"""What to generate: rows of (id, prompt, seed), drawn from real metadata or given."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch.utils.data import Dataset

from diffmask.prompts.builder import PromptBuilder
from diffmask.prompts.retrieval import PromptRetriever

__all__ = [
    "GenerationRequest",
    "RequestDataset",
    "draw_requests",
    "retrieve_requests",
    "requests_from_prompts",
    "collate_requests",
]


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.

    Attributes:
        id: sample id (also the PNG name).
        prompt: the prompt.
        seed: the seed of its initial noise.
        meta: the metadata the prompt was built from ({} for given prompts).
    """

    id: str
    prompt: str
    seed: int
    meta: dict[str, str] = field(default_factory=dict)


def draw_requests(
    num_samples: int,
    seed: int,
    prompt_builder: PromptBuilder,
    metas: Sequence[Mapping[str, object]] = (),
    id_prefix: str = "syn",
    retriever: PromptRetriever | None = None,
    findings: Mapping[str, object] | None = None,
) -> list[GenerationRequest]:
    """``num_samples`` requests whose prompts come from randomly drawn real metadata.

    Deterministic in (seed, index): asking for more samples keeps the first ones unchanged
    (with a ``retriever``: deterministic in seed).

    Args:
        num_samples: how many.
        seed: seed of the draws (metadata, template, per-image seeds).
        prompt_builder: builds the prompts.
        metas: metadata dicts of the real training images (empty → neutral prompts).
        id_prefix: ids are ``<prefix><index:06d>``.
        retriever: draw the prompts by retrieval from the corpus that ``prompt_builder`` makes
            of ``metas`` (``prompts=retrieval``) instead of uniformly over ``metas``.
        findings: an anatomy-pathology builder (``prompts=anatomy_pathology`` at fit) draws each
            request's findings from its training images' findings (the joint real distribution);
            these asked findings override the drawn ones, e.g. ``{"heart_size": "enlarged"}``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples}")
    anatomy = hasattr(prompt_builder, "sample_findings")
    if findings and not anatomy:
        raise ValueError(
            "findings: the model's prompts carry no findings (fitted with prompts=default); "
            "asked findings need a model fitted with prompts=anatomy_pathology"
        )
    if anatomy:
        prompt_builder.check_findings(findings or {})
    if retriever is not None:
        if anatomy:
            raise ValueError(
                "prompts=retrieval: not for anatomy-pathology models (their prompts are drawn from findings)"
            )
        return retrieve_requests(num_samples, seed, prompt_builder, metas, retriever, id_prefix)
    rng = random.Random(seed)
    metas = [dict(m) for m in metas]
    out = []
    for i in range(num_samples):
        if anatomy:
            meta = prompt_builder.sample_findings(rng, findings)
        else:
            meta = metas[rng.randrange(len(metas))] if metas else {}
        built = prompt_builder.build(meta, rng=rng)
        out.append(GenerationRequest(
            id=f"{id_prefix}{i:06d}", prompt=built.text, seed=rng.getrandbits(31),
            meta={k: "" if v is None else str(v) for k, v in meta.items()},
        ))
    return out


def retrieve_requests(
    num_samples: int,
    seed: int,
    prompt_builder: PromptBuilder,
    metas: Sequence[Mapping[str, object]],
    retriever: PromptRetriever,
    id_prefix: str = "syn",
) -> list[GenerationRequest]:
    """``num_samples`` requests whose prompts a :class:`~diffmask.prompts.PromptRetriever` draws.

    The metadata row each prompt was rebuilt from is kept in ``meta`` (plus ``retrieval_query``
    in ``query`` mode). Deterministic in ``seed``.
    """
    drawn = retriever.draw(prompt_builder, metas, num_samples, seed)
    # per-image seeds from their own stream, so they do not depend on how the prompts were drawn
    rng = random.Random(f"{seed}/noise")
    out = []
    for i, d in enumerate(drawn):
        meta = dict(d.meta)
        if d.query is not None:
            meta["retrieval_query"] = d.query
        seed_i = rng.getrandbits(31)
        out.append(GenerationRequest(id=f"{id_prefix}{i:06d}", prompt=d.prompt.text, seed=seed_i, meta=meta))
    return out


def requests_from_prompts(
    prompts: Sequence[str], num_per_prompt: int, seed: int, id_prefix: str = "syn"
) -> list[GenerationRequest]:
    """``num_per_prompt`` requests for each given prompt, seeds ``seed, seed+1, ...`` in order."""
    if not prompts or num_per_prompt < 1:
        raise ValueError(
            "prompts/num_per_prompt: expected prompts and >= 1 per prompt, got "
            f"{len(prompts)}, {num_per_prompt}"
        )
    out, k = [], 0
    for p in prompts:
        for _ in range(num_per_prompt):
            out.append(GenerationRequest(id=f"{id_prefix}{k:06d}", prompt=str(p), seed=seed + k))
            k += 1
    return out


class RequestDataset(Dataset):
    """Requests as dataset items ``{"id", "prompt", "seed", "meta"}`` (for ``trainer.predict``)."""

    def __init__(self, requests: Sequence[GenerationRequest]):
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("requests: ids must be unique")
        self.requests = list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict:
        r = self.requests[index]
        return {"id": r.id, "prompt": r.prompt, "seed": r.seed, "meta": dict(r.meta)}


def collate_requests(items: list[dict]) -> dict[str, list]:
    """Collate :class:`RequestDataset` items into one list per key (no tensors: ids, prompts, seeds, meta)."""
    return {key: [it[key] for it in items] for key in items[0]}
