"""Pure metric kernels: input checks, the per-image pass, and the public ``ece``/``image_ece``.

Two kinds of kernel live here. The *update* kernel (:func:`image_sums`) reduces one image's
pixels to small sums: int64 counts and float64 sums, so results stay exact when the sums of
10^9+ pixels are added up. *Compute* kernels turn those sums (as stored in
:class:`pipeline.metrics.stats.ImageStats`) into metric values. Per-pixel values never leave an
image, so memory is bounded by one image.

Inputs may be torch tensors or NumPy arrays; the kernels run on NumPy views of them (no copy
for contiguous CPU tensors). The per-image pass is one numba-compiled loop over blocks of
pixels: every statistic needs only a few operations per probability, and a fused loop does
them in one read of the image instead of the dozen full passes (and temporaries) that the
same work takes as torch or NumPy array operations. The public :func:`ece` and
:func:`image_ece` have their own, smaller compiled pass (:func:`_top_label_bins`): first
argmax, confidence, correctness and bin only, about as fast as reading the probabilities once
(``probs.amax(1)``). :mod:`pipeline.metrics.torch_stats` is the per-image pass in torch, for
GPUs.

Bin rule (top-label, classwise and score bins alike): with ``n`` equal-width bins, bin ``b``
holds values in ``(b/n, (b+1)/n]``; bin 0 also holds 0 and a value of exactly 1.0 lands in the
last bin.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba.cpython.unsafe.numbers import trailing_zeros
from torch import Tensor

SUM_TOLERANCE = 1e-3
"""Largest accepted ``|sum_c probs[c] - 1|`` per pixel (float16 storage needs about 1e-3)."""

_ROWS = 1 << 16  # (P, C) inputs are transposed and reduced this many rows at a time


# ---------------------------------------------------------------------------------------------
# Input checks


def _as_array(x: object, name: str) -> np.ndarray:
    """NumPy view of a torch tensor (on the CPU) or a NumPy array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(
        f"Expected `{name}` to be a torch.Tensor or numpy.ndarray, but got {type(x).__name__}"
    )


def check_n_bins(n_bins: object, name: str = "n_bins") -> int:
    """Validate a bin count.

    Args:
        n_bins: The value to check.
        name: Argument name used in the error message.

    Returns:
        ``n_bins`` as an int.

    Raises:
        TypeError: If ``n_bins`` is not an int.
        ValueError: If ``n_bins`` is smaller than 1.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {n_bins}")
    return n_bins


def check_ignore_index(ignore_index: object) -> int | None:
    """Validate ``ignore_index`` (None or an int).

    Raises:
        TypeError: If it is neither None nor an int.
    """
    if ignore_index is not None and (
        not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
    ):
        raise TypeError(
            f"Expected `ignore_index` to be None or an int, but got {ignore_index!r}"
        )
    return ignore_index


def as_probs(probs: object, ndims: tuple[int, ...], layout: str, name: str = "probs") -> np.ndarray:
    """NumPy float32/float64 view of ``probs``, with rank, class count and size checked.

    Values are checked pixel by pixel in the per-image pass (:func:`image_sums`).

    Args:
        probs: torch tensor or NumPy array of probabilities.
        ndims: Accepted numbers of dimensions.
        layout: Expected layout for messages, e.g. ``"(N, C, H, W) or (P, C)"``.
        name: Argument name used in messages.

    Returns:
        A float32 (float16/bfloat16 are widened) or float64 array.

    Raises:
        TypeError: If ``probs`` is not a floating tensor/array.
        ValueError: On a wrong rank, fewer than two classes or an empty input.
    """
    a = _as_array(probs, name)
    if a.dtype.kind != "f":
        raise TypeError(f"Expected `{name}` to be a floating tensor, but got dtype {a.dtype}")
    if a.ndim not in ndims:
        raise ValueError(f"Expected `{name}` of shape {layout}, but got {a.shape}")
    class_dim = 1 if a.ndim in (2, 4) else 0
    if a.shape[class_dim] < 2:
        raise ValueError(
            f"Expected `{name}` to have at least 2 classes (dim {class_dim}), but got shape "
            f"{a.shape}"
        )
    if a.size == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, but got shape {a.shape}")
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def as_labels(labels: object, shape: tuple[int, ...], name: str = "labels") -> np.ndarray:
    """NumPy integer view of ``labels``, with the shape checked against ``shape``.

    Raises:
        TypeError: If ``labels`` is not an integer tensor/array.
        ValueError: If its shape differs from ``shape``.
    """
    a = _as_array(labels, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `{name}` of shape {tuple(shape)} to match `probs`, but got {a.shape}"
        )
    return a


def as_preds(preds: object, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Flat int64 copy of predicted classes, with dtype, shape and range checked.

    Args:
        preds: Integer tensor/array of predicted classes.
        shape: Expected shape (that of the labels).
        num_classes: Number of classes C.

    Returns:
        ``preds`` flattened, as int64.

    Raises:
        TypeError: If ``preds`` is not an integer tensor/array.
        ValueError: On a shape other than ``shape`` or a value outside ``[0, C)``.
    """
    a = _as_array(preds, "preds")
    if a.dtype.kind not in "iu":
        raise TypeError(f"Expected `preds` to be an integer tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `preds` of shape {tuple(shape)} to match `labels`, but got {a.shape}"
        )
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"Expected `preds` to be in [0, {num_classes}), but got {lo if lo < 0 else hi}"
        )
    return a.reshape(-1).astype(np.int64, copy=False)


