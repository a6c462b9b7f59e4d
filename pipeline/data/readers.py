"""Dataset listings: which image goes with which label file.

Three layouts, chosen by ``DatasetConfig.format``:

- ``folder``: ``images`` holds files matching ``glob`` (``**`` recurses); ``labels`` holds one
  label file per image with the same relative path and file stem (any image suffix), or, with
  ``label_pattern`` (e.g. ``"{stem}_L.png"``), the pattern's name in the image's subfolder.
- ``cityscapes``: ``images`` is the Cityscapes root, holding
  ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png`` (``labels`` may point to another folder
  laid out like ``gtFine``).
- ``manifest``: a CSV or Parquet table with columns ``image`` and ``label`` (URIs: local paths
  or any fsspec/pyarrow filesystem URL; relative ones are relative to the manifest) and an
  optional ``image_id``.

A ``monitor`` dataset (unlabelled) lists its images only: every sample's ``label_uri`` is None,
whatever ``labels`` (or a manifest's ``label`` column) says; its folder format needs no
``labels`` folder and its manifest no ``label`` column.

Listing only looks at names; files are opened later, in :mod:`pipeline.data.decode`, inside
Ray read tasks.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import DatasetConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_CS_IMAGE_SUFFIX = "_leftImg8bit.png"
_CS_LABEL_SUFFIX = "_gtFine_labelIds.png"


class DataError(ValueError):
    """A dataset file or listing that cannot be used; the message names the file or key."""


@dataclass(frozen=True)
class Sample:
    """One listed image: its id, its URI and its label's URI (None when no label was found)."""

    image_id: str
    uri: str
    label_uri: str | None


def _label_index(labels: Path) -> tuple[dict[str, Path], set[str]]:
    """Label files by relative path without suffix, and every relative path with it."""
    by_stem: dict[str, Path] = {}
    names: set[str] = set()
    for p in sorted(labels.rglob("*")):
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            continue
        rel = p.relative_to(labels)
        names.add(rel.as_posix())
        stem = rel.with_suffix("").as_posix()
        if stem in by_stem:
            raise DataError(
                f"Expected one label file per stem in {labels}, but got {by_stem[stem]} and {p}"
            )
        by_stem[stem] = p
    return by_stem, names


def label_rule(cfg: DatasetConfig) -> str:
    """How the folder format matches a label file to an image, in words (for messages).

    Example:
        >>> from pipeline.config import DatasetConfig
        >>> label_rule(DatasetConfig(name="a", role="test", domain="d", images="i", labels="l",
        ...                          label_pattern="{stem}_L.png"))
        "label_pattern '{stem}_L.png': <labels>/<image's subfolder>/{stem}_L.png"
    """
    if cfg.label_pattern is None:
        return (
            "same relative path and stem as the image, any image suffix "
            "(<labels>/<image's subfolder>/<stem>.png|.jpg|...; set `label_pattern` otherwise)"
        )
    pattern = cfg.label_pattern
    any_suffix = Path(pattern).suffix.lower() not in IMAGE_SUFFIXES
    return f"label_pattern {pattern!r}: <labels>/<image's subfolder>/{pattern}" + (
        " with any image suffix" if any_suffix else ""
    )


def _listing_folder(cfg: DatasetConfig) -> list[Sample]:
    images, labels = Path(cfg.images or ""), Path(cfg.labels or "")
    unlabelled = cfg.role == "monitor"
    folders = (("images", images),) if unlabelled else (("images", images), ("labels", labels))
    for key, folder in folders:
        if not folder.is_dir():
            raise DataError(
                f"Expected `{key}` of dataset {cfg.name!r} to be a folder, but got {folder}"
            )
    if unlabelled:
        return [
            Sample(p.relative_to(images).with_suffix("").as_posix(), str(p), None)
            for p in sorted(images.glob(cfg.glob)) if p.is_file()
        ]
    label_index, label_names = _label_index(labels)
    pattern = cfg.label_pattern
    exact = pattern is not None and Path(pattern).suffix.lower() in IMAGE_SUFFIXES
    samples = []
    for p in sorted(images.glob(cfg.glob)):
        if not p.is_file():
            continue
        rel = p.relative_to(images)
        image_id = rel.with_suffix("").as_posix()
        if pattern is None:
            label = label_index.get(image_id)
        else:
            target = (rel.parent / pattern.format(stem=p.stem)).as_posix()
            if exact:
                label = labels / target if target in label_names else None
            else:
                label = label_index.get(target)
        samples.append(Sample(image_id, str(p), None if label is None else str(label)))
    return samples


