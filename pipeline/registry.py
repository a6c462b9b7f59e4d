"""Champion/challenger registry: complete artifact sets, an atomic ``current`` and a history.

Layout of a registry folder ``DIR``::

    DIR/runs/<run id>/          a complete copy of one run's artifact set (see RUN_FILES) + run.json
    DIR/current -> runs/<id>    relative symlink, switched atomically (temp link + os.replace)
    DIR/history.jsonl           one JSON object per decision, with its numbers and reason
    DIR/.lock                   held (fcntl.flock, non-blocking) by a refresh or a promotion

A run folder appears under its final name only once the copy is complete (copied under a
temporary name, then renamed), so ``current`` can only ever point to a complete set.

Decisions (:func:`compare`) use image-wise ECE (the mean over images of each image's ECE) from
the runs' ``summary.csv``: the challenger is promoted only if, on every dataset and calibrator the
champion was measured on, its image-wise ECE is no worse than the champion's plus a tolerance.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.paths import atomic_write_json

RUNS = "runs"
CURRENT = "current"
HISTORY = "history.jsonl"
LOCK = ".lock"
RUN_META = "run.json"
SUMMARY = "summary.csv"
ARTIFACTS = "artifacts"
# What a run's artifact set is: the fitted calibrators and every table/report describing them.
# Shards (logits) are the run's inputs, not its product, and stay in the run's output folder.
RUN_FILES = (
    SUMMARY,
    "domain_shift.csv",
    "best.csv",
    "per_image.parquet",
    "report.md",
    "report.html",
    "config.resolved.yaml",
)
RUN_DIRS = (ARTIFACTS, "plots")
REQUIRED = (ARTIFACTS, SUMMARY)

# summary.csv columns the decision reads (written by pipeline.evaluate).
KEY_COLUMNS = ("dataset", "calibrator")
METRIC = "img_ece"
UNCALIBRATED = "uncalibrated"


class RegistryError(RuntimeError):
    """The registry cannot be used as asked: locked, broken ``current``, unknown or partial run."""


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


def _metric_table(summary: pd.DataFrame, name: str) -> pd.Series:
    missing = [c for c in (*KEY_COLUMNS, METRIC) if c not in summary.columns]
    if missing:
        raise ValueError(
            f"Expected the {name} summary to have columns {[*KEY_COLUMNS, METRIC]}, "
            f"but it lacks {missing}"
        )
    table = summary[summary["calibrator"] != UNCALIBRATED]
    return table.set_index(list(KEY_COLUMNS))[METRIC].astype(float)


def compare(
    challenger: pd.DataFrame, champion: pd.DataFrame | None, *, tolerance: float
) -> Decision:
    """Decide whether the challenger replaces the champion.

    Every (dataset, calibrator) row of the champion's summary is compared; the ``uncalibrated``
    rows are skipped (they measure the model, not the calibrators). The challenger wins only if
    it has every such row and none is worse than ``champion + tolerance``. Rows only the
    challenger has (a new dataset or calibrator) cannot be compared and do not count; with no
    calibrated champion row at all nothing is established and the champion stays.

    Args:
        challenger: the new run's summary table (columns ``dataset``, ``calibrator``,
            ``img_ece``; one row per dataset x calibrator).
        champion: the current champion's summary, or None when there is no champion yet.
        tolerance: how much worse (absolute image-wise ECE) a row may be and still pass.

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
    new = _metric_table(challenger, "challenger")
    if champion is None:
        return Decision(True, "no champion yet", tolerance)
    old = _metric_table(champion, "champion")
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


# --- registry folder ---------------------------------------------------------------------------


