"""Stage 2: fit every configured calibrator on the calibration shards and write its artifact.

``run(cfg)`` reads the shards of the datasets with role ``calibration``, splits them by image
into a fit part and a held-out part, samples pixels (pointwise calibrators) or strided whole
maps (spatial ones), fits each entry of ``cfg.calibrators`` and writes
``OUTPUT/artifacts/<label>/`` with `pipeline.calibrators.save`. Everything is validated and
every calibrator fitted before the first artifact is written, so a failed run leaves the
previous artifacts untouched.

Two modes (``fit.mode``):

- ``local``: ``calibrator.fit(..., heldout=...)`` in-process.
- ``ray``: ``ray.train.torch.TorchTrainer`` runs for each group of calibrators that fit on the
  same datasets: as many runs at once as the cluster has room for (`_concurrent_runs`), each
  fitting its share of the group's calibrators in turn, so independent calibrators fit
  concurrently and start-up is paid once per run. The driver keeps no fit pixels: it checks
  and counts the fit images and hands out references to them (`FitSource`); each worker gets
  its share with ``ray.train.get_dataset_shard``, reads those images from the shards and
  samples them by the same seeded rule, then runs the very same ``calibrator.fit`` with a
  `pipeline.calibrators.base.DistributedReduce` hook that all-reduces the sums, counts, loss
  values and gradients the loop computes over fit rows (the hook is the identity in-process).
  So the calibrator's own optimiser, defaults, warm starts, grids, refits and early stopping
  run unchanged: deterministic fits agree with the local ones up to float summation order,
  the mini-batch ones up to their sampling. Held-out data is sampled by the driver and whole
  on every worker. This module knows no calibrator by name or type: the classes' ``spatial``
  and ``distributed`` flags say which rows they need and whether they can run sharded.

Corrupted calibration data (issue 8): a calibration dataset with a ``corruption`` is used only
by calibrators whose spec options say ``use_corrupted: true`` (or list
``augment_corruptions: [{kind, severity}, ...]``, which picks those corruptions and implies
``use_corrupted``); all other calibrators ignore it. Both keys are fit-stage options and are
removed before the calibrator is built. The held-out split is by image id, so an image and its
corrupted copies always fall on the same side; held-out metrics always come from the clean
(uncorrupted) calibration images so that every calibrator is scored on the same pixels.

Run it with ``segcal fit CONFIG`` or ``python jobs/fit.py CONFIG``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from pipeline.calibrators import CALIBRATORS, Calibrator, FitData, build_calibrator, save
from pipeline.calibrators.base import DistributedReduce
from pipeline.config import CalibratorSpec, DatasetConfig, JobConfig
from pipeline.metrics import ece
from pipeline.models import model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import (
    ImageRecord,
    Manifest,
    iter_dataset,
    read_manifest,
    read_shard,
    upsample_logits,
)

__all__ = [
    "FIT_OPTIONS",
    "FitSource",
    "data_fingerprint",
    "fit_spec",
    "fit_specs",
    "heldout_metrics",
    "record_map",
    "run",
    "sample_pixel_indices",
    "sample_pixels",
    "split_heldout",
    "train_loop_per_worker",
]

logger = logging.getLogger(__name__)

# Spec options read by this stage, never passed to the calibrator.
FIT_OPTIONS = ("use_corrupted", "augment_corruptions")
# The Ray dataset of each layout: sampled pixels (pointwise calibrators) or maps (spatial ones).
_LAYOUTS = {False: "pixels", True: "maps"}
# Rows per Arrow block of the Ray dataset: enough blocks to balance workers, few enough to be cheap.
_BLOCK_ROWS = 65536


# --------------------------------------------------------------------------------------------
# Splitting and sampling: pure functions of records and seeds, independent of shard order.


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()


def split_heldout(image_ids: Iterable[str], fraction: float, seed: int) -> set[str]:
    """Pick the held-out images: the ``round(fraction * n)`` ids with the smallest seeded hash.

    The choice depends only on the set of ids and the seed (not on their order), and keeps at
    least one image on each side when ``fraction > 0`` and there are two or more images.

    Args:
        image_ids: Image ids (duplicates, e.g. corrupted copies of one image, count once).
        fraction: Share of images held out, in [0, 1).
        seed: Seed of the hash.

    Returns:
        The held-out ids.

    Raises:
        ValueError: When ``fraction`` is outside [0, 1).

    Example:
        >>> ids = [f"img{i}" for i in range(10)]
        >>> held = split_heldout(ids, 0.3, seed=0)
        >>> len(held), held == split_heldout(reversed(ids), 0.3, seed=0)
        (3, True)
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Expected `heldout_fraction` in [0, 1), but got {fraction}")
    ids = sorted(set(image_ids))
    if fraction == 0.0 or len(ids) < 2:
        return set()
    k = min(max(round(fraction * len(ids)), 1), len(ids) - 1)
    return set(sorted(ids, key=lambda i: (_digest(seed, i), i))[:k])


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    """A generator per (seed, image): samples do not depend on which shard an image is in."""
    return np.random.default_rng([seed, int.from_bytes(_digest(image_id)[:8], "little")])


