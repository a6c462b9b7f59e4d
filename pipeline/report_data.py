"""What the report says, computed from the tables a run writes (no rendering here).

:mod:`pipeline.report` renders these to Markdown and (through :mod:`pipeline.report_html`) to
HTML. Everything comes from ``summary.csv``, ``domain_shift.csv``, ``per_image.parquet``,
``label_free.csv`` and the artifact cards (``artifacts/<label>/calibrator.json``); nothing is
recomputed from pixels.

This module holds the report's shared vocabulary (which rows are held-out, which calibrators are
shown only for reference, the glossary), the recommendation and the matrix and shift families
(sections 1 to 3 of the page). Section 5, each calibrator's fitted values, its selector and the
classwise table, is in :mod:`pipeline.report_calibrators`; section 4, the label-free estimates,
in :mod:`pipeline.report_label_free`.

The recommendation (:func:`recommend`) looks at the held-out part of the calibration data only
(the ``*-heldout`` rows): test sets are never used to choose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.config import JobConfig
from pipeline.metrics import catalogue

UNCALIBRATED = "uncalibrated"  # as in pipeline.evaluate (not imported: keeps this module light)
HELDOUT_SUFFIX = "-heldout"
MIN_HELDOUT_IMAGES = 10
"""Fewest held-out calibration images the recommendation needs before it names a winner: with
fewer, the bootstrap interval of a mean over images says little (one image gives a point)."""

GLOSSARY: dict[str, str] = {
    "dataset": "evaluated set; `<name>-heldout` is the held-out part of a calibration set",
    "calibrator": "calibrator label; `uncalibrated` is the model's own softmax",
    "n_images": "images in the set",
    "img_ece 95%": "95% bootstrap interval of img_ece over images",
    **{m.name: m.description for m in catalogue.METRICS if m.report},
}
"""Every column the report shows, in plain words."""

def glossary(columns: Sequence[str]) -> dict[str, str]:
    """The glossary entries of ``columns`` (those shown), in glossary order."""
    return {k: v for k, v in GLOSSARY.items() if k in set(columns)}


SUMMARY_SHOWN = (
    "calibrator", "n_images", "img_ece", "img_ece 95%",
    *(name for name in catalogue.report_metrics() if name != "img_ece"),
)

_FAMILY = re.compile(r"^(?P<kind>.+?)[-_]?(?P<severity>\d+)$")


def is_heldout(summary: pd.DataFrame) -> pd.Series:
    """Rows of the held-out calibration images (role ``calibration`` or a ``-heldout`` name)."""
    return (summary["role"] == "calibration") | summary["dataset"].str.endswith(HELDOUT_SUFFIX)


def is_reference_column(calibrator: str) -> bool:
    """Columns shown for reference, never recommended: uncalibrated and oracle bounds."""
    return calibrator == UNCALIBRATED or "oracle" in calibrator.lower()


# ---------------------------------------------------------------------------------------------
# The recommendation


@dataclass
class Recommendation:
    """The calibrator to ship, decided on the held-out calibration images only.

    Attributes:
        pick: the recommended calibrator, or None (no clear winner, too little data, no data).
        kind: ``"clear"``, ``"no clear winner"``, ``"too small"``, ``"no intervals"`` or
            ``"no held-out data"``.
        lines: two or three sentences for the first screen.
        leader: the calibrator with the lowest held-out image-wise ECE (None without data).
        tied: calibrators whose interval overlaps the leader's.
        n_images: held-out images.
        heldout: per calibrator, ``img_ece, lo, hi, nll`` on the held-out part (pooled).
    """

    pick: str | None
    kind: str
    lines: list[str]
    leader: str | None = None
    tied: list[str] = field(default_factory=list)
    n_images: int = 0
    heldout: pd.DataFrame | None = None


def _interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    # Imported here: pipeline.evaluate pulls in torch; the report only needs this function.
    from pipeline.evaluate_tables import bootstrap_interval

    return bootstrap_interval(values, resamples=resamples, seed=seed)


def heldout_table(
    summary: pd.DataFrame, per_image_ece: pd.DataFrame | None, *, resamples: int, seed: int
) -> pd.DataFrame:
    """Per calibrator, image-wise ECE and NLL on the held-out part, pooled over its sets.

    One held-out set: its summary rows as they are. Several: the per-image ECEs of all held-out
    images pooled, with a bootstrap interval drawn as evaluate draws it (same seed).

    Args:
        summary: the summary table.
        per_image_ece: ``dataset, calibrator, image_id, img_ece`` per image (None: summary only).
        resamples: bootstrap resamples (``evaluate.bootstrap``).
        seed: bootstrap seed (``evaluate.seed``).

    Returns:
        Indexed by calibrator: ``img_ece, lo, hi, nll, n_images`` (empty without held-out rows).
    """
    rows = summary[is_heldout(summary)]
    columns = ["img_ece", "lo", "hi", "nll", "n_images"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    records = {}
    for calibrator, g in rows.groupby("calibrator", sort=False):
        n = int(g["n_images"].sum())
        nll = float(np.average(g["nll"], weights=g["n_images"]))
        if len(g) == 1 or per_image_ece is None:
            mean = float(np.average(g["img_ece"], weights=g["n_images"]))
            lo, hi = (float(g["img_ece_lo"].iloc[0]), float(g["img_ece_hi"].iloc[0])) \
                if len(g) == 1 else (math.nan, math.nan)
        else:
            mine = per_image_ece[(per_image_ece["calibrator"] == calibrator)
                                 & per_image_ece["dataset"].isin(set(g["dataset"]))]
            values = mine.sort_values(["dataset", "image_id"])["img_ece"].to_numpy()
            mean = float(np.nanmean(values)) if len(values) else math.nan
            lo, hi = _interval(values, resamples, seed)
        records[calibrator] = {"img_ece": mean, "lo": lo, "hi": hi, "nll": nll, "n_images": n}
    return pd.DataFrame.from_dict(records, orient="index", columns=columns)


def _ci(lo: float, hi: float) -> str:
    return "no interval" if math.isnan(lo) else f"[{lo:.3f}, {hi:.3f}]"


def recommend(
    heldout: pd.DataFrame,
    *,
    min_images: int = MIN_HELDOUT_IMAGES,
    sizes: Mapping[str, int] | None = None,
) -> Recommendation:
    """Pick the calibrator by a rule fixed on the held-out calibration images only.

    The rule: rank by held-out image-wise ECE (ties: NLL). With fewer than ``min_images``
    held-out images nothing is picked. The leader is recommended only when its 95% interval
    overlaps no other's (uncalibrated included); otherwise there is no clear winner.
    Oracle rows are bounds, never candidates.

    Args:
        heldout: :func:`heldout_table`'s output.
        min_images: the fewest held-out images needed to decide.
        sizes: calibrator label -> fitted parameters (`pipeline.calibrators.parameter_count`),
            to name the simplest of tied calibrators; None names none.

    Returns:
        The recommendation with its sentences.

    Example:
        >>> h = pd.DataFrame({"img_ece": [0.10, 0.04], "lo": [0.09, 0.03], "hi": [0.11, 0.05],
        ...     "nll": [0.5, 0.4], "n_images": [20, 20]}, index=["uncalibrated", "temperature"])
        >>> recommend(h).pick
        'temperature'
    """
    candidates = heldout[[not is_reference_column(c) or c == UNCALIBRATED for c in heldout.index]]
    if candidates.empty:
        return Recommendation(None, "no held-out data", [
            "No recommendation: the run has no held-out calibration images, and test sets are "
            "never used to choose. Set `fit.heldout_fraction` > 0 and "
            "`evaluate.include_heldout: true` to get one."
        ], heldout=heldout)
    ranked = candidates.sort_values(["img_ece", "nll"], kind="stable")  # ties: config order
    leader = str(ranked.index[0])
    top = ranked.iloc[0]
    n = int(top["n_images"])
    base = heldout.loc[UNCALIBRATED] if UNCALIBRATED in heldout.index else None
    base_text = "" if base is None or leader == UNCALIBRATED else (
        f" against uncalibrated's {base['img_ece']:.3f} {_ci(base['lo'], base['hi'])}")
    lead_text = (f"{leader} has the lowest image-wise ECE on the {n} held-out calibration "
                 f"images, {top['img_ece']:.3f} {_ci(top['lo'], top['hi'])}{base_text}")
    common = dict(leader=leader, n_images=n, heldout=heldout)
    if n < min_images:
        return Recommendation(None, "too small", [
            f"No recommendation: the held-out part has {n} image{'' if n == 1 else 's'}, "
            f"fewer than the "
            f"{min_images} needed to decide (its intervals say little).",
            f"For what it is worth, {lead_text}.",
        ], **common)
    if math.isnan(top["lo"]):
        return Recommendation(None, "no intervals", [
            "No recommendation: there are no bootstrap intervals (`evaluate.bootstrap: 0`), "
            "so a clear lead cannot be told from noise.",
            f"For what it is worth, {lead_text}.",
        ], **common)
    others = ranked.iloc[1:]
    tied = [str(c) for c, r in others.iterrows() if r["lo"] <= top["hi"] and top["lo"] <= r["hi"]]
    if tied:
        names = ", ".join(tied)
        plain = (" None is clearly better than uncalibrated." if UNCALIBRATED in [leader, *tied]
                 else "")
        known = {c: sizes[c] for c in [leader, *tied] if sizes and c in sizes}
        simplest = " (fewest parameters)."
        if known:
            label = min(known, key=known.__getitem__)
            simplest = f": {label}, with {known[label]} fitted parameter" + (
                "." if known[label] == 1 else "s.")
        return Recommendation(None, "no clear winner", [
            f"No clear winner on the held-out calibration data: {lead_text}, but its 95% "
            f"interval overlaps those of {names}.{plain}",
            "Any of them is defensible; prefer the simplest" + simplest,
        ], tied=tied, **common)
    if leader == UNCALIBRATED:
        return Recommendation(UNCALIBRATED, "clear", [
            f"Keep the model uncalibrated: {lead_text}; every calibrator is clearly worse "
            "there.",
        ], **common)
    return Recommendation(leader, "clear", [
        f"Use {leader}: {lead_text}; its 95% interval overlaps no other calibrator's.",
    ], **common)


def outcome_on_tests(summary: pd.DataFrame, pick: str | None) -> str:
    """One sentence on how ``pick`` (or nothing) fares on the test sets (never used to choose)."""
    test = summary[summary["role"] == "test"]
    if pick is None or pick == UNCALIBRATED or test.empty:
        return ""
    wins, changes = 0, []
    for _, g in test.groupby("dataset", sort=False):
        ece = g.set_index("calibrator")["img_ece"]
        if pick not in ece:
            continue
        rivals = ece[[not is_reference_column(c) or c == UNCALIBRATED for c in ece.index]]
        wins += int(ece[pick] <= rivals.min())
        if UNCALIBRATED in ece and ece[UNCALIBRATED] > 0:
            changes.append(ece[pick] / ece[UNCALIBRATED] - 1)
    n = test["dataset"].nunique()
    mean = f"; image-wise ECE {100 * np.mean(changes):+.0f}% against uncalibrated on average" \
        if changes else ""
    return (f"On the test sets (shown, not used to choose) {pick} is lowest on {wins} of {n}"
            f"{mean}.")


# ---------------------------------------------------------------------------------------------
# The matrix and the shift families


def matrix_columns(summary: pd.DataFrame) -> list[str]:
    """Calibrators in matrix order: uncalibrated, oracle bounds, then the rest as configured."""
    names = list(dict.fromkeys(summary["calibrator"]))
    refs = [c for c in names if is_reference_column(c)]
    refs.sort(key=lambda c: c != UNCALIBRATED)
    return refs + [c for c in names if c not in refs]


def best_per_set(summary: pd.DataFrame) -> dict[str, str]:
    """Dataset -> calibrator with the lowest image-wise ECE (oracle bounds excluded)."""
    out = {}
    for dataset, g in summary.groupby("dataset", sort=False):
        g = g[[not is_reference_column(c) or c == UNCALIBRATED for c in g["calibrator"]]]
        if not g.empty:
            out[dataset] = str(g.sort_values(["img_ece", "nll"], kind="stable")
                               ["calibrator"].iloc[0])
    return out


def families(cfg: JobConfig | None, summary: pd.DataFrame) -> dict[str, dict[int, str]]:
    """Corruption family -> severity -> test dataset.

    From the datasets' ``corruption`` in the config; datasets without one but named
    ``<kind>-<n>`` with a reference domain count as well.
    """
    tests = summary[summary["role"] == "test"].drop_duplicates("dataset")
    configured = {d.name: d for d in (cfg.datasets if cfg is not None else [])}
    out: dict[str, dict[int, str]] = {}
    for row in tests.itertuples(index=False):
        ds = configured.get(row.dataset)
        if ds is not None and ds.corruption is not None:
            kind, severity = ds.corruption.kind, int(ds.corruption.severity)
        elif isinstance(row.reference, str) and (m := _FAMILY.match(row.dataset)):
            kind, severity = m["kind"], int(m["severity"])
        else:
            continue
        out.setdefault(kind, {})[severity] = row.dataset
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def family_curves(
    summary: pd.DataFrame, fams: Mapping[str, Mapping[int, str]]
) -> dict[str, pd.DataFrame]:
    """Family -> image-wise ECE per severity (rows; 0 is the reference domain) x calibrator."""
    test = summary[summary["role"] == "test"]
    curves = {}
    for kind, sets in fams.items():
        rows = test[test["dataset"].isin(set(sets.values()))]
        table = rows.pivot_table(index="dataset", columns="calibrator", values="img_ece")
        table.index = [next(s for s, d in sets.items() if d == name) for name in table.index]
        refs = rows["reference"].dropna().unique()
        if len(refs) == 1:
            base = test[(test["domain"] == refs[0]) & test["reference"].isna()]
            if not base.empty:
                pooled = base.groupby("calibrator").apply(
                    lambda g: np.average(g["img_ece"], weights=g["n_images"]),
                    include_groups=False)
                table.loc[0] = pooled
        curves[kind] = table.sort_index()[[c for c in matrix_columns(rows) if c in table]]
    return curves
