"""What a submission uploads: the allow-list of project files, staged as the job's ``working_dir``.

:func:`package_files` chooses the files: the ``pipeline`` package and ``jobs/``
(:data:`PACKAGE_TREES`, less caches and stray files over :data:`TREE_FILE_MAX_BYTES`),
``pyproject.toml``, the config and the files it names (:func:`named_paths`) when they lie inside
the project. Nothing else is uploaded: no dotfile or dot-folder (``.env``, ``.ray/auth_token``,
``.aws/credentials``, ``.git``, ``.venv``), nothing under ``secrets/`` or that looks like a key
or credential (:data:`SECRET_PATTERNS`, :func:`refused`), no data, runs or outputs; a link that
leads outside the project or to a refused path is left out too, and every named input left out
is logged as a warning. :func:`staged_package` copies the chosen files into a temporary folder,
which Ray zips and uploads when the job is submitted (:func:`pipeline.submit.submit`).

Only the filesystem is read here: no Ray, no network.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import JobConfig

# The warnings of a submission, what it leaves out included, keep the one logger name.
logger = logging.getLogger("pipeline.submit")

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Folders uploaded whole (less what SKIP_* and SECRET_PATTERNS leave out) and single files.
PACKAGE_TREES = ("pipeline", "jobs")
PACKAGE_FILES = ("pyproject.toml",)
# Never uploaded, wherever they are, even when the config names them: any name starting with
# "." (.env, .ray/, .aws/, .ssh/, .git/, .venv/), and names that hold keys or credentials.
SECRET_PATTERNS = (
    ".*",
    "secrets",
    "secret",
    "*credentials*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*.token",
    "auth_token",
    "*.kdbx",
)
# Left out of the package trees: caches, build and run outputs.
SKIP_NAMES = ("__pycache__", "*.pyc", "*.pyo", "*.nbi", "*.nbc", "*.egg-info", "runs", "outputs")
# A file in a package tree above this is a stray data file, not code: left out with a warning.
TREE_FILE_MAX_BYTES = 2 * 1024 * 1024
# A file the config names (model weights, a manifest) above this is not uploaded: large inputs
# belong on storage the cluster reads (Ray refuses packages over 500 MiB anyway).
NAMED_FILE_MAX_BYTES = 100 * 1024 * 1024


def refused(rel: str | PurePosixPath) -> str | None:
    """Why the project path ``rel`` (relative, POSIX) is never uploaded, or None.

    Example:
        >>> refused(".ray/auth_token")
        "'.ray' matches '.*'"
        >>> refused("pipeline/cli.py") is None
        True
    """
    for part in PurePosixPath(rel).parts:
        for pattern in SECRET_PATTERNS:
            if fnmatch.fnmatch(part.lower(), pattern):
                return f"{part!r} matches {pattern!r}"
    return None


def _inside(path: Path, root: Path) -> PurePosixPath | None:
    """``path`` relative to ``root``, its links resolved, or None when it lies outside."""
    real = path.resolve()
    return PurePosixPath(real.relative_to(root).as_posix()) if real.is_relative_to(root) else None


def _tree_files(root: Path, tree: str) -> Iterator[PurePosixPath]:
    top = root / tree
    if top.is_symlink():
        logger.warning("Not uploading %s: a link (the package must lie in the project)", tree)
        return
    if not top.is_dir():
        return
    for folder, dirs, files in os.walk(top):  # links to folders are not followed
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in SKIP_NAMES))
        for name in sorted(files):
            if not any(fnmatch.fnmatch(name, p) for p in SKIP_NAMES):
                yield PurePosixPath((Path(folder) / name).relative_to(root).as_posix())


def _python_module_files(path: str, root: Path) -> list[Path]:
    """The project files of a ``package.module:factory`` model path (and its packages)."""
    parts = path.split(":", 1)[0].split(".")
    found = []
    for i in range(1, len(parts)):
        init = root.joinpath(*parts[:i], "__init__.py")
        if init.is_file():
            found.append(init)
    module = root.joinpath(*parts)
    if module.with_suffix(".py").is_file():
        found.append(module.with_suffix(".py"))
    elif module.is_dir():
        found.extend(sorted(module.rglob("*.py")))
    return found


def named_paths(cfg: JobConfig, root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """The inputs a config names, by key: model weights or module, dataset folders, manifests.

    Outputs (``output``, ``refresh.registry``) are written on the cluster, never uploaded.
    """
    named: dict[str, Path] = {}
    if cfg.model.kind == "python":
        for i, file in enumerate(_python_module_files(cfg.model.path, root)):
            named[f"model.path[{i}]"] = file
    elif "://" not in cfg.model.path:
        named["model.path"] = Path(cfg.model.path)
    for i, ds in enumerate(cfg.datasets):
        for key in ("images", "labels", "manifest"):
            value = getattr(ds, key)
            if value and "://" not in value:
                named[f"datasets.{i}.{key}"] = Path(value)
    return named


def package_files(
    config: str | Path | None = None,
    named: Mapping[str, Path] | None = None,
    root: Path = PROJECT_ROOT,
) -> list[PurePosixPath]:
    """The project files a submission uploads, relative to ``root``, sorted.

    The allow-list: every file of :data:`PACKAGE_TREES` (less caches, and files over
    :data:`TREE_FILE_MAX_BYTES`), :data:`PACKAGE_FILES`, the config when it lies inside
    ``root``, and each file in ``named`` that lies inside ``root`` (up to
    :data:`NAMED_FILE_MAX_BYTES`). A path that :func:`refused` names, or a link that leads
    outside ``root`` or to a refused path, is never uploaded. A named folder inside ``root``
    (a dataset) is not uploaded: the job must read it from storage the cluster sees; each
    named input left out is logged as a warning.

    Args:
        config: the run config.
        named: the config's inputs by key (see :func:`named_paths`).
        root: the project folder.
    """
    root = root.resolve()
    chosen: set[PurePosixPath] = set()

    def add(path: Path, why: str, limit: int) -> None:
        rel = _inside(path, root)
        own = PurePosixPath(Path(os.path.abspath(path)).relative_to(root).as_posix())
        reason = refused(own) or (refused(rel) if rel is not None else "it links outside")
        if reason or rel is None:
            logger.warning("Not uploading %s (%s): %s", own, why, reason)
        elif not path.is_file():
            logger.warning(
                "Not uploading %s (%s): not a file; the job must find it on storage the "
                "cluster sees",
                own,
                why,
            )
        elif path.stat().st_size > limit:
            logger.warning(
                "Not uploading %s (%s): %d bytes, over the %d-byte limit; put it on storage "
                "the cluster sees",
                own,
                why,
                path.stat().st_size,
                limit,
            )
        else:
            chosen.add(own)

    for tree in PACKAGE_TREES:
        for rel in _tree_files(root, tree):
            add(root / rel, "package", TREE_FILE_MAX_BYTES)
    for name in PACKAGE_FILES:
        if (root / name).is_file():
            add(root / name, "package", TREE_FILE_MAX_BYTES)
    inputs = dict(named or {})
    if config is not None:
        inputs["config"] = Path(config)
    for key, path in inputs.items():
        path = Path(os.path.abspath(path))  # absolute, "a/../b" made "b" (links kept)
        if not path.exists():
            continue  # nothing to upload: a hub id, or a path that exists only on the cluster
        if path.is_relative_to(root) or path.resolve().is_relative_to(root):
            if not path.is_relative_to(root):  # a link from outside into the project
                path = path.resolve()
            add(path, key, NAMED_FILE_MAX_BYTES)
    return sorted(chosen)


@contextmanager
def staged_package(
    config: str | Path | None = None,
    named: Mapping[str, Path] | None = None,
    root: Path = PROJECT_ROOT,
) -> Iterator[Path]:
    """A temporary folder holding a copy of :func:`package_files`, removed on exit.

    It is what the job gets as ``working_dir``: Ray zips and uploads it when the job is
    submitted.
    """
    with tempfile.TemporaryDirectory(prefix="segcal-submit-") as tmp:
        stage = Path(tmp) / "project"
        stage.mkdir()
        for rel in package_files(config, named, root):
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest)  # follows links (checked to stay inside root)
        yield stage
