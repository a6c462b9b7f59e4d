"""Compute kernels: sums in, metric values out.

They turn the bins, histograms and confusion matrix that the passes produce (and that
:class:`pipeline.metrics.stats.ImageStats` stores and adds up) into metric values: ECE, MCE and
SCE from confidence bins, AUROC from score histograms, mIoU from a confusion matrix. Each is a
few NumPy operations on arrays of size ``n_bins`` or ``C x C``.
"""

from __future__ import annotations

import math

import numpy as np


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