def near_misses(cfg: DatasetConfig, sample: Sample, limit: int = 3) -> list[str]:
    """Label files (relative to ``labels``) whose names resemble an unmatched image's.

    Files whose name starts with the image's stem come first, then close matches by
    :func:`difflib.get_close_matches`.
    """
    import difflib

    labels = Path(cfg.labels or "")
    if not labels.is_dir():
        return []
    stem = Path(sample.uri).stem
    names = sorted(
        p.relative_to(labels).as_posix() for p in labels.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    found = [n for n in names if Path(n).name.startswith(stem)][:limit]
    by_name = {Path(n).name: n for n in names}
    for name in difflib.get_close_matches(Path(sample.uri).name, list(by_name), n=limit):
        if by_name[name] not in found:
            found.append(by_name[name])
    return found[:limit]


def suggest_label_pattern(sample: Sample, near: list[str]) -> str | None:
    """A ``label_pattern`` that would match ``near[0]`` for ``sample``, when one is evident.

    Example:
        >>> suggest_label_pattern(Sample("s/a", "/img/s/a.png", None), ["s/a_L.png"])
        '{stem}_L.png'
    """
    stem = Path(sample.uri).stem
    for name in near:
        base = Path(name).name
        if base.startswith(stem) and base != Path(sample.uri).name:
            return "{stem}" + base[len(stem):]
    return None


def missing_labels_message(cfg: DatasetConfig, samples: list[Sample]) -> str | None:
    """One line on the samples without a label: the folder searched, the rule, the count, near
    misses and the likely fix; None when every sample has a label (or the set is a ``monitor``
    set, which has none by design).

    Args:
        cfg: the dataset's config.
        samples: its listed samples.
    """
    unmatched = [s for s in samples if s.label_uri is None]
    if not unmatched or cfg.role == "monitor":
        return None
    first = unmatched[0]
    where = cfg.labels if cfg.format != "manifest" else cfg.manifest
    text = (
        f"Expected a label file for every image of dataset {cfg.name!r}, but found none for "
        f"{len(unmatched)} of {len(samples)} images (e.g. {first.uri})"
    )
    if cfg.format == "folder":
        near = near_misses(cfg, first)
        text += f"; searched {where} with the rule: {label_rule(cfg)}"
        text += f"; near misses: {', '.join(near)}" if near else "; no similar label file there"
        pattern = suggest_label_pattern(first, near)
        if pattern is not None:
            text += f"; fix: set `label_pattern: {pattern!r}` for this dataset"
        else:
            text += "; fix: point `labels` at the label folder or set `label_pattern`"
    elif cfg.format == "cityscapes":
        text += f"; searched {where or cfg.images}/gtFine/{cfg.split}/<city>/<id>{_CS_LABEL_SUFFIX}"
    else:
        text += f"; the manifest {where} gives no label for them"
    return text


def _listing_cityscapes(cfg: DatasetConfig) -> list[Sample]:
    root = Path(cfg.images or "")
    image_dir = root / "leftImg8bit" / cfg.split
    label_dir = Path(cfg.labels) if cfg.labels else root / "gtFine"
    label_dir = label_dir / cfg.split
    if not image_dir.is_dir():
        raise DataError(
            f"Expected `images` of dataset {cfg.name!r} to be a Cityscapes root with "
            f"leftImg8bit/{cfg.split}/, but {image_dir} is not a folder"
        )
    samples = []
    for p in sorted(image_dir.glob(f"*/*{_CS_IMAGE_SUFFIX}")):
        image_id = p.name[: -len(_CS_IMAGE_SUFFIX)]
        label = label_dir / p.parent.name / f"{image_id}{_CS_LABEL_SUFFIX}"
        found = cfg.role != "monitor" and label.is_file()
        samples.append(Sample(image_id, str(p), str(label) if found else None))
    return samples


def _join_uri(base: str, uri: str) -> str:
    if "://" in uri or posixpath.isabs(uri) or Path(uri).is_absolute():
        return uri
    return posixpath.join(base, uri)


def _read_manifest_table(uri: str, name: str) -> pa.Table:
    suffix = posixpath.splitext(uri.split("?")[0])[1].lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(
            f"Expected `manifest` of dataset {name!r} to end in .csv or .parquet, but got {uri}"
        )
    try:
        with fsspec.open(uri, "rb") as f:
            return pacsv.read_csv(f) if suffix == ".csv" else pq.read_table(f)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"Expected manifest {uri} to be a readable table, but got: {err}") from err


