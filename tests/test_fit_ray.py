"""Stage 2 (ray mode): a TorchTrainer with 2 DDP workers reproduces the local temperature fit."""

from __future__ import annotations

import json

import pytest

from pipeline import fit
from pipeline.calibrators import load
from tests.test_fit import FP, make_cfg, make_records, write_dataset


@pytest.mark.ray
def test_ray_temperature_matches_local(tmp_path, monkeypatch, ray_local):
    monkeypatch.setattr(fit, "model_fingerprint", lambda model: FP)
    output = tmp_path / "run"
    # 7 images x 97 pixels: a row count that 2 workers cannot split evenly without padding.
    write_dataset(output, "cal", make_records("cal", 10, size=(24, 24), scale=2.5))
    local = load(fit.run(make_cfg(tmp_path, pixels_per_image=97))["temperature"])
    out = fit.run(make_cfg(tmp_path, pixels_per_image=97, mode="ray", num_workers=2))
    distributed = load(out["temperature"])
    assert distributed.temperature == pytest.approx(local.temperature, abs=1e-3)
    card = json.loads((out["temperature"] / "calibrator.json").read_text())
    assert card["metrics"]["mode"] == "ray"
    # The Train run's checkpoints are removed once the artifact holds the result.
    assert not any((output / "ray_train").glob("fit-temperature-*"))


@pytest.mark.ray
def test_ray_lts_trains_on_maps_and_improves_heldout_nll(tmp_path, monkeypatch, ray_local):
    # The AdamW path of the Train loop on whole maps with images (LTS), which the pointwise
    # test above does not reach: the fit must run, write a loadable artifact and calibrate.
    monkeypatch.setattr(fit, "model_fingerprint", lambda model: FP)
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 10, size=(16, 16), scale=3.0, image=True))
    cfg = make_cfg(
        tmp_path, calibrators=[{"name": "lts", "options": {"epochs": 3, "batch_size": 2}}],
        mode="ray", num_workers=2, map_stride=1,
    )
    out = fit.run(cfg)
    card = json.loads((out["lts"] / "calibrator.json").read_text())
    assert card["metrics"]["mode"] == "ray"
    held = card["metrics"]["heldout"]
    assert held["nll"] < card["metrics"]["uncalibrated"]["nll"]
    assert held["ece"] < card["metrics"]["uncalibrated"]["ece"]
    assert load(out["lts"]).spatial