def sample_pixel_indices(
    labels: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    ignore_index: int | None,
    mispredicted: np.ndarray | None = None,
) -> np.ndarray:
    """Draw up to ``n`` distinct valid pixels of one image, as sorted flat indices.

    Without ``mispredicted`` the draw is uniform over valid pixels. With it, mispredicted
    pixels are oversampled: up to half of the draw comes from them (all of them when fewer),
    the rest from correct pixels, and mispredicted ones fill in when correct ones run out.

    Args:
        labels: (H, W) integer labels.
        n: Pixels wanted (all valid pixels when fewer exist).
        rng: The image's generator.
        ignore_index: Label value never drawn, or None.
        mispredicted: Optional (H, W) bool, True where the model's argmax is wrong.

    Returns:
        (min(n, #valid),) int64 flat indices into ``labels.ravel()``, sorted.

    Example:
        >>> labels = np.array([[0, 255], [1, 2]])
        >>> sample_pixel_indices(labels, 5, np.random.default_rng(0), ignore_index=255)
        array([0, 2, 3])
    """
    flat = labels.reshape(-1)
    valid = np.flatnonzero(flat != ignore_index) if ignore_index is not None else np.arange(
        flat.size
    )
    if mispredicted is None:
        if len(valid) <= n:
            return valid.astype(np.int64)
        return np.sort(rng.choice(valid, n, replace=False)).astype(np.int64)
    wrong_mask = mispredicted.reshape(-1)[valid]
    wrong, right = valid[wrong_mask], valid[~wrong_mask]
    n_wrong = min(len(wrong), max(n // 2, n - len(right)))
    n_right = min(len(right), n - n_wrong)
    picked = np.concatenate(
        [rng.choice(wrong, n_wrong, replace=False), rng.choice(right, n_right, replace=False)]
    )
    return np.sort(picked).astype(np.int64)


def _check_classes(record: ImageRecord, num_classes: int) -> None:
    if record.logits.shape[0] != num_classes:
        raise ValueError(
            f"Expected logits with model.num_classes={num_classes} classes in dataset "
            f"{record.dataset!r}, image {record.image_id!r}, but got {record.logits.shape[0]}"
        )


def sample_pixels(
    records: Iterable[ImageRecord],
    *,
    pixels_per_image: int,
    seed: int,
    ignore_index: int | None,
    oversample_mispredicted: bool = False,
    num_classes: int | None = None,
) -> FitData:
    """Sample valid pixels of each image at label resolution (see `sample_pixel_indices`).

    Logits are upsampled to the labels' size with `pipeline.shards.upsample_logits` first.
    Pixels are ordered by (dataset, image id), so the result does not depend on record order.

    Args:
        records: The images.
        pixels_per_image: Pixels drawn per image.
        seed: Sampling seed (each image draws from its own generator).
        ignore_index: Label value never drawn, or None.
        oversample_mispredicted: Oversample pixels whose argmax is wrong.
        num_classes: Expected class count; checked against every record when given.

    Returns:
        `FitData` with (P, C) float32 logits and (P,) int64 labels, valid pixels only.

    Raises:
        ValueError: When a record's class count differs from ``num_classes``, or no record
            has a valid pixel.
    """
    parts: list[tuple[tuple[str, str], Tensor, Tensor]] = []
    for record in records:
        if num_classes is not None:
            _check_classes(record, num_classes)
        logits, labels = _sample_record(
            record, pixels_per_image, seed, ignore_index, oversample_mispredicted
        )
        parts.append(((record.dataset, record.image_id), logits, labels))
    parts.sort(key=lambda p: p[0])
    if not parts or sum(len(p[2]) for p in parts) == 0:
        raise ValueError(
            f"Expected records with pixels not equal to `ignore_index`={ignore_index}, but got "
            f"{len(parts)} images without any"
        )
    return FitData(torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]))


def _sample_record(
    record: ImageRecord,
    n: int,
    seed: int,
    ignore_index: int | None,
    oversample: bool,
) -> tuple[Tensor, Tensor]:
    logits = upsample_logits(record.logits, (record.height, record.width))
    labels = record.labels.astype(np.int64)
    mispredicted = logits.argmax(0).numpy() != labels if oversample else None
    index = sample_pixel_indices(
        labels, n, _image_rng(seed, record.image_id), ignore_index=ignore_index,
        mispredicted=mispredicted,
    )
    points = logits.reshape(logits.shape[0], -1)[:, torch.from_numpy(index)].t().contiguous()
    return points, torch.from_numpy(labels.reshape(-1)[index])


