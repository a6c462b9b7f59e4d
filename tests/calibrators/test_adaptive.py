"""Adaptive temperature scaling: per-image temperatures from label-free logit features.

Synthetic truth: every image's logits are ``s * z`` where ``softmax(z)`` is calibrated, so the
right temperature of an image is its ``s``; clean images have s = 1, shifted ones s = 3.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.calibrators import build_calibrator
from pipeline.calibrators.adaptive import (
    FEATURES,
    AdaptiveTemperatureScaling,
    GatedAdaptiveTemperatureScaling,
    image_features,
)
from pipeline.calibrators.reduce import DistributedReduce
from pipeline.calibrators.temperature import fit_temperature

C = 5
D = len(FEATURES)


def _maps(n, scale, seed, h=16, w=16):
    """``scale * z`` logits with labels drawn from softmax(z): true temperature ``scale``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, h, w, generator=g) * 2.5
    probs = torch.softmax(z, 1).permute(0, 2, 3, 1).reshape(-1, C)
    labels = torch.multinomial(probs, 1, generator=g).reshape(n, h, w)
    return z * scale, labels


def _domains(seed=0, n=12):
    clean = _maps(n, 1.0, seed)
    shifted = _maps(n, 3.0, seed + 100)
    both = (torch.cat([clean[0], shifted[0]]), torch.cat([clean[1], shifted[1]]))
    return clean, shifted, both


def _nll(calibrator, logits, labels):
    with torch.no_grad():
        return float(F.cross_entropy(calibrator(logits), labels))


def test_features_of_known_maps():
    # Uniform logits: confidence 1/C, entropy log C, no margin, no spread, top logit 0,
    # log-sum-exp log C.
    uniform = image_features(torch.zeros(1, C, 4, 4))[0]
    torch.testing.assert_close(uniform, torch.tensor([1 / C, 1.0, 0.0, 0.0, 0.0, math.log(C)]))
    # One class far ahead everywhere: confidence 1, entropy 0, margin log(1 + 50).
    sure = torch.zeros(1, C, 4, 4)
    sure[:, 2] = 50.0
    values = image_features(sure)[0]
    torch.testing.assert_close(values[:2], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)
    assert float(values[2]) == pytest.approx(float(torch.log1p(torch.tensor(50.0))))
    assert float(values[4]) == pytest.approx(50.0)
    assert float(values[5]) == pytest.approx(50.0, abs=1e-6)
    assert len(FEATURES) == image_features(sure).shape[1]


def test_per_image_temperature_recovers_each_domain():
    clean, shifted, both = _domains()
    ats = AdaptiveTemperatureScaling(C).fit(*both)
    t_clean, t_shifted = ats.temperature(clean[0]), ats.temperature(shifted[0])
    # One temperature for all cannot be right for both: TS lands in between.
    t_ts = fit_temperature(both[0].movedim(1, -1).reshape(-1, C), both[1].reshape(-1))
    assert 1.3 < t_ts < 2.7
    # Measured: clean ~1.0, shifted ~3.0.
    assert float(t_clean.median()) == pytest.approx(1.0, abs=0.2)
    assert float(t_shifted.median()) == pytest.approx(3.0, abs=0.45)
    # On unseen images of both kinds it beats one temperature.
    _, _, test = _domains(seed=7)
    ts = build_calibrator("temperature", C).fit(*both)
    assert _nll(ats, *test) < _nll(ts, *test) - 0.02


def test_argmax_never_changes_and_temperatures_are_positive():
    _, _, both = _domains()
    ats = AdaptiveTemperatureScaling(C).fit(*both)
    logits = both[0] * torch.linspace(0.2, 5.0, len(both[0])).view(-1, 1, 1, 1)
    assert torch.equal(ats(logits).argmax(1), logits.argmax(1))
    assert bool((ats.temperature(logits) > 0).all())


def test_gated_keeps_plain_ts_inside_the_clean_band_and_adapts_outside():
    clean, shifted, both = _domains()
    gated = GatedAdaptiveTemperatureScaling(C, gate="hard", band=0.0)
    options = gated.reference_options(FitDataLike(*clean))
    gated = GatedAdaptiveTemperatureScaling(C, gate="hard", band=0.0, **options).fit(*both)
    # T0 is the TS solution on the clean images' pixels (every pixel here: 256 per map).
    t0 = fit_temperature(clean[0].movedim(1, -1).reshape(-1, C), clean[1].reshape(-1))
    assert options["reference"]["temperature"] == pytest.approx(t0, rel=1e-5)
    # Every clean fit image lies inside its own band (band=0: min to max): exactly T0.
    assert bool((gated.gate(clean[0]) == 0).all())
    torch.testing.assert_close(gated.temperature(clean[0]), torch.full((12,), t0), rtol=1e-5,
                               atol=0)
    # The shifted images lie outside it and get their own temperature.
    assert bool((gated.gate(shifted[0]) == 1).all())
    assert float(gated.temperature(shifted[0]).median()) == pytest.approx(3.0, abs=0.45)


def test_soft_gate_grows_with_the_distance_outside_the_band():
    clean, _, both = _domains()
    options = GatedAdaptiveTemperatureScaling(C, band=0.0).reference_options(FitDataLike(*clean))
    gated = GatedAdaptiveTemperatureScaling(C, band=0.0, width=0.5, **options).fit(*both)
    logits = clean[0][:1] * torch.tensor([1.0, 1.5, 2.5, 4.0]).view(-1, 1, 1, 1)
    g = gated.gate(logits)
    assert float(g[0]) == 0.0  # a clean reference image: inside the band
    assert bool((g[1:] - g[:-1] >= 0).all())
    assert float(g[-1]) > 0.9


