"""The label-free part of a nightly refresh's record: drift and estimates without labels.

When evaluate wrote ``OUTPUT/label_free.csv`` (monitor and test sets), the night's entry in
``history.jsonl`` keeps, per set, the drift score, its threshold and alarm, and the label-free
estimates (ATC and DoC pixel accuracy, image-wise ECE; the truth where labels exist) of the
current run's calibrator (:func:`run_calibrator`) on today's data (:func:`label_free_entry`,
called by :func:`pipeline.refresh.refresh` before ``current`` moves). Oracle bounds are never
the run's calibrator; target-adapted calibrators only with ``allow_adaptive``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import registry
from pipeline.paths import CHAMPION_EVAL, LABEL_FREE, SUMMARY

if TYPE_CHECKING:
    from pipeline.config import JobConfig

__all__ = ["ESTIMATES", "label_free_entry", "label_free_record", "read_label_free",
           "run_calibrator"]

ESTIMATES = ("est_pixel_acc", "est_pixel_acc_doc", "est_img_ece", "true_pixel_acc", "true_img_ece")
"""The label-free estimates (and their truth) of one calibrator that ``history.jsonl`` keeps."""


def run_calibrator(
    summary: pd.DataFrame, *, allow_adaptive: bool = False, adapted: Collection[str] | None = None
) -> str | None:
    """The calibrator a run ships: the lowest image-wise ECE on its held-out calibration images.

    The same ranking as the report's recommendation (:func:`pipeline.report_data.recommend`:
    held-out rows only, image-wise ECE pooled over images, ties by NLL), without its
    clear-winner test: a nightly record needs one name, and when no calibrator is clearly
    better the leader is as good as any. ``uncalibrated`` can win (the model is kept as it
    is); oracle bounds never; target-adapted calibrators only with ``allow_adaptive``.

    Args:
        summary: the run's ``summary.csv``.
        allow_adaptive: let a target-adapted calibrator be chosen.
        adapted: the run's target-adapted labels (`pipeline.registry.adapted_labels`); None:
            those named after an adapted class.

    Returns:
        The calibrator label, or None when the summary has no held-out rows (or not the
        columns ``dataset, role, calibrator, n_images, img_ece, nll``).

    Example:
        >>> s = pd.DataFrame({"dataset": ["cal-heldout"] * 3, "role": ["calibration"] * 3,
        ...     "calibrator": ["uncalibrated", "temperature", "adaptive_ts"],
        ...     "n_images": [20] * 3, "img_ece": [0.10, 0.04, 0.03], "nll": [0.5, 0.4, 0.4]})
        >>> run_calibrator(s), run_calibrator(s, allow_adaptive=True)
        ('temperature', 'adaptive_ts')
    """
    needed = {"dataset", "role", "calibrator", "n_images", "img_ece", "nll"}
    if not needed <= set(summary.columns):
        return None
    held = (summary["role"] == "calibration") | summary["dataset"].astype(str).str.endswith(
        "-heldout"
    )
    rows = summary[held & summary["img_ece"].notna()]
    adapted = registry.adapted_labels() if adapted is None else adapted
    allowed = rows["calibrator"].astype(str).map(
        lambda c: c == registry.UNCALIBRATED
        or registry.is_candidate(c, allow_adaptive=allow_adaptive, adapted=adapted)
    ).astype(bool)
    rows = rows[allowed]
    if rows.empty:
        return None
    pooled = rows.groupby("calibrator", sort=False).apply(
        lambda g: pd.Series({
            "img_ece": np.average(g["img_ece"], weights=g["n_images"]),
            "nll": np.average(g["nll"], weights=g["n_images"]),
        }),
        include_groups=False,
    )
    return str(pooled.sort_values(["img_ece", "nll"], kind="stable").index[0])


def _number(value: Any) -> float | None:
    # JSON has no NaN: a value that was not measured is null.
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _flag(value: Any) -> bool | None:
    # pandas reads a bool column back as bool, but as object (True/False/NaN) when some rows
    # have no value.
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text == "true" else False if text == "false" else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def read_label_free(path: Path) -> pd.DataFrame:
    """A ``label_free.csv``, checked to have the columns the refresh reads.

    Raises:
        ValueError: a needed column is missing (the message names the file).
    """
    table = pd.read_csv(path)
    needed = ["dataset", "calibrator", "drift_score", "drift_threshold", "drift_alarm", *ESTIMATES]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"Expected {path} to have columns {needed}, but it lacks {missing}")
    return table


def label_free_record(
    table: pd.DataFrame, calibrator: str | None, *, estimates: bool = True
) -> dict[str, Any]:
    """What ``history.jsonl`` keeps of a run's ``label_free.csv``.

    Args:
        table: the ``label_free.csv`` rows (one per set and calibrator).
        calibrator: the calibrator whose estimates are kept (None: none).
        estimates: False keeps the drift only (the estimates in ``table`` are of another run's
            calibrators).

    Returns:
        ``{"calibrator", "alarms", "sets"}``: ``alarms`` names the sets whose drift alarm
        fired; ``sets`` holds one dict per set with ``dataset, domain, role, n_images,
        drift_score, drift_threshold, drift_alarm`` and the calibrator's :data:`ESTIMATES`
        (null where not measured: a monitor set has no truth).
    """
    sets = []
    for dataset, rows in table.groupby("dataset", sort=False):
        # Drift is measured on the uncalibrated logits: the same on every row of the set.
        first = rows.iloc[0]
        item: dict[str, Any] = {"dataset": str(dataset)}
        for key in ("domain", "role"):
            item[key] = None if pd.isna(first.get(key)) else str(first.get(key))
        n_images = _number(first.get("n_images"))
        item["n_images"] = None if n_images is None else int(n_images)
        item["drift_score"] = _number(first["drift_score"])
        item["drift_threshold"] = _number(first["drift_threshold"])
        item["drift_alarm"] = _flag(first["drift_alarm"])
        mine = rows[rows["calibrator"] == calibrator] if estimates else rows.iloc[:0]
        for key in ESTIMATES:
            item[key] = _number(mine[key].iloc[0]) if len(mine) else None
        sets.append(item)
    return {
        "calibrator": calibrator if estimates else None,
        "alarms": [s["dataset"] for s in sets if s["drift_alarm"]],
        "sets": sets,
    }


def label_free_entry(
    cfg: JobConfig,
    root: Path,
    *,
    promote: bool,
    champion: str | None,
    champion_evaluated: bool,
    allow_adaptive: bool,
    adapted: Collection[str],
) -> dict[str, Any] | None:
    """The night's label-free record for the run that is current after the decision."""
    output = Path(cfg.output)
    today = output / LABEL_FREE
    if not today.is_file():
        return None  # no monitor or test set, or a run from before label-free monitoring
    if promote or champion is None:
        summary = pd.read_csv(output / SUMMARY)
    else:
        summary = registry.read_summary(root, champion)
    calibrator = run_calibrator(summary, allow_adaptive=allow_adaptive, adapted=adapted)
    champion_today = output / CHAMPION_EVAL / LABEL_FREE
    if promote or not champion_evaluated:
        # Promoted, or kept because today's artifacts are the champion's own: today's table.
        record = label_free_record(read_label_free(today), calibrator)
        source = str(today)
    elif champion_today.is_file():
        record = label_free_record(read_label_free(champion_today), calibrator)
        source = str(champion_today)
    else:
        # The champion was not re-evaluated (no calibrator in common): the drift is the
        # model's, but today's estimates belong to the challenger's calibrators.
        record = label_free_record(read_label_free(today), calibrator, estimates=False)
        source = str(today)
    return {**record, "source": source}
