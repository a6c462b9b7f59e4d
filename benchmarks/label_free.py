"""Issue 14's three goal tables from a finished run: label-free estimates, drift, adaptation.

Reads ``RUN_DIR/label_free.csv``, ``RUN_DIR/per_image.parquet`` (with the label-free feature
columns, :data:`pipeline.label_free.FEATURE_COLUMNS`) and ``RUN_DIR/summary.csv`` as written
by ``segcal evaluate`` and prints:

(a) estimated vs true pixel accuracy (ATC and DoC) and image-wise ECE per labelled test set,
    with the mean absolute error over the sets (goal: ATC within 0.05 on average);
(b) drift score, threshold and alarm per set, then the alarms on ``--splits`` random subsets
    of the in-domain ``--day`` set's images (``--split-size`` images each, by default the
    median size of the corrupted sets) drawn without replacement and compared with the
    calibration held-out images (goal: an alarm on every severity >= 3 set and on no split);
(c) image-wise ECE of temperature scaling, every calibrator whose name starts with
    ``adaptive`` and the ``oracle_ts`` bound per test set, the share of the TS-to-oracle gap
    each closed, and the goal checks for the gated calibrator (beats TS on every
    severity >= 3 set, closes at least half of the gap on average over them, loses at most
    0.003 to TS on ``day`` and ``dusk``).

A part whose inputs are missing prints ``n/a`` instead of failing. Nothing is fitted or chosen
here: every estimator's choices were fixed on calibration data (see
:mod:`pipeline.label_free`).

Run:
    .venv/bin/python benchmarks/label_free.py ../runs/camvid_espnet
    .venv/bin/python benchmarks/label_free.py RUN_DIR --splits 50 --split-size 40
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.label_free import FEATURE_COLUMNS, drift

UNCALIBRATED = "uncalibrated"
TEMPERATURE = "temperature"
ORACLE = "oracle_ts"
HELDOUT_SUFFIX = "-heldout"
GOAL_ACC_MAE = 0.05
GOAL_IN_DOMAIN_LOSS = 0.003
GOAL_GAP_CLOSED = 0.5
_SEVERITY = re.compile(r"^(?P<kind>.+?)[-_]?(?P<severity>\d+)$")


def severity(name: str) -> int | None:
    """Severity of a corrupted set named ``<kind>-<severity>`` (e.g. ``fog-3``), else None."""
    match = _SEVERITY.match(name)
    return int(match["severity"]) if match else None


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _read(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        print(f"n/a: {path} not found")
        return None
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _print(frame: pd.DataFrame) -> None:
    print(frame.to_string(index=False))


# ---------------------------------------------------------------------------------------------
# (a) estimates vs truth


def estimates_table(label_free: pd.DataFrame, calibrator: str) -> tuple[pd.DataFrame, float]:
    """Per labelled set: true vs ATC and DoC pixel accuracy under ``calibrator``; and ATC MAE."""
    rows = label_free[(label_free["calibrator"] == calibrator)
                      & label_free["true_pixel_acc"].notna()]
    table = pd.DataFrame({
        "dataset": rows["dataset"],
        "true_acc": rows["true_pixel_acc"],
        "atc": rows["est_pixel_acc"],
        "doc": rows["est_pixel_acc_doc"],
        "atc_err": rows["est_pixel_acc"] - rows["true_pixel_acc"],
        "doc_err": rows["est_pixel_acc_doc"] - rows["true_pixel_acc"],
    })
    mae = float(table["atc_err"].abs().mean()) if len(table) else math.nan
    return table, mae


def ece_table(label_free: pd.DataFrame) -> pd.DataFrame:
    """Per labelled set: ``true/est`` image-wise ECE of each calibrator, and an MAE row."""
    rows = label_free[label_free["true_img_ece"].notna()]
    if rows.empty:
        return pd.DataFrame()
    cals = list(dict.fromkeys(rows["calibrator"]))
    out = {"dataset": list(dict.fromkeys(rows["dataset"]))}
    mae = {"dataset": "MAE"}
    for cal in cals:
        part = rows[rows["calibrator"] == cal].set_index("dataset")
        cells = []
        for ds in out["dataset"]:
            if ds in part.index:
                cells.append(f"{part.at[ds, 'true_img_ece']:.3f}/{part.at[ds, 'est_img_ece']:.3f}")
            else:
                cells.append("n/a")
        out[cal] = cells
        mae[cal] = _num(float((part["est_img_ece"] - part["true_img_ece"]).abs().mean()))
    table = pd.DataFrame(out)
    return pd.concat([table, pd.DataFrame([mae])], ignore_index=True)


# ---------------------------------------------------------------------------------------------
# (b) drift


def drift_table(label_free: pd.DataFrame) -> pd.DataFrame:
    """One row per set: drift score, threshold and alarm (the same on every calibrator row)."""
    cols = ["dataset", "n_images", "drift_score", "drift_threshold", "drift_alarm"]
    return label_free[cols].drop_duplicates("dataset").reset_index(drop=True)


def split_alarms(
    per_image: pd.DataFrame, day: str, *, splits: int, size: int, level: float = 0.05,
    seed: int = 0,
) -> tuple[int, int, str]:
    """Alarms on ``splits`` random subsets of ``size`` images of the ``day`` set.

    Each subset's uncalibrated rows are compared with the uncalibrated rows of the calibration
    held-out images, as :func:`pipeline.label_free.drift` does for a monitor set.

    Returns:
        ``(alarms, splits run, reference dataset name)``.
    """
    raw = per_image[per_image["calibrator"] == UNCALIBRATED]
    held = sorted(d for d in raw["dataset"].unique() if str(d).endswith(HELDOUT_SUFFIX))
    if not held:
        raise ValueError(f"Expected a '*{HELDOUT_SUFFIX}' dataset in per_image.parquet, but got "
                         f"{sorted(raw['dataset'].unique())}")
    reference = raw[raw["dataset"] == held[0]]
    images = raw[raw["dataset"] == day].reset_index(drop=True)
    if images.empty:
        raise ValueError(f"Expected dataset {day!r} in per_image.parquet, but got none")
    size = min(size, len(images))
    rng = np.random.default_rng(seed)
    alarms = 0
    for k in range(splits):
        subset = images.iloc[np.sort(rng.choice(len(images), size, replace=False))]
        alarms += drift(reference, subset, level=level, seed=k).alarm
    return alarms, splits, held[0]


# ---------------------------------------------------------------------------------------------
# (c) adaptive calibrators vs TS and the oracle


def gap_table(summary: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per test set: image-wise ECE of TS, the adaptive calibrators and the oracle; gap closed.

    The share of the gap closed by calibrator ``a`` is
    ``(ECE_TS - ECE_a) / (ECE_TS - ECE_oracle)`` (NaN where the oracle is not below TS).
    """
    tests = summary[(summary["role"] == "test") & ~summary["dataset"].str.endswith(HELDOUT_SUFFIX)]
    wide = tests.pivot_table(index="dataset", columns="calibrator", values="img_ece",
                             sort=False)
    adaptive = [c for c in wide.columns if str(c).startswith("adaptive")]
    cols = [c for c in (TEMPERATURE, *adaptive, ORACLE) if c in wide.columns]
    table = wide[cols].copy()
    if TEMPERATURE in wide.columns and ORACLE in wide.columns:
        gap = wide[TEMPERATURE] - wide[ORACLE]
        for cal in adaptive:
            table[f"closed:{cal}"] = ((wide[TEMPERATURE] - wide[cal]) / gap).where(gap > 0)
    table.insert(0, "severity", pd.array([severity(d) for d in table.index], dtype="Int64"))
    return table.reset_index(), adaptive