def test_without_a_reference_every_fit_image_counts_as_clean():
    clean, _, _ = _domains()
    ats = AdaptiveTemperatureScaling(C, gate="hard", band=0.0).fit(*clean)
    expected = AdaptiveTemperatureScaling(C).reference_options(FitDataLike(*clean))["reference"]
    assert float(ats.log_t0.exp()) == pytest.approx(expected["temperature"], rel=1e-5)
    torch.testing.assert_close(ats.feature_mean, torch.tensor(expected["mean"]))


def test_ignored_pixels_and_fully_ignored_maps_are_skipped():
    clean, _, both = _domains()
    labels = both[1].clone()
    labels[0] = 255  # a fully ignored map
    labels[:, :2] = 255
    ats = AdaptiveTemperatureScaling(C).fit(both[0], labels, ignore_index=255)
    assert all(torch.isfinite(p).all() for p in ats.parameters())


def test_summary_and_options_rebuild():
    clean, _, both = _domains()
    options = GatedAdaptiveTemperatureScaling(C).reference_options(FitDataLike(*clean))
    gated = GatedAdaptiveTemperatureScaling(C, **options).fit(*both)
    summary = gated.summary()
    assert summary["gate"] == "soft"
    assert summary["features"] == list(FEATURES)
    assert summary["temperature"] == pytest.approx(options["reference"]["temperature"])
    again = build_calibrator("adaptive_ts_gated", C, **gated.options)
    again.load_state_dict(gated.state_dict())
    torch.testing.assert_close(again(both[0]), gated(both[0]))


@pytest.mark.parametrize(
    ("cls", "options", "error", "match"),
    [
        pytest.param(AdaptiveTemperatureScaling, {"gate": "sometimes"}, ValueError,
                     r"`gate` to be one of \['none', 'soft', 'hard'\]", id="gate"),
        pytest.param(GatedAdaptiveTemperatureScaling, {"gate": "none"}, ValueError,
                     r"`gate` to be one of \['soft', 'hard'\]", id="gated-none"),
        pytest.param(AdaptiveTemperatureScaling, {"band": 0.5}, ValueError,
                     r"`band` to be a float < 0.5", id="band"),
        pytest.param(AdaptiveTemperatureScaling, {"width": 0.0}, ValueError,
                     r"`width` to be a float > 0", id="width"),
        pytest.param(AdaptiveTemperatureScaling, {"pixels_per_image": 0}, ValueError,
                     r"`pixels_per_image` to be an int >= 1", id="pixels"),
        pytest.param(AdaptiveTemperatureScaling, {"reference": {"temperature": 1.0}},
                     ValueError, r"`reference` to be None or a dict with keys", id="ref-keys"),
        pytest.param(AdaptiveTemperatureScaling, {"reference": {
            "temperature": 1.0, "mean": [0.0] * D, "std": [1.0] * 3, "lo": [0.0] * D,
            "hi": [0.0] * D}}, ValueError, r"`reference.std` to be a list of 6", id="ref-len"),
        pytest.param(AdaptiveTemperatureScaling, {"reference": {
            "temperature": -1.0, "mean": [0.0] * D, "std": [1.0] * D, "lo": [0.0] * D,
            "hi": [0.0] * D}}, ValueError, r"`reference.temperature` to be a float > 0",
            id="ref-t"),
    ],
)
def test_bad_options_are_refused(cls, options, error, match):
    with pytest.raises(error, match=match):
        cls(C, **options)


def test_pixels_are_refused():
    _, _, both = _domains()
    ats = AdaptiveTemperatureScaling(C).fit(*both)
    with pytest.raises(ValueError, match=r"of shape \(N, C, H, W\) for the spatial calibrator"):
        ats(torch.zeros(10, C))
    with pytest.raises(ValueError, match=r"Expected clean reference maps"):
        ats.reference_options(FitDataLike(torch.zeros(10, C), torch.zeros(10, dtype=torch.long)))


def FitDataLike(logits, labels):  # noqa: N802 - reads like the dataclass it builds
    from pipeline.calibrators import FitData

    return FitData(logits, labels)


# --------------------------------------------------------------------------------------------
# The reduce hook: a fit sharded over two gloo workers equals the in-process one.


def _worker(rank, world, init_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _, _, both = _domains()
        cut = 9  # unequal shards, both domains on worker 1
        part = slice(0, cut) if rank == 0 else slice(cut, None)
        states = {}
        for name in ("adaptive_ts", "adaptive_ts_gated"):
            calibrator = build_calibrator(name, C)
            calibrator.fit(both[0][part], both[1][part], seed=0, reduce=DistributedReduce())
            states[name] = calibrator.state_dict()
        if rank == 0:
            torch.save(states, out_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptive_reduce")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "out.pt")), nprocs=2, join=True)
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", ["adaptive_ts", "adaptive_ts_gated"])
def test_sharded_fit_equals_the_in_process_fit(sharded, name):
    _, _, both = _domains()
    local = build_calibrator(name, C).fit(*both, seed=0)
    remote = build_calibrator(name, C)
    remote.load_state_dict(sharded[name])
    remote.fitted.fill_(True)
    # The reference (T0, statistics, band) is computed from the gathered features and the
    # all-reduced Newton sums: equal to float summation order.
    for key in ("log_t0", "feature_mean", "feature_std", "band_lo", "band_hi"):
        torch.testing.assert_close(remote.state_dict()[key], local.state_dict()[key],
                                   rtol=1e-5, atol=1e-6)
    # L-BFGS on the same objective from the same seeded start: the loss agrees, the
    # per-image temperatures closely.
    assert _nll(remote, *both) == pytest.approx(_nll(local, *both), abs=1e-4)
    torch.testing.assert_close(remote.temperature(both[0]), local.temperature(both[0]),
                               rtol=2e-2, atol=0)
