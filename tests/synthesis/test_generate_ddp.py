import functools

import pytest
import pytorch_lightning as pl

from diffmask.data import read_manifest
from diffmask.labels import DEFAULT_CLASS_NAMES
from diffmask.prompts import PromptBuilder
from diffmask.synthesis import draw_requests, generate_samples


@pytest.mark.slow
def test_two_ranks_write_disjoint_shards_and_rank0_merges(tmp_path, sampler):
    requests = draw_requests(5, seed=0, prompt_builder=PromptBuilder())
    factory = functools.partial(
        pl.Trainer, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    out = tmp_path / "ddp"
    counts = generate_samples(factory, sampler, requests, out, DEFAULT_CLASS_NAMES, batch_size=2,
                              num_inference_steps=1, guidance_scale=2.0)
    assert counts["rows"] == 5
    shards = sorted(p.name for p in out.glob("manifest.rank*.jsonl"))
    assert shards == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    per_rank = [[line for line in (out / s).read_text().splitlines() if line] for s in shards]
    assert sorted(len(rows) for rows in per_rank) == [2, 3]  # no id generated twice
    assert [r.id for r in read_manifest(out)] == [r.id for r in requests]
    assert all((out / "images" / f"{r.id}.png").is_file() for r in requests)
