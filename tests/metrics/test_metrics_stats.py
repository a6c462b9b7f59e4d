"""ImageStats: every metric against the float64 reference, exact merging, rows, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from pipeline.metrics import ROW_KEYS, ImageStats, image_stats

from . import reference as ref
from .test_metrics_functional import flat_valid, make_inputs

ARRAYS = [f.name for f in dataclasses.fields(ImageStats) if f.name not in ("n_bins", "num_classes")]


def assert_stats_equal(a: ImageStats, b: ImageStats, rtol: float = 1e-12) -> None:
    """Integer fields exactly, float fields to ``rtol`` (float64 sums in another order)."""
    assert (a.n_bins, a.num_classes) == (b.n_bins, b.num_classes)
    for name in ARRAYS:
        x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if x.dtype.kind == "i":
            assert np.array_equal(x, y), name
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-12, err_msg=name)


@pytest.fixture(scope="module")
def images():
    """Six 10x12 images, 6 classes, float64, 15% ignored, with a selector score."""
    probs, labels = make_inputs(n=6, c=6, h=10, w=12, seed=7, ignore=255)
    score = np.random.default_rng(8).random((6, 10, 12))
    return probs, labels, score


def stats_of(images, i, **kw):
    probs, labels, score = images
    return image_stats(probs[i], labels[i], ignore_index=255, mis_score=score[i], **kw)


# --------------------------------------------------------------------------------------------
# Metrics against the reference


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_every_metric_matches_reference(images, dtype):
    probs, labels, score = images
    probs = probs.astype(dtype)
    per_image = [
        image_stats(probs[i], labels[i], ignore_index=255, mis_score=score[i], n_bins=10)
        for i in range(6)
    ]
    stats = sum(per_image)
    p, lab = flat_valid(probs, labels, 255)
    conf, correct = ref.top_label(p, lab)
    ece, mce = ref.ece_mce(p, lab, 10)
    bnd = np.concatenate([ref.boundary(labels[i], 2).reshape(-1) for i in range(6)])
    bnd = bnd[labels.reshape(-1) != 255]
    right = correct.astype(bool)
    per_image_ece = [ref.ece_mce(*flat_valid(probs[i : i + 1], labels[i : i + 1], 255), 10)[0]
                     for i in range(6)]
    per_image_ace = [ref.ace(*flat_valid(probs[i : i + 1], labels[i : i + 1], 255), 10)
                     for i in range(6)]
    expected = {
        "ece": ece, "mce": mce, "sce": ref.sce(p, lab, 10), "nll": ref.nll(p, lab),
        "brier": ref.brier(p, lab), "miou": ref.miou(p, lab, 6), "pixel_acc": correct.mean(),
        "boundary_ece": ref.binned_gap(conf[bnd], correct[bnd], 10)[0],
        "ece_correct": ref.binned_gap(conf[right], correct[right], 10)[0],
        "ece_incorrect": ref.binned_gap(conf[~right], correct[~right], 10)[0],
        "image_ece_mean": np.mean(per_image_ece), "image_ece_std": np.std(per_image_ece),
        "ace": np.mean(per_image_ace),
    }
    # float32 inputs: per-pixel squares are summed over classes in float32.
    tol = 1e-12 if dtype == np.float64 else 1e-6
    summary = stats.summary()
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, abs=tol), name
    assert stats.n_pixels == len(lab)
    assert stats.n_images == 6


def test_misprediction_auroc_precision_recall(images):
    probs, labels, _ = images
    rng = np.random.default_rng(9)
    # Scores at the centres of the 1000 histogram bins but 499 and 500, plus exactly 0.5 (bin
    # 499, not flagged) and the next float32 above it (bin 500, flagged): one distinct value
    # per bin, so the histogram is lossless.
    bins = rng.integers(0, 998, labels.shape)
    bins[bins >= 499] += 2
    score = ((bins + 0.5) / 1000).astype(np.float32)
    score[:, 0, :3] = [0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.5]
    stats = sum(
        image_stats(probs[i], labels[i], ignore_index=255, mis_score=score[i]) for i in range(6)
    )
    valid = labels != 255
    p, lab = flat_valid(probs, labels, 255)
    wrong = ref.top_label(p, lab)[1] == 0
    s = score[valid].astype(np.float64)
    assert stats.mis_auroc() == pytest.approx(ref.rank_auroc(s, wrong), abs=1e-12)
    flagged = s > 0.5
    assert stats.mis_precision() == pytest.approx(wrong[flagged].mean(), abs=1e-12)
    assert stats.mis_recall() == pytest.approx(flagged[wrong].mean(), abs=1e-12)


def test_max_prob_auroc_is_always_computed():
    rng = np.random.default_rng(10)
    conf = 1 - (rng.integers(0, 500, 200) + 0.5) / 1000  # 1 - conf at bin centres
    probs = np.stack([conf, 1 - conf]).reshape(2, 10, 20)
    labels = (rng.random((10, 20)) < 0.3).astype(np.int64)  # label 1 = mispredicted
    stats = image_stats(probs, labels)
    expected = ref.rank_auroc(1 - conf, labels.reshape(-1) == 1)
    assert stats.msp_auroc() == pytest.approx(expected, abs=1e-12)
    assert math.isnan(stats.mis_auroc())  # no selector score given


def test_nll_floors_a_zero_true_class_probability():
    probs = np.array([[[1.0, 0.5]], [[0.0, 0.5]]], dtype=np.float32)
    stats = image_stats(probs, np.array([[1, 1]]))
    tiny = np.finfo(np.float32).tiny
    assert stats.nll_sum == pytest.approx(-math.log(tiny) - math.log(0.5), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Given predictions


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["numpy_uint8", "torch_int64"])
def test_preds_equal_to_the_argmax_change_nothing(images, dtype, kind):
    probs, labels, score = images
    for i in range(6):
        p = probs[i].astype(dtype)
        pred = p.argmax(0).astype(np.uint8)
        pred = pred if kind == "numpy_uint8" else torch.from_numpy(pred).long()
        expected = image_stats(p, labels[i], ignore_index=255, mis_score=score[i])
        got = image_stats(p, labels[i], ignore_index=255, mis_score=score[i], preds=pred)
        assert_stats_equal(got, expected, rtol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_other_preds_match_the_reference(images, dtype):
    """Half the pixels predict a random class: its probability is the confidence."""
    probs, labels, score = images
    probs = probs.astype(dtype)
    rng = np.random.default_rng(12)
    preds = np.where(rng.random(labels.shape) < 0.5, probs.argmax(1),
                     rng.integers(0, 6, labels.shape))
    per_image = [
        image_stats(probs[i], labels[i], ignore_index=255, mis_score=score[i], n_bins=10,
                    preds=preds[i])
        for i in range(6)
    ]
    stats = sum(per_image)
    p, lab = flat_valid(probs, labels, 255)
    pred = preds[labels != 255]
    assert (pred != p.argmax(1)).mean() > 0.3  # the predictions do differ from the argmax
    conf, correct = ref.top_label(p, lab, pred)
    ece, mce = ref.ece_mce(p, lab, 10, pred)
    right = correct.astype(bool)
    per_image_ece, per_image_ace = [], []
    for i in range(6):
        keep = labels[i] != 255
        pi, li = flat_valid(probs[i : i + 1], labels[i : i + 1], 255)
        per_image_ece.append(ref.ece_mce(pi, li, 10, preds[i][keep])[0])
        per_image_ace.append(ref.ace(pi, li, 10, preds[i][keep]))
    expected = {
        "ece": ece, "mce": mce, "sce": ref.sce(p, lab, 10), "nll": ref.nll(p, lab),
        "brier": ref.brier(p, lab), "miou": ref.miou(p, lab, 6, pred),
        "pixel_acc": correct.mean(),
        "ece_correct": ref.binned_gap(conf[right], correct[right], 10)[0],
        "ece_incorrect": ref.binned_gap(conf[~right], correct[~right], 10)[0],
        "image_ece_mean": np.mean(per_image_ece), "ace": np.mean(per_image_ace),
    }
    tol = 1e-12 if dtype == np.float64 else 1e-6
    summary = stats.summary()
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, abs=tol), name
    # Score histograms of the wrongly predicted pixels: selector score and 1 - confidence.
    s = score[labels != 255]
    for got, values in ((stats.mis_hist_inc, s[~right]), (stats.msp_hist_inc, 1 - conf[~right])):
        np.testing.assert_array_equal(got, np.bincount(ref.bins_of(values, 1000), minlength=1000))


def test_preds_decide_ties():
    """Uniform probabilities: every class ties, so only ``preds`` says which is predicted."""
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2]])
    preds = labels.copy()
    preds[1:] = (labels[1:] + 1) % 4  # right on the first row only
    probs = np.full((4, 3, 4), 0.25, np.float32)
    stats = image_stats(probs, labels, preds=preds)
    expected_confusion = np.zeros((4, 4), np.int64)
    np.add.at(expected_confusion, (labels.ravel(), preds.ravel()), 1)
    np.testing.assert_array_equal(stats.confusion, expected_confusion)
    assert stats.pixel_acc() == pytest.approx(4 / 12)
    assert stats.ece() == pytest.approx(abs(0.25 - 4 / 12))
    # Without preds the first argmax, class 0, is predicted everywhere.
    argmax = image_stats(probs, labels)
    assert argmax.confusion[:, 1:].sum() == 0
    assert argmax.pixel_acc() == pytest.approx((labels == 0).mean())


# --------------------------------------------------------------------------------------------
# Exact merging


def test_merge_is_order_free_and_matches_sum_rows(images):
    parts = [stats_of(images, i) for i in range(6)]
    forward = sum(parts)
    assert_stats_equal(forward, sum(reversed(parts)))
    tree = (parts[0] + parts[5]) + ((parts[2] + parts[1]) + (parts[4] + parts[3]))
    assert_stats_equal(forward, tree)
    assert_stats_equal(forward, ImageStats.zero(6) + forward)
    frame = pd.DataFrame([part.to_row() for part in parts]).sample(frac=1.0, random_state=0)
    assert_stats_equal(forward, ImageStats.sum_rows(frame))
    assert_stats_equal(forward, ImageStats.sum_rows(frame.to_dict("records")))


def test_halves_of_an_image_add_up_to_the_image(images):
    """Pooled sums are additive over pixels; boundary and per-image fields are not (a cut
    changes neighbours; ACE and image-wise ECE are per image by definition)."""
    probs, labels, score = images
    whole = stats_of(images, 0)
    halves = [
        image_stats(probs[0][:, rows], labels[0][rows], ignore_index=255,
                    mis_score=score[0][rows])
        for rows in (slice(0, 4), slice(4, 10))
    ]
    merged = halves[1] + halves[0]
    per_image = {"ace_sum", "ece_img_sum", "ece_img_sqsum", "n_images"}
    for name in ARRAYS:
        if name.startswith("boundary") or name in per_image:
            continue
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12,
                                   atol=1e-12, err_msg=name)
    assert merged.n_images == 2


def test_fully_ignored_image_counts_no_image():
    probs, labels = make_inputs(n=1, seed=11)
    empty = image_stats(probs[0], np.full(labels[0].shape, 255), ignore_index=255)
    assert (empty.n_pixels, empty.n_images) == (0, 0)
    assert math.isnan(empty.ece())
    assert math.isnan(empty.ace())
    assert all(math.isnan(v) for v in empty.summary().values())
    full = image_stats(probs[0], labels[0])
    assert_stats_equal(empty + full, full)


# --------------------------------------------------------------------------------------------
# Rows


def test_row_round_trip_through_json_pandas_and_arrow(images):
    stats = stats_of(images, 0) + stats_of(images, 1)
    row = stats.to_row()
    assert tuple(row) == ROW_KEYS
    assert_stats_equal(ImageStats.from_row(json.loads(json.dumps(row))), stats, rtol=0)
    table = pa.Table.from_pandas(pd.DataFrame([row, stats_of(images, 2).to_row()]))
    back = table.to_pandas()  # list columns come back as NumPy arrays
    assert_stats_equal(ImageStats.from_row(back.iloc[0]), stats, rtol=0)
    assert_stats_equal(ImageStats.sum_rows(back), stats + stats_of(images, 2))


def test_inputs_may_be_torch_float16_or_non_contiguous(images):
    probs, labels, _ = images
    expected = image_stats(probs[0].astype(np.float32), labels[0], ignore_index=255)
    t = torch.from_numpy(probs[0].astype(np.float32)).permute(1, 2, 0).contiguous()
    got = image_stats(t.permute(2, 0, 1), torch.from_numpy(labels[0]), ignore_index=255)
    assert_stats_equal(got, expected, rtol=0)
    two = np.stack([np.full((2, 2), 0.25), np.full((2, 2), 0.75)]).astype(np.float16)
    assert image_stats(two, np.ones((2, 2), np.uint16)).ece() == pytest.approx(0.25)


def test_validate_args_false_skips_value_checks():
    probs = np.full((2, 2, 2), 0.9)
    labels = np.zeros((2, 2), np.int64)
    with pytest.raises(ValueError, match="sum to 1"):
        image_stats(probs, labels)
    assert image_stats(probs, labels, validate_args=False).n_pixels == 4


# --------------------------------------------------------------------------------------------
# Bad input


def _ok():
    return np.full((2, 3, 4), 0.5), np.zeros((3, 4), np.int64)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"probs": np.full((1, 2, 3, 4), 0.5)}, ValueError, r"`probs` of shape \(C, H, W\)"),
        ({"labels": np.zeros((4, 3), np.int64)}, ValueError,
         r"`labels` of shape \(3, 4\) to match `probs`, but got \(4, 3\)"),
        ({"boundary_width": 0}, ValueError, r"`boundary_width` to be a positive int, but got 0"),
        ({"boundary_width": 1.5}, TypeError, r"`boundary_width` to be an int, but got float"),
        ({"n_score_bins": 999}, ValueError, r"`n_score_bins` to be even, but got 999"),
        ({"n_score_bins": 0}, ValueError, r"`n_score_bins` to be a positive int"),
        ({"mis_score": np.zeros((4, 3))}, ValueError,
         r"`mis_score` of shape \(3, 4\) to match `labels`, but got \(4, 3\)"),
        ({"mis_score": np.zeros((3, 4), np.int64)}, TypeError, r"`mis_score` to be a floating"),
        ({"mis_score": np.full((3, 4), np.nan)}, ValueError, r"`mis_score` to be finite"),
        ({"mis_score": np.full((3, 4), 1.5)}, ValueError,
         r"`mis_score` to be in \[0, 1\], but got 1.5"),
        ({"mis_score": np.full((3, 4), -0.1)}, ValueError,
         r"`mis_score` to be in \[0, 1\], but got -0.1"),
        ({"mis_score": [0.5]}, TypeError, r"`mis_score` to be a torch.Tensor or numpy.ndarray"),
        ({"preds": np.zeros((4, 3), np.int64)}, ValueError,
         r"`preds` of shape \(3, 4\) to match `labels`, but got \(4, 3\)"),
        ({"preds": np.zeros((3, 4))}, TypeError,
         r"`preds` to be an integer tensor, but got dtype float64"),
        ({"preds": np.full((3, 4), 2)}, ValueError, r"`preds` to be in \[0, 2\), but got 2"),
        ({"preds": np.full((3, 4), -1)}, ValueError, r"`preds` to be in \[0, 2\), but got -1"),
        ({"preds": [0]}, TypeError, r"`preds` to be a torch.Tensor or numpy.ndarray"),
    ],
    ids=["probs_rank", "labels_shape", "width_zero", "width_float", "score_bins_odd",
         "score_bins_zero", "score_shape", "score_int", "score_nan", "score_above",
         "score_below", "score_list", "preds_shape", "preds_float", "preds_above",
         "preds_below", "preds_list"],
)
def test_image_stats_rejects_bad_input(kwargs, error, match):
    probs, labels = _ok()
    args = {"probs": probs, "labels": labels, **kwargs}
    with pytest.raises(error, match=match):
        image_stats(args.pop("probs"), args.pop("labels"), **args)


def test_adding_mismatched_stats_raises():
    with pytest.raises(ValueError, match=r"same \(n_bins, num_classes, n_score_bins\)"):
        ImageStats.zero(3) + ImageStats.zero(4)
    with pytest.raises(TypeError):
        ImageStats.zero(3) + 1


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], r"`rows` to hold at least one row"),
        ([{"n_bins": 15}], r"`rows` to have the ImageStats keys, but missing"),
        ([ImageStats.zero(3).to_row(), ImageStats.zero(4).to_row()],
         r"`rows` to share \(n_bins, num_classes\)"),
        (pd.DataFrame([ImageStats.zero(3).to_row()]).drop(columns="count"),
         r"`rows` to have the ImageStats columns, but missing \['count'\]"),
        ([ImageStats.zero(3).to_row(), {**ImageStats.zero(3).to_row(), "count": [1, 2]}],
         r"every row's `count` to have 15 values"),
    ],
    ids=["empty", "missing_key", "mixed_sizes", "missing_column", "ragged"],
)
def test_sum_rows_rejects_bad_rows(rows, match):
    with pytest.raises(ValueError, match=match):
        ImageStats.sum_rows(rows)


def test_from_row_rejects_bad_rows():
    row = ImageStats.zero(3).to_row()
    missing = r"`row` to have the ImageStats keys, but missing \['nll_sum'\]"
    with pytest.raises(ValueError, match=missing):
        ImageStats.from_row({k: v for k, v in row.items() if k != "nll_sum"})
    with pytest.raises(ValueError, match=r"`row\['confusion'\]` to have 9 values, but got 4"):
        ImageStats.from_row({**row, "confusion": [0, 0, 0, 0]})
