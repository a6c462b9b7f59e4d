"""Champion/challenger registry: complete artifact sets, an atomic ``current`` and a history.

Layout of a registry folder ``DIR``::

    DIR/runs/<run id>/          a complete copy of one run's artifact set (see RUN_FILES) + run.json
    DIR/current -> runs/<id>    relative symlink, switched atomically (temp link + os.replace)
    DIR/history.jsonl           one JSON object per decision, with its numbers and reason
    DIR/history.torn            torn last lines of history.jsonl, set aside (see below)
    DIR/.lock                   held (fcntl.flock) by a refresh or a promotion
    DIR/.promotion.json         journal of a switch of ``current`` whose record is not written yet

A run folder appears under its final name only once the copy is complete (copied under a
temporary name, then renamed), so ``current`` can only ever point to a complete set.

Crash safety. Every writer holds :func:`lock`; taking it first repairs what a killed holder
(SIGKILL, power loss) left behind:

- A switch of ``current`` and its history record form one recoverable step: :func:`switch`
  writes the journal ``.promotion.json`` before it replaces the link and :func:`record` removes
  it once the record is on disk. A journal found at the next :func:`lock` means the holder died
  in between: the outcome (``current`` switched or not) is read off the link and recorded with
  ``"recovered": true``, so no champion is ever unrecorded.
- A torn last line of ``history.jsonl`` (a write cut short) is moved to ``history.torn`` with
  a warning before the next record, so that record starts on its own line; :func:`history`
  skips such a line with a warning, so ``segcal status`` keeps working meanwhile.
- Temporary copies and links (``runs/.<id>.tmp``, ``.current.<pid>.tmp``, ``.*.tmp`` files of
  atomic writes) are removed.

Decisions (:func:`compare`) use image-wise ECE (the mean over images of each image's ECE) from
the runs' ``summary.csv``: the challenger is promoted only if, on every dataset and calibrator the
champion was measured on, its image-wise ECE is no worse than the champion's plus a tolerance.
Rows that measure no shippable calibrator are left out: ``uncalibrated`` (the model), oracle
bounds (``oracle_ts``: a temperature fitted on each test set's own labels) and, unless the
refresh allows them, the target-adapted calibrators (``adaptive*``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.paths import (
    BEST,
    DOMAIN_SHIFT,
    LABEL_FREE,
    PER_IMAGE,
    REPORT_HTML,
    REPORT_MD,
    RESOLVED_CONFIG,
    SUMMARY,
    TIMINGS,
    atomic_write_json,
)

RUNS = "runs"
CURRENT = "current"
HISTORY = "history.jsonl"
TORN = "history.torn"
LOCK = ".lock"
JOURNAL = ".promotion.json"
RUN_META = "run.json"
ARTIFACTS = "artifacts"
# What a run's artifact set is: the fitted calibrators and every table/report describing them.
# Shards (logits) are the run's inputs, not its product, and stay in the run's output folder.
RUN_FILES = (
    SUMMARY, DOMAIN_SHIFT, BEST, LABEL_FREE, PER_IMAGE, REPORT_MD, REPORT_HTML, RESOLVED_CONFIG,
)
RUN_DIRS = (ARTIFACTS, "plots")
REQUIRED = (ARTIFACTS, SUMMARY)

# summary.csv columns the decision reads (written by pipeline.evaluate).
KEY_COLUMNS = ("dataset", "calibrator")
METRIC = "img_ece"
UNCALIBRATED = "uncalibrated"
ADAPTIVE_PREFIX = "adaptive"
"""Calibrators named ``adaptive*`` adapt to the unlabelled target domain: they count in a
decision, and can be the run's calibrator, only when the refresh is told to (``allow_adaptive``)."""
# Files of an artifact folder that describe the fit's execution, not its result (wall-clock
# timings): left out of `artifact_digest`, so identical calibrators are recognised.
VOLATILE_FILES = (TIMINGS,)

logger = logging.getLogger(__name__)


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


def is_bound(calibrator: str) -> bool:
    """Whether ``calibrator`` names a bound (``oracle_ts``: fitted on the test set's own labels)."""
    return "oracle" in calibrator.lower()


