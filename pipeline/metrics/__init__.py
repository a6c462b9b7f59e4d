"""Exact, mergeable segmentation calibration metrics.

:func:`image_stats` reduces one image to an :class:`ImageStats` (int64 counts, float64 sums);
stats add with ``+`` in any order, and their methods give ECE, MCE, ACE, SCE, NLL, Brier, mIoU,
pixel accuracy, boundary ECE, image-wise ECE mean/std and misprediction AUROC. :func:`ece` and
:func:`image_ece` are the one-call versions for whole arrays. :func:`first_argmax` gives
predicted classes (e.g. of logits, for ``image_stats(..., preds=...)``) fast.
:func:`image_stats_torch` computes the same statistics with torch on any device (a GPU).
"""

from __future__ import annotations

from pipeline.metrics.per_image import first_argmax
from pipeline.metrics.stats import N_SCORE_BINS, ROW_KEYS, ImageStats, image_stats
from pipeline.metrics.top_label import ece, image_ece
from pipeline.metrics.torch_stats import image_stats_torch

__all__ = [
    "N_SCORE_BINS", "ROW_KEYS", "ImageStats", "ece", "first_argmax", "image_ece", "image_stats",
    "image_stats_torch",
]
