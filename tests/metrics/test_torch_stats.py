"""The torch statistics (CPU and CUDA) against the numba kernel, on random and adversarial input.

Tolerances: every int64 field (bins, confusion, histograms, image counts) must be identical.
Float64 fields are sums of the same per-pixel values in another order, so they must agree to
``rtol=1e-9`` (what the issue asks; observed ~1e-15) with ``atol = 1e-15 * P`` for P pixels:
classwise bin 0 is a class total minus the other bins (as in the kernel), whose absolute
rounding error grows with P even where the exact value is 0.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.metrics import ImageStats, image_stats
from pipeline.metrics.torch_stats import image_stats_torch, prepare_targets

FIELDS = [f.name for f in dataclasses.fields(ImageStats)]
CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu,
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
)
DEVICES = ["cpu", CUDA]


def assert_same_stats(a: ImageStats, b: ImageStats, pixels: int) -> None:
    """Ints identical; floats to rtol 1e-9, atol 1e-15 * pixels (see the module docstring)."""
    for name in FIELDS:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        assert x.shape == y.shape, name
        if x.dtype.kind in "iu" or isinstance(getattr(a, name), int):
            assert np.array_equal(x, y), name
        else:
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-15 * pixels, err_msg=name)


def both(probs, labels, device, **kw):
    """(numba on the CPU, torch on ``device``) statistics of one image."""
    expected = image_stats(probs, labels, **kw)
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got = image_stats_torch(probs.to(device), labels.to(device), **moved)
    return expected, got


def softmax_image(c, h, w, *, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(c, h, w, generator=g, dtype=torch.float64) * scale
    labels = torch.where(torch.rand(h, w, generator=g) < 0.7, logits.argmax(0),
                         torch.randint(0, c, (h, w), generator=g))
    return logits, torch.softmax(logits, 0).to(dtype), labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(11, 45, 60), (19, 32, 64), (150, 16, 16)],
                         ids=["camvid", "cityscapes", "ade"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_random_images_match_numba(device, shape, dtype):
    c, h, w = shape
    _, probs, labels = softmax_image(c, h, w, seed=c, dtype=dtype)
    labels[torch.rand(h, w, generator=torch.Generator().manual_seed(1)) < 0.15] = 255
    score = torch.rand(h, w, generator=torch.Generator().manual_seed(2))
    expected, got = both(probs, labels, device, ignore_index=255, mis_score=score, n_bins=15)
    assert_same_stats(got, expected, h * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_bins", [1, 2, 4, 10, 15, 20])
def test_values_on_every_bin_edge_bin_alike(device, n_bins):
    """float32 values at, just below and just above k/n, for every edge k (and 0 and 1)."""
    edges = np.arange(n_bins + 1) / n_bins
    values = np.concatenate([edges, np.nextafter(edges.astype(np.float32), 0),
                             np.nextafter(edges.astype(np.float32), 1)]).astype(np.float32)
    values = np.clip(values, 0, 1)
    # Two classes: p and 1 - p (rounded in float32: sums stay within tolerance).
    p = torch.from_numpy(values).reshape(1, 1, -1)
    probs = torch.cat([p, 1 - p]).contiguous()
    labels = torch.zeros(1, p.shape[-1], dtype=torch.long)
    labels[0, ::3] = 1
    expected, got = both(probs, labels, device, n_bins=n_bins, n_score_bins=2 * n_bins,
                         mis_score=torch.from_numpy(values.astype(np.float64)).reshape(1, -1))
    assert_same_stats(got, expected, values.size)


@pytest.mark.parametrize("device", DEVICES)
def test_exact_ones_and_zeros(device):
    """One-hot probabilities (confidence exactly 1.0, others exactly 0.0), right and wrong."""
    c, h, w = 5, 6, 7
    g = torch.Generator().manual_seed(3)
    pred = torch.randint(0, c, (h, w), generator=g)
    probs = torch.nn.functional.one_hot(pred, c).permute(2, 0, 1).float().contiguous()
    labels = torch.where(torch.rand(h, w, generator=g) < 0.5, pred, (pred + 1) % c)
    expected, got = both(probs, labels, device)
    assert expected.nll_sum > 0  # the floored zero probabilities
    assert_same_stats(got, expected, h * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_preds", [False, True], ids=["argmax", "preds"])
def test_ties(device, with_preds):
    """Uniform and half-tied pixels: the first maximum, or the given predictions, decide."""
    c, h, w = 4, 5, 6
    probs = torch.full((c, h, w), 0.25)
    probs[:2, :2] = 0.5
    probs[2:, :2] = 0.0
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, c, (h, w), generator=g)
    kw = {"preds": torch.randint(0, c, (h, w), generator=g)} if with_preds else {}
    expected, got = both(probs, labels, device, **kw)
    assert_same_stats(got, expected, h * w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e4, 1e10, 1e30])
def test_huge_temperatures(device, temperature):
    """Logits divided by a huge T: float32 ties everywhere; predictions from the logits."""
    logits, _, labels = softmax_image(11, 20, 24, seed=5)
    logits = logits.float()
    probs = torch.softmax(logits / temperature, 0)
    expected, got = both(probs, labels, device, preds=logits.argmax(0), ignore_index=None)
    assert_same_stats(got, expected, 20 * 24)


@pytest.mark.parametrize("device", DEVICES)
def test_absent_class_and_ignore_pixels(device):
    """A class never labelled nor predicted (probability ~0), most pixels ignored."""
    logits, _, labels = softmax_image(6, 20, 20, seed=6)
    logits[5] = -200.0  # exp underflows to exactly 0 in float32
    probs = torch.softmax(logits, 0).float()
    labels = logits.argmax(0)
    labels[torch.rand(20, 20, generator=torch.Generator().manual_seed(7)) < 0.8] = 11
    expected, got = both(probs, labels, device, ignore_index=11)
    assert expected.cls_count[5, 1:].sum() == 0
    assert expected.confusion[5].sum() == 0
    assert_same_stats(got, expected, 400)


@pytest.mark.parametrize("device", DEVICES)
def test_fully_ignored_image(device):
    _, probs, _ = softmax_image(3, 4, 4, seed=8)
    expected, got = both(probs, torch.full((4, 4), 255), device, ignore_index=255)
    assert got.n_images == 0
    assert_same_stats(got, expected, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_input_and_prepared_targets(device):
    _, probs, labels = softmax_image(7, 12, 10, seed=9)
    half = probs.half()
    expected = image_stats(half, labels, boundary_width=3)
    targets = prepare_targets(labels, 7, boundary_width=3, device=device)
    got = image_stats_torch(half.to(device), targets=targets)
    assert_same_stats(got, expected, 120)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"probs": torch.full((2, 2, 2), 0.6)}, ValueError, r"Expected `probs` to sum to 1"),
        ({"probs": torch.full((2, 2, 2), float("nan"))}, ValueError, r"to be finite"),
        ({"labels": torch.full((2, 2), 7)}, ValueError, r"Expected `labels` to be in \[0, 2\)"),
        ({"labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, r"of shape \(2, 2\)"),
        ({"labels": torch.zeros(2, 2)}, TypeError, r"integer tensor"),
        ({"preds": torch.full((2, 2), 5)}, ValueError, r"Expected `preds` to be in \[0, 2\)"),
        ({"mis_score": torch.full((2, 2), 1.5)}, ValueError, r"`mis_score` to be in \[0, 1\]"),
        ({"n_bins": 0}, ValueError, r"`n_bins` to be a positive int"),
        ({"n_score_bins": 3}, ValueError, r"`n_score_bins` to be even"),
        ({"probs": torch.ones(1, 2, 2)}, ValueError, r"at least 2 classes"),
    ],
)
def test_rejects_bad_input_like_numba(kwargs, error, match):
    args = {"probs": torch.full((2, 2, 2), 0.5), "labels": torch.zeros(2, 2, dtype=torch.long)}
    args.update(kwargs)
    probs, labels = args.pop("probs"), args.pop("labels")
    with pytest.raises(error, match=match):
        image_stats_torch(probs, labels, **args)
    if "probs" in kwargs or "labels" in kwargs or "preds" in kwargs:
        with pytest.raises(error, match=match):
            image_stats(probs, labels, **args)
