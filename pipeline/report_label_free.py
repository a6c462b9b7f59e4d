"""Section 4 of the report: drift and label-free estimates, from ``label_free.csv``.

``label_free.csv`` (written by :mod:`pipeline.evaluate`) holds per (monitor or test set,
calibrator) the drift score and alarm and the label-free estimates of pixel accuracy (ATC, DoC)
and image-wise ECE, beside the true values where labels exist. :func:`label_free_table` shows
them per set, :func:`label_free_errors` gives each estimate's mean absolute error over the
labelled sets and :func:`label_free_sentence` the alarms in one sentence. No rendering here
(:mod:`pipeline.report` renders it); the shared vocabulary is :mod:`pipeline.report_data`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from pipeline.report_data import UNCALIBRATED, is_reference_column


def _cells(*values: float, digits: int = 3) -> str:
    return " / ".join("–" if v is None or math.isnan(v) else f"{v:.{digits}f}" for v in values)


def _alarm(value: Any) -> str:
    if isinstance(value, str):
        value = {"true": True, "false": False}.get(value.strip().lower())
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "ALARM" if bool(value) else "no"


def label_free_table(label_free: pd.DataFrame, shown: Sequence[str]) -> pd.DataFrame:
    """Per set: the drift and, per shown calibrator, estimated against true values, as text.

    Columns: ``set, role, n_images, drift score, threshold, alarm``, then per calibrator ``c``
    ``c: pixel acc ATC / DoC / true`` and ``c: img_ece est. / true`` ("–" where there is no
    truth: monitor sets). A last row holds each column's mean absolute error over the
    labelled sets.

    Args:
        label_free: the ``label_free.csv`` rows.
        shown: the calibrators to show (those absent from the table are skipped).

    Returns:
        The table (empty when ``label_free`` is).
    """
    if label_free.empty:
        return pd.DataFrame()
    shown = [c for c in dict.fromkeys(shown) if c in set(label_free["calibrator"])]
    records = []
    for dataset, rows in label_free.groupby("dataset", sort=False):
        first = rows.iloc[0]
        record = {"set": dataset, "role": first.get("role", "–"),
                  "n_images": int(first["n_images"]) if "n_images" in rows else "–",
                  "drift score": _cells(float(first["drift_score"])),
                  "threshold": _cells(float(first["drift_threshold"])),
                  "alarm": _alarm(first["drift_alarm"])}
        by = rows.set_index("calibrator")
        for c in shown:
            r = by.loc[c] if c in by.index else None
            record[f"{c}: pixel acc ATC / DoC / true"] = "–" if r is None else _cells(
                r["est_pixel_acc"], r["est_pixel_acc_doc"], r["true_pixel_acc"])
            record[f"{c}: img_ece est. / true"] = "–" if r is None else _cells(
                r["est_img_ece"], r["true_img_ece"], digits=4)
        records.append(record)
    errors = label_free_errors(label_free)
    n = int(errors["labelled sets"].max()) if not errors.empty else 0
    if n:
        last: dict[str, Any] = {"set": f"mean absolute error ({n} labelled sets)", "role": "",
                                "n_images": "", "drift score": "", "threshold": "", "alarm": ""}
        for c in shown:
            e = errors.loc[c] if c in errors.index else None
            last[f"{c}: pixel acc ATC / DoC / true"] = "–" if e is None else _cells(
                e["pixel acc MAE (ATC)"], e["pixel acc MAE (DoC)"])
            last[f"{c}: img_ece est. / true"] = "–" if e is None else _cells(
                e["img_ece MAE"], digits=4)
        records.append(last)
    return pd.DataFrame.from_records(records)


def label_free_errors(label_free: pd.DataFrame) -> pd.DataFrame:
    """Per calibrator, the mean absolute error of each estimate over the labelled sets.

    Returns:
        Indexed by calibrator (oracle bounds left out): ``labelled sets``, ``pixel acc MAE
        (ATC)``, ``pixel acc MAE (DoC)``, ``img_ece MAE``; empty without a labelled set.

    Example:
        >>> lf = pd.DataFrame({"dataset": ["a", "b", "m"], "calibrator": ["ts"] * 3,
        ...     "est_pixel_acc": [0.8, 0.7, 0.5], "true_pixel_acc": [0.9, 0.7, float("nan")],
        ...     "est_pixel_acc_doc": [0.8] * 3, "est_img_ece": [0.05] * 3,
        ...     "true_img_ece": [0.07, 0.03, float("nan")]})
        >>> label_free_errors(lf).round(3).to_dict("records")
        [{'labelled sets': 2, 'pixel acc MAE (ATC)': 0.05, 'pixel acc MAE (DoC)': 0.1, \
'img_ece MAE': 0.02}]
    """
    columns = ["labelled sets", "pixel acc MAE (ATC)", "pixel acc MAE (DoC)", "img_ece MAE"]
    rows = label_free[label_free["true_pixel_acc"].notna()]
    rows = rows[[not is_reference_column(c) or c == UNCALIBRATED for c in rows["calibrator"]]]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    records = {}
    for calibrator, g in rows.groupby("calibrator", sort=False):
        records[calibrator] = {
            "labelled sets": g["dataset"].nunique(),
            "pixel acc MAE (ATC)": float((g["est_pixel_acc"] - g["true_pixel_acc"]).abs().mean()),
            "pixel acc MAE (DoC)": float(
                (g["est_pixel_acc_doc"] - g["true_pixel_acc"]).abs().mean()),
            "img_ece MAE": float((g["est_img_ece"] - g["true_img_ece"]).abs().mean()),
        }
    return pd.DataFrame.from_dict(records, orient="index", columns=columns)


def label_free_sentence(label_free: pd.DataFrame) -> str:
    """The drift alarms in one sentence: which sets fired, out of how many."""
    if label_free.empty:
        return ""
    firsts = label_free.drop_duplicates("dataset")
    fired = [str(d) for d, a in zip(firsts["dataset"], firsts["drift_alarm"], strict=True)
             if _alarm(a) == "ALARM"]
    n = len(firsts)
    monitors = int((firsts.get("role") == "monitor").sum()) if "role" in firsts else 0
    kinds = f" ({monitors} without labels)" if monitors else ""
    if not fired:
        return f"No drift alarm on any of the {n} sets{kinds}."
    return f"Drift alarm on {len(fired)} of the {n} sets{kinds}: {', '.join(fired)}."
