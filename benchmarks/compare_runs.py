"""Compare the tables of two run folders: the largest relative difference per table.

Used to check that a change leaves the demo's numbers as they were: rerun fit and evaluate
into a copy of a finished run's shards, then compare the two folders. Text columns must be
equal; float columns are compared relative to the first run's value (floats summed in another
order differ by a few 1e-16 relative per step).

Run:
    .venv/bin/python benchmarks/compare_runs.py runs/camvid_espnet /tmp/rerun [--tolerance 1e-9]

Exits 1 when a table differs in shape, columns, text or missing values, or when a float column
differs by more than the tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

TABLES = ("summary.csv", "label_free.csv", "domain_shift.csv", "best.csv")


def largest_difference(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, str | None]:
    """The largest relative difference over float columns, and its column.

    Raises:
        ValueError: the tables differ in shape, columns, text values or where values are missing.
    """
    if list(a.columns) != list(b.columns) or a.shape != b.shape:
        raise ValueError(f"Expected the same columns and shape, but got {a.shape} vs {b.shape}")
    worst, where = 0.0, None
    for column in a.columns:
        if a[column].dtype.kind == "f" or b[column].dtype.kind == "f":
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            if (np.isnan(x) != np.isnan(y)).any():
                raise ValueError(f"Expected missing values in the same rows of `{column}`")
            finite = np.isfinite(x) & np.isfinite(y)
            if finite.any():
                rel = np.abs(x[finite] - y[finite]) / np.maximum(np.abs(x[finite]), 1e-12)
                if rel.max() > worst:
                    worst, where = float(rel.max()), column
        elif (a[column].fillna("").astype(str) != b[column].fillna("").astype(str)).any():
            raise ValueError(f"Expected equal text in `{column}`")
    return worst, where


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-9)
    args = parser.parse_args()
    failed = False
    for name in TABLES:
        if not (args.first / name).is_file():
            continue
        # "" is missing; a text value such as "NA" (a domain name) stays text.
        read = dict(keep_default_na=False, na_values=[""])
        try:
            worst, where = largest_difference(pd.read_csv(args.first / name, **read),
                                              pd.read_csv(args.second / name, **read))
        except (ValueError, FileNotFoundError) as err:
            print(f"{name}: {err}")
            failed = True
            continue
        print(f"{name}: largest relative difference {worst:.3g}" + (f" ({where})" if where else ""))
        failed |= worst > args.tolerance
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
