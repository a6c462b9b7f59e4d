"""Stage 2 (ray mode): each calibrator's own fit, sharded over 2 Ray Train workers, agrees
with the in-process fit on the same data.

`pipeline.fit.run` fits every registered calibrator on the same shards in-process and in one
TorchTrainer run of two workers (so Ray Train's start-up is paid once), and the artifacts'
cards carry the held-out NLL each reached.
Closed-form and Newton fits (temperature, meta_cal's T and quantile) agree to float summation
order; L-BFGS fits (vector, matrix, dirichlet, ETS weights) stop where float32 loss changes
vanish, which moves their held-out NLL by up to ~3e-5; mini-batch fits (selectors, LTS / IBTS)
draw other batches from two shards than from one, so they agree within their own sampling
noise. Measured when written (|held-out NLL ray - local|, the workers reading their images
from the shards): temperature 0, vector 0, matrix 0, meta_cal 0, ibts 6e-8, ets 2e-7,
dirichlet 8e-6, lts 5e-5, selective_refine 2e-4, selective 2e-3, selective_spatial 2e-3 to
8e-3 (whose local fit moves by up to 0.2 between seeds on data this small).
"""

from __future__ import annotations

import json

import pytest

from pipeline import fit
from pipeline.calibrators import list_calibrators, load
from pipeline.calibrators.artifacts import read_timings
from tests.test_fit import FP, make_cfg, make_records, write_dataset

# (label, registry name, options, |held-out NLL ray - local| tolerance)
CASES = [
    ("temperature", "temperature", {}, 1e-6),
    ("vector", "vector", {}, 1e-4),
    ("matrix", "matrix", {}, 1e-4),
    ("dirichlet", "dirichlet", {}, 1e-4),
    ("ets", "ets", {}, 1e-4),
    ("meta_cal", "meta_cal", {}, 1e-6),
    ("selective", "selective", {"epochs": 4, "batch_size": 128}, 0.03),
    # The issue-13 case: Ray mode used to skip `refine` and fit the base in the driver.
    ("selective_refine", "selective", {
        "epochs": 4, "batch_size": 128, "gate": "soft", "refine": True, "base": "temperature",
        "t_cor": "fit",
    }, 0.01),
    ("selective_spatial", "selective_spatial", {"epochs": 4, "batch_size": 2}, 0.05),
    # Ray mode used to start LTS at T = 1 instead of at the TS temperature.
    ("lts", "lts", {"epochs": 4, "batch_size": 2}, 0.01),
    ("ibts", "ibts", {"epochs": 4, "batch_size": 2}, 0.01),
    # Full-batch L-BFGS on a grid of pixels (no sampling): float summation order only.
    ("adaptive_ts", "adaptive_ts", {}, 1e-4),
    ("adaptive_ts_gated", "adaptive_ts_gated", {}, 1e-4),
]


def test_cases_cover_every_registered_calibrator():
    assert {name for _, name, _, _ in CASES} == set(list_calibrators())


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_local):
    """Artifact folders, cards and timings per mode (``local``, ``ray``) and label."""
    tmp_path = tmp_path_factory.mktemp("fit_ray")
    calibrators = [{"name": name, "label": label, "options": options}
                   for label, name, options, _ in CASES]
    # 12 images of 24 x 24, 4 held out; 201 pixels per image: a row count that 2 workers
    # cannot split evenly without padding.
    write_dataset(tmp_path / "run", "cal",
                  make_records("cal", 12, size=(24, 24), scale=2.5, image=True))
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit, "model_fingerprint", lambda model: FP)
        for mode in ("local", "ray"):
            cfg = make_cfg(tmp_path, calibrators=calibrators, pixels_per_image=201, mode=mode,
                           num_workers=2 if mode == "ray" else 1)
            out[mode] = {
                label: (path, json.loads((path / "calibrator.json").read_text()),
                        read_timings(path))
                for label, path in fit.run(cfg).items()
            }
    # The Train run's checkpoints are removed once the artifacts hold the result.
    assert not any((tmp_path / "run" / "ray_train").glob("fit-*"))
    return out


@pytest.mark.ray
@pytest.mark.parametrize(("label", "tolerance"), [pytest.param(c[0], c[3], id=c[0]) for c in CASES])
def test_ray_fit_matches_local_heldout_nll(fitted, label, tolerance):
    local, ray = fitted["local"][label][1]["metrics"], fitted["ray"][label][1]["metrics"]
    assert (local["mode"], ray["mode"]) == ("local", "ray")
    assert ray["heldout"]["pixels"] == local["heldout"]["pixels"]
    # The workers read and sample the fit images from the shards: the same pixels.
    assert ray["fit_pixels"] == local["fit_pixels"]
    nll_local, nll_ray = local["heldout"]["nll"], ray["heldout"]["nll"]
    print(f"{label}: held-out NLL local {nll_local:.6f} ray {nll_ray:.6f} "
          f"|diff| {abs(nll_ray - nll_local):.2e}")
    assert nll_ray == pytest.approx(nll_local, abs=tolerance)


@pytest.mark.ray
def test_ray_fit_is_one_trainer_run_with_startup_reported_apart(fitted):
    # Timings live in timings.json, apart from the card's metrics.
    timings = {label: t for label, (_, _, t) in fitted["ray"].items()}
    run = timings["temperature"]["ray"]
    assert run["startup_seconds"] > 0
    assert run["fit_seconds"] == {label: t["seconds"] for label, t in timings.items()}
    card = fitted["ray"]["temperature"][1]["metrics"]["ray"]
    assert card == {"workers": 2, "calibrators_in_run": len(CASES), "concurrent_runs": 1}


@pytest.mark.ray
def test_ray_temperature_equals_local(fitted):
    local = load(fitted["local"]["temperature"][0])
    distributed = load(fitted["ray"]["temperature"][0])
    assert distributed.temperature == pytest.approx(local.temperature, rel=1e-6)


@pytest.mark.ray
def test_independent_calibrators_fit_in_concurrent_trainer_runs(tmp_path, monkeypatch, ray_local):
    # 4 logical CPUs hold two 1-worker runs (one CPU each kept free for Ray Data): temperature
    # and vector fit side by side, each in its own TorchTrainer run, and still match local.
    monkeypatch.setattr(fit, "model_fingerprint", lambda model: FP)
    write_dataset(tmp_path / "run", "cal", make_records("cal", 8, size=(16, 16), scale=2.5))
    calibrators = [{"name": "temperature"}, {"name": "vector"}]
    cards = {}
    for mode in ("local", "ray"):
        out = fit.run(make_cfg(tmp_path, calibrators=calibrators, mode=mode, num_workers=1))
        cards[mode] = {k: json.loads((p / "calibrator.json").read_text())["metrics"]
                       for k, p in out.items()}
    for label, tolerance in (("temperature", 1e-6), ("vector", 1e-4)):
        assert cards["ray"][label]["ray"] == {"workers": 1, "calibrators_in_run": 1,
                                              "concurrent_runs": 2}
        assert cards["ray"][label]["heldout"]["nll"] == pytest.approx(
            cards["local"][label]["heldout"]["nll"], abs=tolerance)