def is_adaptive(calibrator: str) -> bool:
    """Whether ``calibrator`` names a target-adapted calibrator (``adaptive*``)."""
    return calibrator.startswith(ADAPTIVE_PREFIX)


def is_candidate(calibrator: str, *, allow_adaptive: bool = False) -> bool:
    """Whether ``calibrator`` can count in a decision and be the run's calibrator.

    Never ``uncalibrated`` (the model itself) or a bound; an adaptive calibrator only when
    ``allow_adaptive``.

    Example:
        >>> [is_candidate(c) for c in ("temperature", "oracle_ts", "adaptive_ts", UNCALIBRATED)]
        [True, False, False, False]
        >>> is_candidate("adaptive_ts_gated", allow_adaptive=True)
        True
    """
    return (
        calibrator != UNCALIBRATED
        and not is_bound(calibrator)
        and (allow_adaptive or not is_adaptive(calibrator))
    )


def _metric_table(summary: pd.DataFrame, name: str, allow_adaptive: bool) -> pd.Series:
    missing = [c for c in (*KEY_COLUMNS, METRIC) if c not in summary.columns]
    if missing:
        raise ValueError(
            f"Expected the {name} summary to have columns {[*KEY_COLUMNS, METRIC]}, "
            f"but it lacks {missing}"
        )
    keep = summary["calibrator"].astype(str).map(
        lambda c: is_candidate(c, allow_adaptive=allow_adaptive)
    ).astype(bool)
    table = summary[keep]
    return table.set_index(list(KEY_COLUMNS))[METRIC].astype(float)