def goal_checks(table: pd.DataFrame, gated: str, in_domain: tuple[str, ...]) -> list[str]:
    """The adaptation goal, as lines of ``PASS``/``MISS``/``n/a`` for the gated calibrator."""
    if gated not in table.columns or TEMPERATURE not in table.columns:
        return [f"n/a: no {gated!r} or {TEMPERATURE!r} column in summary.csv"]
    lines = []
    severe = table[table["severity"].fillna(0) >= 3]
    losers = severe[~(severe[gated] < severe[TEMPERATURE])]["dataset"].tolist()
    lines.append(f"{'PASS' if severe.size and not losers else 'MISS'}: {gated} beats TS on "
                 f"{len(severe) - len(losers)}/{len(severe)} severity >= 3 sets"
                 + (f" (not on {', '.join(losers)})" if losers else ""))
    closed_col = f"closed:{gated}"
    if closed_col in severe.columns:
        closed = float(severe[closed_col].mean())
        ok = closed >= GOAL_GAP_CLOSED
        lines.append(f"{'PASS' if ok else 'MISS'}: mean share of the TS-to-oracle gap closed on "
                     f"severity >= 3 sets {_num(closed)} (goal >= {GOAL_GAP_CLOSED})")
        gaps = severe[TEMPERATURE] - severe[ORACLE]
        if ORACLE in severe.columns and float(gaps.sum()) > 0:
            pooled = float((severe[TEMPERATURE] - severe[gated]).sum() / gaps.sum())
            lines.append(f"info: share of the summed TS-to-oracle gap closed on severity >= 3 "
                         f"sets {_num(pooled)}")
    else:
        lines.append(f"n/a: no {ORACLE!r} rows, no gap closed")
    for name in in_domain:
        row = table[table["dataset"] == name]
        if row.empty:
            lines.append(f"n/a: no test set {name!r}")
            continue
        loss = float(row[gated].iloc[0] - row[TEMPERATURE].iloc[0])
        ok = loss <= GOAL_IN_DOMAIN_LOSS
        lines.append(f"{'PASS' if ok else 'MISS'}: {gated} - TS on {name} = {loss:+.4f} "
                     f"(goal <= {GOAL_IN_DOMAIN_LOSS})")
    return lines


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Print the three tables for the run folder given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (OUTPUT)")
    parser.add_argument("--calibrator", default=UNCALIBRATED,
                        help="calibrator whose accuracy estimates table (a) shows")
    parser.add_argument("--day", default="day", help="the in-domain test set to split")
    parser.add_argument("--dusk", default="dusk", help="the second in-domain check of (c)")
    parser.add_argument("--splits", type=int, default=20, help="random day subsets")
    parser.add_argument("--split-size", type=int, default=0,
                        help="images per subset (0: median size of the corrupted sets)")
    parser.add_argument("--level", type=float, default=0.05, help="drift false-alarm level")
    args = parser.parse_args(argv)
    pd.set_option("display.width", 200)
    pd.set_option("display.float_format", lambda v: f"{v:.3f}")

    label_free = _read(args.run / "label_free.csv")
    summary = _read(args.run / "summary.csv")
    per_image_path = args.run / "per_image.parquet"

    print("\n(a) Label-free estimates vs truth on the labelled test sets")
    if label_free is None:
        print("n/a")
    else:
        table, mae = estimates_table(label_free, args.calibrator)
        if table.empty:
            print(f"n/a: no labelled rows for calibrator {args.calibrator!r}")
        else:
            print(f"pixel accuracy under {args.calibrator} (ATC = est_pixel_acc, DoC):")
            _print(table)
            doc_mae = float(table["doc_err"].abs().mean())
            verdict = "PASS" if mae <= GOAL_ACC_MAE else "MISS"
            print(f"{verdict}: ATC MAE {_num(mae)} over {len(table)} sets "
                  f"(goal <= {GOAL_ACC_MAE}); DoC MAE {_num(doc_mae)}")
        ece = ece_table(label_free)
        print("\nimage-wise ECE, true/estimated, per calibrator:")
        _print(ece) if not ece.empty else print("n/a")

    print("\n(b) Drift against the calibration held-out images")
    if label_free is None:
        print("n/a")
    else:
        table = drift_table(label_free)
        table.insert(1, "severity", pd.array([severity(d) for d in table["dataset"]],
                                             dtype="Int64"))
        _print(table)
        severe = table[table["severity"].fillna(0) >= 3]
        missed = severe[~severe["drift_alarm"].astype(bool)]["dataset"].tolist()
        print(f"{'PASS' if not missed else 'MISS'}: alarm on {len(severe) - len(missed)}/"
              f"{len(severe)} severity >= 3 sets" + (f" (not {', '.join(missed)})"
                                                      if missed else ""))
    size = args.split_size
    if size <= 0 and label_free is not None:
        sized = label_free.drop_duplicates("dataset")
        sized = sized[[severity(d) is not None for d in sized["dataset"]]]
        size = int(sized["n_images"].median()) if len(sized) else 40
    size = size if size > 0 else 40
    if not per_image_path.is_file():
        print(f"n/a: {per_image_path} not found, no {args.day} splits")
    else:
        per_image = pd.read_parquet(per_image_path, columns=[
            "dataset", "calibrator", "image_id", *FEATURE_COLUMNS[:3]])
        try:
            alarms, runs, ref = split_alarms(per_image, args.day, splits=args.splits,
                                             size=size, level=args.level)
        except (ValueError, KeyError) as err:
            print(f"n/a: {err}")
        else:
            print(f"{'PASS' if alarms == 0 else 'MISS'}: {alarms}/{runs} random {size}-image "
                  f"subsets of {args.day!r} raise the alarm against {ref!r} "
                  f"(level {args.level})")

    print("\n(c) Image-wise ECE: TS, adaptive calibrators and the oracle temperature")
    if summary is None:
        print("n/a")
        return
    table, adaptive = gap_table(summary)
    if not adaptive and ORACLE not in table.columns:
        print("n/a: no adaptive* or oracle_ts rows in summary.csv")
    _print(table)
    gated = [c for c in adaptive if "gated" in c]
    for cal in gated or adaptive[:1] or ["adaptive (none)"]:
        for line in goal_checks(table, cal, (args.day, args.dusk)):
            print(line)


if __name__ == "__main__":
    main()
