"""Mergeable per-image statistics: :class:`ImageStats` and :func:`image_stats`.

One :class:`ImageStats` holds the sufficient statistics of one image (or, once added up, of any
set of images): int64 counts and float64 sums, so ``a + b`` is exact and order-free up to
float64 rounding, and a summary over 10^9+ pixels needs no per-pixel values. Rows
(:meth:`ImageStats.to_row`) are flat dicts of scalars and lists, ready for pandas/Arrow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from pipeline.metrics.checks import (
    as_labels,
    as_preds,
    as_probs,
    as_scores,
    check_ignore_index,
    check_n_bins,
    valid_mask,
)
from pipeline.metrics.compute import (
    auroc_from_histograms,
    ece_from_bins,
    mce_from_bins,
    miou_from_confusion,
    sce_from_bins,
)
from pipeline.metrics.per_image import ImageSums, adaptive_bins, boundary_mask, image_sums

N_SCORE_BINS = 1000
"""Default bins of the misprediction score histograms (AUROC, flag precision/recall)."""


def _layout(n_bins: int, num_classes: int, n_score_bins: int) -> dict[str, tuple]:
    """Shape and dtype of every array/scalar field, for a given size."""
    b, c, s = (n_bins,), (num_classes, n_bins), (n_score_bins,)
    i8, f8 = np.int64, np.float64
    return {
        "count": (b, i8), "conf_sum": (b, f8), "correct_sum": (b, i8),
        "boundary_count": (b, i8), "boundary_conf_sum": (b, f8), "boundary_correct_sum": (b, i8),
        "cor_conf_sum": (b, f8),
        "cls_count": (c, i8), "cls_conf_sum": (c, f8), "cls_correct_sum": (c, i8),
        "confusion": ((num_classes, num_classes), i8),
        "mis_hist_cor": (s, i8), "mis_hist_inc": (s, i8),
        "msp_hist_cor": (s, i8), "msp_hist_inc": (s, i8),
        "nll_sum": ((), f8), "brier_sum": ((), f8), "ace_sum": ((), f8),
        "ece_img_sum": ((), f8), "ece_img_sqsum": ((), f8), "n_images": ((), i8),
    }


_FIELDS = tuple(_layout(1, 1, 1))
ROW_KEYS = ("n_bins", "num_classes", *_FIELDS)
"""Keys of :meth:`ImageStats.to_row` (arrays flattened in C order)."""


@dataclass(eq=False)
class ImageStats:
    """Exact, mergeable calibration statistics of one or more images.

    Bins are top-label confidence bins (``count``, ``conf_sum``, ``correct_sum``), the same bins
    over boundary pixels only (``boundary_*``) and over correctly predicted pixels
    (``cor_conf_sum``; ``cor_count``/``inc_count``/``inc_conf_sum`` are derived), classwise bins
    of every class's probability (``cls_*``, (C, n_bins)), a (C, C) confusion matrix (rows:
    label, columns: prediction), NLL and Brier sums, per-image ACE and ECE sums (for the mean
    and std over images), and score histograms of correct/incorrect pixels for a selector's
    misprediction score (``mis_hist_*``) and for ``1 - confidence`` (``msp_hist_*``).

    A pixel's prediction is the argmax of its probabilities unless :func:`image_stats` got
    ``preds``; its confidence is its probability of the predicted class.

    Add with ``a + b`` or ``sum(stats_list)``; merge a pandas group with :meth:`sum_rows`.
    Metric methods return NaN where a metric is undefined (e.g. no pixels).
    """

    n_bins: int
    num_classes: int
    count: np.ndarray
    conf_sum: np.ndarray
    correct_sum: np.ndarray
    boundary_count: np.ndarray
    boundary_conf_sum: np.ndarray
    boundary_correct_sum: np.ndarray
    cor_conf_sum: np.ndarray
    cls_count: np.ndarray
    cls_conf_sum: np.ndarray
    cls_correct_sum: np.ndarray
    confusion: np.ndarray
    mis_hist_cor: np.ndarray
    mis_hist_inc: np.ndarray
    msp_hist_cor: np.ndarray
    msp_hist_inc: np.ndarray
    nll_sum: float
    brier_sum: float
    ace_sum: float
    ece_img_sum: float
    ece_img_sqsum: float
    n_images: int

    # -- construction and merging ---------------------------------------------------------

    @classmethod
    def zero(
        cls, num_classes: int, n_bins: int = 15, n_score_bins: int = N_SCORE_BINS
    ) -> ImageStats:
        """Empty statistics (the neutral element of ``+``)."""
        layout = _layout(n_bins, num_classes, n_score_bins)
        values = {
            k: np.zeros(shape, dtype) if shape else dtype(0).item()
            for k, (shape, dtype) in layout.items()
        }
        return cls(n_bins=n_bins, num_classes=num_classes, **values)

    @property
    def n_score_bins(self) -> int:
        """Bins of the score histograms."""
        return len(self.msp_hist_cor)

    def _check_compatible(self, other: ImageStats) -> None:
        mine = (self.n_bins, self.num_classes, self.n_score_bins)
        theirs = (other.n_bins, other.num_classes, other.n_score_bins)
        if mine != theirs:
            raise ValueError(
                "Expected ImageStats with the same (n_bins, num_classes, n_score_bins) "
                f"{mine}, but got {theirs}"
            )

    def __add__(self, other: ImageStats) -> ImageStats:
        if not isinstance(other, ImageStats):
            return NotImplemented
        self._check_compatible(other)
        summed = {k: getattr(self, k) + getattr(other, k) for k in _FIELDS}
        return ImageStats(n_bins=self.n_bins, num_classes=self.num_classes, **summed)

    def __radd__(self, other: object) -> ImageStats:
        # Lets the builtin sum(...) start from its default 0.
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    # -- rows -----------------------------------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        """Flat dict of Python ints, floats and lists (arrays flattened in C order)."""
        row: dict[str, Any] = {"n_bins": self.n_bins, "num_classes": self.num_classes}
        for k in _FIELDS:
            value = getattr(self, k)
            row[k] = value.reshape(-1).tolist() if isinstance(value, np.ndarray) else value
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ImageStats:
        """Inverse of :meth:`to_row` (lists may also be NumPy arrays, as read from Parquet).

        Raises:
            ValueError: If a key is missing or an array has the wrong length.
        """
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"Expected `row` to have the ImageStats keys, but missing {missing}")
        n_bins, num_classes = int(row["n_bins"]), int(row["num_classes"])
        n_score_bins = len(row["msp_hist_cor"])
        values = {}
        for k, (shape, dtype) in _layout(n_bins, num_classes, n_score_bins).items():
            if not shape:
                values[k] = dtype(row[k]).item()
                continue
            flat = np.asarray(row[k], dtype=dtype)
            if flat.size != math.prod(shape):
                raise ValueError(
                    f"Expected `row['{k}']` to have {math.prod(shape)} values, "
                    f"but got {flat.size}"
                )
            values[k] = flat.reshape(shape)
        return cls(n_bins=n_bins, num_classes=num_classes, **values)

    @classmethod
    def sum_rows(cls, rows: Any) -> ImageStats:
        """Sum many rows at once (a pandas DataFrame, e.g. one ``groupby`` group, or dicts).

        Each column is stacked into one array and summed along the rows, which is much faster
        than adding ImageStats objects one by one.

        Args:
            rows: A pandas DataFrame with the :data:`ROW_KEYS` columns, or an iterable of
                row mappings.

        Returns:
            The merged statistics.

        Raises:
            ValueError: If there are no rows, a key is missing, or the rows differ in size.
        """
        if hasattr(rows, "columns"):
            missing = [k for k in ROW_KEYS if k not in rows.columns]
            if missing:
                raise ValueError(
                    f"Expected `rows` to have the ImageStats columns, but missing {missing}"
                )
            columns = {k: rows[k].tolist() for k in ROW_KEYS}
        else:
            rows = list(rows)
            missing = sorted({k for r in rows for k in ROW_KEYS if k not in r})
            if missing:
                raise ValueError(
                    f"Expected `rows` to have the ImageStats keys, but missing {missing}"
                )
            columns = {k: [r[k] for r in rows] for k in ROW_KEYS}
        if not columns["n_bins"]:
            raise ValueError("Expected `rows` to hold at least one row, but got none")
        pairs = zip(columns["n_bins"], columns["num_classes"], strict=True)
        sizes = {(int(b), int(c)) for b, c in pairs}
        if len(sizes) > 1:
            raise ValueError(
                f"Expected `rows` to share (n_bins, num_classes), but got {sorted(sizes)}"
            )
        [(n_bins, num_classes)] = sizes
        merged: dict[str, Any] = {"n_bins": n_bins, "num_classes": num_classes}
        layout = _layout(n_bins, num_classes, len(columns["msp_hist_cor"][0]))
        for k, (shape, dtype) in layout.items():
            try:
                stacked = np.asarray(columns[k], dtype=dtype)
            except ValueError as err:  # ragged lists
                raise ValueError(
                    f"Expected every row's `{k}` to have {math.prod(shape)} values: {err}"
                ) from None
            merged[k] = stacked.sum(0)
        return cls.from_row(merged)

    # -- derived bins ---------------------------------------------------------------------

    @property
    def n_pixels(self) -> int:
        """Scored pixels (ignore pixels excluded)."""
        return int(self.count.sum())

    @property
    def cor_count(self) -> np.ndarray:
        """Correctly predicted pixels per confidence bin."""
        return self.correct_sum

    @property
    def inc_count(self) -> np.ndarray:
        """Wrongly predicted pixels per confidence bin."""
        return self.count - self.correct_sum

    @property
    def inc_conf_sum(self) -> np.ndarray:
        """Sum of confidences of wrongly predicted pixels per bin."""
        return self.conf_sum - self.cor_conf_sum

    # -- metrics --------------------------------------------------------------------------

    def ece(self) -> float:
        """Pooled top-label ECE over all pixels."""
        return ece_from_bins(self.count, self.conf_sum, self.correct_sum)

    def mce(self) -> float:
        """Maximum calibration error over the non-empty bins."""
        return mce_from_bins(self.count, self.conf_sum, self.correct_sum)

    def ace(self) -> float:
        """Adaptive (equal-mass bins) calibration error, averaged over images."""
        return self.ace_sum / self.n_images if self.n_images else math.nan

    def sce(self) -> float:
        """Static (classwise) calibration error."""
        return sce_from_bins(self.cls_count, self.cls_conf_sum, self.cls_correct_sum)

    def nll(self) -> float:
        """Mean negative log-likelihood per pixel."""
        return self.nll_sum / self.n_pixels if self.n_pixels else math.nan

    def brier(self) -> float:
        """Mean Brier score per pixel (sum over classes of squared errors)."""
        return self.brier_sum / self.n_pixels if self.n_pixels else math.nan

    def miou(self) -> float:
        """Mean IoU over classes present in labels or predictions."""
        return miou_from_confusion(self.confusion)

    def pixel_acc(self) -> float:
        """Fraction of pixels whose top label is right."""
        return int(self.correct_sum.sum()) / self.n_pixels if self.n_pixels else math.nan

    def boundary_ece(self) -> float:
        """ECE over boundary pixels only."""
        return ece_from_bins(
            self.boundary_count, self.boundary_conf_sum, self.boundary_correct_sum
        )

    def ece_correct(self) -> float:
        """ECE over correctly predicted pixels only (accuracy 1 in every bin)."""
        return ece_from_bins(self.cor_count, self.cor_conf_sum, self.cor_count)

    def ece_incorrect(self) -> float:
        """ECE over wrongly predicted pixels only (accuracy 0 in every bin)."""
        return ece_from_bins(self.inc_count, self.inc_conf_sum, np.zeros_like(self.count))

    def image_ece_mean(self) -> float:
        """Mean over images of each image's ECE."""
        return self.ece_img_sum / self.n_images if self.n_images else math.nan

    def image_ece_std(self) -> float:
        """Population standard deviation (ddof=0) over images of each image's ECE."""
        if not self.n_images:
            return math.nan
        mean = self.ece_img_sum / self.n_images
        return math.sqrt(max(self.ece_img_sqsum / self.n_images - mean * mean, 0.0))

    def mis_auroc(self) -> float:
        """AUROC of the selector's score for detecting mispredicted pixels (NaN without one)."""
        return auroc_from_histograms(self.mis_hist_inc, self.mis_hist_cor)

    def msp_auroc(self) -> float:
        """AUROC of the ``1 - confidence`` (max prob) baseline for detecting mispredictions."""
        return auroc_from_histograms(self.msp_hist_inc, self.msp_hist_cor)

    def mis_precision(self) -> float:
        """Share of pixels flagged by the selector (score > 0.5) that are mispredicted."""
        half = self.n_score_bins // 2
        flagged = int(self.mis_hist_inc[half:].sum() + self.mis_hist_cor[half:].sum())
        return int(self.mis_hist_inc[half:].sum()) / flagged if flagged else math.nan

    def mis_recall(self) -> float:
        """Share of mispredicted pixels that the selector flags (score > 0.5)."""
        half = self.n_score_bins // 2
        total = int(self.mis_hist_inc.sum())
        return int(self.mis_hist_inc[half:].sum()) / total if total else math.nan

    def summary(self) -> dict[str, float]:
        """Every metric by name, as Python floats (NaN where undefined)."""
        names = (
            "ece", "mce", "ace", "sce", "nll", "brier", "miou", "pixel_acc", "boundary_ece",
            "ece_correct", "ece_incorrect", "image_ece_mean", "image_ece_std", "mis_auroc",
            "msp_auroc", "mis_precision", "mis_recall",
        )
        return {name: float(getattr(self, name)()) for name in names}


