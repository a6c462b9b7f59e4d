"""Run-directory layout and atomic writes.

Everything a run writes lives under its ``output`` folder::

    OUTPUT/config.resolved.yaml
    OUTPUT/shards/<fp12>/<dataset>/part-00000.parquet, manifest.json
    OUTPUT/artifacts/<calibrator label>/model.safetensors, calibrator.json
    OUTPUT/per_image.parquet, summary.csv, domain_shift.csv, best.csv, report.md, report.html
    OUTPUT/plots/*.png

Writes go to a temporary name in the same folder and are renamed into place, so a killed run
never leaves a half-written file under a final name. Stages that write several files at once
build them in a hidden scratch folder (:func:`scratch_dir`) and move them into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    @property
    def shards_root(self) -> Path:
        """Folder holding one sub-folder per dataset for this model."""
        return self.output / "shards" / self.model_fingerprint[:12]

    @property
    def artifacts(self) -> Path:
        """Folder holding one sub-folder per fitted calibrator."""
        return self.output / "artifacts"

    @property
    def plots(self) -> Path:
        """Folder holding the report's PNG figures."""
        return self.output / "plots"

    def dataset_dir(self, name: str) -> Path:
        """Shard folder of dataset ``name``."""
        return self.shards_root / name

    def artifact_dir(self, label: str) -> Path:
        """Artifact folder of the calibrator labelled ``label``."""
        return self.artifacts / label


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        The new, empty folder; the caller removes it when done.
    """
    parent = Path(parent)
    prefix = f".{stage}-{socket.gethostname().replace('-', '_')}-"
    for old in parent.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if old.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