@contextmanager
def lock(root: str | Path) -> Iterator[Path]:
    """Hold the registry's lock for the duration of the block (non-blocking).

    Args:
        root: the registry folder (created when missing).

    Yields:
        The registry folder as a Path.

    Raises:
        RegistryError: another process holds the lock.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RegistryError(
                f"Registry {root} is locked by another refresh or promotion ({holder}); "
                f"try again when it has finished"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {_now()}\n")
        f.flush()
        try:
            yield root
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def run_dir(root: str | Path, run_id: str) -> Path:
    """The folder of run ``run_id``, checked to hold a complete artifact set.

    Raises:
        RegistryError: no such run, or the run lacks ``artifacts/`` or ``summary.csv``.
    """
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise RegistryError(f"Expected `run_id` to be a run folder name, but got {run_id!r}")
    path = Path(root) / RUNS / run_id
    if not path.is_dir():
        known = ", ".join(list_runs(root)) or "none"
        raise RegistryError(f"Registry {root} has no run {run_id!r} (runs: {known})")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise RegistryError(f"Run {path} is incomplete: missing {', '.join(missing)}")
    return path


def list_runs(root: str | Path) -> list[str]:
    """Run ids in the registry, oldest first (ids start with a UTC timestamp)."""
    runs = Path(root) / RUNS
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))


def current(root: str | Path) -> str | None:
    """The champion's run id, or None when nothing has been promoted yet.

    Raises:
        RegistryError: ``current`` exists but is not a symlink to a complete run in ``runs/``.
    """
    link = Path(root) / CURRENT
    if not link.is_symlink():
        if link.exists():
            raise RegistryError(f"Expected {link} to be a symlink to runs/<id>, but it is not")
        return None
    target = os.readlink(link)
    parts = Path(target).parts
    if len(parts) != 2 or parts[0] != RUNS:
        raise RegistryError(f"Expected {link} to point to runs/<id>, but it points to {target}")
    try:
        run_dir(root, parts[1])
    except RegistryError as err:
        raise RegistryError(f"{link} is broken: {err}") from None
    return parts[1]


def switch(root: str | Path, run_id: str) -> None:
    """Point ``current`` at run ``run_id`` atomically (the caller holds :func:`lock`).

    Raises:
        RegistryError: the run does not exist or is incomplete; ``current`` is left unchanged.
    """
    root = Path(root)
    run_dir(root, run_id)
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    # A relative target keeps the registry valid when the whole folder is moved or mounted.
    os.symlink(f"{RUNS}/{run_id}", tmp)
    os.replace(tmp, root / CURRENT)
    _fsync_dir(root)


def artifact_digest(output: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``output/artifacts``.

    Two runs with the same digest ship byte-identical calibrators.
    """
    base = Path(output) / ARTIFACTS
    h = hashlib.sha256()
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        h.update(path.relative_to(base).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def add_run(root: str | Path, output: str | Path, meta: dict[str, Any]) -> str:
    """Copy a finished run's artifact set into the registry (the caller holds :func:`lock`).

    Args:
        root: the registry folder.
        output: the run's output folder (must hold ``artifacts/`` and ``summary.csv``).
        meta: JSON-able facts to keep beside the copy in ``run.json`` (config hash, ...);
            ``artifact_digest`` and ``created`` are added.

    Returns:
        The new run id, ``<UTC timestamp>-<digest[:8]>``.

    Raises:
        RegistryError: ``output`` lacks part of the artifact set.
    """
    root, output = Path(root), Path(output)
    missing = [name for name in REQUIRED if not (output / name).exists()]
    if missing:
        raise RegistryError(f"Run output {output} is incomplete: missing {', '.join(missing)}")
    digest = artifact_digest(output)
    created = _now()
    run_id = f"{created.replace('-', '').replace(':', '')}-{digest[:8]}"
    final = root / RUNS / run_id
    if final.exists():
        raise RegistryError(f"Registry run {final} already exists")
    tmp = root / RUNS / f".{run_id}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in RUN_DIRS:
            if (output / name).is_dir():
                shutil.copytree(output / name, tmp / name)
        for name in RUN_FILES:
            if (output / name).is_file():
                shutil.copy2(output / name, tmp / name)
        atomic_write_json(
            tmp / RUN_META,
            {**meta, "artifact_digest": digest, "created": created, "source": str(output)},
        )
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return run_id


def find_run(root: str | Path, digest: str) -> str | None:
    """The newest run whose artifacts have ``digest`` (see :func:`artifact_digest`), if any."""
    for run_id in reversed(list_runs(root)):
        meta = Path(root) / RUNS / run_id / RUN_META
        if meta.is_file() and json.loads(meta.read_text()).get("artifact_digest") == digest:
            return run_id
    return None


def run_meta(root: str | Path, run_id: str) -> dict[str, Any]:
    """The ``run.json`` of a registry run."""
    return json.loads((run_dir(root, run_id) / RUN_META).read_text())


def read_summary(root: str | Path, run_id: str) -> pd.DataFrame:
    """The ``summary.csv`` of a registry run."""
    return pd.read_csv(run_dir(root, run_id) / SUMMARY)


def record(root: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one decision to ``history.jsonl`` (with a ``time`` field) and fsync it.

    Returns:
        The entry as written.
    """
    entry = {"time": _now(), **entry}
    path = Path(root) / HISTORY
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def history(root: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """The recorded decisions, oldest first (only the ``last`` ones when given).

    Raises:
        RegistryError: a line of ``history.jsonl`` is not JSON.
    """
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    entries = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise RegistryError(f"Expected JSON on line {i} of {path}, but got {line!r}") from None
    return entries[-last:] if last else entries


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    # Makes a rename or new link durable, not only atomic, across a crash.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
