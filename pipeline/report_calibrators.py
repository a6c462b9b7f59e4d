"""Section 5 of the report: each calibrator's fitted values in words, selectors, classes.

Computed from the artifact cards (``artifacts/<label>/calibrator.json``), ``summary.csv`` and
``per_image.parquet``; no rendering here (:mod:`pipeline.report` renders it):
:func:`describe_card` puts a card's fitted values into words, :func:`selector_table` and
:func:`selector_sentence` say whether a selector finds mispredicted pixels better than
``1 - max p``, :func:`flagged_share` how many held-out pixels it flags, and :func:`class_table`
gives classwise ECE per calibrator. The shared vocabulary is :mod:`pipeline.report_data`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.calibrators import describe, parameter_count
from pipeline.report_data import HELDOUT_SUFFIX, UNCALIBRATED


def describe_card(card: Mapping[str, Any], flagged: float | None = None) -> str:
    """A calibrator's fitted values in plain words, from its ``calibrator.json``.

    The words are the calibrator class's own (`pipeline.calibrators.describe`); this adds the
    share of held-out pixels a selector flags.

    Args:
        card: the artifact card.
        flagged: share of held-out pixels the selector flags (score > 0.5), if known.

    Example:
        >>> describe_card({"name": "temperature", "summary": {"temperature": 1.3124}})
        'one temperature, T = 1.31'
        >>> describe_card({"name": "new", "summary": {"t": [1.0, 3.0], "inputs": ["a", "b"]}})
        't = mean 2.00, range 1.00 to 3.00, inputs = a, b'
    """
    words = describe(str(card.get("name")), dict(card.get("summary") or {}),
                     dict(card.get("options") or {}), card.get("num_classes"))
    if flagged is not None and not math.isnan(flagged):
        words += f"; flags {100 * flagged:.1f}% of the held-out pixels"
    return words


def parameter_counts(cards: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Label -> fitted parameters, for the cards whose calibrator can be rebuilt."""
    counts = {}
    for label, card in cards.items():
        try:
            counts[label] = parameter_count(str(card.get("name")), int(card["num_classes"]),
                                            card.get("options") or {})
        except (KeyError, TypeError, ValueError):
            continue  # an unknown calibrator or an old card: not counted
    return counts


