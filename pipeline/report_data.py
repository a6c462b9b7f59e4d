"""What the report says, computed from the tables a run writes (no rendering here).

:mod:`pipeline.report` renders these to Markdown and (through :mod:`pipeline.report_html`) to
HTML. Everything comes from ``summary.csv``, ``domain_shift.csv``, ``per_image.parquet`` and the
artifact cards (``artifacts/<label>/calibrator.json``); nothing is recomputed from pixels.

The recommendation (:func:`recommend`) looks at the held-out part of the calibration data only
(the ``*-heldout`` rows): test sets are never used to choose.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def recommend(heldout: pd.DataFrame, *, min_images: int = MIN_HELDOUT_IMAGES) -> Recommendation:
    """Pick the calibrator by a rule fixed on the held-out calibration images only.

    The rule: rank by held-out image-wise ECE (ties: NLL). With fewer than ``min_images``
    held-out images nothing is picked. The leader is recommended only when its 95% interval
    overlaps no other's (uncalibrated included); otherwise there is no clear winner.
    Oracle rows are bounds, never candidates.

    Args:
        heldout: :func:`heldout_table`'s output.
        min_images: the fewest held-out images needed to decide.

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
        return Recommendation(None, "no clear winner", [
            f"No clear winner on the held-out calibration data: {lead_text}, but its 95% "
            f"interval overlaps those of {names}.{plain}",
            "Any of them is defensible; prefer the simplest"
            + (": temperature, with one parameter." if "temperature" in [leader, *tied]
               else " (fewest parameters)."),
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


# ---------------------------------------------------------------------------------------------
# Fitted parameters, selector diagnostics, classes


def _num(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        value = float(value)
        if abs(value) >= 1e6:
            return f"{value:.0e}"
        # Three significant digits, trailing zeros kept: T = 1.30, not 1.3.
        return f"{value:#.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _spread(values: Sequence[float]) -> str:
    arr = np.asarray(values, dtype=float)
    return f"mean {_num(arr.mean())}, range {_num(arr.min())} to {_num(arr.max())}"


def describe_card(card: Mapping[str, Any], flagged: float | None = None) -> str:
    """A calibrator's fitted values in plain words, from its ``calibrator.json``.

    Args:
        card: the artifact card.
        flagged: share of held-out pixels the selector flags (score > 0.5), if known.

    Example:
        >>> describe_card({"name": "temperature", "summary": {"temperature": 1.3124}})
        'one temperature, T = 1.31'
        >>> describe_card({"name": "new", "summary": {"t": [1.0, 3.0], "inputs": ["a", "b"]}})
        't = mean 2.00, range 1.00 to 3.00, inputs = a, b'
    """
    name, s = str(card.get("name")), dict(card.get("summary") or {})
    options = dict(card.get("options") or {})
    if name == "temperature" and "temperature" in s:
        return f"one temperature, T = {_num(s['temperature'])}"
    if name == "ets" and "temperature" in s:
        w = s.get("weights") or []
        mix = " / ".join(_num(x) for x in w)
        return (f"one temperature, T = {_num(s['temperature'])}, mixed with the raw and the "
                f"uniform distribution (weights {mix})")
    if name in ("lts", "ibts"):
        where = "per image" if name == "ibts" else "per pixel"
        return (f"a small conv net predicts a temperature {where}, starting from "
                f"T = {_num(s.get('init_temperature'))}")
    if name == "meta_cal":
        threshold = s.get("threshold")
        gate = ("nothing gated" if threshold is None else
                f"pixels with entropy above {_num(threshold)} nats (the {_num(s.get('quantile'))}"
                " quantile) get the uniform distribution")
        return f"one temperature, T = {_num(s.get('temperature'))}; {gate}"
    if name == "vector" and "scale" in s:
        return (f"one scale and one bias per class (scales {_spread(s['scale'])}; biases "
                f"{_spread(s['bias'])})")
    if name in ("matrix", "dirichlet") and "diag_mean" in s:
        return (f"a full {card.get('num_classes')}x{card.get('num_classes')} linear map: "
                f"diagonal mean {_num(s['diag_mean'])}, off-diagonal mean |w| "
                f"{_num(s['offdiag_abs_mean'])}, ODIR strength {_num(s.get('odir'))}")
    if name.startswith("selective") and "t_mis" in s:
        t_cor = s.get("t_cor")
        t_cor_text = (f"{_spread(t_cor)} (per class)" if isinstance(t_cor, list)
                      else _num(t_cor))
        parts = [f"a selector flags likely-wrong pixels ({options.get('gate', '?')} gate, "
                 f"features {options.get('features', '?')}); flagged pixels get "
                 f"T_mis = {_num(s['t_mis'])}"
                 + (" (the uniform distribution)" if float(s["t_mis"]) >= 1e6 else "")
                 + f", the others T_cor = {t_cor_text}"]
        if isinstance(s.get("base"), dict) and options.get("base"):
            parts.append(f"on top of {options['base']} "
                         f"({describe_card({'name': options['base'], 'summary': s['base']})})")
        if flagged is not None and not math.isnan(flagged):
            parts.append(f"flags {100 * flagged:.1f}% of the held-out pixels")
        return "; ".join(parts)
    if name.startswith("adaptive") and "temperature" in s:
        gated = ("; kept at T inside the clean calibration images' feature band, adapted "
                 f"outside it ({s.get('gate', '?')} gate)" if name.endswith("_gated") else "")
        return (f"a temperature per image, T = {_num(s['temperature'])} (temperature scaling's) "
                f"times a factor a small net predicts from the image's label-free features "
                f"({', '.join(map(str, s.get('features') or []))}){gated}")
    if not s:
        return "no fitted values recorded"
    return ", ".join(f"{k} = {_value(v)}" for k, v in s.items())


def _value(value: Any) -> str:
    """A fitted value in words: a number, the spread of a list of numbers, or the text."""
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) for v in value):
            return _spread(value)
        return ", ".join(map(str, value))
    return _num(value)


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


# ---------------------------------------------------------------------------------------------
# Label-free estimates (``label_free.csv``)


"""Drift and label-free estimates per (monitor or test set, calibrator), by pipeline.evaluate."""


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
