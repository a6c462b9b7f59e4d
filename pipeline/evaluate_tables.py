"""Stage 3, aggregation: per-image rows -> summary, domain-shift and best tables (pandas).

`Aggregator` adds the rows of :mod:`pipeline.evaluate_rows` into one running total per
dataset x calibrator and builds ``summary.csv`` (its metric columns from
:mod:`pipeline.metrics.catalogue`, the image-wise ECE with a bootstrap interval over images);
:func:`domain_shift` and :func:`best_per_domain` derive the other two tables from it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics import ImageStats, catalogue

UNCALIBRATED = "uncalibrated"
HELDOUT_SUFFIX = "-heldout"
MONITOR = "monitor"

KEY_COLUMNS = ("dataset", "domain", "reference", "role", "calibrator")
"""Columns naming a summary row (``reference`` is the reference domain of a shifted set)."""

METRIC_COLUMNS = catalogue.metric_names()
"""Metrics of a summary row, from the catalogue (`pipeline.metrics.catalogue`). ``mis_*``/
``flag_*`` are the selector's misprediction detection (NaN for calibrators without a selector);
``msp_*`` the ``1 - max p`` baseline. A pixel is flagged when its score exceeds 0.5."""


def _summary_columns() -> tuple[str, ...]:
    # The bootstrap interval of img_ece follows its mean and spread.
    at = METRIC_COLUMNS.index("img_ece_std") + 1
    return (*KEY_COLUMNS, "n_images", "n_pixels", *METRIC_COLUMNS[:at], "img_ece_lo",
            "img_ece_hi", *METRIC_COLUMNS[at:])


SUMMARY_COLUMNS = _summary_columns()

SHIFT_METRICS = catalogue.shift_metrics()


# ---------------------------------------------------------------------------------------------
# Aggregation (pandas; no Ray needed)


def bootstrap_interval(
    values: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Resamples are drawn in chunks, so memory stays at about 100 x len(values) indices.

    Args:
        values: (N,) float per-image values (NaNs are dropped).
        resamples: number of bootstrap resamples; 0 gives (NaN, NaN).
        seed: seed of the resampling; with the same N, the same images are drawn (paired
            comparison across calibrators of one dataset).
        level: coverage of the interval.

    Returns:
        ``(lo, hi)``; both equal the value for a single value; NaN without values.

    Example:
        >>> lo, hi = bootstrap_interval(np.array([0.1, 0.2, 0.3, 0.4]), resamples=200, seed=0)
        >>> bool(lo <= 0.25 <= hi)
        True
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if resamples == 0 or values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 100):
        idx = rng.integers(0, values.size, size=(min(100, resamples - start), values.size))
        means.append(values[idx].mean(axis=1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _metrics(total: ImageStats) -> dict[str, float]:
    """The summary metrics of summed statistics (the catalogue's)."""
    return catalogue.compute(total)


class Aggregator:
    """Adds per-image rows, batch by batch, into per dataset x calibrator totals.

    Keeps one :class:`ImageStats` per dataset x calibrator and one float per image (its ECE,
    for the bootstrap), never the rows themselves.

    Args:
        bootstrap: bootstrap resamples for ``img_ece_lo``/``img_ece_hi`` (0: NaN).
        seed: bootstrap seed.
    """

    def __init__(self, *, bootstrap: int, seed: int) -> None:
        self.bootstrap = bootstrap
        self.seed = seed
        self.totals: dict[tuple[str, ...], ImageStats] = {}
        self._ece: list[pd.DataFrame] = []

    def add(self, rows: pd.DataFrame) -> None:
        """Add a batch of per-image rows (columns of :data:`ROW_SCHEMA`).

        Rows of ``monitor`` sets are left out: they have no labels, hence no metrics.
        """
        rows = rows[rows["role"] != MONITOR]
        if rows.empty:
            return
        rows = rows.assign(reference=rows["reference"].fillna(""))
        for key, group in rows.groupby(list(KEY_COLUMNS), sort=False):
            part = ImageStats.sum_rows(group)
            self.totals[key] = self.totals[key] + part if key in self.totals else part
        self._ece.append(rows[["dataset", "calibrator", "image_id", "img_ece"]])

    def summary(self) -> pd.DataFrame:
        """One row per dataset x calibrator with :data:`SUMMARY_COLUMNS`."""
        if not self.totals:
            raise ValueError("Expected at least one per-image row to summarise, but got none")
        ece = pd.concat(self._ece, ignore_index=True).sort_values("image_id", kind="stable")
        per_group = {k: g["img_ece"].to_numpy() for k, g in ece.groupby(["dataset", "calibrator"])}
        records = []
        for key, total in self.totals.items():
            row: dict[str, Any] = dict(zip(KEY_COLUMNS, key, strict=True))
            row["reference"] = row["reference"] or None
            row["n_images"], row["n_pixels"] = total.n_images, total.n_pixels
            row.update(_metrics(total))
            row["img_ece_lo"], row["img_ece_hi"] = bootstrap_interval(
                per_group[(row["dataset"], row["calibrator"])],
                resamples=self.bootstrap, seed=self.seed,
            )
            records.append(row)
        return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))

    def domain_totals(self, datasets: Iterable[str]) -> dict[str, ImageStats]:
        """Per calibrator, the statistics of ``datasets`` pooled (exact, by adding sums)."""
        wanted = set(datasets)
        pooled: dict[str, ImageStats] = {}
        for (dataset, *_, calibrator), total in self.totals.items():
            if dataset in wanted:
                pooled[calibrator] = pooled[calibrator] + total if calibrator in pooled else total
        return pooled