def record_map(
    record: ImageRecord, *, stride: int = 1
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One image's whole map at label resolution, subsampled by ``stride`` to bound memory.

    Args:
        record: The image.
        stride: Keep every ``stride``-th row and column.

    Returns:
        (C, H', W') float32 logits, (H', W') int64 labels and the (3, H', W') float32 image in
        [0, 1] (bilinearly resized from the stored one), or None when none is stored.
    """
    size = (record.height, record.width)
    logits = upsample_logits(record.logits, size)[:, ::stride, ::stride]
    labels = torch.from_numpy(record.labels.astype(np.int64))[::stride, ::stride]
    image = None
    if record.image is not None:
        rgb = torch.from_numpy(np.array(record.image)).permute(2, 0, 1).float()  # a writable copy
        rgb = F.interpolate(rgb[None] / 255.0, size=size, mode="bilinear", align_corners=False)
        image = rgb[0, :, ::stride, ::stride].clamp(0.0, 1.0)
    return logits.contiguous(), labels.contiguous(), image


def _record_key(record: ImageRecord) -> tuple[str, str]:
    return record.dataset, record.image_id


def data_fingerprint(manifests: Iterable[Manifest]) -> str:
    """sha256 over the datasets' shard checksums (order-independent).

    Example:
        >>> len(data_fingerprint([]))
        64
    """
    lines = sorted(f"{m.dataset}/{s.file}:{s.sha256}" for m in manifests for s in m.shards)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Planning and validation: everything that can fail before data is read or a worker starts.


@dataclass(frozen=True)
class _Job:
    """One calibrator to fit: its spec, its place in the config and the datasets it uses."""

    index: int
    spec: CalibratorSpec
    datasets: tuple[str, ...]
    spatial: bool

    @property
    def label(self) -> str:
        return self.spec.key


def _fit_options(
    spec: CalibratorSpec, index: int
) -> tuple[dict[str, Any], bool, list[tuple[str, int]] | None]:
    options = dict(spec.options)
    where = f"calibrators.{index}.options"
    use_corrupted = options.pop("use_corrupted", False)
    if not isinstance(use_corrupted, bool):
        raise TypeError(f"Expected `{where}.use_corrupted` to be a bool, but got {use_corrupted!r}")
    augment = options.pop("augment_corruptions", None)
    if augment is None:
        return options, use_corrupted, None
    wanted = []
    if not isinstance(augment, list) or not augment:
        raise ValueError(
            f"Expected `{where}.augment_corruptions` to be a non-empty list of "
            f"{{kind, severity}}, but got {augment!r}"
        )
    for item in augment:
        if not isinstance(item, dict) or set(item) != {"kind", "severity"}:
            raise ValueError(
                f"Expected each of `{where}.augment_corruptions` to be {{kind, severity}}, but "
                f"got {item!r}"
            )
        wanted.append((item["kind"], item["severity"]))
    return options, True, wanted


def _spec_options(
    cfg: JobConfig, spec: CalibratorSpec, index: int
) -> tuple[dict[str, Any], bool, list[tuple[str, int]] | None]:
    """The calibrator's options, ``use_corrupted`` and the wanted corruptions of a spec.

    ``fit.epochs`` becomes the default of calibrators that take an ``epochs`` option.
    """
    options, use_corrupted, wanted = _fit_options(spec, index)
    cls = CALIBRATORS.get(spec.name)
    if cls is not None and "epochs" in inspect.signature(cls.__init__).parameters:
        options = {"epochs": cfg.fit.epochs, **options}
    return options, use_corrupted, wanted


def _plan(cfg: JobConfig) -> list[_Job]:
    calibration = cfg.datasets_with_role("calibration")
    if not calibration:
        raise ValueError(
            "Expected at least one dataset with role 'calibration' in `datasets`, but got "
            f"none (datasets: {[d.name for d in cfg.datasets]})"
        )
    clean = tuple(d.name for d in calibration if d.corruption is None)
    if not clean:
        raise ValueError(
            "Expected at least one calibration dataset without `corruption`, but every one of "
            f"{[d.name for d in calibration]} is corrupted"
        )
    if not cfg.calibrators:
        raise ValueError("Expected at least one entry in `calibrators`, but got none")
    corrupted = [d for d in calibration if d.corruption is not None]
    jobs = []
    for i, spec in enumerate(cfg.calibrators):
        options, use_corrupted, wanted = _spec_options(cfg, spec, i)
        try:  # build once: unknown names and options fail here, before any data is read
            calibrator = build_calibrator(spec.name, cfg.model.num_classes, **options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Invalid calibrator `calibrators.{i}` ({spec.key!r}): {err}") from err
        extra = _pick_corrupted(corrupted, use_corrupted, wanted, i) if use_corrupted else ()
        jobs.append(_Job(i, spec, clean + extra, type(calibrator).spatial))
    return jobs


def _pick_corrupted(
    corrupted: Sequence[DatasetConfig], use: bool, wanted: list[tuple[str, int]] | None, i: int
) -> tuple[str, ...]:
    if not corrupted:
        raise ValueError(
            f"Expected calibration datasets with a `corruption` for `calibrators.{i}` "
            "(use_corrupted / augment_corruptions), but got none: add calibration datasets "
            "with `corruption: {kind, severity}` to the config"
        )
    if wanted is None:
        return tuple(d.name for d in corrupted)
    have = {(d.corruption.kind, d.corruption.severity) for d in corrupted if d.corruption}
    missing = [w for w in wanted if w not in have]
    if missing:
        raise ValueError(
            f"Expected a calibration dataset for each corruption in "
            f"`calibrators.{i}.options.augment_corruptions`, but none has {missing} "
            f"(available: {sorted(have)})"
        )
    return tuple(
        d.name for d in corrupted
        if d.corruption and (d.corruption.kind, d.corruption.severity) in wanted
    )


def _read_manifests(cfg: JobConfig, paths: RunPaths, names: Iterable[str]) -> dict[str, Manifest]:
    manifests = {}
    for name in sorted(set(names)):
        directory = paths.dataset_dir(name)
        manifest = read_manifest(directory)
        if manifest.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"Expected `num_classes` in {directory / 'manifest.json'} to equal "
                f"model.num_classes={cfg.model.num_classes} from the config, but got "
                f"{manifest.num_classes}"
            )
        if manifest.n_images == 0:
            raise ValueError(
                f"Expected calibration dataset {name!r} ({directory}) to hold images, but its "
                "manifest lists none"
            )
        manifests[name] = manifest
    return manifests


# --------------------------------------------------------------------------------------------
# Reading: one pass over every calibration dataset.


@dataclass(frozen=True)
class FitSource:
    """Fit images left in their shards: in ``ray`` mode each worker reads and samples its own.

    The driver keeps only these references (and the held-out samples); the pixels a worker
    fits on are drawn there by the same seeded per-image rule as in-process (`_fit_samples`),
    so both modes fit the same pixels.

    Attributes:
        images: ``(dataset dir, shard file, image id, the dataset's ignore index)`` per image.
        spatial: Whole maps (True) or sampled pixels (False).
        n_valid: Valid pixels the images yield (pixels sampled, or valid map pixels).
        ignore_index: The maps' common ignore index (None for pixels: all valid).
    """

    images: tuple[tuple[str, str, str, int], ...]
    spatial: bool
    n_valid: int
    ignore_index: int | None = None

    def load(self, fit: Any) -> FitData:
        """Read and sample the images here (``fit``: the config's ``fit`` section)."""
        data = _load_images(self.images, fit, self.ignore_index, self.spatial)
        if data is None:
            raise ValueError(f"Expected fit images with valid pixels, but got none of "
                             f"{len(self.images)}")
        return data


@dataclass
class _Samples:
    """One calibration dataset's fit and held-out samples (fit: `FitSource` in ray mode)."""

    fit: FitData | FitSource
    heldout: FitData | None
    fit_maps: FitData | FitSource | None
    heldout_maps: FitData | None


def _fit_samples(
    record: ImageRecord, fit: Any, ignore_index: int, common_ignore: int, *, held: bool,
    pixels: bool, maps: bool,
) -> tuple[FitData | None, FitData | None]:
    """One image's sampled pixels and strided map (each None when not wanted or empty).

    ``fit`` is the ``fit`` section of the config (``pixels_per_image``, ``seed``,
    ``oversample_mispredicted``, ``map_stride``); held-out pixels are never oversampled.
    """
    points = grid = None
    if pixels:
        logits, labels = _sample_record(
            record, fit.pixels_per_image, fit.seed, ignore_index,
            fit.oversample_mispredicted and not held,
        )
        points = FitData(logits, labels) if len(labels) else None
    if maps:
        z, y, image = record_map(record, stride=fit.map_stride)
        y[y == ignore_index] = common_ignore
        grid = FitData(z[None], y[None], None if image is None else image[None], common_ignore)
    return points, grid


def _load_images(
    images: Sequence[tuple[str, str, str, int]], fit: Any, common_ignore: int | None,
    spatial: bool,
) -> FitData | None:
    """Read and sample `FitSource` images (each shard file once), ordered as in-process."""
    by_file: dict[tuple[str, str], dict[str, int]] = {}
    for directory, file, image_id, ignore in images:
        by_file.setdefault((directory, file), {})[image_id] = ignore
    parts = []
    for (directory, file), wanted in sorted(by_file.items()):
        for record in read_shard(Path(directory) / file):
            if record.image_id in wanted:
                points, grid = _fit_samples(
                    record, fit, wanted[record.image_id], common_ignore, held=False,
                    pixels=not spatial, maps=spatial,
                )
                if (grid if spatial else points) is not None:
                    parts.append((_record_key(record), grid if spatial else points))
    return _concat([data for _, data in sorted(parts, key=lambda p: p[0])])


def _read_dataset(
    cfg: JobConfig,
    directory: Path,
    manifest: Manifest,
    heldout_ids: set[str],
    common_ignore: int,
    with_maps: bool,
) -> _Samples:
    """Sample one dataset in a single pass: pixels always, strided maps for spatial fits.

    In ``ray`` mode the fit images are only checked and counted here (`FitSource`): the Train
    workers read and sample them from the shards, so no fit pixel is held by the driver.
    """
    fit = cfg.fit
    stream = fit.mode == "ray"
    # [held out?] -> ((dataset, image id), sample): sorted later, so shard order cannot matter.
    pixels: dict[bool, list[tuple[tuple[str, str], FitData]]] = {True: [], False: []}
    maps: dict[bool, list[tuple[tuple[str, str], FitData]]] = {True: [], False: []}
    shard_of = {i: shard.file for shard in manifest.shards for i in shard.image_ids}
    refs: list[tuple[str, str, str, int]] = []
    counts = {"pixels": 0, "maps": 0}
    map_sizes = set()
    for record in iter_dataset(directory):
        _check_classes(record, cfg.model.num_classes)
        key, is_held = _record_key(record), record.image_id in heldout_ids
        if stream and not is_held:
            refs.append((str(directory), shard_of[record.image_id], record.image_id,
                         manifest.ignore_index))
            labels = record.labels.astype(np.int64)
            valid = labels != manifest.ignore_index
            counts["pixels"] += min(fit.pixels_per_image, int(valid.sum()))
            step = fit.map_stride
            counts["maps"] += int(valid[::step, ::step].sum())
            map_sizes.add(labels[::step, ::step].shape)
            continue
        points, grid = _fit_samples(
            record, fit, manifest.ignore_index, common_ignore, held=is_held, pixels=True,
            maps=with_maps,
        )
        if points is not None:
            pixels[is_held].append((key, points))
        if grid is not None:
            maps[is_held].append((key, grid))
            map_sizes.add(tuple(grid.labels.shape[-2:]))
    if stream and with_maps and len(map_sizes) > 1:
        raise ValueError(
            f"Expected calibration maps of one size for a spatial calibrator, but got "
            f"{sorted(map_sizes)}; extract the calibration data at one label size"
        )
    has_fit = bool(pixels[False]) or counts["pixels"] > 0
    if not has_fit and not pixels[True]:
        raise ValueError(
            f"Expected calibration dataset {manifest.dataset!r} ({directory}) to hold pixels "
            f"not equal to `ignore_index`={manifest.ignore_index}, but all "
            f"{manifest.n_images} images are fully ignored"
        )
    if not has_fit:
        raise ValueError(
            f"Expected the fit part of calibration dataset {manifest.dataset!r} ({directory}) "
            "to hold valid pixels, but only its held-out images have any"
        )

    def ordered(parts: list[tuple[tuple[str, str], FitData]]) -> FitData | None:
        return _concat([data for _, data in sorted(parts, key=lambda p: p[0])])

    if stream:
        return _Samples(
            FitSource(tuple(refs), False, counts["pixels"]), ordered(pixels[True]),
            FitSource(tuple(refs), True, counts["maps"], common_ignore) if with_maps else None,
            ordered(maps[True]),
        )
    return _Samples(
        ordered(pixels[False]), ordered(pixels[True]), ordered(maps[False]), ordered(maps[True])
    )


def _concat(parts: Sequence[Any]) -> Any:
    """Concatenate fit data along dim 0 (images only when every part has them); None if empty.

    `FitSource` parts concatenate their image lists.

    Raises:
        ValueError: When maps of different sizes meet.
    """
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if isinstance(parts[0], FitSource):
        return FitSource(tuple(i for p in parts for i in p.images), parts[0].spatial,
                         sum(p.n_valid for p in parts), parts[0].ignore_index)
    if parts[0].logits.dim() == 4:
        sizes = sorted({tuple(p.labels.shape[-2:]) for p in parts})
        if len(sizes) > 1:
            raise ValueError(
                f"Expected calibration maps of one size for a spatial calibrator, but got "
                f"{sizes}; extract the calibration data at one label size"
            )
    images = None
    if all(p.images is not None for p in parts):
        images = torch.cat([p.images for p in parts])
    return FitData(
        torch.cat([p.logits for p in parts]), torch.cat([p.labels for p in parts]), images,
        parts[0].ignore_index,
    )


# --------------------------------------------------------------------------------------------
# Held-out metrics.


def heldout_metrics(
    calibrator: Calibrator | None, data: FitData, *, n_bins: int = 15, chunk: int = 8
) -> dict[str, float]:
    """NLL and pooled ECE (`pipeline.metrics.ece`) of ``calibrator`` on ``data``.

    Args:
        calibrator: A fitted calibrator, or None for the raw logits ("uncalibrated").
        data: Pointwise (P, C) / (P,) pixels, or (N, C, H, W) maps with ``ignore_index``.
        n_bins: ECE bins.
        chunk: Maps per forward pass (bounds memory for spatial calibrators).

    Returns:
        ``{"nll": ..., "ece": ..., "pixels": ...}`` (mean NLL over valid pixels).
    """
    step = chunk if data.logits.dim() == 4 else len(data.labels)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(data.labels), step):
            logits = data.logits[start : start + step]
            if calibrator is not None:
                image = None if data.images is None else data.images[start : start + step]
                logits = calibrator(logits, image)
            outputs.append(logits.float())
    logits = torch.cat(outputs)
    ignore = -100 if data.ignore_index is None else data.ignore_index
    n_valid = _n_valid(data)
    nll = F.cross_entropy(logits, data.labels, ignore_index=ignore, reduction="sum") / n_valid
    # the logits' argmax: a huge temperature flattens probabilities into float32 ties
    value = ece(torch.softmax(logits, 1), data.labels, n_bins=n_bins,
                ignore_index=data.ignore_index, preds=logits.argmax(1))
    return {"nll": float(nll), "ece": float(value), "pixels": n_valid}


def _n_valid(data: FitData | FitSource) -> int:
    if isinstance(data, FitSource):
        return data.n_valid
    if data.ignore_index is None:
        return data.labels.numel()
    return int((data.labels != data.ignore_index).sum())


# --------------------------------------------------------------------------------------------
# Ray Train: every worker runs the calibrators' own `fit` on its shard, with the reduce hook.


def _rows(data: FitData) -> dict[str, Tensor]:
    """The Ray dataset columns of fit data: one row per pixel (pointwise) or per map."""
    rows = {"logits": data.logits, "label": data.labels}
    if data.images is not None:
        rows["image"] = data.images
    return rows


def _padded(rows: dict[str, Tensor], multiple: int) -> dict[str, Tensor]:
    """Pad rows to a multiple of the worker count, marking the copies in a ``pad`` column.

    ``streaming_split(equal=True)`` drops the rows that do not divide evenly; the workers drop
    the ``pad`` rows, so every fit row is used exactly once.
    """
    n = len(rows["label"])
    extra = (-n) % multiple
    out = {k: torch.cat([v, v[:1].expand(extra, *v.shape[1:])]) for k, v in rows.items()}
    out["pad"] = torch.arange(n + extra) >= n
    return out


def _ray_dataset(rows: dict[str, Tensor]) -> Any:
    """An in-memory Ray dataset of tensor columns, in Arrow blocks of ``_BLOCK_ROWS`` rows.

    Built from blocks already in memory, so it needs no Ray Data tasks: the Train workers,
    which hold their CPUs for the whole fit, cannot starve a read or map stage (the known hang
    of Train + Data on small machines).
    """
    import pyarrow as pa
    import ray.data

    columns = {}
    for key, value in rows.items():
        array = value.cpu().numpy()
        columns[key] = (pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))
                        if array.ndim > 1 else pa.array(array))
    table = pa.table(columns)
    return ray.data.from_arrow(
        [table.slice(i, _BLOCK_ROWS) for i in range(0, table.num_rows, _BLOCK_ROWS)]
    )