def _check_width(width: object) -> int:
    if not isinstance(width, int) or isinstance(width, bool):
        raise TypeError(f"Expected `boundary_width` to be an int, but got {type(width).__name__}")
    if width < 1:
        raise ValueError(f"Expected `boundary_width` to be a positive int, but got {width}")
    return width


def image_stats(
    probs: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    *,
    n_bins: int = 15,
    ignore_index: int | None = None,
    boundary_width: int = 2,
    mis_score: Tensor | np.ndarray | None = None,
    n_score_bins: int = N_SCORE_BINS,
    validate_args: bool = True,
    preds: Tensor | np.ndarray | None = None,
) -> ImageStats:
    """Sufficient statistics of one image.

    One compiled pass over the image on the CPU (:func:`pipeline.metrics.per_image.image_sums`)
    plus a sort of its confidences for ACE. Per-pixel terms are computed in the input precision
    (float32 unless float64 is given) and summed in float64. A probability of exactly 0 on the
    true class (a float32 softmax underflow) is floored at the dtype's smallest normal number,
    capping that pixel's NLL (about 87.3 in float32) instead of making the sum infinite.

    Each pixel's predicted class is the first argmax of its probabilities, or ``preds`` when
    given; its confidence is its probability of that class. Every statistic (bins, confusion,
    correctness, AUROC of ``1 - confidence``, ACE, ...) follows from that prediction. Pass
    ``preds`` when the argmax of the probabilities is not the model's: e.g. logits divided by a
    huge temperature differ by ~1e-9, which a float32 softmax rounds to exact ties, while the
    argmax of the logits is unchanged.

    Args:
        probs: (C, H, W) float probabilities (torch or NumPy) summing to 1 over C.
        labels: (H, W) integer labels in ``[0, C)`` or ``ignore_index``.
        n_bins: Number of equal-width confidence bins.
        ignore_index: Label value whose pixels are left out, or None.
        boundary_width: Shift in pixels defining boundary pixels (see
            :func:`pipeline.metrics.per_image.boundary_mask`).
        mis_score: Optional (H, W) float selector score in [0, 1], P(pixel is mispredicted).
        n_score_bins: Bins of the score histograms; even, so ``score > 0.5`` is a bin edge.
        validate_args: Check probability values (finite, >= 0, sum to 1). Shapes, dtypes and
            the label range are always checked. Turn off only for inputs straight from a
            softmax.
        preds: Optional (H, W) integer predicted classes in ``[0, C)``.

    Returns:
        The image's :class:`ImageStats` (``n_images`` is 0 when every pixel is ignored).

    Raises:
        TypeError: If an argument has the wrong type or dtype.
        ValueError: On wrong shapes, NaN/inf, probabilities not summing to 1, labels, scores or
            predictions out of range, fewer than two classes or an empty image.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[[0.9, 0.2]], [[0.1, 0.8]]])  # (C=2, H=1, W=2)
        >>> stats = image_stats(probs, torch.tensor([[0, 0]]), n_bins=2)
        >>> round(stats.ece(), 4), stats.pixel_acc()
        (0.35, 0.5)
    """
    n_bins = check_n_bins(n_bins)
    n_score_bins = check_n_bins(n_score_bins, "n_score_bins")
    if n_score_bins % 2:
        raise ValueError(f"Expected `n_score_bins` to be even, but got {n_score_bins}")
    width = _check_width(boundary_width)
    ignore_index = check_ignore_index(ignore_index)
    p = as_probs(probs, (3,), "(C, H, W)")
    c, h, w = p.shape
    lab2d = as_labels(labels, (h, w))
    score = None
    if mis_score is not None:
        score = as_scores(mis_score, (h, w)).reshape(-1).astype(np.float64)
    pred = None if preds is None else as_preds(preds, (h, w), c)
    lab = lab2d.reshape(-1).astype(np.int64)
    sums = image_sums(
        np.ascontiguousarray(p.reshape(c, h * w)), lab, valid_mask(lab, c, ignore_index),
        boundary_mask(lab2d, width).reshape(-1), score, n_bins, n_score_bins,
        check=validate_args, preds=pred,
    )
    return stats_from_image_sums(sums, n_bins, c)


