"""Run-directory layout and atomic writes.

Everything a run writes lives under its ``output`` folder::

    OUTPUT/config.resolved.yaml
    OUTPUT/shards/<fp12>/<dataset>/part-00000.parquet, manifest.json
    OUTPUT/artifacts/<calibrator label>/model.safetensors, calibrator.json
    OUTPUT/artifacts/oracle_ts/<test dataset>/model.safetensors, calibrator.json
    OUTPUT/per_image.parquet, label_free.csv, domain_shift.csv, best.csv, summary.csv
    OUTPUT/report.md, report.html, error.log (a failed command's traceback)
    OUTPUT/plots/*.png

``config.resolved.yaml`` is written by :func:`pipeline.config.write_resolved_config`.

Writes go to a temporary name in the same folder and are renamed into place, so a killed run
never leaves a half-written file under a final name. Stages that write several files at once
build them in a hidden scratch folder (:func:`scratch_dir`) and move them into place at the end.
Files and folders are created with the process umask (0644 and 0755 under umask 022), like
``open()`` and ``mkdir``; :mod:`tempfile` would make them 0600 and 0700, unreadable to a serving
process or a colleague.

Names from the config that become file or folder names (dataset names, calibrator labels) are
checked by :func:`child`: one path component, never ``.`` or ``..``, resolving inside its parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The artifact folder (and summary.csv label) of the per-test-set oracle temperatures.
ORACLE = "oracle_ts"

# The names of the files a run writes, in one place (every stage imports them from here).
RESOLVED_CONFIG = "config.resolved.yaml"  # OUTPUT/: the config as the run read it
PER_IMAGE = "per_image.parquet"  # OUTPUT/: one row per image and calibrator
SUMMARY = "summary.csv"  # OUTPUT/: written last by evaluate, it marks a finished evaluation
DOMAIN_SHIFT = "domain_shift.csv"
BEST = "best.csv"
LABEL_FREE = "label_free.csv"  # OUTPUT/: drift and label-free estimates
CHAMPION_EVAL = "champion_eval"  # OUTPUT/: refresh re-evaluates the champion's calibrators here
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
ERROR_LOG = "error.log"  # OUTPUT/: the traceback of a failed command
CARD = "calibrator.json"  # OUTPUT/artifacts/<label>/: the artifact's card
TIMINGS = "timings.json"  # OUTPUT/artifacts/<label>/: fit timings, apart from the card


@dataclass(frozen=True)
class RunPaths:
    """Where a run's files go.

    Args:
        output: the run directory.
        model_fingerprint: the model's fingerprint; shards of another model go elsewhere.

    Example:
        >>> p = RunPaths(Path("/runs/a"), "0123456789abcdef")
        >>> str(p.dataset_dir("camvid-val"))
        '/runs/a/shards/0123456789ab/camvid-val'
    """

    output: Path
    model_fingerprint: str
    store: str | None = None

    @classmethod
    def for_run(cls, cfg: Any, fingerprint: str) -> RunPaths:
        """The paths of the run ``cfg`` (a ``JobConfig``) for the model with ``fingerprint``.

        When ``cfg.output`` is a URI the CLI runs in a local mirror and keeps the URI in
        ``cfg.store``: shards are then read and written there (see :mod:`pipeline.storage`).

        Raises:
            ValueError: ``cfg.output`` is a URI not turned into a mirror
                (`pipeline.storage.mirrored`).
        """
        from pipeline.storage import check_local

        check_local(cfg)
        return cls(Path(cfg.output), fingerprint, getattr(cfg, "store", None))

    @property
    def shards_root(self) -> Any:
        """Folder holding one sub-folder per dataset for this model.

        A :class:`~pathlib.Path`, or a ``upath.UPath`` at the run's URI (:attr:`store`).
        """
        from pipeline.storage import location

        base = location(self.store) if self.store else self.output
        return base / "shards" / self.model_fingerprint[:12]

    @property
    def artifacts(self) -> Path:
        """Folder holding one sub-folder per fitted calibrator."""
        return self.output / "artifacts"

    @property
    def plots(self) -> Path:
        """Folder holding the report's PNG figures."""
        return self.output / "plots"

    def dataset_dir(self, name: str) -> Any:
        """Shard folder of dataset ``name``.

        Raises:
            ValueError: ``name`` is not a single folder name inside :attr:`shards_root`.
        """
        return child(self.shards_root, name, what="dataset name")

    def artifact_dir(self, label: str) -> Path:
        """Artifact folder of the calibrator labelled ``label``.

        Raises:
            ValueError: ``label`` is not a single folder name inside :attr:`artifacts`.
        """
        return child(self.artifacts, label, what="calibrator label")

    def oracle_dir(self, dataset: str) -> Path:
        """Artifact folder of the oracle temperature of test set ``dataset``.

        ``OUTPUT/artifacts/oracle_ts/<dataset>``: a temperature fitted on that set's own
        labels, a bound that is evaluated on that set only (see `pipeline.fit`).

        Raises:
            ValueError: ``dataset`` is not a single folder name.
        """
        return child(self.artifacts / ORACLE, dataset, what="dataset name")


