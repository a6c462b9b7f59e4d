"""The registry's history: ``history.jsonl``, one JSON object per decision, and torn lines.

:func:`record` appends one decision as a single line ending in a newline, fsynced. A last line
without its newline was cut short (SIGKILL, power loss mid-write): the next :func:`record` first
moves such a torn line to ``history.torn`` with a warning (or, when the line is complete JSON and
only its newline is missing, adds the newline), so that every record starts on its own line;
:func:`history` meanwhile skips a torn last line with a warning, so ``segcal status`` keeps
working. Recording also completes a journalled switch of ``current``
(:func:`pipeline.registry_store.switch`): the journal is removed once the record is on disk.

The public names are re-exported by :mod:`pipeline.registry`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.registry_layout import (
    HISTORY,
    JOURNAL,
    TORN,
    RegistryError,
    _fsync_dir,
    _link_target,
    _now,
)

# Named after the public module, so log filters and handlers set up for the registry still apply.
logger = logging.getLogger("pipeline.registry")


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

