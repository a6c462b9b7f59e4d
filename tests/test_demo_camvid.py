"""The quick CamVid run end to end, on the real data and weights (skips when they are absent)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.data
@pytest.mark.slow
def test_quick_camvid_run_calibrates_in_domain(camvid_root, espnet_weights, tmp_path):
    env = {**os.environ, "CAMVID_ROOT": str(camvid_root),
           "SEGCAL_ESPNET_WEIGHTS": str(espnet_weights), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(ROOT / "configs" / "camvid_quick.yaml"),
         "--set", f"output={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(out / "report.html") in proc.stdout
    summary = pd.read_csv(out / "summary.csv")
    numeric = summary.select_dtypes("number").drop(
        columns=["mis_auroc", "flag_precision", "flag_recall"], errors="ignore"
    )
    assert numeric.notna().all().all()
    assert numeric.apply(lambda c: c.map(math.isfinite)).all().all()
    day = summary[summary.dataset == "day"].set_index("calibrator")
    best = day.drop(index="uncalibrated").img_ece.min()
    assert best < day.loc["uncalibrated", "img_ece"]
    # These calibrators keep the argmax, so accuracy is the same for all of them.
    assert day.pixel_acc.max() - day.pixel_acc.min() < 1e-4
    for name in ("report.md", "domain_shift.csv", "best.csv", "per_image.parquet"):
        assert (out / name).is_file(), name