def as_scores(scores: object, shape: tuple[int, ...], name: str = "mis_score") -> np.ndarray:
    """NumPy float view of per-pixel scores in [0, 1], with shape and range checked.

    Raises:
        TypeError: If ``scores`` is not a floating tensor/array.
        ValueError: On a shape other than ``shape``, NaN/inf or values outside [0, 1].
    """
    a = _as_array(scores, name)
    if a.dtype.kind != "f":
        raise TypeError(f"Expected `{name}` to be a floating tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `{name}` of shape {tuple(shape)} to match `labels`, but got {a.shape}"
        )
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(f"Expected `{name}` to be finite, but got {a[~finite][0]}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 1:
        raise ValueError(f"Expected `{name}` to be in [0, 1], but got {lo if lo < 0 else hi}")
    return a


def valid_mask(
    labels: np.ndarray, num_classes: int, ignore_index: int | None, name: str = "labels"
) -> np.ndarray:
    """Check the label range and return the mask of pixels to score.

    Args:
        labels: Integer labels of any shape.
        num_classes: Number of classes C.
        ignore_index: Label value excluded from every metric, or None.
        name: Argument name used in messages.

    Returns:
        Bool mask (same shape as ``labels``) of pixels not equal to ``ignore_index``.

    Raises:
        ValueError: If a label is outside ``[0, C)`` and is not ``ignore_index``.
    """
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = (labels < 0) | (labels >= num_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bad.any():
            allowed = f"[0, {num_classes})"
            if ignore_index is not None:
                allowed += f" or ignore_index={ignore_index}"
            raise ValueError(f"Expected `{name}` to be in {allowed}, but got {labels[bad][0]}")
    if ignore_index is None:
        return np.ones(labels.shape, dtype=bool)
    return labels != ignore_index


# ---------------------------------------------------------------------------------------------
# Update kernels (one image in, small sums out)

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


def _raise_bad_pixel(column: np.ndarray, pixel: int, name: str) -> None:
    if not np.isfinite(column).all():
        raise ValueError(
            f"Expected `{name}` to be finite, but got {column[~np.isfinite(column)][0]} "
            f"at pixel {pixel}"
        )
    if column.min() < 0:
        raise ValueError(
            f"Expected `{name}` to be non-negative, but got {column.min()} at pixel {pixel}"
        )
    raise ValueError(
        f"Expected `{name}` to sum to 1 over the classes (tolerance {SUM_TOLERANCE}), but got "
        f"{float(column.sum(dtype=np.float64)):.6g} at pixel {pixel}"
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


# ---------------------------------------------------------------------------------------------
# Compute kernels (sums in, metric values out)


def ece_from_bins(count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    r"""Expected calibration error from per-bin sums.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|
              = \frac{1}{N} \sum_b \Big|\sum_{i \in b} c_i - \sum_{i \in b} 1[\hat y_i = y_i]\Big|

    Args:
        count: Pixels per bin, int (n_bins,).
        conf_sum: Sum of confidences per bin, float64 (n_bins,).
        correct_sum: Correct pixels per bin, (n_bins,).

    Returns:
        ECE in [0, 1], or NaN when there are no pixels.
    """
    total = int(np.sum(count))
    if total == 0:
        return math.nan
    return float(np.abs(np.asarray(conf_sum) - np.asarray(correct_sum)).sum() / total)


def mce_from_bins(count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    r"""Maximum calibration error: :math:`\max_{b: n_b > 0} |\mathrm{acc}_b - \mathrm{conf}_b|`.

    Returns:
        MCE in [0, 1], or NaN when there are no pixels.
    """
    count = np.asarray(count)
    full = count > 0
    if not full.any():
        return math.nan
    gap = np.abs(np.asarray(conf_sum)[full] - np.asarray(correct_sum)[full]) / count[full]
    return float(gap.max())


def sce_from_bins(count: np.ndarray, conf_sum: np.ndarray, correct_sum: np.ndarray) -> float:
    r"""Static (classwise) calibration error: the mean over classes of each class's ECE.

    .. math:: \mathrm{SCE} = \frac{1}{K} \sum_k \sum_b \frac{n_{kb}}{N}
              |\mathrm{acc}_{kb} - \mathrm{conf}_{kb}|

    Args:
        count: (C, n_bins) pixels per class bin (each row sums to N).
        conf_sum: (C, n_bins) float64 sum of ``probs[k]`` per class bin.
        correct_sum: (C, n_bins) pixels labelled k per class bin.

    Returns:
        SCE, or NaN when there are no pixels.
    """
    count = np.asarray(count)
    total = int(count[0].sum())
    if total == 0:
        return math.nan
    gaps = np.abs(np.asarray(conf_sum) - np.asarray(correct_sum)).sum(1)
    return float(gaps.mean() / total)


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve from score histograms of positives and negatives.

    Equals the probability that a random positive scores above a random negative, scores in
    the same bin counting one half (the exact rank AUROC when no bin holds two distinct scores).

    Args:
        pos: (n,) counts of positives (e.g. mispredicted pixels) per ascending score bin.
        neg: (n,) counts of negatives per bin.

    Returns:
        AUROC in [0, 1], or NaN without positives or negatives.

    Example:
        >>> auroc_from_histograms(np.array([0, 1, 1]), np.array([2, 0, 0]))
        1.0
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


def miou_from_confusion(confusion: np.ndarray) -> float:
    """Mean intersection over union from a (C, C) confusion matrix (rows: label, cols: pred).

    Classes absent from both labels and predictions are left out of the mean.

    Returns:
        mIoU in [0, 1], or NaN when the matrix is empty.

    Example:
        >>> round(miou_from_confusion(np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])), 4)
        0.5833
    """
    confusion = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    if not present.any():
        return math.nan
    return float((tp[present] / union[present]).mean())


# ---------------------------------------------------------------------------------------------
# Public functions


_TOP_BLOCK = 128  # pixels per block of the top-label pass: its scratch stays in L1
_PARALLEL_MIN = 1 << 20  # probabilities from which ece/image_ece reduce parts on threads
_LANES = 4  # interleaved bin copies: consecutive pixels in one bin do not wait on each other


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _top_label_cols(x, labels, preds, ignore, use_ignore, n_bins, check, tol, out_count,
                    out_sum, out_correct, bad):
    """Top-label bins of a (C, P) image in one read; see :func:`_top_label_bins`.

    ``bad`` receives the first pixel with bad probabilities, label and prediction (-1: none);
    such pixels are skipped, so the caller can raise in the documented order. ``tol`` is
    ``SUM_TOLERANCE`` rounded down to the input dtype, so the check in that dtype accepts
    exactly the sums the float64 check does. Images must have fewer than 2^32 pixels.
    """
    c, p = x.shape
    one, zero = x.dtype.type(1.0), x.dtype.type(0.0)
    psum = np.empty(_TOP_BLOCK, x.dtype)
    best = np.empty(_TOP_BLOCK, x.dtype)
    low = np.empty(_TOP_BLOCK, x.dtype)
    arg = np.empty(_TOP_BLOCK, np.int32)
    cell = np.empty(_TOP_BLOCK, np.int64)
    packed = np.empty(_TOP_BLOCK, np.int64)
    dump = _LANES * n_bins
    count = np.zeros(dump + 1, np.int64)  # per cell: pixels + 2^32 * correct pixels
    conf_sum = np.zeros(dump + 1)
    for j0 in range(0, p, _TOP_BLOCK):
        m = min(_TOP_BLOCK, p - j0)
        psum[:m] = 0
        best[:m] = -np.inf
        low[:m] = np.inf
        arg[:m] = 0
        if preds.size == 0:
            # Two classes per sweep halve the scratch loads and stores (the time here).
            for k in range(0, c - 1, 2):
                row0, row1 = x[k, j0 : j0 + m], x[k + 1, j0 : j0 + m]
                k0, k1 = np.int32(k), np.int32(k + 1)
                for i in range(m):
                    v0, v1 = row0[i], row1[i]
                    psum[i] += v0 + v1
                    top, a = best[i], arg[i]
                    new_max = v0 > top  # strict: the first maximum wins
                    a = k0 if new_max else a
                    top = v0 if new_max else top
                    new_max = v1 > top
                    arg[i] = k1 if new_max else a
                    best[i] = v1 if new_max else top
                    v0 = v0 if v0 < v1 else v1
                    low[i] = v0 if v0 < low[i] else low[i]
            if c % 2:
                row0 = x[c - 1, j0 : j0 + m]
                k0 = np.int32(c - 1)
                for i in range(m):
                    v0 = row0[i]
                    psum[i] += v0
                    new_max = v0 > best[i]
                    arg[i] = k0 if new_max else arg[i]
                    best[i] = v0 if new_max else best[i]
                    low[i] = v0 if v0 < low[i] else low[i]
        else:
            if check:
                for k in range(c):
                    row = x[k, j0 : j0 + m]
                    for i in range(m):
                        v = row[i]
                        psum[i] += v
                        low[i] = v if v < low[i] else low[i]
            for i in range(m):
                a = preds[j0 + i]
                arg[i] = a
                if a < 0 or a >= c:
                    if bad[2] < 0:
                        bad[2] = j0 + i
                    arg[i] = -1
                else:
                    best[i] = x[a, j0 + i]
        # Pixels to score: probabilities, label and prediction fine, label not ignored. Each
        # gets a cell (lane, bin); the others go to a dump cell. Vectorised.
        n_fine = 0
        for i in range(m):
            y = labels[j0 + i]
            a = arg[i]
            ok = (y >= 0) & (y < c) & (a >= 0)
            ok = ok & ((abs(psum[i] - one) <= tol) & (low[i] >= zero) | ~check)
            n_fine += np.int64(ok)
            b = np.int64(math.ceil(np.float64(best[i]) * n_bins)) - 1  # bin_of, inlined
            b = min(max(b, 0), n_bins - 1)
            score = ok & ~(use_ignore & (y == ignore))
            cell[i] = (i % _LANES) * n_bins + b if score else dump
            # Count and correct count in one int64: correct pixels add 1 + 2^32.
            packed[i] = 1 + (np.int64(a == y) << 32)
        if n_fine < m:  # rare: record the first bad pixel of each kind
            for i in range(m):
                j = j0 + i
                y = labels[j]
                if check and not (abs(psum[i] - 1.0) <= SUM_TOLERANCE and low[i] >= 0):
                    if bad[0] < 0:
                        bad[0] = j
                elif not (use_ignore and y == ignore) and (y < 0 or y >= c) and bad[1] < 0:
                    bad[1] = j
        for i in range(m):
            count[cell[i]] += packed[i]
            conf_sum[cell[i]] += np.float64(best[i])
    for lane in range(_LANES):
        for b in range(n_bins):
            both = count[lane * n_bins + b]
            out_count[b] += both & 0xFFFFFFFF
            out_sum[b] += conf_sum[lane * n_bins + b]
            out_correct[b] += both >> 32


@numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _top_label_rows(x, labels, preds, ignore, use_ignore, n_bins, check, out_count, out_sum,
                    out_correct, bad):
    """:func:`_top_label_cols` for (P, C) rows."""
    p, c = x.shape
    for j in range(p):
        if check:
            s = x.dtype.type(0)
            low = x.dtype.type(np.inf)
            for k in range(c):
                v = x[j, k]
                s += v
                low = v if v < low else low
            if not (abs(s - 1.0) <= SUM_TOLERANCE and low >= 0):
                if bad[0] < 0:
                    bad[0] = j
                continue
        y = labels[j]
        if use_ignore and y == ignore:
            continue
        if y < 0 or y >= c:
            if bad[1] < 0:
                bad[1] = j
            continue
        if preds.size:
            a = preds[j]
            if a < 0 or a >= c:
                if bad[2] < 0:
                    bad[2] = j
                continue
        else:
            a = 0
            best = x[j, 0]
            for k in range(1, c):
                if x[j, k] > best:
                    best = x[j, k]
                    a = k
        top = np.float64(x[j, a])
        b = bin_of(top, n_bins)
        out_count[b] += 1
        out_sum[b] += top
        out_correct[b] += a == y


def _parts(a: np.ndarray) -> list[tuple[int, int]]:
    """Independent parts of (N, C, P) images (one per image) or (P, C) rows (``_ROWS`` each)."""
    if a.ndim == 3:
        return [(i, i + 1) for i in range(a.shape[0])]
    return [(s, min(s + _ROWS, a.shape[0])) for s in range(0, a.shape[0], _ROWS)]


def _top_label_bins(
    probs: object, labels: object, n_bins: int, ignore_index: int | None, *, images: bool,
    preds: object = None, check: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate and bin the top-label confidences: one compiled read of the probabilities.

    Only what :func:`ece` and :func:`image_ece` return is computed: each pixel's first
    argmax (or ``preds``), its confidence, whether it is correct and its bin. Images (or blocks
    of ``_ROWS`` rows) are independent parts, reduced on up to ``torch.get_num_threads()``
    threads (the kernel releases the GIL) into their own bins, so the result does not depend
    on the thread count.

    Returns:
        ``(count, conf_sum, correct_sum, pixels)``: (parts, n_bins) int64 / float64 / int64
        bins per part and the (parts,) scored pixels per part.

    Raises:
        TypeError, ValueError: as documented by :func:`ece`. Errors are raised in input order:
        a prediction out of range anywhere first, then per part a label out of range, then
        bad probabilities.
    """
    n_bins = check_n_bins(n_bins)
    ignore_index = check_ignore_index(ignore_index)
    layout = "(N, C, H, W)" if images else "(N, C, H, W) or (P, C)"
    p = as_probs(probs, (4,) if images else (2, 4), layout)
    if p.ndim == 4:
        n, c, h, w = p.shape
        shape: tuple[int, ...] = (n, h, w)
        lab = as_labels(labels, shape).reshape(n, h * w)
        x = p.reshape(n, c, h * w)
    else:
        rows, c = p.shape
        shape = (rows,)
        lab = as_labels(labels, shape)
        x = p
    if lab.dtype == np.uint64:
        lab = lab.astype(np.int64)
    pred = np.empty(0, np.int64)
    if preds is not None:
        pred = _as_array(preds, "preds")
        if pred.dtype.kind not in "iu":
            raise TypeError(f"Expected `preds` to be an integer tensor, but got dtype {pred.dtype}")
        if pred.shape != shape:
            raise ValueError(
                f"Expected `preds` of shape {shape} to match `labels`, but got {pred.shape}"
            )
        pred = pred.reshape(lab.shape)
        if pred.dtype == np.uint64:
            pred = pred.astype(np.int64)
    parts = _parts(x)
    count = np.zeros((len(parts), n_bins), np.int64)
    conf_sum = np.zeros((len(parts), n_bins))
    correct_sum = np.zeros((len(parts), n_bins), np.int64)
    bad = np.full((len(parts), 3), -1, np.int64)
    ignore = 0 if ignore_index is None else ignore_index
    if x.ndim == 3 and x.shape[2] >= 1 << 32:
        raise ValueError(f"Expected images of fewer than 2^32 pixels, but got {x.shape[2]}")
    tol = x.dtype.type(SUM_TOLERANCE)
    if tol > SUM_TOLERANCE:  # float32(1e-3) lies above 1e-3
        tol = np.nextafter(tol, x.dtype.type(0))

    def run(i: int) -> None:
        lo, hi = parts[i]
        if x.ndim == 3:
            xi, li = np.ascontiguousarray(x[lo]), lab[lo]
            pi = pred[lo] if pred.size else pred
            kernel = _top_label_cols
        else:
            xi, li = np.ascontiguousarray(x[lo:hi]), lab[lo:hi]
            pi = pred[lo:hi] if pred.size else pred
            kernel = _top_label_rows
        args = (xi, np.ascontiguousarray(li), np.ascontiguousarray(pi), ignore,
                ignore_index is not None, n_bins, check)
        if kernel is _top_label_cols:
            args += (tol,)
        kernel(*args, count[i], conf_sum[i], correct_sum[i], bad[i])

    # Threads only pay off on large inputs (a pool costs ~0.1 ms to start).
    threads = min(torch.get_num_threads(), len(parts)) if x.size >= _PARALLEL_MIN else 1
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, range(len(parts))))
    else:
        for i in range(len(parts)):
            run(i)
    if (bad[:, 2] >= 0).any():
        as_preds(preds, shape, c)  # raises the message
    for i, (lo, _) in enumerate(parts):
        if bad[i, 1] >= 0:
            li = lab[lo] if x.ndim == 3 else lab[lo:]
            valid_mask(li.reshape(-1), c, ignore_index)  # raises the message
        if bad[i, 0] >= 0:
            if x.ndim == 3:
                _raise_bad_pixel(x[lo][:, bad[i, 0]], int(bad[i, 0]), "probs")
            _raise_bad_pixel(x[lo + bad[i, 0]], int(lo + bad[i, 0]), "probs")
    return count, conf_sum, correct_sum, count.sum(1)


def _no_pixels(ignore_index: int | None) -> ValueError:
    return ValueError(
        f"Expected `labels` to have a pixel other than ignore_index={ignore_index}, "
        "but got none"
    )


def ece(
    probs: Tensor | np.ndarray, labels: Tensor | np.ndarray, *, n_bins: int = 15,
    ignore_index: int | None = None, preds: Tensor | np.ndarray | None = None,
) -> float:
    r"""Pooled top-label expected calibration error over every scored pixel.

    .. math:: \mathrm{ECE} = \sum_b \frac{n_b}{N} |\mathrm{acc}_b - \mathrm{conf}_b|

    Bins are equal-width: bin b holds confidences in ``(b/n, (b+1)/n]`` (0 in the first bin).
    Counts are int64 and sums float64, one image (or block of rows) at a time.

    Args:
        probs: Probabilities, (N, C, H, W) or (P, C), float, torch or NumPy; each pixel's
            probabilities sum to 1.
        labels: Integer labels, (N, H, W) or (P,), in ``[0, C)`` or ``ignore_index``.
        n_bins: Number of equal-width confidence bins.
        ignore_index: Label value whose pixels are left out, or None.
        preds: Optional predicted classes shaped like ``labels`` (default: the first argmax of
            ``probs``); pass the argmax of the logits when a huge temperature flattens the
            probabilities into float ties.

    Returns:
        ECE as a float.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: On wrong shapes, NaN/inf, probabilities not summing to 1, labels out of
            range, fewer than two classes, an empty input or no pixel left after ignoring.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
        >>> round(ece(probs, torch.tensor([0, 1, 1]), n_bins=2), 4)
        0.0667
    """
    count, conf_sum, correct_sum, pixels = _top_label_bins(
        probs, labels, n_bins, ignore_index, images=False, preds=preds
    )
    if pixels.sum() == 0:
        raise _no_pixels(ignore_index)
    # Per-part float64 sums added in part order: the same result on any number of threads.
    return ece_from_bins(count.sum(0), conf_sum.sum(0), correct_sum.sum(0))


def image_ece(
    probs: Tensor | np.ndarray, labels: Tensor | np.ndarray, *, n_bins: int = 15,
    ignore_index: int | None = None, preds: Tensor | np.ndarray | None = None,
) -> float:
    """Image-wise ECE: each image's own ECE, averaged over the images.

    This is the protocol of the local temperature scaling and selective scaling papers.
    Images with no scored pixel (all ``ignore_index``) are left out of the mean.

    Args:
        probs: Probabilities (N, C, H, W), float, torch or NumPy.
        labels: Integer labels (N, H, W) in ``[0, C)`` or ``ignore_index``.
        n_bins: Number of equal-width confidence bins.
        ignore_index: Label value whose pixels are left out, or None.
        preds: Optional predicted classes (N, H, W), as for :func:`ece`.

    Returns:
        Mean per-image ECE as a float.

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: On the same bad inputs as :func:`ece`.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]]).T.reshape(1, 2, 1, 2)
        >>> probs = torch.cat([probs, probs.flip(1)])  # the second image predicts class 1
        >>> round(image_ece(probs, torch.zeros(2, 1, 2, dtype=torch.long), n_bins=2), 4)
        0.5
    """
    count, conf_sum, correct_sum, pixels = _top_label_bins(
        probs, labels, n_bins, ignore_index, images=True, preds=preds
    )
    values = [
        ece_from_bins(count[i], conf_sum[i], correct_sum[i])
        for i in range(len(pixels)) if pixels[i]
    ]
    if not values:
        raise _no_pixels(ignore_index)
    return float(np.mean(values))