def stats_from_image_sums(sums: ImageSums, n_bins: int, num_classes: int) -> ImageStats:
    """One image's :class:`ImageStats` from :func:`pipeline.metrics.per_image.image_sums`.

    Adds ACE (a sort of the image's confidences) to the kernel's sums.
    """
    n_valid = sums.conf_cor.size + sums.conf_inc.size
    ace = math.nan
    if n_valid:
        ace = ece_from_bins(*adaptive_bins(sums.conf_cor, sums.conf_inc, n_bins))
    return stats_from_sums(
        n_bins=n_bins, num_classes=num_classes, n_valid=n_valid, top_count=sums.top_count,
        top_sum=sums.top_sum, cls_count=sums.cls_count, cls_sum=sums.cls_sum,
        cls_correct=sums.cls_correct, confusion=sums.confusion, msp_hist=sums.msp_hist,
        mis_hist=sums.mis_hist, nll_sum=sums.nll_sum, brier_sum=sums.brier_sum, ace=ace,
    )


def stats_from_sums(
    *, n_bins: int, num_classes: int, n_valid: int, top_count: np.ndarray, top_sum: np.ndarray,
    cls_count: np.ndarray, cls_sum: np.ndarray, cls_correct: np.ndarray, confusion: np.ndarray,
    msp_hist: np.ndarray, mis_hist: np.ndarray, nll_sum: float, brier_sum: float, ace: float,
) -> ImageStats:
    """One image's :class:`ImageStats` from the sums of a statistics pass (numba or torch).

    Args:
        n_bins: Number of confidence bins n.
        num_classes: Number of classes C.
        n_valid: Scored pixels of the image.
        top_count: (4, n) int64 top-label bins by group ``correct + 2 * boundary``.
        top_sum: (4, n) float64 confidence sums, same groups.
        cls_count: (C, n) int64 classwise bins.
        cls_sum: (C, n) float64 classwise sums.
        cls_correct: (C, n) int64 pixels labelled k per classwise bin.
        confusion: (C, C) int64 (rows: label, columns: prediction).
        msp_hist: (2, S) int64 ``1 - confidence`` histogram (row 0 correct, 1 wrong).
        mis_hist: (2, S) int64 selector score histogram, same rows.
        nll_sum: float64 NLL sum.
        brier_sum: float64 Brier sum.
        ace: The image's ACE (unused when ``n_valid`` is 0).

    Returns:
        The image's statistics (``n_images`` is 0 without scored pixels).
    """
    top, tsum = top_count, top_sum
    stats = ImageStats(
        n_bins=n_bins, num_classes=num_classes,
        count=top.sum(0), conf_sum=tsum.sum(0), correct_sum=top[1] + top[3],
        boundary_count=top[2] + top[3], boundary_conf_sum=tsum[2] + tsum[3],
        boundary_correct_sum=top[3], cor_conf_sum=tsum[1] + tsum[3],
        cls_count=cls_count, cls_conf_sum=cls_sum, cls_correct_sum=cls_correct,
        confusion=confusion,
        mis_hist_cor=mis_hist[0], mis_hist_inc=mis_hist[1],
        msp_hist_cor=msp_hist[0], msp_hist_inc=msp_hist[1],
        nll_sum=nll_sum, brier_sum=brier_sum,
        ace_sum=0.0, ece_img_sum=0.0, ece_img_sqsum=0.0, n_images=0,
    )
    if n_valid:
        image_ece = stats.ece()
        stats.ece_img_sum, stats.ece_img_sqsum = image_ece, image_ece * image_ece
        stats.ace_sum = ace
        stats.n_images = 1
    return stats
