"""Changing the registry under its lock: crash recovery, the atomic switch of ``current``, new runs.

Every writer holds :func:`lock`; taking it first repairs what a killed holder (SIGKILL, power
loss) left behind (:func:`recover`):

- A switch of ``current`` and its history record form one recoverable step: :func:`switch`
  writes the journal ``.promotion.json`` before it replaces the link and
  :func:`~pipeline.registry_history.record` removes it once the record is on disk. A journal
  found at the next :func:`lock` means the holder died in between: the outcome (``current``
  switched or not) is read off the link and recorded with ``"recovered": true``, so no champion
  is ever unrecorded.
- A torn last line of ``history.jsonl`` (a write cut short) is moved to ``history.torn``
  (see :mod:`pipeline.registry_history`).
- Temporary copies and links (``runs/.<id>.tmp``, ``.current.<pid>.tmp``, ``.*.tmp`` files of
  atomic writes) are removed.

:func:`add_run` copies a finished run's artifact set in under a temporary name and renames it
into place, so a run folder is complete whenever it exists (layout:
:mod:`pipeline.registry_layout`). The public names are re-exported by :mod:`pipeline.registry`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.paths import atomic_write_json
from pipeline.registry_history import _repair_history, history, record
from pipeline.registry_layout import (
    CURRENT,
    JOURNAL,
    LOCK,
    REQUIRED,
    RUN_DIRS,
    RUN_FILES,
    RUN_META,
    RUNS,
    RegistryError,
    _fsync_dir,
    _link_target,
    _now,
    artifact_digest,
    run_dir,
)

# Named after the public module, so log filters and handlers set up for the registry still apply.
logger = logging.getLogger("pipeline.registry")


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

