"""Vector, matrix, Dirichlet, ETS and Meta-Cal scaling on synthetic miscalibrated data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import build_calibrator

C = 5
POINTWISE = ["temperature", "vector", "matrix", "dirichlet", "ets", "meta_cal"]


def _miscalibrated(n, *, seed, scale=2.0, bias=(1.5, 0.0, -1.0, 0.5, 0.0), noise=0.0):
    """Labels from softmax(true_logits) (a fraction ``noise`` uniform); logits distorted.

    The observed logits are ``true * scale + bias``: over-confident and class-biased, so there
    is something for every calibrator to fix.
    """
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, C, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    noisy = torch.rand(n, generator=g) < noise
    labels[noisy] = torch.randint(0, C, (int(noisy.sum()),), generator=g)
    return true * scale + torch.tensor(bias), labels


def _nll(logits, labels):
    return float(F.cross_entropy(logits.detach(), labels))


@pytest.fixture(scope="module")
def splits():
    return {
        "fit": _miscalibrated(4_000, seed=0),
        "heldout": _miscalibrated(2_000, seed=1),
        "test": _miscalibrated(4_000, seed=2),
    }


@pytest.mark.parametrize("name", POINTWISE)
def test_lowers_test_nll_on_miscalibrated_data(name, splits):
    calibrator = build_calibrator(name, C).fit(*splits["fit"], heldout=splits["heldout"])
    logits, labels = splits["test"]
    assert _nll(calibrator(logits), labels) < _nll(logits, labels) - 0.05


@pytest.mark.parametrize("name", ["vector", "matrix", "dirichlet"])
def test_class_bias_is_fixed_beyond_temperature_scaling(name, splits):
    # A single temperature cannot undo a per-class bias; these maps can.
    ts = build_calibrator("temperature", C).fit(*splits["fit"])
    calibrator = build_calibrator(name, C).fit(*splits["fit"], heldout=splits["heldout"])
    logits, labels = splits["test"]
    assert _nll(calibrator(logits), labels) < _nll(ts(logits), labels) - 0.02


@pytest.mark.parametrize(("name", "matches"), [
    pytest.param("vector", lambda x, out: torch.equal(out, x), id="vector"),
    pytest.param("matrix", lambda x, out: torch.allclose(out, x), id="matrix"),
    pytest.param("dirichlet", lambda x, out: torch.allclose(out, torch.log_softmax(x, 1)),
                 id="dirichlet"),
])
def test_identity_at_initialisation(name, matches):
    calibrator = build_calibrator(name, C)
    calibrator.fitted.fill_(True)
    x = torch.randn(2, C, 3, 3)
    assert matches(x, calibrator(x))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param("temperature", {}, id="temperature"),
        pytest.param("ets", {}, id="ets"),
        pytest.param("meta_cal", {"quantile": 0.5, "quantile_grid": None}, id="meta_cal-gating"),
    ],
)
def test_argmax_preserved(name, options, splits):
    calibrator = build_calibrator(name, C, **options).fit(*splits["fit"])
    logits = splits["test"][0].reshape(40, 10, 10, C).permute(0, 3, 1, 2)
    assert torch.equal(calibrator(logits).argmax(1), logits.argmax(1))


@pytest.mark.parametrize("name", ["matrix", "dirichlet"])
def test_odir_strength_is_the_heldout_argmin_of_the_grid(name, splits):
    grid = [0.0, 1e-2, 1.0, 100.0]
    held = splits["heldout"]
    picked = build_calibrator(name, C, odir_grid=grid).fit(*splits["fit"], heldout=held)
    scores = {
        lam: _nll(build_calibrator(name, C, odir=lam).fit(*splits["fit"])(held[0]), held[1])
        for lam in grid
    }
    assert picked.summary()["odir"] == pytest.approx(min(scores, key=scores.get))


@pytest.mark.parametrize("name", ["matrix", "dirichlet"])
def test_odir_shrinks_off_diagonal_weights_and_bias(name, splits):
    weak = build_calibrator(name, C, odir=0.0).fit(*splits["fit"])
    strong = build_calibrator(name, C, odir=100.0).fit(*splits["fit"])
    assert strong.summary()["offdiag_abs_mean"] < 0.2 * weak.summary()["offdiag_abs_mean"]
    assert strong.bias.abs().sum() < weak.bias.abs().sum()


def test_odir_penalty_formula():
    calibrator = build_calibrator("matrix", C, odir=0.3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        calibrator.weight.copy_(torch.randn(C, C, generator=g))
        calibrator.bias.copy_(torch.randn(C, generator=g))
    logits, labels = torch.randn(50, C, generator=g), torch.randint(0, C, (50,), generator=g)
    w, b = calibrator.weight.detach(), calibrator.bias.detach()
    off = sum(float(w[i, j]) ** 2 for i in range(C) for j in range(C) if i != j)
    expected = _nll(logits @ w.T + b, labels) + 0.3 * (off / (C * (C - 1)) + float(b @ b) / C)
    assert float(calibrator.loss(logits, labels).detach()) == pytest.approx(expected, rel=1e-5)


def test_ets_weights_form_a_simplex_and_use_uniform_under_label_noise():
    logits, labels = _miscalibrated(6_000, seed=3, bias=(0.0,) * C, noise=0.4)
    summary = build_calibrator("ets", C).fit(logits, labels).summary()
    assert sum(summary["weights"]) == pytest.approx(1.0, abs=1e-6)
    assert min(summary["weights"]) > 0
    assert summary["weights"][2] > 0.1  # 40% uniform labels: the uniform component matters


def _two_populations(n, seed):
    """Confident pixels with correct temperature, plus flat pixels whose labels are random.

    One temperature cannot serve both; gating the high-entropy pixels to uniform can.
    """
    g = torch.Generator().manual_seed(seed)
    half = n // 2
    sharp = torch.randn(half, C, generator=g) * 4
    sharp_labels = torch.multinomial(torch.softmax(sharp, 1), 1, generator=g).squeeze(1)
    flat = torch.randn(n - half, C, generator=g) * 0.7
    flat_labels = torch.randint(0, C, (n - half,), generator=g)
    return torch.cat([sharp, flat]), torch.cat([sharp_labels, flat_labels])


def test_meta_cal_gating_beats_temperature_scaling_when_it_should():
    fit, held, test = (_two_populations(4_000, seed) for seed in (4, 5, 6))
    meta = build_calibrator("meta_cal", C).fit(*fit, heldout=held)
    ts = build_calibrator("temperature", C).fit(*fit)
    assert meta.summary()["quantile"] < 1.0
    assert _nll(meta(test[0]), test[1]) < _nll(ts(test[0]), test[1]) - 0.01


def test_meta_cal_gates_the_quantile_and_makes_gated_pixels_near_uniform():
    logits, labels = _two_populations(4_000, seed=7)
    meta = build_calibrator("meta_cal", C, quantile=0.8, quantile_grid=None).fit(logits, labels)
    probs = torch.softmax(meta(logits), 1).detach()
    entropy = -(probs * probs.log()).sum(1)
    gated = entropy > math.log(C) - 1e-3
    assert float(gated.float().mean()) == pytest.approx(0.2, abs=0.01)
    assert float(probs[gated].max()) < 1 / C + 1e-3
    assert meta.summary()["threshold"] is not None


def test_meta_cal_quantile_one_is_temperature_scaling(splits):
    meta = build_calibrator("meta_cal", C, quantile=1.0, quantile_grid=None).fit(*splits["fit"])
    ts = build_calibrator("temperature", C).fit(*splits["fit"])
    logits = splits["test"][0]
    torch.testing.assert_close(meta(logits), ts(logits))
    assert meta.summary()["threshold"] is None


@pytest.mark.parametrize(
    ("name", "options", "error", "match"),
    [
        pytest.param("vector", {"max_iter": 0}, ValueError, "`max_iter` to be an int >= 1",
                     id="vector-max-iter"),
        pytest.param("matrix", {"odir": -1.0}, ValueError, "`odir` to be a float >= 0",
                     id="matrix-odir"),
        pytest.param("matrix", {"odir_grid": []}, ValueError, "`odir_grid` to be a non-empty",
                     id="matrix-grid-empty"),
        pytest.param("dirichlet", {"odir_grid": [0.1, -1.0]}, ValueError,
                     "`odir_grid` to be a float >= 0", id="dirichlet-grid-value"),
        pytest.param("dirichlet", {"odir_grid": "0.1"}, ValueError, "`odir_grid` to be a non",
                     id="dirichlet-grid-type"),
        pytest.param("ets", {"max_iter": "5"}, TypeError, "`max_iter` to be an int",
                     id="ets-max-iter"),
        pytest.param("meta_cal", {"quantile": 0.0}, ValueError, "`quantile` to be a float > 0",
                     id="meta-quantile"),
        pytest.param("meta_cal", {"quantile_grid": [0.5, 1.5]}, ValueError,
                     "`quantile_grid` to be a float <= 1", id="meta-grid"),
        pytest.param("meta_cal", {"quantile_grid": ()}, ValueError,
                     "`quantile_grid` to be a non-empty", id="meta-grid-empty"),
        pytest.param("meta_cal", {"gate_temperature": 1.0}, ValueError,
                     "`gate_temperature` to be a float > 1", id="meta-gate"),
    ],
)
def test_rejects_bad_options(name, options, error, match):
    with pytest.raises(error, match=match):
        build_calibrator(name, C, **options)
