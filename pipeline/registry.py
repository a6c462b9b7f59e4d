"""Champion/challenger registry: complete artifact sets, an atomic ``current`` and a history.

A registry folder keeps a complete copy of every run it was given, a link ``current`` to the
champion and a record of every decision. It is split by responsibility, and this module
re-exports the public names of the parts, so ``from pipeline import registry`` is the one
import callers need:

- :mod:`pipeline.registry_layout`: the folder's layout (``runs/``, ``current``,
  ``history.jsonl``, ``.lock``, ``.promotion.json``) and reading it without the lock
  (:func:`run_dir`, :func:`list_runs`, :func:`current`, :func:`find_run`, :func:`run_meta`,
  :func:`read_summary`, :func:`artifact_digest`), and :class:`RegistryError`.
- :mod:`pipeline.registry_store`: changing it under :func:`lock`, which first repairs what a
  killed holder left behind (:func:`recover`); the journalled atomic switch of ``current``
  (:func:`switch`, :func:`promote`); copying a run in (:func:`add_run`).
- :mod:`pipeline.registry_history`: ``history.jsonl`` (:func:`record`, :func:`history`),
  including torn last lines left by a crash.
- this module: the champion/challenger decision (:func:`compare`, :func:`is_candidate`).

Decisions (:func:`compare`) use image-wise ECE (the mean over images of each image's ECE) from
the runs' ``summary.csv``: the challenger is promoted only if, on every dataset and calibrator the
champion was measured on, its image-wise ECE is no worse than the champion's plus a tolerance.
Rows that measure no shippable calibrator are left out: ``uncalibrated`` (the model), oracle
bounds (``oracle_ts``: a temperature fitted on each test set's own labels) and, unless the
refresh allows them, the target-adapted calibrators (those whose class says it adapts to each
target image, :func:`adapted_labels`).

The re-exported functions look up their helpers in their own modules: to patch one (a test
injecting a fault), patch it there, e.g. ``pipeline.registry_store.record``, not here.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.registry_history import history, record
from pipeline.registry_layout import (
    ARTIFACTS,
    CURRENT,
    HISTORY,
    JOURNAL,
    LOCK,
    REQUIRED,
    RUN_DIRS,
    RUN_FILES,
    RUN_META,
    RUNS,
    TORN,
    VOLATILE_FILES,
    RegistryError,
    artifact_digest,
    current,
    find_run,
    list_runs,
    read_summary,
    run_dir,
    run_meta,
)
from pipeline.registry_store import add_run, lock, promote, recover, switch

__all__ = [
    "ARTIFACTS",
    "CURRENT",
    "HISTORY",
    "JOURNAL",
    "KEY_COLUMNS",
    "LOCK",
    "METRIC",
    "REQUIRED",
    "RUNS",
    "RUN_DIRS",
    "RUN_FILES",
    "RUN_META",
    "TORN",
    "UNCALIBRATED",
    "VOLATILE_FILES",
    "Comparison",
    "Decision",
    "RegistryError",
    "adapted_labels",
    "add_run",
    "artifact_digest",
    "compare",
    "current",
    "find_run",
    "history",
    "is_adaptive",
    "is_bound",
    "is_candidate",
    "list_runs",
    "lock",
    "promote",
    "read_summary",
    "record",
    "recover",
    "run_dir",
    "run_meta",
    "switch",
]

# summary.csv columns the decision reads (written by pipeline.evaluate).
KEY_COLUMNS = ("dataset", "calibrator")
METRIC = "img_ece"
UNCALIBRATED = "uncalibrated"


@dataclass(frozen=True)
class Comparison:
    """One (dataset, calibrator) row of a champion/challenger decision."""

    dataset: str
    calibrator: str
    champion: float
    challenger: float | None
    ok: bool


@dataclass(frozen=True)
class Decision:
    """The outcome of :func:`compare`: whether to promote, why, and the numbers behind it."""

    promote: bool
    reason: str
    tolerance: float
    comparisons: list[Comparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, as written to ``history.jsonl``."""
        return asdict(self)


# --- decision ----------------------------------------------------------------------------------


def is_bound(calibrator: str) -> bool:
    """Whether ``calibrator`` names a bound (``oracle_ts``: fitted on the test set's own labels)."""
    return "oracle" in calibrator.lower()


def adapted_labels(*outputs: str | Path) -> frozenset[str]:
    """The calibrator labels that adapt to each unlabelled target image (adaptive temperatures).

    A calibrator adapts when its class says so (`pipeline.calibrators.adapts_to_target`); its
    class is read from the card in ``<output>/artifacts/<label>/`` of each run folder given. A
    label without a readable card there counts by its own name, since a calibrator's label
    defaults to its registry name.

    Example:
        >>> sorted(adapted_labels())
        ['adaptive_ts', 'adaptive_ts_gated']
    """
    from pipeline.calibrators import CALIBRATORS, adapts_to_target, read_card

    carded, adapted = set(), set()
    for output in outputs:
        for folder in sorted(p for p in (Path(output) / ARTIFACTS).glob("*") if p.is_dir()):
            try:
                card = read_card(folder)
            except (OSError, ValueError):
                continue  # no card, e.g. the oracle folder: the label counts by its name
            carded.add(folder.name)
            if adapts_to_target(str(card.get("name"))):
                adapted.add(folder.name)  # in either run: adapted in both
    by_name = {name for name in CALIBRATORS if adapts_to_target(name)} - carded
    return frozenset(adapted | by_name)


