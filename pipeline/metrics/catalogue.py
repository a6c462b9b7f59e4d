"""The metric catalogue: every summary metric once, with how it is computed, where it shows and
what it means.

``summary.csv``'s metric columns, ``domain_shift.csv``'s metrics, the report's summary table and
its glossary all derive from :data:`METRICS`, under one name per metric end to end. A metric that
follows from existing `ImageStats` sums is one entry here; one that needs new sums also needs
them in `ImageStats` (and the kernels that fill it).

Example:
    >>> [m.name for m in METRICS][:4]
    ['img_ece', 'img_ece_std', 'ece', 'mce']
    >>> "nll" in shift_metrics() and "img_ece_std" not in shift_metrics()
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.metrics.stats import ImageStats

__all__ = ["METRICS", "Metric", "compute", "metric_names", "report_metrics", "shift_metrics"]


@dataclass(frozen=True)
class Metric:
    """One summary metric.

    Attributes:
        name: Its column name in ``summary.csv``, ``domain_shift.csv`` and the report.
        of: Computes it from a set's summed `ImageStats` (NaN where undefined).
        description: Its meaning in plain words (the report's glossary).
        shift: Whether ``domain_shift.csv`` compares it between a shifted set and its reference.
        report: Whether the report's summary table shows it.
    """

    name: str
    of: Callable[[ImageStats], float]
    description: str
    shift: bool = True
    report: bool = True


def _msp(total: ImageStats) -> ImageStats:
    # The 1 - max p baseline flags pixels by the selector's rule (score > 0.5).
    return dataclasses.replace(total, mis_hist_cor=total.msp_hist_cor,
                               mis_hist_inc=total.msp_hist_inc)


METRICS: tuple[Metric, ...] = (
    Metric("img_ece", ImageStats.image_ece_mean,
           "image-wise ECE: each image's top-label ECE, averaged over images (lower is better); "
           "the interval is a 95% bootstrap over images"),
    Metric("img_ece_std", ImageStats.image_ece_std,
           "standard deviation of the per-image ECE over the set's images",
           shift=False, report=False),
    Metric("ece", ImageStats.ece,
           "top-label ECE pooled over all pixels of the set (15 equal-width bins)"),
    Metric("mce", ImageStats.mce,
           "largest gap between confidence and accuracy over the non-empty bins"),
    Metric("ace", ImageStats.ace, "adaptive ECE (equal-mass bins), averaged over images"),
    Metric("sce", ImageStats.sce,
           "static (classwise) ECE: each class's probability binned, averaged over classes"),
    Metric("nll", ImageStats.nll, "mean negative log-likelihood per pixel"),
    Metric("brier", ImageStats.brier,
           "mean Brier score per pixel (sum over classes of squared errors)"),
    Metric("miou", ImageStats.miou, "mean intersection over union of the top-label prediction"),
    Metric("pixel_acc", ImageStats.pixel_acc, "share of pixels whose top label is right"),
    Metric("boundary_ece", ImageStats.boundary_ece, "ECE over pixels on label boundaries only"),
    Metric("ece_correct", ImageStats.ece_correct,
           "ECE over correctly predicted pixels (there: 1 - confidence)"),
    Metric("ece_incorrect", ImageStats.ece_incorrect,
           "ECE over mispredicted pixels (there: their mean confidence)"),
    Metric("mis_auroc", ImageStats.mis_auroc,
           "AUROC of a selector's score for telling mispredicted pixels from correct ones "
           "(selective calibrators only)"),
    Metric("msp_auroc", ImageStats.msp_auroc, "AUROC of 1 - max p for the same task"),
    Metric("flag_precision", ImageStats.mis_precision,
           "share of pixels the selector flags (score > 0.5) that are mispredicted",
           shift=False),
    Metric("flag_recall", ImageStats.mis_recall,
           "share of mispredicted pixels the selector flags", shift=False),
    Metric("msp_precision", lambda total: _msp(total).mis_precision(),
           "share of pixels with 1 - max p > 0.5 that are mispredicted",
           shift=False, report=False),
    Metric("msp_recall", lambda total: _msp(total).mis_recall(),
           "share of mispredicted pixels with 1 - max p > 0.5", shift=False, report=False),
)
"""Every summary metric, in ``summary.csv``'s column order."""


def metric_names() -> tuple[str, ...]:
    """Every metric's name, in catalogue order (``summary.csv``'s metric columns)."""
    return tuple(m.name for m in METRICS)


def shift_metrics() -> tuple[str, ...]:
    """The metrics ``domain_shift.csv`` compares between a shifted set and its reference."""
    return tuple(m.name for m in METRICS if m.shift)


def report_metrics() -> tuple[str, ...]:
    """The metrics the report's summary table shows, in catalogue order."""
    return tuple(m.name for m in METRICS if m.report)


def compute(total: ImageStats) -> dict[str, float]:
    """Every metric of a set's summed statistics, by name, as Python floats."""
    return {m.name: float(m.of(total)) for m in METRICS}
