"""experiments/gpu_session.sh, the GPU session plan, runs end to end tiny on a CPU (SMOKE=1).

No CI machine has a GPU, so this is the only check of the plan's commands before a session
with a GPU spends its device time on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_session_steps_run_in_smoke_mode(tmp_path, real_dir):
    env = {**os.environ, "SMOKE": "1", "PY": sys.executable, "ART": str(tmp_path / "art"),
           "LOGS": str(tmp_path / "logs"), "OUT": str(tmp_path / "out"), "DIFFMASK_JSRT_DIR": str(real_dir)}
    for step in ("fit", "generate", "table", "ablation"):
        result = subprocess.run(["bash", "experiments/gpu_session.sh", step], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"step {step}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = tmp_path / "out"
    masks = json.loads((out / "mask_iou.json").read_text())["metrics"]
    assert {"masks/jsrt/raw/miou", "masks/jsrt/threshold/miou", "masks/jsrt/densecrf/miou",
            "masks/jsrt/affinity/miou"} <= set(masks)
    assert "affinity/miou =" in (out / "affinity_t_val.txt").read_text()
    for chain in ("", "_raw", "_threshold_densecrf", "_threshold_densecrf_affinity"):
        assert json.loads((out / f"gpu128{chain}_stage.json").read_text())["counts"]["rows"] == 4
    report = (out / "report.md").read_text()
    assert "8 runs, 8 conditions" in report
    assert "segmentation.init_weights=[" in report and "synthetic_name=gpu128_raw" in report
    assert (out / "report.csv").is_file()
    # the table's models are also scored on the shifted JSRT copies (experiments/robustness), one pair of
    # plots each
    header = (out / "report.csv").read_text().splitlines()[0]
    for s in ("jsrt", "window", "fov", "detector", "mixed"):
        assert f"test/{s}/miou" in header, header
        assert (out / f"iou_vs_real_fraction_{s}.png").is_file() and (out / f"backbones_{s}.png").is_file(), s
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["bash", "experiments/gpu_session.sh", "nope"], cwd=ROOT, env=env, check=True,
                       capture_output=True)