def is_adaptive(calibrator: str, adapted: Collection[str] | None = None) -> bool:
    """Whether the calibrator labelled ``calibrator`` adapts to each target image.

    Args:
        calibrator: a ``summary.csv`` calibrator label.
        adapted: the run's adapted labels (:func:`adapted_labels`); None: registry names only.
    """
    return calibrator in (adapted_labels() if adapted is None else adapted)


def is_candidate(
    calibrator: str, *, allow_adaptive: bool = False, adapted: Collection[str] | None = None
) -> bool:
    """Whether ``calibrator`` can count in a decision and be the run's calibrator.

    Never ``uncalibrated`` (the model itself) or a bound; a target-adapted calibrator
    (:func:`is_adaptive` with ``adapted``) only when ``allow_adaptive``.

    Example:
        >>> [is_candidate(c) for c in ("temperature", "oracle_ts", "adaptive_ts", UNCALIBRATED)]
        [True, False, False, False]
        >>> is_candidate("adaptive_ts_gated", allow_adaptive=True)
        True
        >>> is_candidate("night", adapted={"night"}), is_candidate("adaptive_ts", adapted=set())
        (False, True)
    """
    return (
        calibrator != UNCALIBRATED
        and not is_bound(calibrator)
        and (allow_adaptive or not is_adaptive(calibrator, adapted))
    )


def _metric_table(
    summary: pd.DataFrame, name: str, allow_adaptive: bool, adapted: Collection[str] | None
) -> pd.Series:
    missing = [c for c in (*KEY_COLUMNS, METRIC) if c not in summary.columns]
    if missing:
        raise ValueError(
            f"Expected the {name} summary to have columns {[*KEY_COLUMNS, METRIC]}, "
            f"but it lacks {missing}"
        )
    keep = summary["calibrator"].astype(str).map(
        lambda c: is_candidate(c, allow_adaptive=allow_adaptive, adapted=adapted)
    ).astype(bool)
    table = summary[keep]
    return table.set_index(list(KEY_COLUMNS))[METRIC].astype(float)


def compare(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    *,
    tolerance: float,
    allow_adaptive: bool = False,
    adapted: Collection[str] | None = None,
) -> Decision:
    """Decide whether the challenger replaces the champion.

    Every (dataset, calibrator) row of the champion's summary is compared, except those that
    measure no shippable calibrator (:func:`is_candidate`): ``uncalibrated`` (the model),
    oracle bounds (fitted on each test set's own labels, the same in both runs) and, unless
    ``allow_adaptive``, the target-adapted calibrators. The challenger wins only
    if it has every such row and none is worse than ``champion + tolerance``. Rows only the
    challenger has (a new dataset or calibrator) cannot be compared and do not count; with no
    calibrated champion row at all nothing is established and the champion stays.

    Args:
        challenger: the new run's summary table (columns ``dataset``, ``calibrator``,
            ``img_ece``; one row per dataset x calibrator).
        champion: the current champion's summary, or None when there is no champion yet.
        tolerance: how much worse (absolute image-wise ECE) a row may be and still pass.
        allow_adaptive: count the target-adapted calibrators' rows too (default False).
        adapted: the labels of the target-adapted calibrators of both runs
            (:func:`adapted_labels`); None: those named after an adapted class.

    Returns:
        The decision with one :class:`Comparison` per champion row.

    Raises:
        ValueError: a negative tolerance, or a summary without the needed columns.

    Example:
        >>> champ = pd.DataFrame({"dataset": ["dusk"], "calibrator": ["ts"],
        ...                       "img_ece": [0.050]})
        >>> chall = champ.assign(img_ece=[0.051])
        >>> compare(chall, champ, tolerance=0.002).promote
        True
        >>> compare(chall, champ, tolerance=0.0).reason
        'challenger is worse than champion + 0 on 1 of 1 rows: dusk/ts 0.051 > 0.05'
    """
    if tolerance < 0:
        raise ValueError(f"Expected `tolerance` to be >= 0, but got {tolerance}")
    adapted = adapted_labels() if adapted is None else adapted
    new = _metric_table(challenger, "challenger", allow_adaptive, adapted)
    if champion is None:
        return Decision(True, "no champion yet", tolerance)
    old = _metric_table(champion, "champion", allow_adaptive, adapted)
    if old.empty:
        reason = "no calibrator in common with the champion; promote by hand if intended"
        return Decision(False, reason, tolerance)
    rows = []
    for (dataset, calibrator), champ_value in old.items():
        value = new.get((dataset, calibrator))
        value = None if value is None or pd.isna(value) else float(value)
        ok = value is not None and value <= champ_value + tolerance
        rows.append(Comparison(str(dataset), str(calibrator), float(champ_value), value, ok))
    missing = [f"{r.dataset}/{r.calibrator}" for r in rows if r.challenger is None]
    worse = [
        f"{r.dataset}/{r.calibrator} {r.challenger:.4g} > {r.champion:.4g}"
        for r in rows
        if r.challenger is not None and not r.ok
    ]
    if missing:
        reason = f"challenger lacks {len(missing)} champion rows: {', '.join(missing)}"
        return Decision(False, reason, tolerance, rows)
    if worse:
        reason = (
            f"challenger is worse than champion + {tolerance:g} on {len(worse)} of {len(rows)} "
            f"rows: {', '.join(worse)}"
        )
        return Decision(False, reason, tolerance, rows)
    reason = f"challenger no worse than champion + {tolerance:g} on all {len(rows)} rows"
    return Decision(True, reason, tolerance, rows)

