"""experiments/robustness/make_shifted_sets.py writes test sets that data.test_sets reads by path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from diffmask.data import open_test_set
from diffmask.domains.chest import CHEST_CLASS_NAMES as CHEST
from diffmask.domains.chest import JSRTSource

ROOT = Path(__file__).resolve().parents[2]


def test_shifted_sets_keep_the_labels_aligned(real_dir, tmp_path):
    subprocess.run(
        [sys.executable, "experiments/robustness/make_shifted_sets.py", str(real_dir), str(tmp_path),
         "--shifts", "window", "fov"],
        cwd=ROOT, check=True, capture_output=True,
    )
    real = JSRTSource(real_dir)
    sid = real.ids("test")[0]
    orig = real.load(sid)
    win = open_test_set(tmp_path / "window", CHEST, name="window")
    assert win.ids("test") == real.ids("test")
    w = win.load(sid)
    assert np.array_equal(w.label, orig.label) and w.meta == orig.meta  # metadata carried for prompts
    assert w.image.min() >= 0.15 * 255 - 1 and w.image.max() <= 0.85 * 255 + 1
    f = open_test_set(tmp_path / "fov", CHEST).load(sid)
    # 80 % of the image on a border: each class keeps ~64 % of its area, and its centre
    for c in (1, 2, 3):
        ratio = (f.label == c).sum() / (orig.label == c).sum()
        assert 0.58 < ratio < 0.70, (c, ratio)
    assert (f.label[:20] == 0).all() and (f.image[:20] <= 10).all()
