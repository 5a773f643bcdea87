import functools

import pytest
import pytorch_lightning as pl

from diffmask.data import read_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES, chest_prompt_builder
from diffmask.synthesis import draw_requests, generate_samples

TWO_CPU_RANKS = functools.partial(
    pl.Trainer, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
    enable_progress_bar=False, enable_model_summary=False,
)


@pytest.mark.slow
def test_two_ranks_write_disjoint_shards_and_rank0_merges(tmp_path, sampler):
    requests = draw_requests(5, seed=0, prompt_builder=chest_prompt_builder())
    out = tmp_path / "ddp"
    counts = generate_samples(TWO_CPU_RANKS, sampler, requests, out, CHEST_CLASS_NAMES, batch_size=2,
                              num_inference_steps=1, guidance_scale=2.0)
    assert counts["rows"] == 5
    shards = sorted(p.name for p in out.glob("manifest.rank*.jsonl"))
    assert shards == ["manifest.rank0.jsonl", "manifest.rank1.jsonl"]
    per_rank = [[line for line in (out / s).read_text().splitlines() if line] for s in shards]
    assert sorted(len(rows) for rows in per_rank) == [2, 3]  # no id generated twice
    assert [r.id for r in read_manifest(out)] == [r.id for r in requests]
    assert all((out / "images" / f"{r.id}.png").is_file() for r in requests)


@pytest.mark.slow
def test_two_ranks_with_attention_masks_write_disjoint_ids_and_every_file(tmp_path, sampler):
    from test_attention_masks import attention_maker

    requests = draw_requests(4, seed=1, prompt_builder=chest_prompt_builder())
    out = tmp_path / "ddp_masks"
    counts = generate_samples(TWO_CPU_RANKS, sampler, requests, out, CHEST_CLASS_NAMES, batch_size=1,
                              num_inference_steps=1, guidance_scale=2.0, mask_maker=attention_maker(),
                              save_class_maps=True)
    assert counts["rows"] == 4
    per_rank = [
        {
            line.split('"id": "')[1].split('"')[0]
            for line in (out / f"manifest.rank{r}.jsonl").read_text().splitlines()
        }
        for r in (0, 1)
    ]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]  # disjoint ids
    assert per_rank[0] | per_rank[1] == {r.id for r in requests}
    for row in read_manifest(out):
        assert (out / row.sem_seg_file_name).is_file() and (out / row.attn_file).is_file()
        assert set(row.scores) == {"left_lung", "right_lung", "heart"}


@pytest.mark.slow
def test_two_ranks_write_controlled_samples_with_their_condition_masks(tmp_path):
    import numpy as np
    from PIL import Image

    from diffmask.control import ConditionBuilder, build_controlnet
    from diffmask.diffusion import ControlledSampler
    from diffmask.diffusion.tiny_models import tiny_scratch_components
    from diffmask.domains.chest import PhantomSource
    from diffmask.synthesis.controlled import ConditionDataset, controlled_requests

    comps = tiny_scratch_components(32, seed=1)
    builder = ConditionBuilder("mask", 4)
    sampler = ControlledSampler(comps, 32, build_controlnet(comps.unet, builder.channels),
                                prompt_builder=chest_prompt_builder())
    src = PhantomSource(size=32, num_train=3)
    requests = controlled_requests(src, src.ids("train"), 2, seed=0, prompt_builder=chest_prompt_builder())
    out = tmp_path / "ddp_control"
    counts = generate_samples(TWO_CPU_RANKS, sampler, ConditionDataset(requests, src, builder, 32), out,
                              CHEST_CLASS_NAMES, batch_size=2, num_inference_steps=1, guidance_scale=1.0)
    assert counts["rows"] == 6
    rows = read_manifest(out)
    assert sorted(r.id for r in rows) == sorted(r.id for r in requests)
    for r in rows:
        assert np.array_equal(np.asarray(Image.open(out / r.sem_seg_file_name)), src.load(r.pair_id).label)