def domain_shift(
    summary: pd.DataFrame, aggregator: Aggregator, references: Mapping[str, list[str]]
) -> pd.DataFrame:
    """Each shifted dataset beside its reference domain, per calibrator, with deltas.

    Args:
        summary: the summary table.
        aggregator: holds the totals, so that a reference domain spread over several datasets
            is pooled exactly.
        references: reference domain -> the datasets that make it up.

    Returns:
        Columns ``dataset, domain, reference, reference_datasets, calibrator`` and, for every
        metric m of :data:`SHIFT_METRICS`, ``m_reference``, ``m`` and ``m_delta`` (shifted
        minus reference).
    """
    columns = ["dataset", "domain", "reference", "reference_datasets", "calibrator"]
    for m in SHIFT_METRICS:
        columns += [f"{m}_reference", m, f"{m}_delta"]
    records = []
    shifted = summary[summary["reference"].notna() & (summary["role"] == "test")]
    pooled = {ref: aggregator.domain_totals(names) for ref, names in references.items()}
    for row in shifted.itertuples(index=False):
        ref_total = pooled.get(row.reference, {}).get(row.calibrator)
        if ref_total is None:
            continue
        ref = _metrics(ref_total)
        out = {
            "dataset": row.dataset, "domain": row.domain, "reference": row.reference,
            "reference_datasets": "+".join(references[row.reference]),
            "calibrator": row.calibrator,
        }
        for m in SHIFT_METRICS:
            value = getattr(row, m)
            out[f"{m}_reference"], out[m], out[f"{m}_delta"] = ref[m], value, value - ref[m]
        records.append(out)
    return pd.DataFrame.from_records(records, columns=columns)


def best_per_domain(summary: pd.DataFrame) -> pd.DataFrame:
    """The best calibrator per test domain by image-wise ECE, ties broken by NLL.

    Oracle rows (``oracle_ts``: fitted on the set's own labels) are bounds and never ranked.
    A domain spread over several test datasets is pooled: image-wise ECE weighted by images,
    NLL by pixels (both exact, as each is a mean over images or pixels).

    Args:
        summary: the summary table (rows of role ``test`` are ranked).

    Returns:
        One row per domain: ``domain, datasets, n_images, best, img_ece, nll,
        uncalibrated_img_ece, uncalibrated_nll, reduction`` where ``reduction`` is the
        relative drop of image-wise ECE against ``uncalibrated`` (0.34 = 34% lower).

    Example:
        >>> s = pd.DataFrame({"dataset": ["d"] * 3, "domain": ["dusk"] * 3,
        ...     "role": ["test"] * 3, "calibrator": ["uncalibrated", "a", "b"],
        ...     "n_images": [2] * 3, "n_pixels": [8] * 3,
        ...     "img_ece": [0.1, 0.05, 0.05], "nll": [1.0, 0.9, 0.8]})
        >>> best_per_domain(s)[["domain", "best", "reduction"]].to_dict("records")
        [{'domain': 'dusk', 'best': 'b', 'reduction': 0.5}]
    """
    columns = ["domain", "datasets", "n_images", "best", "img_ece", "nll",
               "uncalibrated_img_ece", "uncalibrated_nll", "reduction"]
    # Oracle rows (a temperature fitted on the set's own labels) are bounds, never candidates.
    oracle = summary["calibrator"].astype(str).str.contains("oracle", case=False)
    test = summary[(summary["role"] == "test") & ~oracle]
    records = []
    for domain, rows in test.groupby("domain", sort=False):
        pooled = rows.groupby("calibrator", sort=False).apply(
            lambda g: pd.Series({
                "img_ece": np.average(g["img_ece"], weights=g["n_images"]),
                "nll": np.average(g["nll"], weights=g["n_pixels"]),
                "n_images": int(g["n_images"].sum()),
            }),
            include_groups=False,
        )
        ranked = pooled.reset_index().sort_values(["img_ece", "nll", "calibrator"],
                                                  kind="stable")
        best = ranked.iloc[0]
        base = pooled.loc[UNCALIBRATED] if UNCALIBRATED in pooled.index else None
        base_ece = math.nan if base is None else float(base["img_ece"])
        records.append({
            "domain": domain,
            "datasets": "+".join(dict.fromkeys(rows["dataset"])),
            "n_images": int(best["n_images"]),
            "best": best["calibrator"],
            "img_ece": float(best["img_ece"]),
            "nll": float(best["nll"]),
            "uncalibrated_img_ece": base_ece,
            "uncalibrated_nll": math.nan if base is None else float(base["nll"]),
            "reduction": (base_ece - float(best["img_ece"])) / base_ece if base_ece else math.nan,
        })
    return pd.DataFrame.from_records(records, columns=columns)
