"""The per-image pass: one image's pixels reduced to small, exact sums.

:func:`image_sums` is the *update* kernel behind :func:`pipeline.metrics.image_stats`: it
reduces one (C, P) image to int64 counts and float64 sums (:class:`ImageSums`), so results stay
exact when the sums of 10^9+ pixels are added up, and per-pixel values never leave an image
(memory is bounded by one image). It is one numba-compiled loop over blocks of pixels: every
statistic needs only a few operations per probability, and a fused loop does them in one read
of the image instead of the dozen full passes (and temporaries) that the same work takes as
torch or NumPy array operations. :mod:`pipeline.metrics.torch_stats` is the same pass in
torch, for GPUs.

Also here: :func:`bin_of` (the bin rule every kernel uses), :func:`first_argmax` (predicted
classes, fast on the CPU), :func:`adaptive_bins` (ACE's equal-mass bins of one image) and
:func:`boundary_mask`.

Bin rule (top-label, classwise and score bins alike): with ``n`` equal-width bins, bin ``b``
holds values in ``(b/n, (b+1)/n]``; bin 0 also holds 0 and a value of exactly 1.0 lands in the
last bin.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros
from torch import Tensor

from pipeline.metrics.checks import SUM_TOLERANCE, _as_array, _raise_bad_pixel

# IEEE-safe fast-math: reassociation lets the per-row loops vectorise; no "nnan"/"ninf", since
# the value checks rely on NaN comparing false.
_FASTMATH = {"reassoc", "contract", "nsz"}
_BLOCK = 2048  # pixels per block: C rows of a block and the per-pixel scratch stay in cache


@numba.njit(cache=True, nogil=True)
def bin_of(value: float, n_bins: int) -> int:
    """Equal-width bin of a value in [0, 1]: bin b holds ``(b/n, (b+1)/n]``.

    Computed as ``ceil(n * x) - 1`` in float64, clipped to ``[0, n-1]`` (0 goes to bin 0, 1.0
    to bin n-1). For float16/float32 values the float64 product is exact, so values on an edge
    land by the rule; for float64 values an edge may be off by one ulp.

    Args:
        value: A value in [0, 1] (values outside are clipped into the end bins).
        n_bins: Number of bins n.

    Returns:
        The bin index.

    Example:
        >>> [bin_of(v, 4) for v in (0.0, 0.25, 0.2501, 1.0)]
        [0, 0, 1, 3]
    """
    b = int(math.ceil(np.float64(value) * n_bins)) - 1
    return min(max(b, 0), n_bins - 1)


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _image_kernel(
    x, labels, preds, valid, boundary, score, n_bins, n_score_bins, check, edge, tiny,
    joint_count, joint_sum, cls_count, cls_sum, cls_correct, confusion, msp_hist, mis_hist,
    total, scalars, conf_cor, conf_inc,
):
    """One pass over a (C, P) image; see :func:`image_sums`.

    A pixel's predicted class is ``preds[j]`` or, when ``preds`` is empty, the first argmax of
    its probabilities; its confidence is its probability of that class. Each scored pixel adds
    its confidence to one cell of a joint histogram over (predicted
    class, confidence bin, correct, boundary, sole value above the edge): one update where
    top-label, boundary and classwise bins would take four. The caller derives those bins and
    the correct pixels' share of ``confusion`` and ``cls_correct`` from it; the kernel adds the
    rest (scanned classwise values, wrongly predicted pixels) and leaves classwise bin 0 to be
    filled in from ``total`` (the per-class sums over scored pixels).

    Returns (scored pixels, correct ones, first pixel failing the checks or -1).
    """
    c, p = x.shape
    psum = np.empty(_BLOCK, x.dtype)
    sq = np.empty(_BLOCK, x.dtype)
    best = np.empty(_BLOCK, x.dtype)
    low = np.empty(_BLOCK, x.dtype)
    arg = np.empty(_BLOCK, np.int32)
    words = (c + 31) // 32
    mask = np.empty((words, _BLOCK), np.uint32)  # classes above the edge, a bit each
    n_valid = n_cor = 0
    nll = brier = 0.0  # locals, not scalars[...]: no loop-carried store per pixel
    for j0 in range(0, p, _BLOCK):
        m = min(_BLOCK, p - j0)
        psum[:m] = 0
        sq[:m] = 0
        best[:m] = -np.inf
        low[:m] = np.inf
        arg[:m] = 0
        mask[:, :m] = 0
        # Dense and vectorised: per pixel the sum, sum of squares, first argmax, min and the
        # classes whose value is above the first classwise edge (bits); per class the sum.
        if preds.size and not check:
            # Given predictions and no value checks (evaluation): the sum, argmax and min are
            # not needed. The same operations on sq, the class bits and the row sums as below.
            for k in range(c):
                row = x[k, j0 : j0 + m]
                row_sum = 0.0
                word = mask[k >> 5]
                bit = np.uint32(1) << np.uint32(k & 31)
                for i in range(m):
                    v = row[i]
                    sq[i] += v * v
                    word[i] |= bit if v > edge else np.uint32(0)
                    row_sum += v
                total[k] += row_sum
        else:
            for k in range(c):
                row = x[k, j0 : j0 + m]
                row_sum = 0.0
                word = mask[k >> 5]
                bit = np.uint32(1) << np.uint32(k & 31)
                for i in range(m):
                    v = row[i]
                    psum[i] += v
                    sq[i] += v * v
                    new_max = v > best[i]
                    arg[i] = k if new_max else arg[i]
                    best[i] = v if new_max else best[i]
                    low[i] = v if v < low[i] else low[i]
                    word[i] |= bit if v > edge else np.uint32(0)
                    row_sum += v
                total[k] += row_sum
        if check:
            for i in range(m):
                if not (abs(psum[i] - 1.0) <= SUM_TOLERANCE and low[i] >= 0):
                    return n_valid, n_cor, j0 + i
        for i in range(m):
            j = j0 + i
            if not valid[j]:
                for k in range(c):
                    total[k] -= x[k, j]
                continue
            y = labels[j]
            if preds.size:
                a = preds[j]
                top = x[a, j]
            else:
                a = arg[i]
                top = best[i]
            conf = np.float64(top)
            b = bin_of(conf, n_bins)
            correct = a == y
            # Classwise bins >= 1 (bin 0 comes from the totals): most pixels have one value
            # above the edge, the predicted one, which the joint cell records; for the others
            # only the classes above the edge are visited (in class order), so a pixel costs a
            # few hard-to-predict branches, not one per class.
            sole = True
            for w in range(words):
                own = np.uint32(1) << np.uint32(a & 31) if w == a >> 5 else np.uint32(0)
                sole = sole and mask[w, i] == own
            if not sole:
                for w in range(words):
                    classes = mask[w, i]
                    while classes:
                        k = w * 32 + trailing_zeros(classes)
                        v = x[k, j]
                        bk = bin_of(v, n_bins)
                        cls_count[k, bk] += 1
                        cls_sum[k, bk] += v
                        classes &= classes - np.uint32(1)
            cell = (((a * n_bins + b) * 2 + correct) * 2 + boundary[j]) * 2 + sole
            joint_count[cell] += 1
            joint_sum[cell] += conf
            p_true = conf
            if not correct:
                p_true = np.float64(x[y, j])
                confusion[y, a] += 1
                cls_correct[y, bin_of(p_true, n_bins)] += 1
            nll -= math.log(max(p_true, tiny))
            brier += np.float64(sq[i]) - 2.0 * p_true + 1.0
            msp_hist[1 - correct, bin_of(1.0 - conf, n_score_bins)] += 1
            if score.size:
                mis_hist[1 - correct, bin_of(score[j], n_score_bins)] += 1
            # Confidences by correctness, for ACE's equal-mass bins.
            if correct:
                conf_cor[n_cor] = top
                n_cor += 1
            else:
                conf_inc[n_valid - n_cor] = top
            n_valid += 1
    scalars[0] = nll
    scalars[1] = brier
    return n_valid, n_cor, -1


def first_argmax(scores: Tensor | np.ndarray) -> np.ndarray:
    """Index of the first maximum over the class dimension (dim 0), e.g. predicted classes.

    Equals ``torch.argmax(scores, 0)`` (first index among equal maxima), several times faster
    on the CPU: torch reduces over a non-innermost dimension slowly (about 30 ms for a
    (11, 360, 480) float32 tensor on one core, this about 1.5 ms).

    Args:
        scores: (C, ...) float logits or probabilities, torch or NumPy, no NaN.

    Returns:
        (...) int64 array.

    Raises:
        TypeError: If ``scores`` is not a floating tensor/array.
        ValueError: If ``scores`` has no class dimension or is empty.

    Example:
        >>> first_argmax(np.array([[1.0, 3.0], [2.0, 3.0]])).tolist()
        [1, 0]
    """
    a = _as_array(scores, "scores")
    if a.dtype.kind != "f":
        raise TypeError(f"Expected `scores` to be a floating tensor, but got dtype {a.dtype}")
    if a.ndim == 0 or a.size == 0:
        raise ValueError(f"Expected `scores` of shape (C, ...), non-empty, but got {a.shape}")
    flat = np.ascontiguousarray(a).reshape(a.shape[0], -1)
    return _first_argmax(flat).reshape(a.shape[1:])


@numba.njit(cache=True, nogil=True)
def _first_argmax(x):
    c, p = x.shape
    out = np.zeros(p, np.int64)
    best = x[0].copy()
    for k in range(1, c):
        row = x[k]
        for j in range(p):
            if row[j] > best[j]:
                best[j] = row[j]
                out[j] = k
    return out


class ImageSums(NamedTuple):
    """Sums of one image from :func:`image_sums` (bins are ``(group, bin)`` arrays)."""

    top_count: np.ndarray  # (4, n_bins) int64; group = correct + 2 * boundary
    top_sum: np.ndarray  # (4, n_bins) float64 confidence sums, same groups
    cls_count: np.ndarray  # (C, n_bins) int64 pixels per class bin of probs[k]
    cls_sum: np.ndarray  # (C, n_bins) float64 sum of probs[k] per class bin
    cls_correct: np.ndarray  # (C, n_bins) int64 pixels labelled k per class bin
    confusion: np.ndarray  # (C, C) int64, rows: label, columns: prediction
    msp_hist: np.ndarray  # (2, n_score_bins) int64 1 - confidence; row 0 correct, 1 wrong
    mis_hist: np.ndarray  # (2, n_score_bins) int64 selector score, same rows
    nll_sum: float
    brier_sum: float
    conf_cor: np.ndarray  # top-label confidences of the correctly predicted pixels (for ACE)
    conf_inc: np.ndarray  # top-label confidences of the wrongly predicted pixels


def image_sums(
    probs: np.ndarray, labels: np.ndarray, valid: np.ndarray, boundary: np.ndarray,
    score: np.ndarray | None, n_bins: int, n_score_bins: int, *, check: bool = True,
    name: str = "probs", preds: np.ndarray | None = None,
) -> ImageSums:
    """Reduce one image's pixels to calibration sums in a single compiled pass.

    A pixel's prediction is ``preds`` when given, else the first argmax of its probabilities;
    its confidence is its probability of the predicted class. Top-label bins are split by
    correctness and boundary; classwise bins, confusion matrix,
    NLL and Brier sums and score histograms come from the same pass. Counts are int64, sums
    float64; per-pixel terms are computed in the input precision.

    Args:
        probs: (C, P) C-contiguous float32/float64 probabilities.
        labels: (P,) int64 labels, in ``[0, C)`` where ``valid`` (checked by the caller).
        valid: (P,) bool, pixels to score.
        boundary: (P,) bool, boundary pixels.
        score: (P,) float64 selector scores in [0, 1], or None.
        n_bins: Number of confidence bins.
        n_score_bins: Number of score-histogram bins.
        check: Check each pixel's probabilities (finite, >= 0, sum to 1).
        name: Argument name for error messages.
        preds: (P,) int64 predicted classes in ``[0, C)`` (checked by the caller), or None.

    Returns:
        The :class:`ImageSums`.

    Raises:
        ValueError: With ``check``, on NaN/inf, a negative value or a sum off by more than
            ``SUM_TOLERANCE``.
    """
    c, p = probs.shape
    i8, f8 = np.int64, np.float64
    hists = (
        np.zeros(c * n_bins * 8, i8), np.zeros(c * n_bins * 8, f8), np.zeros((c, n_bins), i8),
        np.zeros((c, n_bins), f8), np.zeros((c, n_bins), i8), np.zeros((c, c), i8),
        np.zeros((2, n_score_bins), i8), np.zeros((2, n_score_bins), i8),
    )
    total, scalars = np.zeros(c), np.zeros(2)
    conf_cor, conf_inc = np.empty(p, probs.dtype), np.empty(p, probs.dtype)
    # Just below 1/n in the input dtype: every value of classwise bin >= 1 lies above it; the
    # few bin-0 values above it are binned exactly and then overwritten with bin 0's total.
    dtype = probs.dtype.type
    edge = np.nextafter(dtype(1.0 / n_bins), dtype(0))
    n_valid, n_cor, bad = _image_kernel(
        probs, labels, np.empty(0, np.int64) if preds is None else preds, valid, boundary,
        np.empty(0) if score is None else score, n_bins, n_score_bins, check, edge,
        np.finfo(probs.dtype).tiny, *hists, total, scalars, conf_cor, conf_inc,
    )
    if bad >= 0:
        _raise_bad_pixel(probs[:, bad], bad, name)
    joint_count, joint_sum, cls_count, cls_sum, cls_correct, confusion, msp_hist, mis_hist = hists
    # Joint cells: (predicted class, bin, correct, boundary, sole value above the edge).
    joint_count = joint_count.reshape(c, n_bins, 2, 2, 2)
    joint_sum = joint_sum.reshape(c, n_bins, 2, 2, 2)
    # Top-label bins by group = correct + 2 * boundary: (n, correct, boundary) -> (4, n).
    top_count = joint_count.sum((0, 4)).transpose(2, 1, 0).reshape(4, n_bins)
    top_sum = joint_sum.sum((0, 4)).transpose(2, 1, 0).reshape(4, n_bins)
    cls_count += joint_count[..., 1].sum((2, 3))
    cls_sum += joint_sum[..., 1].sum((2, 3))
    cls_count[:, 0] = n_valid - cls_count[:, 1:].sum(1)
    cls_sum[:, 0] = total - cls_sum[:, 1:].sum(1)
    correct_by_class = joint_count[:, :, 1].sum((2, 3))  # (C, n): label = prediction
    cls_correct += correct_by_class
    confusion[np.diag_indices(c)] += correct_by_class.sum(1)
    return ImageSums(
        top_count, top_sum, cls_count, cls_sum, cls_correct, confusion, msp_hist, mis_hist,
        float(scalars[0]), float(scalars[1]), conf_cor[:n_cor], conf_inc[: n_valid - n_cor],
    )


def adaptive_bins(
    conf_cor: np.ndarray, conf_inc: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-mass bins of one image's pixels (the bins of ACE).

    Pixels sorted by confidence are split into ``min(n_bins, P)`` runs whose sizes differ by at
    most one (rank i goes to run ``floor(i * runs / P)``). Equal confidences are ordered
    incorrect before correct, so the split of ties is deterministic.

    Args:
        conf_cor: Top-label confidences of the correctly predicted pixels, in [0, 1].
        conf_inc: Top-label confidences of the wrongly predicted pixels (same dtype); the two
            together hold P >= 1 pixels.
        n_bins: Number of bins.

    Returns:
        ``(count, conf_sum, correct_sum)`` per run: int64, float64, int64.

    Example:
        >>> adaptive_bins(np.array([0.9, 0.8]), np.array([0.6, 0.7]), 2)
        (array([2, 2]), array([1.3, 1.7]), array([0, 2]))
    """
    # Two value sorts and a merge: several times faster than one argsort of all pixels.
    return _merge_runs(np.sort(conf_cor), np.sort(conf_inc), n_bins)


