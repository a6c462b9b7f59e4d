"""The registry folder: its layout, the runs in it and ``current``, read without the lock.

Layout of a registry folder ``DIR``::

    DIR/runs/<run id>/          a complete copy of one run's artifact set (see RUN_FILES) + run.json
    DIR/current -> runs/<id>    relative symlink, switched atomically (temp link + os.replace)
    DIR/history.jsonl           one JSON object per decision, with its numbers and reason
    DIR/history.torn            torn last lines of history.jsonl, set aside
    DIR/.lock                   held (fcntl.flock) by a refresh or a promotion
    DIR/.promotion.json         journal of a switch of ``current`` whose record is not written yet

A run folder appears under its final name only once the copy is complete (copied under a
temporary name, then renamed), so ``current`` can only ever point to a complete set.

This module names every entry of that layout and reads it: :func:`run_dir`, :func:`list_runs`,
:func:`current`, :func:`find_run`, :func:`run_meta`, :func:`read_summary` and
:func:`artifact_digest` (what identifies a run's calibrators). What changes the folder lives in
:mod:`pipeline.registry_store` (the lock, crash recovery, the switch of ``current``, adding
runs) and :mod:`pipeline.registry_history` (``history.jsonl``); :mod:`pipeline.registry`
re-exports the public names of all three.
"""

from __future__ import annotations

import hashlib
import json
import os
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
# Files of an artifact folder that describe the fit's execution, not its result (wall-clock
# timings): left out of `artifact_digest`, so identical calibrators are recognised.
VOLATILE_FILES = (TIMINGS,)


class RegistryError(RuntimeError):
    """The registry cannot be used as asked: locked, broken ``current``, unknown or partial run."""


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


def _link_target(root: Path) -> str | None:
    # The run id ``current`` names, without checking that the run is complete.
    link = root / CURRENT
    if not link.is_symlink():
        return None
    parts = Path(os.readlink(link)).parts
    return parts[1] if len(parts) == 2 and parts[0] == RUNS else None



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



def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    # Makes a rename or new link durable, not only atomic, across a crash.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