def _source_dataset(source: FitSource, multiple: int) -> Any:
    """A Ray dataset of `FitSource` image references (no tensors), padded like `_padded`."""
    import ray.data

    items = [{"dir": d, "file": f, "image_id": i, "ignore": g, "pad": False}
             for d, f, i, g in source.images]
    extra = (-len(items)) % multiple
    items += [{**items[0], "pad": True} for _ in range(extra)]
    return ray.data.from_items(items)


def _source_rows(shard: Any, fit: Any, source: dict[str, Any]) -> dict[str, Tensor]:
    """Read and sample this worker's share of `FitSource` images from their shards."""
    images = [(row["dir"], row["file"], row["image_id"], int(row["ignore"]))
              for batch in shard.iter_batches(batch_format="numpy")
              for row in ({k: v[j] for k, v in batch.items()} for j in range(len(batch["pad"])))
              if not row["pad"]]
    data = FitSource(tuple(images), source["spatial"], 0, source["ignore_index"]).load(fit)
    return _rows(data)


def _shard_tensors(shard: Any) -> dict[str, Tensor]:
    """Materialise this worker's shard without its ``pad`` rows (full-batch fits need it)."""
    columns: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=_BLOCK_ROWS, batch_format="numpy"):
        for key, value in batch.items():
            columns.setdefault(key, []).append(value)
    tensors = {k: torch.from_numpy(np.concatenate(v)) for k, v in columns.items()}
    keep = ~tensors.pop("pad")
    return {k: v[keep] for k, v in tensors.items()}


