"""Generation with the real mask maker (attention store -> threshold/CRF), crash-resume, quality filter."""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from diffmask.attention import CrossAttentionStore
from diffmask.data import ManifestSource, read_manifest
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import chest_prompt_builder
from diffmask.refine import DenseCRFRefiner, RefinementChain, ThresholdRefiner
from diffmask.refine.mask_maker import AttentionMaskMaker
from diffmask.synthesis import (
    MaskQualityFilter,
    draw_requests,
    generate_samples,
    load_class_maps,
    read_dropped,
)

STEPS = dict(num_inference_steps=2, guidance_scale=2.0)


def attention_maker() -> AttentionMaskMaker:
    return AttentionMaskMaker(
        functools.partial(CrossAttentionStore, upsample="bilinear"),
        RefinementChain(
            {
                "threshold": ThresholdRefiner(ignore_band=0.1),
                "densecrf": DenseCRFRefiner(iterations=3, reference_size=512),
            }
        ),
        class_names=CHEST,
    )


class CrashAfter:
    """Wraps a mask maker; raises on call number ``n``.

    A crash mid-run, after earlier batches were written.
    """

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def new_sink(self, *args):
        return self.inner.new_sink(*args)

    def __call__(self, images, sink, positions):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.inner(images, sink, positions)


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_capture_then_masks_scores_class_maps_and_manifest(tmp_path, sampler, trainer_factory):
    requests = draw_requests(3, seed=0, prompt_builder=chest_prompt_builder())
    out = tmp_path / "syn.tmp"
    counts = generate_samples(trainer_factory, sampler, requests, out, CHEST, batch_size=2,
                              mask_maker=attention_maker(), save_class_maps=True, **STEPS)
    assert counts["rows"] == 3 and counts["dropped_total"] == 0
    rows = read_manifest(out)
    for r in rows:
        assert r.sem_seg_file_name == f"masks/{r.id}.png" and r.attn_file == f"attn/{r.id}.npz"
        assert set(r.scores) == {"left_lung", "right_lung", "heart"}
        assert all(0 <= v <= 1 for v in r.scores.values())
        mask = np.asarray(Image.open(out / r.sem_seg_file_name))
        assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2, 3}
        maps = load_class_maps(out / r.attn_file)
        assert maps.shape == (3, 32, 32) and np.isfinite(maps).all() and 0 <= maps.min() and maps.max() <= 1
    raw = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    expected_keys = {"score_left_lung", "score_right_lung", "score_heart", "sem_seg_file_name", "attn_file"}
    assert expected_keys <= set(raw)
    assert ManifestSource(out, CHEST).load(rows[0].id).label.shape == (32, 32)


