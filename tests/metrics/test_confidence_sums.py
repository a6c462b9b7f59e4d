"""The fused label-free sums against a direct float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics.confidence import confidence_sums

EDGES = np.array([0.3, 0.5, 0.7, 0.9, 0.99, 0.999])


def _direct(logits: torch.Tensor) -> tuple[float, float, np.ndarray]:
    z = logits.double()
    p = z.softmax(0)
    conf = p.amax(0)
    entropy = -(torch.special.xlogy(p, p)).sum(0)
    index = torch.bucketize(conf, torch.as_tensor(EDGES), right=False)
    return float(conf.sum()), float(entropy.sum()), np.bincount(index.numpy(), minlength=7)


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "random", torch.randn(11, 500, generator=g) * 3
    yield "many classes", torch.randn(150, 300, generator=g) * 2
    yield "two classes", torch.randn(2, 400, generator=g) * 5
    yield "ties", torch.zeros(5, 50)  # every pixel uniform: H = log 5, conf = 0.2
    yield "peaked", torch.randn(6, 200, generator=g) * 60  # one-hot in float32
    # selective scaling's T_mis = 1e10: logits that differ by ~1e-9, nearly uniform
    z = torch.randn(8, 200, generator=g)
    yield "huge temperature", (z - z.amax(0)) / 1e10


@pytest.mark.parametrize(("name", "logits"), list(_cases()), ids=[n for n, _ in _cases()])
def test_sums_match_the_direct_float64_computation(name, logits):
    probs = logits.softmax(0)  # float32, as evaluation has them
    preds = logits.argmax(0).numpy()
    counts = np.full(logits.shape[0], 5, np.int64)  # added to, not overwritten
    conf, entropy, hist = confidence_sums(probs.numpy(), logits.numpy(), preds, EDGES,
                                          pred_counts=counts)
    assert counts.tolist() == (np.bincount(preds, minlength=logits.shape[0]) + 5).tolist()
    # Without counting: the same pass, in the same order, so the same values.
    again = confidence_sums(probs.numpy(), logits.numpy(), preds, EDGES)
    assert again[:2] == (conf, entropy)
    assert again[2].tolist() == hist.tolist()
    want_conf, want_entropy, want_hist = _direct(logits)
    n = logits.shape[1]
    # float32 probabilities: per pixel ~1e-6 relative, so the sums agree to 1e-5 per pixel
    assert conf == pytest.approx(want_conf, rel=1e-5, abs=1e-5 * n)
    assert entropy == pytest.approx(want_entropy, rel=1e-5, abs=1e-5 * n)
    assert hist.sum() == n
    # a confidence within float32 rounding of an edge may land in the next bin
    assert np.abs(hist - want_hist).sum() <= 2, (hist, want_hist)


def test_uniform_pixels_have_entropy_log_c_and_bin_zero():
    logits = np.zeros((4, 10), np.float32)
    probs = np.full((4, 10), 0.25, np.float32)
    conf, entropy, hist = confidence_sums(probs, logits, np.zeros(10, np.int64), EDGES)
    assert conf == pytest.approx(2.5)
    assert entropy == pytest.approx(10 * np.log(4), rel=1e-6)
    assert hist.tolist() == [10, 0, 0, 0, 0, 0, 0]


def test_mismatched_inputs_are_refused():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"one \(C, P\) shape and dtype"):
        confidence_sums(z, z.astype(np.float64), np.zeros(4, np.int64), EDGES)
    with pytest.raises(ValueError, match=r"Expected `preds` of shape \(4,\)"):
        confidence_sums(z, z, np.zeros(3, np.int64), EDGES)
    with pytest.raises(ValueError, match=r"Expected `pred_counts` of shape \(3,\) and dtype int64"):
        confidence_sums(z, z, np.zeros(4, np.int64), EDGES, pred_counts=np.zeros(3, np.int32))


def test_histogram_bins_equal_searchsorted_on_and_around_edges():
    from pipeline.label_free import CONF_EDGES

    for edges in (EDGES, CONF_EDGES[1:-1], np.array([0.5])):
        conf = np.concatenate([
            edges, np.nextafter(edges, 0.0), np.nextafter(edges, 1.0), [0.0, 1.0, np.nan],
            np.random.default_rng(0).random(5000),
        ])
        # Two classes with these top-label confidences (all >= 0.5 after the max).
        conf = np.maximum(conf, 1.0 - conf)
        probs = np.stack([conf, 1.0 - conf])
        logits = np.log(np.maximum(probs, 1e-300))
        _, _, hist = confidence_sums(probs, logits, np.zeros(conf.size, np.int64), edges)
        want = np.bincount(np.searchsorted(edges, conf), minlength=len(edges) + 1)
        assert hist.tolist() == want.tolist()
