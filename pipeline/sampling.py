"""Fit data from shards: the held-out split, per-image pixel sampling, maps, image references.

Pure functions of records and seeds, independent of shard order, shared by the fit stage
(in-process and in every Ray Train worker), evaluation (`split_heldout`) and the benchmarks.
`FitSource` names fit images left in their shards, so that a Ray Train worker reads and samples
its share by the same rule as the in-process fit.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from pipeline.calibrators import FitData, read_card
from pipeline.config import JobConfig
from pipeline.paths import ORACLE, RunPaths
from pipeline.shards import (
    ImageRecord,
    data_fingerprint,
    read_manifest,
    read_shard,
    upsample_logits,
)
from pipeline.storage import location

logger = logging.getLogger(__name__)

__all__ = [
    "FitSource",
    "check_classes",
    "concat_fit_data",
    "fit_samples",
    "load_images",
    "record_key",
    "record_map",
    "sample_pixel_indices",
    "sample_pixels",
    "sample_record",
    "split_heldout",
]


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


def check_classes(record: ImageRecord, num_classes: int) -> None:
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
            check_classes(record, num_classes)
        logits, labels = sample_record(
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


def sample_record(
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


def record_key(record: ImageRecord) -> tuple[str, str]:
    return record.dataset, record.image_id


@dataclass(frozen=True)
class FitSource:
    """Fit images left in their shards: in ``ray`` mode each worker reads and samples its own.

    The driver keeps only these references (and the held-out samples); the pixels a worker
    fits on are drawn there by the same seeded per-image rule as in-process (`fit_samples`),
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
        data = load_images(self.images, fit, self.ignore_index, self.spatial)
        if data is None:
            raise ValueError(f"Expected fit images with valid pixels, but got none of "
                             f"{len(self.images)}")
        return data



def fit_samples(
    record: ImageRecord, fit: Any, ignore_index: int, common_ignore: int, *, held: bool,
    pixels: bool, maps: bool,
) -> tuple[FitData | None, FitData | None]:
    """One image's sampled pixels and strided map (each None when not wanted or empty).

    ``fit`` is the ``fit`` section of the config (``pixels_per_image``, ``seed``,
    ``oversample_mispredicted``, ``map_stride``); held-out pixels are never oversampled.
    """
    points = grid = None
    if pixels:
        logits, labels = sample_record(
            record, fit.pixels_per_image, fit.seed, ignore_index,
            fit.oversample_mispredicted and not held,
        )
        points = FitData(logits, labels) if len(labels) else None
    if maps:
        z, y, image = record_map(record, stride=fit.map_stride)
        y[y == ignore_index] = common_ignore
        grid = FitData(z[None], y[None], None if image is None else image[None], common_ignore)
    return points, grid


def load_images(
    images: Sequence[tuple[str, str, str, int]], fit: Any, common_ignore: int | None,
    spatial: bool,
) -> FitData | None:
    """Read and sample `FitSource` images (each shard file once), ordered as in-process."""
    by_file: dict[tuple[str, str], dict[str, int]] = {}
    for directory, file, image_id, ignore in images:
        by_file.setdefault((directory, file), {})[image_id] = ignore
    parts = []
    for (directory, file), wanted in sorted(by_file.items()):
        for record in read_shard(location(directory) / file):
            if record.image_id in wanted:
                points, grid = fit_samples(
                    record, fit, wanted[record.image_id], common_ignore, held=False,
                    pixels=not spatial, maps=spatial,
                )
                if (grid if spatial else points) is not None:
                    parts.append((record_key(record), grid if spatial else points))
    return concat_fit_data([data for _, data in sorted(parts, key=lambda p: p[0])])



def concat_fit_data(parts: Sequence[Any]) -> Any:
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


def oracle_artifacts(cfg: JobConfig, paths: RunPaths) -> dict[str, str]:
    """Test set -> its oracle artifact folder, for the sets whose oracle is current.

    An oracle is current when its card's data fingerprint equals that of the set's shards;
    a missing or stale one is left out with a warning (``segcal fit`` writes them).

    Args:
        cfg: The run config.
        paths: The run's folders.

    Returns:
        ``{dataset: folder}`` in config order of the test sets.
    """
    found = {}
    for ds in cfg.datasets_with_role("test"):
        directory = paths.oracle_dir(ds.name)
        try:
            card = read_card(directory)
            manifest = read_manifest(paths.dataset_dir(ds.name))
        except FileNotFoundError:
            logger.warning("no %s artifact for test set %r at %s: run `segcal fit`", ORACLE,
                           ds.name, directory)
            continue
        if card.get("data_fingerprint") != data_fingerprint([manifest]):
            logger.warning("the %s artifact at %s was fitted on other shards of %r than these: "
                           "left out; run `segcal fit`", ORACLE, directory, ds.name)
            continue
        found[ds.name] = str(directory)
    return found
