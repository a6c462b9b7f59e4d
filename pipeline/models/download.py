"""Checked downloads and file hashes for model weights.

A weights path may be a local file or folder, or an http(s) URL. URLs are downloaded once into
a cache folder (``$SEGCAL_CACHE``, else ``~/.cache/segcal``) through a temporary file that is
renamed into place only after its sha256 matched, so a failed or tampered download is never
used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline.paths import create_temp_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_URL_SCHEMES = ("https://", "http://")


def is_url(path: str) -> bool:
    """Whether ``path`` is an http(s) URL that :func:`resolve` downloads."""
    return path.startswith(_URL_SCHEMES)


def default_cache_dir() -> Path:
    """The download cache: ``$SEGCAL_CACHE`` if set, else ``~/.cache/segcal``."""
    return Path(os.environ.get("SEGCAL_CACHE") or Path.home() / ".cache" / "segcal")


@functools.lru_cache(maxsize=1024)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are part of the cache key only: a rewritten file gets hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file, cached per (path, size, mtime) within the process.

    Args:
        path: a regular file.

    Returns:
        64 lowercase hex characters.
    """
    path = Path(path).resolve()
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


class ChecksumError(ValueError):
    """A downloaded file whose sha256 is not the expected one (it was discarded).

    Args:
        url: where the file came from.
        expected: the expected hex digest.
        actual: the digest of what was downloaded.
    """

    def __init__(self, url: str, expected: str, actual: str) -> None:
        super().__init__(
            f"Expected the download of `{url}` to have sha256 {expected}, but got {actual}; "
            "the file was discarded"
        )
        self.url, self.expected, self.actual = url, expected, actual


def download_file(url: str, target: str | Path, *, sha256: str | None = None) -> Path:
    """Download ``url`` to ``target`` atomically, checking its sha256 before it lands.

    The bytes go to a temporary file beside ``target`` that is renamed into place only after
    the digest matched, so ``target`` is either absent, left as it was, or complete.

    Args:
        url: an http(s) URL.
        target: the local file to write (its folder is created).
        sha256: expected hex digest (None: not checked).

    Returns:
        ``target``.

    Raises:
        ChecksumError: the digest did not match (nothing is written to ``target``).
        urllib.error.URLError: the download failed (``HTTPError`` for an HTTP error status).
        OSError: a network timeout or a local write error.
    """
    target = Path(target)
    _download(url, target, sha256)
    return target


def _download(url: str, target: Path, sha256: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    log.debug("downloading %s -> %s", url, target)
    digest = hashlib.sha256()
    fd, tmp_name = create_temp_file(target.parent, f".{target.name}.", ".part")  # umask's mode
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(url, sha256, actual)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def resolve(
    path_or_url: str | Path, *, sha256: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local path for model weights, downloading and checking a URL once.

    Args:
        path_or_url: a local file or folder, or an ``https://`` (or ``http://``) URL of a file.
        sha256: expected hex digest of the file; checked for downloads and for local files.
        cache_dir: download cache (default :func:`default_cache_dir`). A URL lands in
            ``<cache_dir>/<sha256(url)[:16]>/<file name>``.

    Returns:
        The local path. A cached download is reused while it matches ``sha256``.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a digest mismatch (a mismatching download is deleted, never returned; a
            :class:`ChecksumError` for a download), a ``sha256`` given for a folder, or a URL
            scheme other than http(s).
        urllib.error.URLError: the download failed.

    Example:
        >>> resolve("/no/such.pt")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Expected `path` to be an existing file or folder, but got /no/such.pt
    """
    text = str(path_or_url)
    if is_url(text):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        name = Path(urllib.parse.urlparse(text).path).name or "download"
        target = root / hashlib.sha256(text.encode()).hexdigest()[:16] / name
        if target.is_file():
            if sha256 is None or sha256_file(target) == sha256.lower():
                return target
            # The expected digest changed (e.g. a new release at the same URL): fetch again.
            target.unlink()
        log.info("downloading %s -> %s", text, target)
        _download(text, target, sha256)
        return target
    if "://" in text:
        raise ValueError(f"Expected `path` to be a local path or an http(s) URL, but got {text}")
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Expected `path` to be an existing file or folder, but got {text}")
    if sha256 is not None:
        if not path.is_file():
            raise ValueError(f"Expected `sha256` to be given for a file, but `{text}` is a folder")
        actual = sha256_file(path)
        if actual != sha256.lower():
            raise ValueError(f"Expected `{text}` to have sha256 {sha256}, but got {actual}")
    return path
