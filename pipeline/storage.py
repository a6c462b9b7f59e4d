"""Run folders at an object-store URI: ``output: s3://bucket/runs/x`` (``gs://``, any fsspec URL).

What a run stores splits in two:

* **Shards and their manifests** are read and written at the URI itself
  (``URI/shards/<fp12>/<dataset>/``), by whichever node holds the logits: extraction's write
  tasks, Ray Train workers and evaluation actors open them there (:func:`location`). A shard is
  one object written in one request, so a killed writer leaves no partial shard under a final
  name, as the local temp-file-and-rename does. Ray Train keeps its checkpoints at
  ``URI/ray_train``.
* **Everything else** (the resolved config, artifacts, tables, report, stage records,
  ``error.log``) is small and written by the driver alone. The driver works in a local mirror of
  the run folder, ``$SEGCAL_CACHE/runs/<sha256 of the URI>`` (``~/.cache/segcal`` by default),
  with all the local-folder guarantees (atomic renames, the output lock). :class:`Mirror`
  pulls it from the URI when a command starts and pushes what changed back when the command
  ends, failed or not: stage records and ``summary.csv``, which mark finished work, go last.

Credentials never appear in the URI (it is logged and written into the run's config): the
filesystem library reads them from the environment or the node's role, as it does for any other
client (for S3: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``). S3 needs
the ``segcal[s3]`` extra (``s3fs``); ``gs://`` needs ``gcsfs``.

Limits: the output lock holds on one driver machine only; two drivers writing the same URI at
once are not detected.

Example:
    >>> is_uri("s3://bucket/runs/x"), is_uri("/runs/x"), is_uri("runs/x")
    (True, False, False)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

# Folders of the run at the URI that the mirror leaves alone: they are read and written there.
REMOTE_ONLY = ("shards", "ray_train")
# Pushed last, in this order: their presence says the files they describe are complete.
_LAST = (".stages", "summary.csv")
_INDEX = ".segcal-mirror.json"  # the mirror's record of what it last pulled or pushed
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_uri(value: str | os.PathLike) -> bool:
    """Whether ``value`` is a URL (``scheme://...``) rather than a local path."""
    return isinstance(value, str) and _SCHEME.match(value) is not None


def check_uri(uri: str, *, key: str = "output") -> None:
    """Check that ``uri`` can hold a run folder: a known scheme, no credentials or query.

    Raises:
        ValueError: naming ``key``, what was expected and what came (the URI without any
            password).
    """
    parts = urlsplit(uri)
    if parts.username or parts.password:
        shown = uri.replace(parts.password or "\0", "***")
        raise ValueError(
            f"Expected `{key}` without credentials in it, but got {shown!r}: give them to the "
            "filesystem through the environment (for S3: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY) or the node's role, never in the config"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"Expected `{key}` to be a plain URI without '?' or '#', but got {uri!r}")
    if not parts.netloc or parts.path.strip("/") == "":
        raise ValueError(
            f"Expected `{key}` to name a folder inside a bucket (scheme://bucket/folder), "
            f"but got {uri!r}"
        )
    import fsspec

    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError as err:
        raise ValueError(
            f"Expected `{key}` to use a filesystem fsspec knows (s3://, gs://, ...), but got "
            f"scheme {parts.scheme!r}"
        ) from err
    except ImportError as err:
        extra = " (pip install 'segcal[s3]')" if parts.scheme in ("s3", "s3a") else ""
        raise ValueError(f"`{key}` is {uri!r}, but its filesystem is not installed{extra}: "
                         f"{err}") from err


def filesystem_requirement(uri: str) -> dict[str, str]:
    """Distribution -> import name of the package fsspec needs for ``uri``'s scheme.

    Example:
        >>> filesystem_requirement("s3://bucket/runs/x")
        {'s3fs': 's3fs'}
        >>> filesystem_requirement("memory://runs/x")  # built into fsspec
        {}
    """
    from fsspec.registry import known_implementations

    impl = known_implementations.get(urlsplit(uri).scheme, {}).get("class", "")
    module = impl.split(".", 1)[0]
    return {} if module in ("", "fsspec") else {module: module}


def check_local(cfg: Any) -> None:
    """Refuse a config whose ``output`` is a URI not yet mirrored (see :func:`mirrored`).

    The stages write the run folder with local-file operations; given a URI they would write
    to a folder named like it under the working directory.

    Raises:
        ValueError: naming the URI and what to do.
    """
    if is_uri(cfg.output) and getattr(cfg, "store", None) is None:
        raise ValueError(
            f"Expected `output` to be a local folder here, but got the URI {cfg.output!r}: run "
            "the stages through the `segcal` CLI, or inside `with pipeline.storage.mirrored(cfg) "
            "as cfg:`, which works in a local mirror of it"
        )


@contextlib.contextmanager
def mirrored(cfg: Any) -> Iterator[Any]:
    """``cfg`` with a URI ``output`` turned into its local mirror, pushed back on exit.

    What the CLI does for every command (:class:`Mirror`), for callers of the stage functions
    (``pipeline.extract.run`` and the rest). A local ``output`` passes through unchanged.

    Example:
        >>> from pipeline.config import parse_config
        >>> cfg = parse_config({"output": "/runs/x", "datasets": [],
        ...                     "model": {"kind": "python", "path": "m:f", "num_classes": 2}})
        >>> with mirrored(cfg) as run:
        ...     run is cfg
        True
    """
    if not is_uri(cfg.output) or getattr(cfg, "store", None) is not None:
        yield cfg
        return
    mirror = Mirror(cfg.output)
    local = cfg.model_copy(update={"output": str(mirror.pull()), "store": mirror.uri})
    try:
        yield local
    finally:
        mirror.push()


def location(value: str | os.PathLike) -> Any:
    """A path object for a local path or a URI: :class:`~pathlib.Path` or ``upath.UPath``.

    Both offer what the shard code uses (``/``, ``name``, ``is_file``, ``glob``, ``open``,
    ``unlink``, ``mkdir``), so one code path serves a local folder and a bucket.
    """
    if hasattr(value, "fs") or isinstance(value, Path):  # already a UPath or a Path
        return value
    if is_uri(value):
        from upath import UPath

        return UPath(value)
    return Path(value)


def is_local(path: Any) -> bool:
    """Whether a :func:`location` is a local :class:`~pathlib.Path` (a URI's ``UPath`` is not)."""
    return isinstance(path, Path)


def write_bytes(path: Any, data: bytes) -> None:
    """Write a whole file: atomically (temp file, rename) locally, as one object at a URI."""
    if is_local(path):
        from pipeline.paths import atomic_write_bytes

        atomic_write_bytes(path, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(data)


def remove_tree(path: Any) -> None:
    """Remove a folder and everything in it, if it exists (local or at a URI)."""
    if is_local(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    fs, root = path.fs, path.path
    if fs.exists(root):
        fs.rm(root, recursive=True)


def cache_root() -> Path:
    """``$SEGCAL_CACHE``, else ``~/.cache/segcal``."""
    return Path(os.environ.get("SEGCAL_CACHE") or Path.home() / ".cache" / "segcal")


def mirror_dir(uri: str) -> Path:
    """The driver's local working copy of the run folder at ``uri``."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / "runs" / digest


def _remote_only(rel: str) -> bool:
    return rel.split("/", 1)[0] in REMOTE_ONLY


def _transient(rel: str) -> bool:
    """Files the mirror never copies: locks, temp files, hidden scratch folders, its index."""
    name = rel.rsplit("/", 1)[-1]
    top = rel.split("/", 1)[0]
    return (rel == _INDEX or name.endswith((".tmp", ".lock"))
            or (top.startswith(".") and top != ".stages"))


def _stamp(info: dict[str, Any]) -> str:
    """What identifies one version of a remote file: its size and ETag or modification time."""
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}:{version}"


@dataclass
class Mirror:
    """The local working copy of a run folder whose ``output`` is a URI.

    The index (``.segcal-mirror.json`` in the mirror) records, per file, the remote version
    and the local size and mtime as of the last pull or push. So a pull fetches only files that
    changed remotely, a push sends only files the command changed, a file the command deleted
    is deleted remotely, and a local file that never reached the URI (a push cut short) is
    kept and pushed next time, never thrown away.
    """

    uri: str
    local: Path = field(init=False)
    _index: dict[str, dict[str, Any]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.uri = self.uri.rstrip("/")
        self.local = mirror_dir(self.uri)

    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.uri)
        return fs, root.rstrip("/")

    def _remote_files(self, fs: Any, root: str) -> dict[str, dict[str, Any]]:
        fs.invalidate_cache(root)  # other machines may have written since this process listed
        if not fs.exists(root):
            return {}
        out = {}
        for path, info in fs.find(root, detail=True).items():
            rel = path[len(root):].lstrip("/")
            if not rel or rel.endswith("/"):  # a folder marker, as pyarrow writes
                continue
            if info.get("type") == "file" and not _remote_only(rel) and not _transient(rel):
                out[rel] = info
        return out

    def _local_files(self) -> Iterator[tuple[str, Path]]:
        for path in sorted(self.local.rglob("*")):
            rel = path.relative_to(self.local).as_posix()
            if path.is_file() and not path.is_symlink() and not _remote_only(rel) \
                    and not _transient(rel):
                yield rel, path

    @staticmethod
    def _local_stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def _save_index(self) -> None:
        from pipeline.paths import atomic_write_json

        atomic_write_json(self.local / _INDEX, self._index)

    def pull(self) -> Path:
        """Bring the mirror up to date with the URI; returns the mirror folder.

        Raises:
            FileNotFoundError: the URI's bucket does not exist (checked here, before any work:
                shards would otherwise fail to write only once extraction is under way).
        """
        fs, root = self._fs()
        bucket = root.split("/", 1)[0] if "/" in root.lstrip("/") else ""
        if bucket and not fs.exists(bucket):
            raise FileNotFoundError(
                f"Expected the bucket {bucket!r} of `output` {self.uri} to exist and be readable "
                "with this machine's credentials, but it is not there: create it, or check "
                "the credentials and endpoint in the environment"
            )
        self.local.mkdir(parents=True, exist_ok=True)
        index_file = self.local / _INDEX
        self._index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        remote = self._remote_files(fs, root)
        fetched = 0
        for rel, info in remote.items():
            target = self.local / rel
            known = self._index.get(rel)
            if known and known["remote"] == _stamp(info) and target.is_file():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            data = fs.cat_file(f"{root}/{rel}")
            from pipeline.paths import atomic_write_bytes

            atomic_write_bytes(target, data)
            self._index[rel] = {"remote": _stamp(info), "local": self._local_stamp(target)}
            fetched += 1
        for rel in [r for r in self._index if r not in remote]:
            # Deleted at the URI since we last saw it there: delete it here too. A file the
            # index does not know was never pushed and stays.
            (self.local / rel).unlink(missing_ok=True)
            del self._index[rel]
        self._save_index()
        logger.info("%s: %d files pulled into %s", self.uri, fetched, self.local)
        return self.local

    def push(self) -> int:
        """Send the files the command changed to the URI; returns how many were sent."""
        fs, root = self._fs()
        files = dict(self._local_files())

        def order(rel: str) -> tuple[int, str]:
            top = rel.split("/", 1)[0]
            return (_LAST.index(top) + 1 if top in _LAST else 0, rel)

        def send(rel: str) -> bool:
            stamp = self._local_stamp(files[rel])
            if self._index.get(rel, {}).get("local") == stamp:
                return False
            fs.makedirs(f"{root}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(files[rel]), f"{root}/{rel}")
            self._index[rel] = {"remote": _stamp(fs.info(f"{root}/{rel}")), "local": stamp}
            self._save_index()  # after each file: a push cut short resumes where it stopped
            return True

        ordered = sorted(files, key=order)
        first = [rel for rel in ordered if order(rel)[0] == 0]
        sent = sum(send(rel) for rel in first)
        for rel in [r for r in self._index if r not in files]:
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{root}/{rel}")  # the command deleted it here
            del self._index[rel]
        # Then the records of finished work, once what they describe is in place.
        sent += sum(send(rel) for rel in ordered[len(first):])
        self._save_index()
        logger.info("%s: %d files pushed from %s", self.uri, sent, self.local)
        return sent