@numba.njit(cache=True, nogil=True)
def _merge_runs(cor, inc, n_bins):
    n = cor.size + inc.size
    runs = min(n_bins, n)
    count = np.zeros(runs, np.int64)
    conf_sum = np.zeros(runs)
    correct_sum = np.zeros(runs, np.int64)
    i = j = r = 0
    end = -(-n // runs)  # first rank of run 1: ceil(n / runs)
    for rank in range(n):
        if rank == end:
            r += 1
            end = -(-(r + 1) * n // runs)
        take_inc = j < inc.size and (i == cor.size or inc[j] <= cor[i])
        if take_inc:
            conf_sum[r] += inc[j]
            j += 1
        else:
            conf_sum[r] += cor[i]
            correct_sum[r] += 1
            i += 1
        count[r] += 1
    return count, conf_sum, correct_sum


def boundary_mask(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels whose label differs from the label ``1..width`` pixels up, down, left or right.

    Ignore-labelled neighbours count as different labels (void usually outlines objects).

    Args:
        labels: (H, W) integer labels.
        width: Largest shift in pixels (>= 1).

    Returns:
        (H, W) bool mask.

    Example:
        >>> boundary_mask(np.array([[0, 0, 0, 1, 1, 1]]), 1).astype(int).tolist()
        [[0, 0, 1, 1, 0, 0]]
    """
    mask = np.zeros(labels.shape, dtype=bool)
    for s in range(1, width + 1):
        rows = labels[s:] != labels[:-s]
        mask[s:] |= rows
        mask[:-s] |= rows
        cols = labels[:, s:] != labels[:, :-s]
        mask[:, s:] |= cols
        mask[:, :-s] |= cols
    return mask
