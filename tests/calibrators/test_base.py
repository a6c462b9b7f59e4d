"""The Calibrator base class: input validation, fit plumbing, the shared optimisation loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import build_calibrator, optimise
from pipeline.calibrators.base import FitData, from_points, to_points
from pipeline.calibrators.checks import check_float, check_int

C = 5


def _data(n=2, c=C, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 3
    labels = torch.randint(0, c, (n, h, w), generator=g)
    return logits, labels


def _fitted(name="temperature"):
    logits, labels = _data()
    return build_calibrator(name, C).fit(logits, labels)


LOGITS, LABELS = _data()
IMAGES = torch.rand(2, 3, 4, 4)

BAD_FIT_INPUTS = [
    pytest.param({"logits": LOGITS.numpy()}, TypeError, "`logits` to be a torch.Tensor",
                 id="logits-numpy"),
    pytest.param({"logits": LOGITS.long()}, TypeError, "`logits` to be a float tensor",
                 id="logits-int"),
    pytest.param({"logits": LOGITS[0]}, ValueError, r"`logits` of shape \(N, C, H, W\) or \(P, C\)",
                 id="logits-3d"),
    pytest.param({"logits": LOGITS[:, :4]}, ValueError, "`logits` to have 5 classes",
                 id="logits-class-count"),
    pytest.param({"logits": LOGITS[:0], "labels": LABELS[:0]}, ValueError,
                 "`logits` to be non-empty", id="logits-empty"),
    pytest.param({"logits": LOGITS.clone().index_put_((torch.tensor(0),), torch.tensor(math.nan))},
                 ValueError, "`logits` to be finite", id="logits-nan"),
    pytest.param({"logits": LOGITS.clone().index_put_((torch.tensor(1),), torch.tensor(math.inf))},
                 ValueError, "`logits` to be finite", id="logits-inf"),
    pytest.param({"labels": LABELS.tolist()}, TypeError, "`labels` to be a torch.Tensor",
                 id="labels-list"),
    pytest.param({"labels": LABELS.float()}, TypeError, "`labels` to be an integer tensor",
                 id="labels-float"),
    pytest.param({"labels": LABELS.bool()}, TypeError, "`labels` to be an integer tensor",
                 id="labels-bool"),
    pytest.param({"labels": LABELS[:, :3]}, ValueError, r"`labels` of shape \(2, 4, 4\)",
                 id="labels-shape"),
    pytest.param({"labels": LABELS + 5}, ValueError, r"`labels` in \[0, 5\).*but got [5-9]",
                 id="labels-too-large"),
    pytest.param({"labels": LABELS - 5}, ValueError, r"`labels` in \[0, 5\).*but got -",
                 id="labels-negative"),
    pytest.param({"labels": torch.full_like(LABELS, 255), "ignore_index": 255}, ValueError,
                 "at least one pixel not equal to `ignore_index`=255", id="labels-all-ignored"),
    pytest.param({"labels": torch.full_like(LABELS, 255)}, ValueError,
                 "`ignore_index`=None, but got 255", id="labels-ignore-without-index"),
    pytest.param({"ignore_index": 2.5}, TypeError, "`ignore_index` to be an int",
                 id="ignore-index-float"),
    pytest.param({"images": IMAGES.long()}, TypeError, "`images` to be a float tensor",
                 id="images-int"),
    pytest.param({"images": IMAGES[:, :1]}, ValueError, r"`images` of shape \(2, 3, 4, 4\)",
                 id="images-shape"),
    pytest.param({"images": IMAGES * 255}, ValueError, r"`images` to hold values in \[0, 1\]",
                 id="images-range"),
    pytest.param({"logits": LOGITS[:, :, 0, 0], "labels": LABELS[:, 0, 0], "images": IMAGES},
                 ValueError, r"logits of shape \(N, C, H, W\) when `images`", id="images-points"),
    pytest.param({"heldout": [LOGITS]}, TypeError, "`heldout` to be a FitData",
                 id="heldout-type"),
    pytest.param({"heldout": (LOGITS, LABELS + 5)}, ValueError, r"`heldout.labels` in \[0, 5\)",
                 id="heldout-labels"),
    pytest.param({"heldout": (LOGITS[:, :3], LABELS)}, ValueError, "`heldout.logits` to have 5",
                 id="heldout-logits"),
    pytest.param({"seed": "0"}, TypeError, "`seed` to be an int", id="seed-str"),
]


@pytest.mark.parametrize(("overrides", "error", "match"), BAD_FIT_INPUTS)
def test_fit_rejects_bad_input(overrides, error, match):
    kwargs = {"logits": LOGITS, "labels": LABELS, **overrides}
    calibrator = build_calibrator("temperature", C)
    with pytest.raises(error, match=match):
        calibrator.fit(kwargs.pop("logits"), kwargs.pop("labels"), **kwargs)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        pytest.param((LOGITS[0],), ValueError, r"`logits` of shape", id="logits-3d"),
        pytest.param((LOGITS[:, :2],), ValueError, "`logits` to have 5 classes", id="classes"),
        pytest.param((LOGITS.int(),), TypeError, "`logits` to be a float tensor", id="int"),
        pytest.param((LOGITS * math.nan,), ValueError, "`logits` to be finite", id="nan"),
        pytest.param((LOGITS, IMAGES[:1]), ValueError, "`image` of shape", id="image-shape"),
        pytest.param((LOGITS, IMAGES - 1), ValueError, r"`image` to hold values in \[0, 1\]",
                     id="image-range"),
    ],
)
def test_forward_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        _fitted()(*args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_forward_accepts_finite_logits_whose_sum_overflows(dtype):
    # The finiteness check sums first; a sum overflowing to inf must not reject finite logits.
    big = torch.full_like(LOGITS, torch.finfo(dtype).max).to(dtype)
    assert not bool(torch.isfinite(big.sum()))
    assert _fitted()(big).shape == big.shape  # no ValueError
    for value in (math.inf, -math.inf, math.nan):
        bad = big.clone()
        bad[1, 2, 3, 0] = value
        with pytest.raises(ValueError, match="`logits` to be finite"):
            _fitted()(bad)


def test_forward_before_fit_raises():
    with pytest.raises(RuntimeError, match="`forward` was called before `fit`"):
        build_calibrator("temperature", C)(LOGITS)


@pytest.mark.parametrize(
    ("num_classes", "error", "match"),
    [
        pytest.param(1, ValueError, r"`num_classes` to be an int >= 2, but got 1", id="one"),
        pytest.param(5.0, TypeError, "`num_classes` to be an int", id="float"),
        pytest.param(True, TypeError, "`num_classes` to be an int", id="bool"),
    ],
)
def test_num_classes_checked(num_classes, error, match):
    with pytest.raises(error, match=match):
        build_calibrator("temperature", num_classes)


def test_fit_returns_self_in_eval_mode_and_marks_fitted():
    calibrator = build_calibrator("temperature", C)
    assert not bool(calibrator.state_dict()["fitted"])
    assert calibrator.fit(LOGITS, LABELS) is calibrator
    assert not calibrator.training
    assert bool(calibrator.state_dict()["fitted"])


def test_ignored_pixels_are_excluded_from_the_fit():
    logits, labels = _data(n=4, h=8, w=8, seed=1)
    keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) < 0.6
    marked = torch.where(keep, labels, torch.full_like(labels, 255))
    with_ignore = build_calibrator("vector", C).fit(logits, marked, ignore_index=255)
    points = logits.permute(0, 2, 3, 1)[keep]
    without = build_calibrator("vector", C).fit(points, labels[keep])
    torch.testing.assert_close(with_ignore.scale, without.scale)
    torch.testing.assert_close(with_ignore.bias, without.bias)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int32], ids=str)
def test_shard_label_dtypes_are_accepted(dtype):
    marked = LABELS.clone()
    marked[0, 0] = 255
    reference = build_calibrator("temperature", C).fit(LOGITS, marked, ignore_index=255)
    calibrator = build_calibrator("temperature", C).fit(
        LOGITS.half(), marked.to(dtype), ignore_index=255
    )
    assert calibrator.temperature == pytest.approx(reference.temperature, rel=1e-2)


def test_heldout_accepts_tuple_and_fitdata_alike():
    logits, labels = _data(n=4, h=8, w=8, seed=3)
    held_logits, held_labels = _data(n=4, h=8, w=8, seed=4)
    a = build_calibrator("matrix", C).fit(logits, labels, heldout=(held_logits, held_labels))
    b = build_calibrator("matrix", C).fit(logits, labels,
                                          heldout=FitData(held_logits, held_labels))
    torch.testing.assert_close(a.weight, b.weight)


def test_fit_leaves_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_calibrator("vector", C).fit(LOGITS, LABELS, seed=7)
    torch.testing.assert_close(torch.rand(3), expected)


def test_forward_accepts_half_precision_and_returns_float32():
    calibrator = _fitted("vector")
    out = calibrator(LOGITS.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, calibrator(LOGITS.half().float()))


@pytest.mark.parametrize("shape", [(2, C, 3, 4), (7, C)], ids=["maps", "points"])
def test_points_round_trip(shape):
    x = torch.randn(shape)
    points = to_points(x)
    assert points.shape == (x.numel() // C, C)
    torch.testing.assert_close(from_points(points, x), x)


def test_loss_is_the_calibrator_nll_and_skips_ignored():
    calibrator = build_calibrator("vector", C)
    marked = LABELS.clone()
    marked[0] = 255
    loss = calibrator.loss(LOGITS, marked, ignore_index=255)
    expected = F.cross_entropy(LOGITS[1:], LABELS[1:])  # identity map at initialisation
    torch.testing.assert_close(loss, expected)


def test_optimise_lbfgs_finds_a_quadratic_minimum():
    x = torch.zeros(3, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5])
    final = optimise(lambda: (x - target).pow(2).sum(), [x])
    torch.testing.assert_close(x.detach(), target)
    assert final < 1e-10


def test_optimise_adamw_stops_when_the_callback_says_so():
    x = torch.zeros(1, requires_grad=True)
    steps = []

    def callback(step, loss):
        steps.append(step)
        return step == 4

    optimise(lambda: (x - 1).pow(2).sum(), [x], method="adamw", max_iter=100, lr=0.1,
             callback=callback)
    assert steps == [0, 1, 2, 3, 4]
    assert 0.3 < float(x.detach()) < 0.7  # five AdamW steps of ~lr towards 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"method": "sgd"}, ValueError, r"`method` to be one of \['lbfgs', 'adamw'\]",
                     id="method"),
        pytest.param({"max_iter": 0}, ValueError, "`max_iter` to be an int >= 1", id="max-iter"),
    ],
)
def test_optimise_rejects_bad_arguments(kwargs, error, match):
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(error, match=match):
        optimise(lambda: x.sum(), [x], **kwargs)


def test_optimise_rejects_a_non_finite_loss():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="finite training loss, but got nan"):
        optimise(lambda: x.sum() * math.nan, [x])


@pytest.mark.parametrize(
    ("check", "value", "error", "match"),
    [
        pytest.param(lambda v: check_int("k", v, ge=1), 0, ValueError, r"`k` to be an int >= 1",
                     id="int-ge"),
        pytest.param(lambda v: check_float("f", v, gt=0), 0.0, ValueError, "`f` to be a float > 0",
                     id="float-gt"),
        pytest.param(lambda v: check_float("f", v, le=1), 2, ValueError, "`f` to be a float <= 1",
                     id="float-le"),
        pytest.param(lambda v: check_float("f", v, lt=1), 1, ValueError, "`f` to be a float < 1",
                     id="float-lt"),
        pytest.param(lambda v: check_float("f", v), math.inf, ValueError, "`f` to be a finite",
                     id="float-inf"),
        pytest.param(lambda v: check_float("f", v), "1", TypeError, "`f` to be a float",
                     id="float-type"),
    ],
)
def test_option_checks(check, value, error, match):
    with pytest.raises(error, match=match):
        check(value)
