"""The public ``ece``/``image_ece`` and the kernels, against float64 references and torchmetrics."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.metrics import ece, first_argmax, image_ece, image_stats
from pipeline.metrics.compute import auroc_from_histograms, ece_from_bins, miou_from_confusion
from pipeline.metrics.per_image import adaptive_bins, bin_of, boundary_mask

from . import reference as ref


def make_inputs(n=3, c=5, h=6, w=7, *, seed=0, dtype=np.float64, ignore=None):
    """Probabilities (n, c, h, w) and labels (n, h, w) that agree with the argmax ~60%."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c, h, w)) * 2.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(dtype)
    labels = np.where(rng.random((n, h, w)) < 0.6, probs.argmax(1), rng.integers(0, c, (n, h, w)))
    if ignore is not None:
        labels[rng.random((n, h, w)) < 0.2] = ignore
    return probs, labels


def flat_valid(probs, labels, ignore=None):
    """(P, C) float64 probabilities and (P,) labels of the scored pixels."""
    c = probs.shape[1]
    p = np.moveaxis(probs, 1, -1).reshape(-1, c).astype(np.float64)
    lab = labels.reshape(-1)
    keep = np.ones(lab.shape, bool) if ignore is None else lab != ignore
    return p[keep], lab[keep]


# --------------------------------------------------------------------------------------------
# ece / image_ece against the float64 reference


@pytest.mark.parametrize("n_bins", [1, 7, 15], ids=lambda b: f"bins{b}")
@pytest.mark.parametrize("ignore", [None, 255], ids=["no_ignore", "ignore255"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["images", "flat"])
def test_ece_matches_reference(layout, dtype, ignore, n_bins):
    probs, labels = make_inputs(dtype=dtype, ignore=ignore)
    expected = ref.ece_mce(*flat_valid(probs, labels, ignore), n_bins)[0]
    if layout == "flat":
        probs = np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1])
        labels = labels.reshape(-1)
    assert ece(probs, labels, n_bins=n_bins, ignore_index=ignore) == pytest.approx(
        expected, abs=1e-12
    )


def test_ece_accepts_torch_and_numpy_alike():
    probs, labels = make_inputs(dtype=np.float32)
    from_numpy = ece(probs, labels)
    tensor = torch.from_numpy(probs).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not tensor.is_contiguous()
    assert ece(tensor, torch.from_numpy(labels).to(torch.uint8)) == from_numpy


def test_image_ece_is_the_mean_of_per_image_eces():
    probs, labels = make_inputs(n=4, ignore=255)
    labels[2] = 255  # an image with no scored pixel is left out
    expected = np.mean([
        ref.ece_mce(*flat_valid(probs[i : i + 1], labels[i : i + 1], 255), 15)[0]
        for i in (0, 1, 3)
    ])
    assert image_ece(probs, labels, ignore_index=255) == pytest.approx(expected, abs=1e-12)


def test_pooled_ece_is_invariant_to_layout_and_merging():
    probs, labels = make_inputs(n=4)
    flat = np.moveaxis(probs, 1, -1).reshape(-1, probs.shape[1])
    whole = ece(probs, labels)
    assert ece(flat, labels.reshape(-1)) == pytest.approx(whole, abs=1e-15)
    merged = sum(image_stats(probs[i], labels[i]) for i in (3, 1, 0, 2))
    assert merged.ece() == pytest.approx(whole, abs=1e-15)
    assert ece_from_bins(merged.count, merged.conf_sum, merged.correct_sum) == merged.ece()


# --------------------------------------------------------------------------------------------
# torchmetrics as an oracle (float32 accumulation: small sizes only)


@pytest.mark.parametrize("ignore", [None, 255], ids=["no_ignore", "ignore255"])
@pytest.mark.parametrize("norm", ["l1", "max"])
def test_matches_torchmetrics(norm, ignore):
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, labels = make_inputs(n=4, c=6, h=20, w=25, seed=3, dtype=np.float32, ignore=ignore)
    expected = float(multiclass_calibration_error(
        torch.from_numpy(probs), torch.from_numpy(labels), num_classes=6, n_bins=10,
        norm=norm, ignore_index=ignore,
    ))
    if norm == "l1":
        ours = ece(probs, labels, n_bins=10, ignore_index=ignore)
    else:
        stats = sum(
            image_stats(probs[i], labels[i], n_bins=10, ignore_index=ignore) for i in range(4)
        )
        ours = stats.mce()
    assert ours == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------------------------
# Bin rule