def _report(metrics: dict[str, Any], states: dict[str, dict[str, Tensor]] | None) -> None:
    """``ray.train.report`` on every rank; rank 0 (``states`` given) attaches a checkpoint."""
    import ray.train
    import safetensors.torch

    if states is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for i, state in enumerate(states.values()):
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
            safetensors.torch.save_file(tensors, str(Path(tmp) / f"{i}.safetensors"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: each calibrator's own ``fit`` on this worker's shard.

    Runs inside a ``TorchTrainer`` worker (see `fit_specs`). ``config`` holds ``jobs`` (one
    ``{"label", "name", "options", "layout"}`` per calibrator, fitted in order),
    ``num_classes``, ``seed``, and per layout (``"pixels"`` / ``"maps"``) its ``ignore_index``
    and ``heldout`` (an object ref of the held-out `FitData`, or None). The fit rows of a layout
    come from ``ray.train.get_dataset_shard(layout)``; held-out data is whole on every worker.

    Every rank calls ``fit(..., reduce=DistributedReduce())``, so sums, counts, loss values and
    gradients over the fit rows are all-reduced and every rank takes the same steps; the
    calibrator's optimiser, defaults, warm starts, grids, refits and early stopping are the
    in-process ones. Rank 0 reports the fitted states as one checkpoint.
    """
    import ray
    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    reduce = DistributedReduce()
    start = time.perf_counter()
    # Sorted: every worker must read the split datasets in the same order (a set's order
    # depends on the process's hash seed), or each waits for the others forever.
    layouts = sorted({job["layout"] for job in config["jobs"]})
    shards = {
        layout: _shard_tensors(ray.train.get_dataset_shard(layout))
        if config["source"][layout] is None else
        _source_rows(ray.train.get_dataset_shard(layout), config["fit"], config["source"][layout])
        for layout in layouts
    }
    heldout = {layout: None if config["heldout"][layout] is None
               else ray.get(config["heldout"][layout]) for layout in layouts}
    metrics: dict[str, Any] = {"load_seconds": time.perf_counter() - start, "fit_seconds": {}}
    states = {}
    for job in config["jobs"]:
        rows, layout = shards[job["layout"]], job["layout"]
        calibrator = build_calibrator(job["name"], config["num_classes"], **job["options"])
        start = time.perf_counter()
        calibrator.to(device).fit(
            rows["logits"], rows["label"], ignore_index=config["ignore_index"][layout],
            images=rows.get("image"), heldout=heldout[layout], seed=config["seed"],
            reduce=reduce,
        )
        metrics["fit_seconds"][job["label"]] = time.perf_counter() - start
        states[job["label"]] = calibrator.state_dict()
    _report(metrics, states if rank == 0 else None)


def _concurrent_runs(cfg: JobConfig, n_jobs: int) -> int:
    """TorchTrainer runs the cluster holds at once: each takes ``num_workers`` CPUs (GPUs).

    One CPU per run stays free for Ray Data's split coordination (Train workers that hold
    every CPU starve it). 1 when Ray is not started yet (the trainer starts it).
    """
    import ray

    if not ray.is_initialized():
        return 1
    total = ray.cluster_resources()
    workers = cfg.fit.num_workers
    room = int(total.get("CPU", 0) // (workers + 1))
    if cfg.fit.use_gpu:
        room = min(room, int(total.get("GPU", 0) // workers))
    return max(1, min(n_jobs, room))


def _fit_ray(
    cfg: JobConfig, jobs: list[dict[str, Any]],
    data: dict[str, tuple[FitData | FitSource, FitData | None]],
) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """Fit ``jobs`` in one TorchTrainer run; returns their states and the run's timings."""
    import ray
    import ray.train
    import safetensors.torch
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    layouts = sorted({job["layout"] for job in jobs})
    sources = {k: data[k][0] if isinstance(data[k][0], FitSource) else None for k in layouts}
    # Every worker needs rows: fewer maps (or images) than workers means fewer workers.
    workers = min(cfg.fit.num_workers, *(
        len(data[k][0].images) if sources[k] else len(data[k][0].labels) for k in layouts
    ))
    if workers < cfg.fit.num_workers:
        logger.warning("%d fit rows for %d workers: fitting on %d", workers,
                       cfg.fit.num_workers, workers)
    config = {
        "jobs": jobs,
        "num_classes": cfg.model.num_classes,
        "seed": cfg.fit.seed,
        "ignore_index": {k: data[k][0].ignore_index for k in layouts},
        "heldout": {k: None if data[k][1] is None else ray.put(data[k][1]) for k in layouts},
        # Fit images each worker reads from the shards (None: rows from the driver's data).
        "source": {k: None if sources[k] is None else
                   {"spatial": sources[k].spatial, "ignore_index": sources[k].ignore_index}
                   for k in layouts},
        "fit": cfg.fit,
    }
    resources = {"CPU": 1.0, **({"GPU": 1.0} if cfg.fit.use_gpu else {})}
    storage = Path(cfg.output).resolve() / "ray_train"
    name = f"fit-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.fit.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
        datasets={k: _source_dataset(sources[k], workers) if sources[k] else
                  _ray_dataset(_padded(_rows(data[k][0]), workers)) for k in layouts},
        dataset_config=ray.train.DataConfig(
            datasets_to_split=layouts, execution_options=ExecutionOptions(verbose_progress=False),
        ),
    )
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    if result.checkpoint is None:
        raise RuntimeError(f"Expected a checkpoint from the Ray Train fit of "
                           f"{[job['label'] for job in jobs]}, but the run reported none")
    with result.checkpoint.as_directory() as directory:
        states = [safetensors.torch.load_file(str(Path(directory) / f"{i}.safetensors"))
                  for i in range(len(jobs))]
    shutil.rmtree(storage / name, ignore_errors=True)
    metrics = dict(result.metrics or {})
    fit_seconds = metrics.get("fit_seconds", {})
    timings = {
        "workers": workers,
        "calibrators_in_run": len(jobs),
        "trainer_seconds": wall,
        "load_seconds": metrics.get("load_seconds"),
        # Worker group and process group start, dataset split and reporting: what a local fit
        # does not pay.
        "startup_seconds": wall - metrics.get("load_seconds", 0.0) - sum(fit_seconds.values()),
        "fit_seconds": fit_seconds,
    }
    return states, timings


