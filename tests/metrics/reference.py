"""Plain float64 NumPy references for the metric tests, written from the definitions.

Everything takes flat inputs: ``probs`` (P, C) float64 and ``labels`` (P,) int of the scored
pixels only (ignored pixels removed by the caller). ``pred`` (P,) optionally replaces the
first argmax as each pixel's predicted class; the confidence is then ``probs[pixel, pred]``.
"""

from __future__ import annotations

import numpy as np


def bins_of(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin b holds (b/n, (b+1)/n]; 0 goes to bin 0. Written with explicit edge comparisons."""
    values = np.asarray(values, dtype=np.float64)
    edges = np.arange(1, n_bins) / n_bins  # inner edges 1/n .. (n-1)/n
    return (values[:, None] > edges[None, :]).sum(1)


def binned_gap(values: np.ndarray, hits: np.ndarray, n_bins: int) -> tuple[float, float]:
    """(ECE, MCE) of ``values`` against 0/1 ``hits`` in equal-width bins."""
    bins = bins_of(values, n_bins)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            gap = abs(values[sel].mean() - hits[sel].mean())
            ece += sel.mean() * gap
            mce = max(mce, gap)
    return ece, mce


def top_label(
    probs: np.ndarray, labels: np.ndarray, pred: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and correctness per pixel (prediction: ``pred``, else the first argmax)."""
    if pred is None:
        return probs.max(1), (probs.argmax(1) == labels).astype(np.float64)
    conf = np.array([probs[i, k] for i, k in enumerate(pred)])
    return conf, (pred == labels).astype(np.float64)


def ece_mce(
    probs: np.ndarray, labels: np.ndarray, n_bins: int, pred: np.ndarray | None = None
) -> tuple[float, float]:
    conf, correct = top_label(probs, labels, pred)
    return binned_gap(conf, correct, n_bins)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(labels)), labels]).mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(1).mean())


def sce(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Mean over classes of the ECE of probs[:, k] against label == k."""
    per_class = [
        binned_gap(probs[:, k], (labels == k).astype(np.float64), n_bins)[0]
        for k in range(probs.shape[1])
    ]
    return float(np.mean(per_class))


def ace(
    probs: np.ndarray, labels: np.ndarray, n_bins: int, pred: np.ndarray | None = None
) -> float:
    """Equal-mass bins: ranks sorted by confidence (ties: incorrect first), rank i in bin
    floor(i * R / P), R = min(n_bins, P); ECE over those bins."""
    conf, correct = top_label(probs, labels, pred)
    order = np.lexsort((correct, conf))
    conf, correct = conf[order], correct[order]
    p = len(conf)
    runs = min(n_bins, p)
    which = np.arange(p) * runs // p
    return float(
        sum(abs(conf[which == r].sum() - correct[which == r].sum()) for r in range(runs)) / p
    )


def miou(
    probs: np.ndarray, labels: np.ndarray, num_classes: int, pred: np.ndarray | None = None
) -> float:
    pred = probs.argmax(1) if pred is None else pred
    ious = []
    for k in range(num_classes):
        inter = np.sum((pred == k) & (labels == k))
        union = np.sum((pred == k) | (labels == k))
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def boundary(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixel by pixel: does any label within `width` steps up/down/left/right differ?"""
    h, w = labels.shape
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            for s in range(1, width + 1):
                for di, dj in ((s, 0), (-s, 0), (0, s), (0, -s)):
                    a, b = i + di, j + dj
                    if 0 <= a < h and 0 <= b < w and labels[a, b] != labels[i, j]:
                        out[i, j] = True
    return out


def rank_auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over all pairs."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
