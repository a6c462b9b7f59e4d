"""The public ``ece``/``image_ece`` (top-label pass only) against the full statistics pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.metrics import ece, image_ece, image_stats, top_label


def images(n=3, c=7, h=33, w=40, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 3
    labels = torch.where(torch.rand(n, h, w, generator=g) < 0.6, logits.argmax(1),
                         torch.randint(0, c, (n, h, w), generator=g))
    if ignore is not None:
        labels[torch.rand(n, h, w, generator=g) < 0.2] = ignore
    return logits, torch.softmax(logits, 1), labels


@pytest.mark.parametrize("ignore", [None, 255])
@pytest.mark.parametrize("with_preds", [False, True], ids=["argmax", "preds"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_equals_the_statistics_pass(ignore, with_preds, dtype):
    """Same bins as ``image_stats`` (counts identical, float64 sums to rounding)."""
    logits, probs, labels = images(ignore=ignore)
    probs = probs.to(dtype)
    preds = torch.randint(0, 7, labels.shape) if with_preds else None
    kw = {"ignore_index": ignore, "n_bins": 10}
    per_image = [
        image_stats(probs[i], labels[i], preds=None if preds is None else preds[i], **kw)
        for i in range(3)
    ]
    assert ece(probs, labels, preds=preds, **kw) == pytest.approx(sum(per_image).ece(), abs=1e-15)
    assert image_ece(probs, labels, preds=preds, **kw) == pytest.approx(
        np.mean([s.ece() for s in per_image]), abs=1e-15)
    flat = probs.permute(0, 2, 3, 1).reshape(-1, 7)
    flat_preds = None if preds is None else preds.reshape(-1)
    assert ece(flat, labels.reshape(-1), preds=flat_preds, **kw) == pytest.approx(
        sum(per_image).ece(), abs=1e-15)


def test_uint8_labels_and_huge_temperature_ties():
    logits, _, labels = images(c=11, seed=1)
    probs = torch.softmax(logits / 1e10, 1)  # float32 ties: predictions from the logits
    preds = logits.argmax(1)
    expected = sum(image_stats(probs[i], labels[i], preds=preds[i]) for i in range(3)).ece()
    assert ece(probs, labels.to(torch.uint8), preds=preds) == pytest.approx(expected, abs=1e-15)


def test_result_does_not_depend_on_threads(monkeypatch):
    monkeypatch.setattr(top_label, "_PARALLEL_MIN", 0)  # threads even on this small input
    _, probs, labels = images(n=6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ece(probs, labels), image_ece(probs, labels)
        torch.set_num_threads(3)
        three = ece(probs, labels), image_ece(probs, labels)
    finally:
        torch.set_num_threads(before)
    assert one == three  # parts are reduced alike and added in order: bit for bit


def test_rows_spanning_several_blocks(monkeypatch):
    monkeypatch.setattr(top_label, "_ROWS", 1000)
    _, probs, labels = images(n=2, h=40, w=50)
    flat, flat_labels = probs.permute(0, 2, 3, 1).reshape(-1, 7), labels.reshape(-1)
    expected = (image_stats(probs[0], labels[0]) + image_stats(probs[1], labels[1])).ece()
    assert ece(flat, flat_labels) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("n_bins", [2, 4, 5, 10, 15])
def test_values_on_bin_edges(n_bins):
    """Two-class pixels whose confidence is each edge b/n and its float32 neighbours."""
    edges = (np.arange(n_bins // 2, n_bins + 1) / n_bins).astype(np.float32)
    conf = np.concatenate([edges, np.nextafter(edges, 1), np.nextafter(edges, 0)])
    conf = np.clip(conf, 0.5, 1).astype(np.float32)
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.arange(conf.size) % 2
    expected = image_stats(probs.T.reshape(2, 1, -1), labels.reshape(1, -1), n_bins=n_bins)
    assert ece(probs, labels, n_bins=n_bins) == pytest.approx(expected.ece(), abs=1e-15)


def test_bad_probabilities_are_reported_at_their_row():
    probs = np.full((10, 3), 1 / 3)
    probs[7, 0] = 0.9
    with pytest.raises(ValueError, match=r"sum to 1 .* at pixel 7"):
        ece(probs, np.zeros(10, np.int64))


def test_a_bad_prediction_is_reported_before_bad_labels():
    probs = np.full((2, 3, 2, 2), 1 / 3)
    labels = np.zeros((2, 2, 2), np.int64)
    labels[0, 0, 0] = 9
    preds = np.zeros((2, 2, 2), np.int64)
    preds[1, 1, 1] = 3
    with pytest.raises(ValueError, match=r"`preds` to be in \[0, 3\), but got 3"):
        ece(probs, labels, preds=preds)
    with pytest.raises(ValueError, match=r"`labels` to be in \[0, 3\), but got 9"):
        ece(probs, labels)