def child(parent: str | Path, name: str, *, what: str = "name") -> Path:
    """``parent / name``, checked to be a direct child of ``parent``.

    Args:
        parent: the folder.
        name: one path component, e.g. a dataset name from the config.
        what: what ``name`` is, for the error message.

    Returns:
        ``parent / name`` (not resolved).

    Raises:
        ValueError: ``name`` is empty, ``.``, ``..``, holds a separator or NUL, or the result
            (symbolic links followed) resolves outside ``parent``.

    Example:
        >>> str(child(Path("/runs/a/artifacts"), "ts"))
        '/runs/a/artifacts/ts'
        >>> child(Path("/runs/a/artifacts"), "..", what="label")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected label to be one folder name inside /runs/a/artifacts, but got '..'
    """
    if not hasattr(parent, "fs"):  # a upath.UPath at a URI stays one (no symlinks there)
        parent = Path(parent)
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or (os.altsep is not None and os.altsep in name)
        or os.sep in name
        or "\0" in name
    )
    path = parent / name if not bad else parent
    if bad or (isinstance(parent, Path) and path.resolve().parent != parent.resolve()):
        raise ValueError(
            f"Expected {what} to be one folder name inside {parent}, but got {name!r}"
        )
    return path


def create_temp_file(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """Create and open a new file ``folder/<prefix><random><suffix>``, mode 0666 minus umask.

    Like :func:`tempfile.mkstemp` (O_EXCL, a fresh name on collision) but not 0600.
    """
    for _ in range(100):
        name = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"No free temporary name {prefix}*{suffix} in {folder}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename).

    The file ends with the permissions a plain ``open(path, "wb")`` would give (0666 minus the
    umask), whatever the old file had.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp_file(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def scratch_dir(parent: str | Path, stage: str) -> Path:
    """A new hidden folder in ``parent`` where ``stage`` builds its files before moving them.

    Named ``.<stage>-<host>-<pid>-<random>``. Folders of the same stage that a killed process
    on this host left behind (its pid no longer runs) are removed first, so a run killed with
    SIGKILL leaves nothing after the next one; folders of live processes or of other hosts
    (shared storage) are left alone.

    Args:
        parent: the folder to create it in (it must exist).
        stage: a short name, e.g. ``"evaluate"``.

    Returns:
        The new, empty folder (mode 0777 minus the umask, like ``mkdir``; so folders moved out
        of it into place are readable as the umask says); the caller removes it when done.
    """
    parent = Path(parent)
    prefix = f".{stage}-{socket.gethostname().replace('-', '_')}-"
    for old in parent.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if old.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return make_temp_dir(parent, prefix=f"{prefix}{os.getpid()}-")


def make_temp_dir(parent: str | Path, *, prefix: str = "", suffix: str = "") -> Path:
    """A new folder ``parent/<prefix><random><suffix>``, mode 0777 minus the umask.

    Use it instead of :func:`tempfile.mkdtemp` (mode 0700) for a folder that is later renamed
    into place, so that it ends as readable as a plain ``mkdir`` would make it.

    Args:
        parent: the folder to create it in (it must exist).
        prefix: the start of the name.
        suffix: the end of the name.

    Returns:
        The new, empty folder.
    """
    for _ in range(100):
        path = Path(parent) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"No free folder name {prefix}*{suffix} in {parent}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


OUTPUT_LOCK = ".segcal.lock"


class OutputLockedError(RuntimeError):
    """Another segcal process is writing the same output folder."""


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[Path]:
    """Hold ``OUTPUT/.segcal.lock`` while stages write the folder; fail at once if taken.

    ``fcntl.flock``: the kernel releases it when its holder dies, so a killed run never
    leaves the folder locked.

    Raises:
        OutputLockedError: another process holds it (the message names the file and holder).
    """
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / OUTPUT_LOCK
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OutputLockedError(
                f"Expected output folder {folder} to be free, but {holder} is writing it "
                f"(lock file {path}); wait for that run to finish or use another `output`"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield path
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