@pytest.mark.parametrize(
    ("value", "n_bins", "expected"),
    [
        (0.0, 15, 0),
        (1.0, 15, 14),
        (0.25, 4, 0),
        (np.nextafter(0.25, 1.0), 4, 1),
        (0.5, 4, 1),
        (0.75, 4, 2),
        (np.nextafter(0.75, 0.0), 4, 2),
        (0.375, 8, 2),
        (1.0, 1, 0),
    ],
    ids=["zero", "one", "edge_q1", "above_q1", "edge_half", "edge_q3", "below_q3", "edge_3_8",
         "single_bin"],
)
def test_bin_of_edges(value, n_bins, expected):
    assert bin_of(value, n_bins) == expected
    assert ref.bins_of(np.array([value]), n_bins)[0] == expected


def _exact_bin(value: float, n_bins: int) -> int:
    """The rule in exact rational arithmetic: the b with b/n < value <= (b+1)/n."""
    v = Fraction(value)
    return next(b for b in range(n_bins) if v <= Fraction(b + 1, n_bins)) if v > 0 else 0


def test_float32_values_near_every_edge_follow_the_exact_rule():
    n_bins = 15
    values = []
    for b in range(1, n_bins):
        edge = np.float32(b / n_bins)
        values += [np.nextafter(edge, np.float32(0)), edge, np.nextafter(edge, np.float32(1))]
    values = np.array(values, dtype=np.float32)
    expected = [_exact_bin(float(v), n_bins) for v in values]
    assert [bin_of(v, n_bins) for v in values] == expected
    # The same values as one class's probabilities go through the image kernel's classwise
    # bins (whose fast path skips values below an edge threshold).
    probs = np.stack([1 - values, values]).reshape(2, 1, -1).astype(np.float32)
    stats = image_stats(probs, np.zeros((1, values.size), np.int64), n_bins=n_bins)
    assert stats.cls_count[1].tolist() == np.bincount(expected, minlength=n_bins).tolist()


def test_top_label_bins_at_0_edges_and_1():
    p1 = np.array([0.0, 0.25, 0.5, np.nextafter(0.25, 0.0)])  # class-1 probabilities
    probs = np.stack([1 - p1, p1]).reshape(2, 1, 4)  # class 0: 1.0, 0.75, 0.5, 0.75
    stats = image_stats(probs, np.array([[0, 0, 1, 1]]), n_bins=4)
    assert stats.count.tolist() == [0, 1, 2, 1]  # 0.5 -> (1/4, 2/4]; 1.0 -> last bin
    assert stats.cls_count[1].tolist() == [3, 1, 0, 0]  # 0.0 and the 0.25 edge in bin 0
    assert stats.cls_count[0].tolist() == [0, 1, 2, 1]
    # The tie [0.5, 0.5] predicts class 0 (first argmax), so its label 1 is wrong.
    assert stats.correct_sum.tolist() == [0, 0, 1, 1]


# --------------------------------------------------------------------------------------------
# Kernels