def _listing_manifest(cfg: DatasetConfig) -> list[Sample]:
    uri = cfg.manifest or ""
    table = _read_manifest_table(uri, cfg.name)
    unlabelled = cfg.role == "monitor"
    required = ["image"] if unlabelled else ["image", "label"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(
            f"Expected manifest {uri} to have columns {required}, but {missing} are "
            f"missing (columns: {table.column_names})"
        )
    base = posixpath.dirname(uri)
    images = table.column("image").cast(pa.string()).to_pylist()
    if unlabelled:
        labels: list[str | None] = [None] * len(images)
    else:
        labels = table.column("label").cast(pa.string()).to_pylist()
    if "image_id" in table.column_names:
        ids = table.column("image_id").cast(pa.string()).to_pylist()
    else:
        ids = [posixpath.splitext(posixpath.basename(u or ""))[0] for u in images]
    samples = []
    for row, (image_id, image, label) in enumerate(zip(ids, images, labels, strict=True)):
        if not image or not image_id:
            raise DataError(f"Expected row {row} of manifest {uri} to name an image, but got none")
        samples.append(
            Sample(image_id, _join_uri(base, image), _join_uri(base, label) if label else None)
        )
    return samples


def _sample_rank(seed: int, image_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()


_LISTINGS = {"folder": _listing_folder, "cityscapes": _listing_cityscapes,
             "manifest": _listing_manifest}


def list_all_samples(cfg: DatasetConfig) -> list[Sample]:
    """Every image of a dataset's source, before ``include`` and ``limit`` choose among them.

    Raises:
        DataError: a missing folder or unreadable manifest, or duplicate image ids.
    """
    samples = _LISTINGS[cfg.format](cfg)
    ids = [s.image_id for s in samples]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"Expected unique image ids in dataset {cfg.name!r}, but got {dupes}")
    return samples


def select_samples(cfg: DatasetConfig, samples: list[Sample]) -> list[Sample]:
    """The samples ``include`` and ``limit`` choose, sorted by ``image_id``.

    With ``limit``, the ``limit`` images of lowest seeded hash rank: a uniform sample without
    replacement that only grows with ``limit`` and keeps its images when new files arrive, so
    incremental reruns extract only the newcomers.

    Raises:
        DataError: no image left.
    """
    if cfg.include:
        prefixes = tuple(cfg.include)
        samples = [s for s in samples if posixpath.basename(s.uri).startswith(prefixes)]
    samples = sorted(samples, key=lambda s: s.image_id)
    if cfg.limit is not None and cfg.limit < len(samples):
        keep = sorted(samples, key=lambda s: _sample_rank(cfg.sample_seed, s.image_id))
        samples = sorted(keep[: cfg.limit], key=lambda s: s.image_id)
    if not samples:
        source = cfg.manifest if cfg.format == "manifest" else cfg.images
        raise DataError(
            f"Expected dataset {cfg.name!r} to list at least one image (format {cfg.format}, "
            f"source {source}, glob {cfg.glob!r}, include {cfg.include}), but found none"
        )
    return samples


def list_samples(cfg: DatasetConfig) -> list[Sample]:
    """List a dataset's images and their labels, filtered by ``include`` and ``limit``.

    Args:
        cfg: the dataset's config.

    Returns:
        Samples sorted by ``image_id`` (see :func:`select_samples`).

    Raises:
        DataError: a missing folder or unreadable manifest, duplicate image ids, or no image
            left to extract.
    """
    return select_samples(cfg, list_all_samples(cfg))


def _file_fingerprint(uri: str, mode: str) -> str:
    if mode == "hash":
        digest = hashlib.sha256()
        try:
            with fsspec.open(uri, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            return "missing"
        return f"sha256:{digest.hexdigest()}"
    try:
        if "://" not in uri:  # local: one stat call, no fsspec overhead
            st = os.stat(uri)
            return f"{st.st_size}:{st.st_mtime_ns}"
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except FileNotFoundError:
        return "missing"
    stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated",
                                    "ETag", "etag", "md5Hash") if info.get(k)), "")
    return f"{info.get('size')}:{stamp}"


def source_fingerprint(sample: Sample, mode: str = "stat") -> str:
    """What identifies the current content of a sample's image and label files.

    ``stat`` (the default) uses size and modification time (``mtime_ns`` locally; the object
    store's modification time or ETag otherwise): cheap, and catches files rewritten in place.
    ``hash`` reads both files for a sha256 each: also catches a rewrite that keeps size and
    mtime, at the price of reading every file on every run. The two kinds never compare equal.

    Example:
        >>> source_fingerprint(Sample("a", "/nonexistent/a.png", None))
        'missing|-'
    """
    # An unlabelled (monitor) image has no label file: "-" stands for it.
    label = "-" if sample.label_uri is None else _file_fingerprint(sample.label_uri, mode)
    return f"{_file_fingerprint(sample.uri, mode)}|{label}"