# --------------------------------------------------------------------------------------------
# The stage.


def fit_specs(
    cfg: JobConfig,
    specs: Sequence[CalibratorSpec],
    data: dict[bool, tuple[FitData | FitSource, FitData | None]],
    *,
    indices: Sequence[int] | None = None,
) -> list[tuple[Calibrator, dict[str, Any]]]:
    """Fit calibrator specs on in-memory data, in ``cfg.fit.mode`` (what `run` does).

    ``local``: each calibrator's ``fit`` in this process. ``ray``: TorchTrainer runs of
    ``cfg.fit.num_workers`` workers, as many at once as the cluster holds (`_concurrent_runs`),
    fit them, each worker running the same ``fit`` on its shard of the rows (see
    `train_loop_per_worker`); a calibrator without the ``distributed`` capability is fitted
    here instead, with a warning.

    Args:
        cfg: The run config (``model.num_classes``, ``fit``, and ``output`` for Ray Train's
            storage under ``OUTPUT/ray_train``).
        specs: The calibrator specs; the fit-stage options (`FIT_OPTIONS`) are dropped.
        data: ``{spatial: (fit, heldout)}``: pointwise (P, C) / (P,) valid pixels under False,
            maps under True, for the layouts the specs need; ``fit`` may be a `FitSource`
            (the images stay in their shards: the workers, or this process, read them).
        indices: The specs' positions in ``cfg.calibrators`` (for error messages).

    Returns:
        Per spec, the fitted calibrator and ``{"mode", "seconds"[, "ray"]}``: ``seconds`` is
        the fit itself; ``ray`` holds the run's timings, Ray Train's start-up apart.
    """
    indices = list(range(len(specs))) if indices is None else list(indices)
    calibrators, options = [], []
    for spec, index in zip(specs, indices, strict=True):
        options.append(_spec_options(cfg, spec, index)[0])
        calibrators.append(build_calibrator(spec.name, cfg.model.num_classes, **options[-1]))
    extras: list[dict[str, Any]] = [{"mode": "local"} for _ in specs]
    remote = []
    if cfg.fit.mode == "ray":
        for i, calibrator in enumerate(calibrators):
            if calibrator.distributed:
                remote.append(i)
            else:
                logger.warning("%r has no distributed fit; fitting it in the driver",
                               specs[i].key)
    # Independent calibrators fit concurrently: as many TorchTrainer runs at once as the
    # cluster has room for, each fitting its share of the calibrators in turn. A run's driver
    # side only waits on its controller actor (TorchTrainer.fit supports non-main threads).
    n_runs = _concurrent_runs(cfg, len(remote)) if remote else 0
    runs = [remote[k::n_runs] for k in range(n_runs)]

    def fit_run(run: list[int]) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
        jobs = [
            {"label": specs[i].key, "name": specs[i].name, "options": options[i],
             "layout": _LAYOUTS[type(calibrators[i]).spatial]}
            for i in run
        ]
        layouts = {job["layout"] for job in jobs}
        return _fit_ray(cfg, jobs, {_LAYOUTS[s]: part for s, part in data.items()
                                    if _LAYOUTS[s] in layouts})

    with ThreadPoolExecutor(max_workers=max(len(runs), 1)) as pool:
        outcomes = list(pool.map(fit_run, runs))
    for run, (states, timings) in zip(runs, outcomes, strict=True):
        timings = {**timings, "concurrent_runs": len(runs)}
        for i, state in zip(run, states, strict=True):
            calibrators[i].load_state_dict(state)
            calibrators[i].eval()
            extras[i] = {"mode": "ray", "seconds": timings["fit_seconds"].get(specs[i].key),
                         "ray": timings}
    for i, calibrator in enumerate(calibrators):
        if i in remote:
            continue
        fit, heldout = data[type(calibrator).spatial]
        if isinstance(fit, FitSource):
            fit = fit.load(cfg.fit)
        start = time.perf_counter()
        calibrator.fit(
            fit.logits, fit.labels, ignore_index=fit.ignore_index, images=fit.images,
            heldout=heldout, seed=cfg.fit.seed,
        )
        extras[i]["seconds"] = time.perf_counter() - start
    return list(zip(calibrators, extras, strict=True))