def read_cards(output: Path, labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Label -> artifact card, for the labels whose card can be read (others are skipped)."""
    from pipeline.calibrators.artifacts import read_card

    cards = {}
    for label in labels:
        try:
            cards[label] = read_card(output / "artifacts" / label)
        except (FileNotFoundError, ValueError):
            continue
    return cards


def _beats(selector: float, baseline: float) -> bool:
    """Whether a selector's AUROC beats 1 - max p's by more than rounding (0.005)."""
    return selector > baseline + 0.005


def selector_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per set, two columns per selector: AUROC against 1 - max p, flag quality.

    The AUROC cell reads ``selector / 1 - max p`` and says ``no better`` when the selector does
    not beat the baseline (by more than 0.005); the flags cell reads ``precision / recall`` of
    the pixels it flags (score > 0.5).
    """
    rows = summary[summary["mis_auroc"].notna()]
    if rows.empty:
        return pd.DataFrame()
    cells: dict[str, dict[str, str]] = {}
    for r in rows.itertuples(index=False):
        verdict = "" if _beats(r.mis_auroc, r.msp_auroc) else " no better"
        cells.setdefault(r.dataset, {})[f"{r.calibrator}: AUROC / 1 - max p"] = (
            f"{r.mis_auroc:.3f} / {r.msp_auroc:.3f}{verdict}")
        cells[r.dataset][f"{r.calibrator}: flags precision / recall"] = (
            f"{r.flag_precision:.3f} / {r.flag_recall:.3f}")
    table = pd.DataFrame.from_dict(cells, orient="index").fillna("–")
    table.index.name = "set"
    return table.reset_index()


def selector_sentence(summary: pd.DataFrame) -> str:
    """Per selector, in plain words: on how many sets it beats 1 - max p at finding errors."""
    rows = summary[summary["mis_auroc"].notna()]
    lines = []
    for calibrator, g in rows.groupby("calibrator", sort=False):
        worse = int(sum(not _beats(a, b) for a, b in zip(g["mis_auroc"], g["msp_auroc"],
                                                         strict=True)))
        if worse == len(g):
            lines.append(f"{calibrator}'s selector is no better than 1 - max p at finding "
                         f"mispredicted pixels on any of the {len(g)} sets.")
        elif worse:
            lines.append(f"{calibrator}'s selector is no better than 1 - max p on {worse} of "
                         f"{len(g)} sets.")
        else:
            lines.append(f"{calibrator}'s selector beats 1 - max p on all {len(g)} sets.")
    return " ".join(lines)


def flagged_share(per_image: pd.DataFrame) -> dict[str, float]:
    """Calibrator -> share of held-out pixels its selector flags (score > 0.5)."""
    out: dict[str, float] = {}
    if not {"mis_hist_cor", "mis_hist_inc", "role"} <= set(per_image.columns):
        return out
    rows = per_image[per_image["dataset"].str.endswith(HELDOUT_SUFFIX)
                     | (per_image["role"] == "calibration")]
    for calibrator, g in rows.groupby("calibrator", sort=False):
        cor, inc = (np.stack(g[c].to_numpy()).sum(0) for c in ("mis_hist_cor", "mis_hist_inc"))
        total = cor.sum() + inc.sum()
        if total == 0:
            continue
        half = len(cor) // 2
        out[str(calibrator)] = float((cor[half:].sum() + inc[half:].sum()) / total)
    return out


def class_table(
    per_image: pd.DataFrame, class_names: Sequence[str], calibrators: Sequence[str]
) -> tuple[pd.DataFrame, str]:
    """Per class: pixel share, classwise ECE per calibrator, mean probability vs frequency.

    Pooled over the unshifted test sets (all test sets when every one is shifted); worst classes
    (by uncalibrated classwise ECE) first.

    Returns:
        ``(table, where)``: ``where`` names the pooled sets.
    """
    needed = {"role", "reference", "num_classes", "cls_count", "cls_conf_sum", "cls_correct_sum"}
    if not needed <= set(per_image.columns):
        return pd.DataFrame(), ""
    test = per_image[per_image["role"] == "test"]
    plain = test[test["reference"].isna() | (test["reference"] == "")]
    rows = plain if not plain.empty else test
    where = ", ".join(dict.fromkeys(rows["dataset"]))
    records: dict[str, dict[str, float]] = {}
    first = None
    for calibrator in calibrators:
        g = rows[rows["calibrator"] == calibrator]
        if g.empty:
            continue
        c = int(g["num_classes"].iloc[0])
        count, conf, correct = (np.stack(g[k].to_numpy()).sum(0).reshape(c, -1)
                                for k in ("cls_count", "cls_conf_sum", "cls_correct_sum"))
        total = max(int(count[0].sum()), 1)
        ece = np.abs(conf - correct).sum(1) / total
        if first is None:
            first = calibrator
            names = list(class_names) if len(class_names) == c else [f"class_{i}" for i in range(c)]
            records = {n: {"pixel share": correct[i].sum() / total} for i, n in enumerate(names)}
            for i, n in enumerate(names):
                records[n]["mean p (uncal.)" if calibrator == UNCALIBRATED
                           else f"mean p ({calibrator})"] = conf[i].sum() / total
        for i, n in enumerate(records):
            records[n][f"{calibrator}"] = ece[i]
    if not records:
        return pd.DataFrame(), where
    table = pd.DataFrame.from_dict(records, orient="index")
    table = table.sort_values(first, ascending=False)
    table.index.name = "class"
    return table.reset_index(), where

