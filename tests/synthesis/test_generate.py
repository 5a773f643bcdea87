import json

import numpy as np
import pytest
from PIL import Image

from diffmask.data import ManifestSource, read_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import PhantomSource, chest_prompt_builder
from diffmask.synthesis import (
    MaskMaker,
    draw_requests,
    generate_samples,
    read_done_rows,
    requests_from_prompts,
)

STEPS = dict(num_inference_steps=2, guidance_scale=2.0)


def _metas():
    src = PhantomSource(size=16)
    return [src.load(i).meta for i in src.ids("train")[:8]]


def test_drawn_requests_are_deterministic_and_prefix_stable():
    a = draw_requests(6, seed=3, prompt_builder=chest_prompt_builder(), metas=_metas())
    b = draw_requests(9, seed=3, prompt_builder=chest_prompt_builder(), metas=_metas())
    assert a == b[:6]
    assert len({r.seed for r in b}) == 9 and [r.id for r in a][:2] == ["syn000000", "syn000001"]
    assert all("left lung, right lung and heart" in r.prompt for r in a)
    assert draw_requests(6, seed=4, prompt_builder=chest_prompt_builder(), metas=_metas()) != a
    given = requests_from_prompts(["p one", "p two"], num_per_prompt=2, seed=10)
    assert [(r.prompt, r.seed) for r in given] == [("p one", 10), ("p one", 11), ("p two", 12), ("p two", 13)]
    with pytest.raises(ValueError, match="num_samples"):
        draw_requests(0, 0, chest_prompt_builder())


def test_generate_writes_pngs_and_a_manifest_then_resumes(tmp_path, sampler, trainer_factory):
    requests = draw_requests(5, seed=0, prompt_builder=chest_prompt_builder(), metas=_metas())
    out = tmp_path / "syn.tmp"
    counts = generate_samples(trainer_factory, sampler, requests[:3], out, CHEST, batch_size=2, **STEPS)
    assert counts == {"written": 3, "dropped": 0, "skipped": 0, "rows": 3, "dropped_total": 0}
    rows = read_manifest(out)
    assert [r.id for r in rows] == [r.id for r in requests[:3]]
    row = rows[0]
    assert row.source == "synthetic" and row.seed == requests[0].seed and row.prompt == requests[0].prompt
    assert row.sem_seg_file_name is None and row.meta == requests[0].meta
    img = np.asarray(Image.open(out / row.file_name))
    assert img.shape == (32, 32) and img.dtype == np.uint8
    first = img.copy()

    # a crash mid-append leaves a torn line; one image whose row never got written is redone
    shard = out / "manifest.rank0.jsonl"
    with open(shard, "a") as f:
        f.write('{"id": "syn0000')
    (out / "images" / f"{requests[2].id}.png").unlink()
    counts = generate_samples(trainer_factory, sampler, requests, out, CHEST, batch_size=2, **STEPS)
    assert counts["skipped"] == 2 and counts["written"] == 3 and counts["rows"] == 5
    assert [r.id for r in read_manifest(out)] == [r.id for r in requests]
    assert np.array_equal(np.asarray(Image.open(out / row.file_name)), first)
    src = ManifestSource(out, CHEST)
    assert len(src.ids("train")) == 5 and src.load(requests[4].id).label is None


def test_same_seed_same_images_regardless_of_batch_size(tmp_path, sampler, trainer_factory):
    requests = draw_requests(3, seed=1, prompt_builder=chest_prompt_builder(), metas=_metas())
    generate_samples(trainer_factory, sampler, requests, tmp_path / "a", CHEST, batch_size=3, **STEPS)
    generate_samples(trainer_factory, sampler, requests, tmp_path / "b", CHEST, batch_size=1, **STEPS)
    for r in requests:
        a = np.asarray(Image.open(tmp_path / "a" / "images" / f"{r.id}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "b" / "images" / f"{r.id}.png")).astype(int)
        assert np.abs(a - b).max() <= 1


def test_mask_maker_hook_writes_masks_and_scores(tmp_path, sampler, trainer_factory, mask_maker):
    assert isinstance(mask_maker, MaskMaker)
    requests = draw_requests(2, seed=0, prompt_builder=chest_prompt_builder(), metas=_metas())
    out = tmp_path / "m"
    generate_samples(trainer_factory, sampler, requests, out, CHEST, batch_size=2,
                     mask_maker=mask_maker, **STEPS)
    assert mask_maker.calls == 1
    raw = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert raw["sem_seg_file_name"] == f"masks/{requests[0].id}.png"
    assert set(k for k in raw if k.startswith("score_")) == {"score_left_lung", "score_heart"}
    sample = ManifestSource(out, CHEST).load(requests[0].id)
    assert sample.label is not None and set(np.unique(sample.label)) <= {0, 1}
    # the trivial maker thresholds the float image at 0.5; the PNG holds round(255 x)
    assert np.mean(sample.label != (sample.image >= 128)) < 0.01
    assert len(read_done_rows(out)) == 2