@pytest.mark.parametrize("shape", [(5, 7, 9), (3, 40), (2,)], ids=["chw", "cp", "c"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_first_argmax_equals_torch_argmax_with_ties(shape, dtype, kind):
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(-2, 3, shape, generator=g).to(dtype)  # many equal maxima
    if scores.ndim > 1:
        scores[:, 0] = -torch.inf  # all classes -inf: the first one
    got = first_argmax(scores if kind == "torch" else scores.numpy())
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, torch.argmax(scores, 0).numpy())


@pytest.mark.parametrize(
    ("scores", "error", "match"),
    [
        (np.zeros((3, 2), np.int64), TypeError, r"`scores` to be a floating tensor, but got dtype"),
        (np.array(1.0), ValueError, r"`scores` of shape \(C, ...\), non-empty, but got \(\)"),
        (np.zeros((0, 4)), ValueError, r"`scores` of shape .* non-empty, but got \(0, 4\)"),
        ([1.0, 2.0], TypeError, r"`scores` to be a torch.Tensor or numpy.ndarray"),
    ],
    ids=["int", "scalar", "empty", "list"],
)
def test_first_argmax_rejects_bad_input(scores, error, match):
    with pytest.raises(error, match=match):
        first_argmax(scores)


def test_adaptive_bins_match_reference_with_ties():
    rng = np.random.default_rng(1)
    conf = rng.choice([0.55, 0.6, 0.7, 0.9], size=103)  # many ties across run boundaries
    correct = rng.random(103) < conf
    probs = np.stack([conf, 1 - conf], 1)
    labels = np.where(correct, 0, 1)
    for n_bins in (1, 4, 15, 200):
        got = ece_from_bins(*adaptive_bins(conf[correct], conf[~correct], n_bins))
        assert got == pytest.approx(ref.ace(probs, labels, n_bins), abs=1e-12)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_boundary_mask_matches_reference(width):
    rng = np.random.default_rng(width)
    labels = rng.integers(0, 3, (4, 5)).repeat(3, 0).repeat(2, 1)
    labels[0, :4] = 255
    assert np.array_equal(boundary_mask(labels, width), ref.boundary(labels, width))


def test_auroc_from_histograms_matches_rank_auroc():
    rng = np.random.default_rng(2)
    # Scores at bin centres: one distinct value per bin, so the histogram is lossless.
    bins = rng.integers(0, 50, 300)
    positive = rng.random(300) < bins / 60
    pos = np.bincount(bins[positive], minlength=50)
    neg = np.bincount(bins[~positive], minlength=50)
    expected = ref.rank_auroc((bins + 0.5) / 50, positive)
    assert auroc_from_histograms(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auroc_is_nan_without_both_classes():
    assert np.isnan(auroc_from_histograms(np.array([0, 0]), np.array([1, 2])))


def test_miou_skips_classes_absent_from_labels_and_predictions():
    probs, labels = make_inputs(n=2, c=6, h=8, w=8, seed=4)
    labels[labels == 5] = 0
    probs[:, 4] = 0.0  # class 4 is never predicted ...
    probs /= probs.sum(1, keepdims=True)
    labels[labels == 4] = 1  # ... nor labelled: left out of the mean
    stats = image_stats(probs[0], labels[0]) + image_stats(probs[1], labels[1])
    expected = ref.miou(*flat_valid(probs, labels), 6)
    assert stats.miou() == pytest.approx(expected, abs=1e-12)
    assert miou_from_confusion(stats.confusion) == stats.miou()


# --------------------------------------------------------------------------------------------
# Bad input


def _probs(n=1, c=3, h=2, w=2):
    return np.full((n, c, h, w), 1.0 / c)


def _labels(n=1, h=2, w=2):
    return np.zeros((n, h, w), np.int64)


def _with(value, where=(0, 0, 0, 0)):
    p = _probs()
    p[where] = value
    return p


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"probs": [[0.5, 0.5]]}, TypeError, r"`probs` to be a torch.Tensor or numpy.ndarray"),
        ({"probs": np.ones((1, 3, 2, 2), np.int64)}, TypeError, r"`probs` to be a floating"),
        ({"probs": _probs()[0]}, ValueError, r"`probs` of shape \(N, C, H, W\) or \(P, C\)"),
        ({"probs": np.ones((1, 1, 2, 2))}, ValueError, r"at least 2 classes"),
        ({"probs": _probs(n=0), "labels": _labels(n=0)}, ValueError, r"`probs` to be non-empty"),
        ({"labels": np.zeros((1, 2, 2))}, TypeError, r"`labels` to be an integer"),
        ({"labels": np.zeros((1, 2, 3), np.int64)}, ValueError,
         r"`labels` of shape \(1, 2, 2\) to match `probs`, but got \(1, 2, 3\)"),
        ({"labels": _labels() + 3}, ValueError, r"`labels` to be in \[0, 3\), but got 3"),
        ({"labels": _labels() - 1, "ignore_index": 255}, ValueError,
         r"`labels` to be in \[0, 3\) or ignore_index=255, but got -1"),
        ({"labels": _labels() + 255, "ignore_index": 255}, ValueError,
         r"`labels` to have a pixel other than ignore_index=255"),
        ({"probs": _with(np.nan)}, ValueError, r"`probs` to be finite, but got nan"),
        ({"probs": _with(np.inf)}, ValueError, r"`probs` to be finite, but got inf"),
        ({"probs": _with(1.0)}, ValueError, r"`probs` to sum to 1 .* but got 1\.66667"),
        ({"probs": np.concatenate([np.full((1, 1, 2, 2), 1.2), np.full((1, 1, 2, 2), -0.2),
                                   np.zeros((1, 1, 2, 2))], 1)},
         ValueError, r"`probs` to be non-negative, but got -0\.2"),
        ({"n_bins": 0}, ValueError, r"`n_bins` to be a positive int, but got 0"),
        ({"n_bins": 2.5}, TypeError, r"`n_bins` to be an int, but got float"),
        ({"n_bins": True}, TypeError, r"`n_bins` to be an int, but got bool"),
        ({"ignore_index": "255"}, TypeError, r"`ignore_index` to be None or an int"),
    ],
    ids=["probs_list", "probs_int", "probs_rank", "one_class", "empty", "labels_float",
         "labels_shape", "label_too_big", "label_negative_with_ignore", "all_ignored", "nan",
         "inf", "sum", "negative", "n_bins_zero", "n_bins_float", "n_bins_bool",
         "ignore_str"],
)
def test_ece_rejects_bad_input(kwargs, error, match):
    args = {"probs": _probs(), "labels": _labels(), **kwargs}
    with pytest.raises(error, match=match):
        ece(args.pop("probs"), args.pop("labels"), **args)


def test_image_ece_rejects_flat_probs():
    with pytest.raises(ValueError, match=r"`probs` of shape \(N, C, H, W\), but got \(4, 3\)"):
        image_ece(np.full((4, 3), 1 / 3), np.zeros(4, np.int64))