def compare(
    challenger: pd.DataFrame,
    champion: pd.DataFrame | None,
    *,
    tolerance: float,
    allow_adaptive: bool = False,
) -> Decision:
    """Decide whether the challenger replaces the champion.

    Every (dataset, calibrator) row of the champion's summary is compared, except those that
    measure no shippable calibrator (:func:`is_candidate`): ``uncalibrated`` (the model),
    oracle bounds (fitted on each test set's own labels, the same in both runs) and, unless
    ``allow_adaptive``, the target-adapted ``adaptive*`` calibrators. The challenger wins only
    if it has every such row and none is worse than ``champion + tolerance``. Rows only the
    challenger has (a new dataset or calibrator) cannot be compared and do not count; with no
    calibrated champion row at all nothing is established and the champion stays.

    Args:
        challenger: the new run's summary table (columns ``dataset``, ``calibrator``,
            ``img_ece``; one row per dataset x calibrator).
        champion: the current champion's summary, or None when there is no champion yet.
        tolerance: how much worse (absolute image-wise ECE) a row may be and still pass.
        allow_adaptive: count the ``adaptive*`` calibrators' rows too (default False).

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
    new = _metric_table(challenger, "challenger", allow_adaptive)
    if champion is None:
        return Decision(True, "no champion yet", tolerance)
    old = _metric_table(champion, "champion", allow_adaptive)
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
def lock(root: str | Path, *, timeout: float = 0.0) -> Iterator[Path]:
    """Hold the registry's lock for the duration of the block, after repairing crash leftovers.

    The lock is ``fcntl.flock`` on ``DIR/.lock``; the kernel releases it when its holder dies,
    so a killed refresh never leaves the registry locked. Once it is held, :func:`recover`
    runs (see the module docstring).

    Args:
        root: the registry folder (created when missing).
        timeout: seconds to wait for another holder to finish; 0 (the default) fails at once.

    Yields:
        The registry folder as a Path.

    Raises:
        RegistryError: another process still holds the lock after ``timeout`` seconds (the
            message names the lock file and its holder).
        ValueError: a negative ``timeout``.
    """
    if timeout < 0:
        raise ValueError(f"Expected `timeout` to be >= 0, but got {timeout}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    deadline = time.monotonic() + timeout
    with open(path, "a+") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "unknown holder"
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise RegistryError(
                        f"Registry {root} is locked by another refresh or promotion{waited}: "
                        f"lock file {path} is held by {holder}; try again when it has finished"
                    ) from None
                time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {_now()}\n")
        f.flush()
        try:
            recover(root)
            yield root
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def recover(root: str | Path) -> list[dict[str, Any]]:
    """Repair what a killed lock holder left behind (the caller holds :func:`lock`).

    Sets a torn last line of ``history.jsonl`` aside, records the outcome of an interrupted
    switch of ``current`` (from its journal) and removes temporary copies and links.

    Args:
        root: the registry folder.

    Returns:
        The history entries recorded for interrupted switches (empty when none).
    """
    root = Path(root)
    _repair_history(root)
    recovered = []
    journal = _read_journal(root)
    entry = None if journal is None else _record_interrupted(root, journal)
    if entry is not None:
        recovered.append(entry)
    for leftover in _leftovers(root):
        logger.warning("Registry %s: removing %s left by a killed run", root, leftover)
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return recovered


def _leftovers(root: Path) -> list[Path]:
    # Every writer holds the lock, so under it every temporary entry is a dead holder's. Only
    # the names this module makes (".<name>.tmp") are touched: a hidden folder someone moved
    # aside by hand is not a leftover.
    return sorted([*root.glob(".*.tmp"), *(root / RUNS).glob(".*.tmp")])


def _read_journal(root: Path) -> dict[str, Any] | None:
    path = root / JOURNAL
    try:
        journal = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        # Written atomically, so unreadable only if tampered with: the link itself is the truth.
        journal = {}
    return journal if isinstance(journal, dict) else {}


def _link_target(root: Path) -> str | None:
    # The run id ``current`` names, without checking that the run is complete.
    link = root / CURRENT
    if not link.is_symlink():
        return None
    parts = Path(os.readlink(link)).parts
    return parts[1] if len(parts) == 2 and parts[0] == RUNS else None


def _record_interrupted(root: Path, journal: dict[str, Any]) -> dict[str, Any] | None:
    run_id = journal.get("run_id")
    previous = journal.get("previous")
    now = _link_target(root)
    try:
        done = history(root, last=1)
    except RegistryError:  # a corrupt line is reported by `segcal status`; recover anyway
        done = []
    if (
        done
        and done[0].get("current") == now
        and str(done[0].get("time", "")) >= str(journal.get("time", ""))
    ):
        # Killed after the record was written, before the journal was removed.
        (root / JOURNAL).unlink(missing_ok=True)
        return None
    planned = journal.get("entry")
    entry = {
        "action": "switch",
        "champion": previous,
        "challenger": run_id,
        **(planned if isinstance(planned, dict) else {}),
        "current": now,
        "recovered": True,
    }
    if run_id is not None and now == run_id:
        entry["decision"] = "promoted"
        reason = (
            f"recovered after a crash: `current` had been switched to {run_id} "
            f"(pid {journal.get('pid')}, {journal.get('time')}) but the decision was not recorded"
        )
    else:
        entry["decision"] = "failed"
        reason = (
            f"recovered after a crash: the switch of `current` to {run_id} "
            f"(pid {journal.get('pid')}, {journal.get('time')}) did not happen; current is {now}"
        )
    entry["reason"] = f"{reason} ({entry['reason']})" if entry.get("reason") else reason
    if entry["decision"] == "failed":
        entry.pop("comparisons", None)  # numbers of a decision that did not take effect
    logger.warning("Registry %s: %s", root, reason)
    return record(root, entry)


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


def switch(root: str | Path, run_id: str, *, entry: dict[str, Any] | None = None) -> None:
    """Point ``current`` at run ``run_id`` atomically (the caller holds :func:`lock`).

    The switch is journalled first (``.promotion.json``); the next :func:`record` completes
    it. If the process dies in between, the next :func:`lock` records the outcome.

    Args:
        root: the registry folder.
        run_id: the run to promote.
        entry: the history entry the caller is about to record, kept in the journal so that a
            recovery records the same facts (see :func:`promote`).

    Raises:
        RegistryError: the run does not exist or is incomplete; ``current`` is left unchanged.
    """
    root = Path(root)
    run_dir(root, run_id)
    journal = {
        "run_id": run_id,
        "previous": _link_target(root),
        "entry": entry or {},
        "pid": os.getpid(),
        "time": _now(),
    }
    atomic_write_json(root / JOURNAL, journal)
    _fsync_dir(root)  # the journal is on disk before the link can change
    tmp = root / f".{CURRENT}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        # A relative target keeps the registry valid when the whole folder is moved or mounted.
        os.symlink(f"{RUNS}/{run_id}", tmp)
        os.replace(tmp, root / CURRENT)
    except Exception:
        # Nothing switched: drop the journal (a crash, not an exception, leaves it for recovery).
        tmp.unlink(missing_ok=True)
        (root / JOURNAL).unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def promote(root: str | Path, run_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Switch ``current`` to ``run_id`` and record ``entry``, as one recoverable step.

    The caller holds :func:`lock`. A crash between the switch and the record is recorded by
    the next :func:`lock` with this same entry (and ``"recovered": true``).

    Args:
        root: the registry folder.
        run_id: the run to promote.
        entry: the history entry (``action``, ``decision``, ``reason``, ...); ``current`` is
            set, ``champion`` (the previous ``current``) and ``challenger`` default.

    Returns:
        The entry as written.

    Raises:
        RegistryError: the run does not exist or is incomplete; nothing is changed or recorded.
    """
    entry = {"champion": _link_target(Path(root)), "challenger": run_id, **entry, "current": run_id}
    switch(root, run_id, entry=entry)
    return record(root, entry)


