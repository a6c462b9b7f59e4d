"""Temperature scaling: the Newton fit against brute force and autograd L-BFGS, and its module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import build_calibrator, fit_temperature, optimise

C = 5


def _scaled(n, t_star, *, c=C, seed=0):
    """Logits true_logits * t_star with labels drawn from softmax(true_logits): T* = t_star."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, c, generator=g) * 3
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    return true * t_star, labels


def _nll64(logits, labels, t):
    """Float64 NumPy reference NLL of softmax(logits / t)."""
    z = logits.double().numpy() / t
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels.numpy()].mean()


@pytest.mark.parametrize("t_star", [0.5, 1.0, 1.7, 3.0], ids=lambda t: f"T*={t}")
def test_recovers_a_known_temperature(t_star):
    logits, labels = _scaled(200_000, t_star)
    assert fit_temperature(logits, labels) == pytest.approx(t_star, rel=0.02)


@pytest.mark.parametrize("n", [3_000, 132_000], ids=["direct", "warm-start"])
def test_matches_a_brute_force_grid_on_nll(n):
    # 132k rows exceed the largest warm-start subsample, so every Newton phase runs.
    logits, labels = _scaled(n, 2.0, seed=1)
    t = fit_temperature(logits, labels)
    coarse = np.linspace(1.5, 2.5, 11)
    best = coarse[np.argmin([_nll64(logits, labels, g) for g in coarse])]
    fine = np.linspace(best - 0.1, best + 0.1, 41)
    nll = np.array([_nll64(logits, labels, g) for g in fine])
    assert abs(t - fine[nll.argmin()]) <= fine[1] - fine[0]
    assert _nll64(logits, labels, t) <= nll.min() + 1e-9


def test_matches_autograd_lbfgs_on_the_naive_nll():
    logits, labels = _scaled(5_000, 1.4, seed=2)
    log_t = torch.zeros((), requires_grad=True)
    optimise(lambda: F.cross_entropy(logits / log_t.exp(), labels), [log_t])
    assert fit_temperature(logits, labels) == pytest.approx(float(log_t.detach().exp()), rel=1e-4)


def test_separable_data_hits_the_lower_bound():
    # Every pixel predicted right with margin: the NLL keeps falling as T -> 0.
    labels = torch.arange(200) % C
    logits = F.one_hot(labels, C).float()
    assert fit_temperature(logits, labels, t_min=0.05) == pytest.approx(0.05, rel=1e-4)


def test_uninformative_data_hits_the_upper_bound():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5_000, C, generator=g)
    labels = torch.randint(0, C, (5_000,), generator=g)  # independent of the logits
    assert fit_temperature(logits, labels, t_max=50.0) > 10


def test_module_fit_on_maps_equals_fit_on_points():
    logits, labels = _scaled(4 * 16 * 16, 2.5, seed=4)
    maps = logits.reshape(4, 16, 16, C).permute(0, 3, 1, 2)
    from_maps = build_calibrator("temperature", C).fit(maps, labels.reshape(4, 16, 16))
    from_points = build_calibrator("temperature", C).fit(logits, labels)
    assert from_maps.temperature == pytest.approx(from_points.temperature, rel=1e-6)
    assert from_maps.summary() == {"temperature": from_maps.temperature}


def test_identity_at_initialisation_and_argmax_preserved():
    calibrator = build_calibrator("temperature", C)
    logits, labels = _scaled(1_000, 3.0, seed=5)
    calibrator.fitted.fill_(True)
    assert torch.equal(calibrator(logits), logits)
    calibrator.fit(logits, labels)
    assert calibrator.temperature > 2
    assert torch.equal(calibrator(logits).argmax(1), logits.argmax(1))


def test_lowers_heldout_nll():
    logits, labels = _scaled(5_000, 2.0, seed=6)
    held_logits, held_labels = _scaled(5_000, 2.0, seed=7)
    calibrator = build_calibrator("temperature", C).fit(logits, labels)
    before = F.cross_entropy(held_logits, held_labels)
    assert F.cross_entropy(calibrator(held_logits), held_labels) < before - 0.05


def test_loss_path_agrees_with_the_newton_fit():
    # The module's loss is the NLL the Newton fit minimises: L-BFGS on it reaches the same T.
    logits, labels = _scaled(20_000, 1.8, seed=8)
    trained = build_calibrator("temperature", C)
    optimise(lambda: trained.loss(logits, labels), trained.parameters())
    newton = build_calibrator("temperature", C).fit(logits, labels)
    assert trained.temperature == pytest.approx(newton.temperature, rel=1e-3)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"t_min": 0.0}, ValueError, "`t_min` to be a float > 0", id="t-min"),
        pytest.param({"t_min": 2.0, "t_max": 1.0}, ValueError, "`t_max` to be a float > 2.0",
                     id="t-max"),
        pytest.param({"max_iter": 0}, ValueError, "`max_iter` to be an int >= 1", id="max-iter"),
        pytest.param({"max_iter": 1.5}, TypeError, "`max_iter` to be an int", id="max-iter-type"),
    ],
)
def test_rejects_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        build_calibrator("temperature", C, **options)