def test_crash_mid_run_resumes_without_duplicates_or_partial_files(tmp_path, sampler, trainer_factory):
    requests = draw_requests(5, seed=2, prompt_builder=chest_prompt_builder())
    out = tmp_path / "crash.tmp"
    crashing = CrashAfter(attention_maker(), n=2)  # batch 1 (2 samples) written, batch 2 crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_samples(trainer_factory, sampler, requests, out, CHEST, batch_size=2,
                         mask_maker=crashing, save_class_maps=True, **STEPS)
    files = _files(out)
    # no partial files
    assert not [f for f in files if f.endswith(".tmp") or os.path.basename(f).startswith(".")]
    assert sum(f.startswith("images/") for f in files) == 2 and sum(f.startswith("attn/") for f in files) == 2
    assert len((out / "manifest.rank0.jsonl").read_text().splitlines()) == 2

    counts = generate_samples(trainer_factory, sampler, requests, out, CHEST, batch_size=2,
                              mask_maker=attention_maker(), save_class_maps=True, **STEPS)
    assert counts["skipped"] == 2 and counts["written"] == 3 and counts["rows"] == 5
    ids = [json.loads(line)["id"] for line in (out / "manifest.rank0.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(r.id for r in requests)  # each id generated exactly once
    assert [r.id for r in read_manifest(out)] == [r.id for r in requests]
    assert sum(f.startswith("masks/") for f in _files(out)) == 5


def test_quality_filter_rules():
    names = CHEST
    mask = np.zeros((20, 20), np.uint8)
    mask[2:8, 2:8], mask[2:8, 12:18], mask[12:16, 8:12] = 1, 2, 3
    keep = MaskQualityFilter(names, min_score=0.2, min_largest_fraction=0.9, max_components=2)
    assert keep.reason(mask, {"left_lung": 0.5, "right_lung": 0.5, "heart": 0.5}) is None
    assert keep.reason(mask, {"left_lung": 0.5, "right_lung": 0.1, "heart": 0.5}).startswith(
        "right_lung: score"
    )
    no_heart = mask.copy()
    no_heart[no_heart == 3] = 0
    assert keep.reason(no_heart) == "missing class heart"
    assert MaskQualityFilter(names, require_all_classes=False).reason(no_heart) is None
    split = mask.copy()
    split[18:20, 0:4] = 1  # a 2nd left-lung piece of 8 px beside 36 px: largest holds 0.82
    assert "largest component" in keep.reason(split)
    split[0, 19] = split[19, 19] = 1
    assert "components" in MaskQualityFilter(names, max_components=2).reason(split)
    with pytest.raises(ValueError, match="min_largest_fraction"):
        MaskQualityFilter(names, min_largest_fraction=0)


class HeartlessOnce:
    """A mask maker whose second image has no heart (the filter must drop exactly that one)."""

    def new_sink(self, prompts, positions, resolution):
        return None

    def __call__(self, images, sink, positions):
        masks = np.zeros((len(images), 32, 32), np.uint8)
        masks[:, 4:28, 2:10], masks[:, 4:28, 22:30], masks[:, 12:20, 12:20] = 1, 2, 3
        masks[1][masks[1] == 3] = 0
        return masks, [{"left_lung": 0.5, "right_lung": 0.5, "heart": 0.5}] * len(images)


def test_quality_filter_drops_a_sample_with_a_missing_class_and_counts_it(tmp_path, sampler, trainer_factory):
    requests = draw_requests(3, seed=0, prompt_builder=chest_prompt_builder())
    out = tmp_path / "q.tmp"
    kwargs = dict(batch_size=3, mask_maker=HeartlessOnce(), quality_filter=MaskQualityFilter(CHEST),
                  **STEPS)
    counts = generate_samples(trainer_factory, sampler, requests, out, CHEST, **kwargs)
    assert counts["rows"] == 2 and counts["dropped"] == 1 and counts["dropped_total"] == 1
    assert read_dropped(out) == {requests[1].id: "missing class heart"}
    assert requests[1].id not in {r.id for r in read_manifest(out)}
    assert not (out / "images" / f"{requests[1].id}.png").exists()
    again = generate_samples(trainer_factory, sampler, requests, out, CHEST, **kwargs)
    assert again["written"] == 0 and again["skipped"] == 3 and again["dropped_total"] == 1  # not redone


def test_quality_filter_and_presence_record_let_an_optional_class_be_missing(tmp_path):
    from diffmask.synthesis.quality import class_presence_record

    keep = MaskQualityFilter(["background", "organ", "lesion"], optional_classes=["lesion"])
    organ_only = np.zeros((8, 8), np.uint8)
    organ_only[2:6, 2:6] = 1
    assert keep(organ_only) and not keep(np.zeros((8, 8), np.uint8))  # the organ is always there
    with pytest.raises(ValueError, match="optional_classes"):
        MaskQualityFilter(["background", "organ"], optional_classes=["lesion"])
    from PIL import Image

    from diffmask.data import ManifestRow, write_manifest

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rows = []
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(organ_only).save(tmp_path / "masks" / f"{i}.png")
        rows.append(
            ManifestRow(
                id=str(i),
                file_name=f"images/{i}.png",
                sem_seg_file_name=f"masks/{i}.png",
                prompt="p",
                source="synthetic",
            )
        )
    write_manifest(tmp_path, rows)
    names = ["background", "organ", "lesion"]
    assert class_presence_record(tmp_path, names, 0.5)["warnings"]  # a lesion in no mask: warned by default
    record = class_presence_record(tmp_path, names, 0.5, optional_classes=["lesion"])
    assert record["class_presence"] == {"organ": 1.0, "lesion": 0.0} and record["warnings"] == []