def artifact_digest(output: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under ``output/artifacts``.

    Two runs with the same digest ship byte-identical calibrators. Files that record how the
    fit ran rather than what it produced (:data:`VOLATILE_FILES`: wall-clock timings) are left
    out, so refitting the same data with the same options gives the same digest.
    """
    base = Path(output) / ARTIFACTS
    h = hashlib.sha256()
    files = (p for p in base.rglob("*") if p.is_file() and p.name not in VOLATILE_FILES)
    for path in sorted(files):
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

    A torn last line is set aside first (see the module docstring), so the entry always starts
    on its own line. Recording completes a journalled :func:`switch`: the journal is removed,
    and ``current`` is added to the entry when the caller did not set it.

    Returns:
        The entry as written.
    """
    root = Path(root)
    _repair_history(root)
    entry = {"time": _now(), **entry}
    journal = root / JOURNAL
    if journal.exists() and "current" not in entry:
        entry["current"] = _link_target(root)
    path = root / HISTORY
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if journal.exists():
        journal.unlink()
        _fsync_dir(root)
    return entry


def _repair_history(root: Path) -> None:
    # A record is one write of a line ending in "\n"; a last line without it was cut short.
    path = root / HISTORY
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        cut = content.rfind(b"\n") + 1
        tail = content[cut:]
        if _parses(tail):
            # The whole line made it; only its newline did not.
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            with open(root / TORN, "ab") as aside:
                aside.write(tail + b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            f.truncate(cut)
            logger.warning(
                "Registry %s: the last line of %s was torn by a crash (%d bytes); moved it to %s",
                root, HISTORY, len(tail), root / TORN,
            )
        f.flush()
        os.fsync(f.fileno())


def _parses(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def history(root: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """The recorded decisions, oldest first (only the ``last`` ones when given).

    A torn last line (no newline, not JSON: a write cut short by a crash) is skipped with a
    warning; the next :func:`record` moves it to ``history.torn``.

    Raises:
        RegistryError: a complete line of ``history.jsonl`` is not a JSON object.
    """
    path = Path(root) / HISTORY
    if not path.is_file():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline
    entries = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            raise RegistryError(
                f"Expected a JSON object on line {i} of {path}, but got {line!r}; move the line "
                f"to {path.parent / TORN} to keep it"
            )
        entries.append(entry)
    if torn.strip():
        if _parses(torn.encode()):
            entries.append(json.loads(torn))
        else:
            logger.warning(
                "Registry %s: skipping the torn last line of %s (%d bytes, cut short by a "
                "crash); the next record moves it to %s",
                path.parent, HISTORY, len(torn), path.parent / TORN,
            )
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
