"""The per-image statistics in torch, on any device (CUDA or CPU).

:func:`image_stats_torch` returns the same :class:`pipeline.metrics.ImageStats` as the numba
kernel behind :func:`pipeline.metrics.image_stats`: int64 counts identical, float64 sums equal
up to float64 summation order (1e-9 relative is what the tests require; observed ~1e-15). It
exists so that evaluation can score images where the calibrated logits already are, a GPU,
and move only the small sums to the host.

Same float computations as the numba kernel, so that every pixel lands in the same bin:

- a bin is ``ceil(float64(value) * n) - 1`` clipped to ``[0, n - 1]`` (:func:`bin_of`), on
  float64 copies of the input values; the score histogram bins ``1.0 - conf`` in float64;
- classwise bin 0 is derived as the numba kernel derives it: counts as the valid pixels minus
  the other bins, sums as the class total (all pixels minus the ignored ones) minus the other
  bins;
- Brier's per-pixel sum of squares is accumulated class by class in the input precision, one
  rounding per class as the kernel's fused multiply-add does (for float32 input the float64
  ``v * v + s`` is exact before its rounding to float32, so the two agree but for a double
  rounding at a float32 tie, about one pixel in 10^8);
- NLL floors the true class's probability at the input dtype's smallest normal number.

Float64 sums (confidence sums, classwise sums, NLL, Brier, ACE's runs) are added in another
order than the kernel's, so they agree to rounding, not bit for bit. Where a value is a
difference of sums (classwise bin 0), its absolute rounding error is about ``P * 1e-16``.

Per image x calibrator the work is a few dozen elementwise and scatter kernels plus one sort
(ACE); the results travel to the host in two tensors (one int64, one float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.checks import (
    SUM_TOLERANCE,
    _raise_bad_pixel,
    as_scores,
    check_ignore_index,
    check_n_bins,
)
from pipeline.metrics.compute import ece_from_bins
from pipeline.metrics.stats import N_SCORE_BINS, ImageStats, _check_width, stats_from_sums


@dataclass(frozen=True)
class Targets:
    """One image's labels on a device, checked and reduced once for every calibrator.

    Build with :func:`prepare_targets`; pass to :func:`image_stats_torch` as ``targets``.

    Attributes:
        height: Image height H.
        width: Image width W.
        num_classes: Number of classes C the labels were checked against.
        valid: (H * W,) bool, pixels not equal to ``ignore_index``.
        index: (P,) int64 indices of the valid pixels (P may be 0).
        labels: (P,) int64 labels of the valid pixels.
        boundary: (P,) int64, 1 on boundary pixels.
        n_valid: P.
    """

    height: int
    width: int
    num_classes: int
    valid: Tensor
    index: Tensor
    labels: Tensor
    boundary: Tensor
    n_valid: int


def boundary_mask_torch(labels: Tensor, width: int) -> Tensor:
    """Torch twin of :func:`pipeline.metrics.per_image.boundary_mask` ((H, W) -> (H, W) bool)."""
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for s in range(1, width + 1):
        rows = labels[s:] != labels[:-s]
        mask[s:] |= rows
        mask[:-s] |= rows
        cols = labels[:, s:] != labels[:, :-s]
        mask[:, s:] |= cols
        mask[:, :-s] |= cols
    return mask


def prepare_targets(
    labels: Tensor | np.ndarray,
    num_classes: int,
    *,
    ignore_index: int | None = None,
    boundary_width: int = 2,
    device: torch.device | str | None = None,
) -> Targets:
    """Check one image's labels and compute its valid and boundary pixels on ``device``.

    Args:
        labels: (H, W) integer labels in ``[0, C)`` or ``ignore_index`` (torch or NumPy).
        num_classes: Number of classes C.
        ignore_index: Label value left out of every metric, or None.
        boundary_width: Shift in pixels defining boundary pixels.
        device: Where to compute (default: the labels' device; NumPy labels: CPU).

    Returns:
        The :class:`Targets`.

    Raises:
        TypeError: If ``labels`` is not an integer tensor/array of rank 2.
        ValueError: On a label outside ``[0, C)`` that is not ``ignore_index``.
    """
    ignore_index = check_ignore_index(ignore_index)
    width = _check_width(boundary_width)
    if isinstance(labels, Tensor):
        lab = labels
    else:
        array = np.asarray(labels)
        # Shard arrays are read-only views of Arrow buffers, which torch warns about.
        lab = torch.from_numpy(array if array.flags.writeable else array.copy())
    if lab.dtype.is_floating_point or lab.dtype.is_complex or lab.dtype == torch.bool:
        raise TypeError(f"Expected `labels` to be an integer tensor, but got dtype {lab.dtype}")
    if lab.ndim != 2:
        raise ValueError(f"Expected `labels` of shape (H, W), but got {tuple(lab.shape)}")
    lab = lab.to(device=device or lab.device, dtype=torch.int64)
    bad = (lab < 0) | (lab >= num_classes)
    if ignore_index is not None:
        bad &= lab != ignore_index
    if bool(bad.any()):
        allowed = f"[0, {num_classes})"
        if ignore_index is not None:
            allowed += f" or ignore_index={ignore_index}"
        raise ValueError(f"Expected `labels` to be in {allowed}, but got {int(lab[bad][0])}")
    flat = lab.reshape(-1)
    if ignore_index is None:
        valid = torch.ones_like(flat, dtype=torch.bool)
    else:
        valid = flat != ignore_index
    index = valid.nonzero()[:, 0]
    boundary = boundary_mask_torch(lab, width).reshape(-1)[index].long()
    h, w = lab.shape
    return Targets(h, w, num_classes, valid, index, flat[index], boundary, int(index.numel()))


def _bins(values64: Tensor, n_bins: int) -> Tensor:
    """:func:`pipeline.metrics.per_image.bin_of` on a float64 tensor (int64 bins)."""
    return (values64 * n_bins).ceil_().sub_(1).clamp_(0, n_bins - 1).long()


def _hist(index: Tensor, size: int, weights: Tensor | None = None) -> Tensor:
    """Counts (int64) or float64 sums of ``weights`` per index in ``[0, size)``."""
    if weights is None:
        out = torch.zeros(size, dtype=torch.int64, device=index.device)
        return out.index_add_(0, index, torch.ones_like(index))
    out = torch.zeros(size, dtype=torch.float64, device=index.device)
    return out.index_add_(0, index, weights)


def _check_values(x: Tensor, name: str) -> None:
    """The numba kernel's value check: finite, >= 0, sums within ``SUM_TOLERANCE`` of 1."""
    ok = (x.sum(0) - 1.0).abs_() <= SUM_TOLERANCE
    ok &= x.amin(0) >= 0  # NaN compares false in both
    if not bool(ok.all()):
        pixel = int((~ok).nonzero()[0, 0])
        _raise_bad_pixel(x[:, pixel].cpu().numpy(), pixel, name)


def _sq_sum(xv: Tensor) -> Tensor:
    """Per-pixel ``sum_k x_k^2`` rounded to the input dtype after every class, as float64.

    The numba kernel adds the classes in order with a fused multiply-add; in float32 the
    float64 ``v * v + s`` is exact or nearly so, and one rounding to float32 follows.
    """
    if xv.dtype == torch.float64:
        return (xv * xv).sum(0)
    sq = torch.zeros(xv.shape[1], dtype=xv.dtype, device=xv.device)
    squares = xv.double().square_()
    for k in range(xv.shape[0]):
        # One kernel per class: the sum is computed in float64 and rounded once on the store.
        torch.add(squares[k], sq, out=sq)
    return sq.double()


def image_stats_torch(
    probs: Tensor,
    labels: Tensor | np.ndarray | None = None,
    *,
    n_bins: int = 15,
    ignore_index: int | None = None,
    boundary_width: int = 2,
    mis_score: Tensor | None = None,
    n_score_bins: int = N_SCORE_BINS,
    validate_args: bool = True,
    preds: Tensor | None = None,
    targets: Targets | None = None,
) -> ImageStats:
    """Sufficient statistics of one image, computed with torch on ``probs``' device.

    The same statistics as :func:`pipeline.metrics.image_stats` (see there for their
    definitions), computed where ``probs`` lives; only the sums come back to the host.

    Args:
        probs: (C, H, W) float probabilities summing to 1 over C (float16/bfloat16 widened to
            float32).
        labels: (H, W) integer labels in ``[0, C)`` or ``ignore_index``; may be None when
            ``targets`` is given.
        n_bins: Number of equal-width confidence bins.
        ignore_index: Label value whose pixels are left out, or None.
        boundary_width: Shift in pixels defining boundary pixels.
        mis_score: Optional (H, W) float selector score in [0, 1].
        n_score_bins: Bins of the score histograms; even.
        validate_args: Check probability values (finite, >= 0, sum to 1), the score range and
            the range of ``preds`` (shapes, dtypes and labels are always checked).
        preds: Optional (H, W) integer predicted classes in ``[0, C)`` (default: first argmax).
        targets: The labels already prepared by :func:`prepare_targets` (evaluation prepares
            them once per image for all calibrators); then ``labels``, ``ignore_index`` and
            ``boundary_width`` are not used.

    Returns:
        The image's :class:`ImageStats`.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: On wrong shapes or bad values, as :func:`pipeline.metrics.image_stats`.

    Example:
        >>> probs = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])  # (C=2, H=1, W=2)
        >>> stats = image_stats_torch(probs, torch.tensor([[0, 0]]), n_bins=2)
        >>> round(stats.ece(), 4), stats.pixel_acc()
        (0.35, 0.5)
    """
    n_bins = check_n_bins(n_bins)
    n_score_bins = check_n_bins(n_score_bins, "n_score_bins")
    if n_score_bins % 2:
        raise ValueError(f"Expected `n_score_bins` to be even, but got {n_score_bins}")
    if not isinstance(probs, Tensor):
        raise TypeError(f"Expected `probs` to be a torch.Tensor, but got {type(probs).__name__}")
    if not probs.dtype.is_floating_point:
        raise TypeError(f"Expected `probs` to be a floating tensor, but got dtype {probs.dtype}")
    if probs.ndim != 3:
        raise ValueError(f"Expected `probs` of shape (C, H, W), but got {tuple(probs.shape)}")
    c, h, w = probs.shape
    if c < 2:
        raise ValueError(
            f"Expected `probs` to have at least 2 classes (dim 0), but got shape "
            f"{tuple(probs.shape)}"
        )
    if probs.numel() == 0:
        raise ValueError(f"Expected `probs` to be non-empty, but got shape {tuple(probs.shape)}")
    device = probs.device
    if targets is None:
        if labels is None:
            raise TypeError("Expected `labels` or `targets`, but got neither")
        if tuple(labels.shape) != (h, w):
            raise ValueError(
                f"Expected `labels` of shape {(h, w)} to match `probs`, but got "
                f"{tuple(labels.shape)}"
            )
        targets = prepare_targets(labels, c, ignore_index=ignore_index,
                                  boundary_width=boundary_width, device=device)
    elif (targets.height, targets.width, targets.num_classes) != (h, w, c):
        raise ValueError(
            f"Expected `targets` of an ({h}, {w}) image with {c} classes, but got "
            f"({targets.height}, {targets.width}) with {targets.num_classes}"
        )
    if probs.dtype not in (torch.float32, torch.float64):
        probs = probs.float()
    x = probs.reshape(c, h * w)
    if validate_args:
        _check_values(x, "probs")
    if preds is None:
        pred = x.argmax(0)  # first maximum, as documented by torch
    else:
        if preds.dtype.is_floating_point or preds.dtype == torch.bool:
            raise TypeError(
                f"Expected `preds` to be an integer tensor, but got dtype {preds.dtype}"
            )
        if tuple(preds.shape) != (h, w):
            raise ValueError(
                f"Expected `preds` of shape {(h, w)} to match `labels`, but got "
                f"{tuple(preds.shape)}"
            )
        pred = preds.reshape(-1).to(device=device, dtype=torch.int64)
        if validate_args:  # two device syncs: evaluation passes the logits' argmax unchecked
            lo, hi = int(pred.min()), int(pred.max())
            if lo < 0 or hi >= c:
                raise ValueError(
                    f"Expected `preds` to be in [0, {c}), but got {lo if lo < 0 else hi}"
                )
    score = None
    if mis_score is not None:
        if not mis_score.dtype.is_floating_point:
            raise TypeError(
                f"Expected `mis_score` to be a floating tensor, but got dtype {mis_score.dtype}"
            )
        if tuple(mis_score.shape) != (h, w):
            raise ValueError(
                f"Expected `mis_score` of shape {(h, w)} to match `labels`, but got "
                f"{tuple(mis_score.shape)}"
            )
        score = mis_score.reshape(-1).to(device=device, dtype=torch.float64)
        if validate_args:
            as_scores(score.cpu().numpy(), (h * w,))
    return _stats(x, pred, score, targets, n_bins, n_score_bins)


def _stats(
    x: Tensor, pred: Tensor, score: Tensor | None, t: Targets, n_bins: int, n_score_bins: int
) -> ImageStats:
    """The statistics pass proper, on checked inputs; ``x`` is (C, H * W) float32/float64."""
    c = x.shape[0]
    device = x.device
    n = t.n_valid
    idx = t.index
    xv = x.index_select(1, idx)  # (C, P) valid pixels
    a = pred.index_select(0, idx)
    y = t.labels
    xv64 = xv.double()
    conf = xv64.gather(0, a[None])[0]
    p_true = xv64.gather(0, y[None])[0]
    b = _bins(conf, n_bins)
    correct = (a == y).long()
    group = correct + 2 * t.boundary
    top_index = group * n_bins + b
    top_count = _hist(top_index, 4 * n_bins)
    top_sum = _hist(top_index, 4 * n_bins, conf)
    # Classwise bins of every class's probability; bin 0 derived as in the numba kernel.
    cls_index = _bins(xv64, n_bins) + (torch.arange(c, device=device) * n_bins)[:, None]
    cls_index = cls_index.reshape(-1)
    cls_count = _hist(cls_index, c * n_bins).reshape(c, n_bins)
    cls_sum = _hist(cls_index, c * n_bins, xv64.reshape(-1)).reshape(c, n_bins)
    total = x.sum(1, dtype=torch.float64)
    if n < x.shape[1]:
        total = total - x[:, ~t.valid].sum(1, dtype=torch.float64)
    cls_count[:, 0] = n - cls_count[:, 1:].sum(1)
    cls_sum[:, 0] = total - cls_sum[:, 1:].sum(1)
    cls_correct = _hist(y * n_bins + _bins(p_true, n_bins), c * n_bins).reshape(c, n_bins)
    confusion = _hist(y * c + a, c * c).reshape(c, c)
    tiny = torch.finfo(x.dtype).tiny
    nll = -p_true.clamp_min(tiny).log_().sum()
    brier = (_sq_sum(xv) - 2.0 * p_true + 1.0).sum()
    wrong = 1 - correct
    msp_hist = _hist(wrong * n_score_bins + _bins(1.0 - conf, n_score_bins), 2 * n_score_bins)
    if score is None:
        mis_hist = torch.zeros(2 * n_score_bins, dtype=torch.int64, device=device)
    else:
        s_bins = _bins(score.index_select(0, idx), n_score_bins)
        mis_hist = _hist(wrong * n_score_bins + s_bins, 2 * n_score_bins)
    # ACE: equal-mass runs of the pixels sorted by confidence, wrong before right on ties
    # (a stable sort of [wrong, right] by confidence), rank i in run floor(i * runs / P).
    runs = min(n_bins, n) if n else 0
    if runs:
        order = torch.argsort(correct, stable=True)
        conf_x = xv.gather(0, a[None])[0].index_select(0, order)  # input dtype, as the kernel
        by_conf = torch.argsort(conf_x, stable=True)
        run = torch.arange(n, device=device) * runs // n
        ace_count = _hist(run, runs)
        ace_sum = _hist(run, runs, conf_x.index_select(0, by_conf).double())
        ace_correct = _hist(run, runs, correct.index_select(0, order).index_select(0, by_conf)
                            .double())
    else:
        ace_count = torch.zeros(0, dtype=torch.int64, device=device)
        ace_sum = ace_correct = torch.zeros(0, dtype=torch.float64, device=device)
    ints = torch.cat([top_count, cls_count.reshape(-1), cls_correct.reshape(-1),
                      confusion.reshape(-1), msp_hist, mis_hist, ace_count]).cpu().numpy()
    floats = torch.cat([top_sum, cls_sum.reshape(-1), nll[None], brier[None], ace_sum,
                        ace_correct]).cpu().numpy()
    sizes = (4 * n_bins, c * n_bins, c * n_bins, c * c, 2 * n_score_bins, 2 * n_score_bins)
    parts = np.split(ints, np.cumsum(sizes))
    top_count_, cls_count_, cls_correct_, confusion_, msp_, mis_, ace_count_ = parts
    top_sum_, cls_sum_, rest = np.split(floats, np.cumsum((4 * n_bins, c * n_bins)))
    ace = math.nan
    if runs:
        ace = ece_from_bins(ace_count_, rest[2 : 2 + runs], rest[2 + runs :])
    return stats_from_sums(
        n_bins=n_bins, num_classes=c, n_valid=n,
        top_count=top_count_.reshape(4, n_bins), top_sum=top_sum_.reshape(4, n_bins),
        cls_count=cls_count_.reshape(c, n_bins), cls_sum=cls_sum_.reshape(c, n_bins),
        cls_correct=cls_correct_.reshape(c, n_bins), confusion=confusion_.reshape(c, c),
        msp_hist=msp_.reshape(2, n_score_bins), mis_hist=mis_.reshape(2, n_score_bins),
        nll_sum=float(rest[0]), brier_sum=float(rest[1]), ace=ace,
    )