def fit_spec(
    cfg: JobConfig,
    spec: CalibratorSpec,
    fit: FitData,
    heldout: FitData | None = None,
    *,
    index: int = 0,
) -> tuple[Calibrator, dict[str, Any]]:
    """Fit one calibrator spec on in-memory data of its layout (see `fit_specs`)."""
    return fit_specs(cfg, [spec], {False: (fit, heldout), True: (fit, heldout)},
                     indices=[index])[0]


def run(cfg: JobConfig) -> dict[str, Path]:
    """Fit every calibrator of ``cfg.calibrators`` and write its artifact.

    Args:
        cfg: The run config (``datasets`` with role ``calibration``, ``calibrators``, ``fit``).

    Returns:
        Calibrator label -> artifact folder (``OUTPUT/artifacts/<label>``).

    Raises:
        ValueError: No calibration dataset, an unknown calibrator name or option, a
            class-count mismatch between shards and ``model.num_classes``, a calibration set
            without valid pixels, missing corrupted data for ``use_corrupted`` (all raised
            before any data is fitted or a worker starts).
        TypeError: A calibrator option of the wrong type.
        FileNotFoundError: A calibration dataset was never extracted.
    """
    jobs = _plan(cfg)
    paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
    calibration = cfg.datasets_with_role("calibration")
    manifests = _read_manifests(cfg, paths, [d.name for d in calibration])
    clean = [d.name for d in calibration if d.corruption is None]
    ignore_index = manifests[clean[0]].ignore_index
    # The split covers every calibration set's ids, as `pipeline.evaluate` recomputes it.
    ids = {i for m in manifests.values() for i in m.image_ids()}
    heldout_ids = split_heldout(ids, cfg.fit.heldout_fraction, cfg.fit.seed)
    with_maps = any(job.spatial for job in jobs)
    samples = {
        name: _read_dataset(cfg, paths.dataset_dir(name), manifests[name], heldout_ids,
                            ignore_index, with_maps)
        for name in sorted({n for job in jobs for n in job.datasets})
    }

    def parts(names: Iterable[str], spatial: bool, held: bool) -> FitData | None:
        attr = ("heldout" if held else "fit") + ("_maps" if spatial else "")
        return _concat([getattr(samples[n], attr) for n in names])

    # Every calibrator is scored on the same clean held-out images (the fit images when
    # nothing valid is held out).
    split = "heldout" if parts(clean, False, True) is not None else "fit"
    if heldout_ids and split == "fit":
        logger.warning("The held-out images hold no valid pixel; metrics are on fit data")
    scored = {spatial: parts(clean, spatial, split == "heldout")
              for spatial in {job.spatial for job in jobs}}
    # Calibrators that fit on the same datasets share one fit (one Ray Train run).
    groups: dict[tuple[str, ...], list[_Job]] = {}
    for job in jobs:
        groups.setdefault(job.datasets, []).append(job)
    results: dict[int, tuple[Calibrator, dict[str, Any]]] = {}
    for datasets, group in groups.items():
        data = {spatial: (parts(datasets, spatial, False), parts(datasets, spatial, True))
                for spatial in {job.spatial for job in group}}
        fitted_group = fit_specs(cfg, [job.spec for job in group], data,
                                 indices=[job.index for job in group])
        results.update({job.index: out for job, out in zip(group, fitted_group, strict=True)})
    fitted = []
    for job in jobs:
        calibrator, extra = results[job.index]
        n_bins = cfg.evaluate.n_bins
        metrics = {
            "split": split,
            split: heldout_metrics(calibrator, scored[job.spatial], n_bins=n_bins),
            "uncalibrated": heldout_metrics(None, scored[job.spatial], n_bins=n_bins),
            "fit_pixels": _n_valid(parts(job.datasets, job.spatial, False)),
            "datasets": list(job.datasets),
            **extra,
        }
        logger.info(
            "%s: %s NLL %.4f ECE %.4f (uncalibrated NLL %.4f ECE %.4f), %s fit in %.1fs",
            job.label, split, metrics[split]["nll"], metrics[split]["ece"],
            metrics["uncalibrated"]["nll"], metrics["uncalibrated"]["ece"], extra["mode"],
            extra["seconds"],
        )
        fingerprint = data_fingerprint(manifests[n] for n in job.datasets)
        fitted.append((job, calibrator, metrics, fingerprint))

    # Only now, with every fit done, replace artifacts (each save is an atomic swap).
    return {
        job.label: save(
            calibrator, paths.artifact_dir(job.label), class_names=cfg.model.names(),
            ignore_index=ignore_index, metrics=metrics, data_fingerprint=fingerprint,
        )
        for job, calibrator, metrics, fingerprint in fitted
    }
