"""The public one-call metrics :func:`ece` and :func:`image_ece` on whole arrays.

They need only top-label bins, so they have their own, smaller compiled pass
(:func:`_top_label_cols` for (C, P) images, :func:`_top_label_rows` for (P, C) rows): first
argmax, confidence, correctness and bin only, about as fast as reading the probabilities once
(``probs.amax(1)``). :func:`_top_label_bins` validates the inputs and runs that pass over
independent parts (images, or blocks of ``_ROWS`` rows), on threads for large inputs; counts
are int64 and sums float64, so the result does not depend on the thread count. The bin rule is
:func:`pipeline.metrics.per_image.bin_of`'s.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from pipeline.metrics.checks import (
    SUM_TOLERANCE,
    _as_array,
    _no_pixels,
    _raise_bad_pixel,
    as_labels,
    as_preds,
    as_probs,
    check_ignore_index,
    check_n_bins,
    valid_mask,
)
from pipeline.metrics.compute import ece_from_bins
from pipeline.metrics.per_image import _FASTMATH, bin_of

_ROWS = 1 << 16  # (P, C) inputs are transposed and reduced this many rows at a time
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
