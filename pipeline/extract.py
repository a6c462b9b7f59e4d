"""Stage 1: run the model over every dataset with Ray Data and store the logits as shards.

Per dataset::

    listing (driver) -> ray.data.from_items -> map(decode_row)           read, corrupt, validate
                     -> map_batches(LogitPredictor,                      model on one GPU per
                                    compute=ActorPoolStrategy(size=n))   actor, else on CPU
                     -> iter_batches on the driver -> shards.write_shard every rows_per_shard
                     -> shards.write_manifest                            last

With GPU actors the decode map runs as separate CPU tasks that overlap with inference. On a
CPU-only cluster both steps ask for the same resources, so Ray Data fuses the decode map into
the actor stage: decoding then runs in the actor, which saves moving decoded images through
the object store and costs nothing when both compete for the same cores anyway.

Writing happens on the driver, as the mapped dataset streams in. One writer gives sequential
shard names, no races and an exact record of what exists when the manifest is written; memory
stays bounded by ``rows_per_shard`` rows per shape, and Ray Data's backpressure keeps the
actors from running far ahead. The price is that every logit travels to the driver and one
process compresses it: about 0.1 CPU-second per 11x360x480 image (CamVid, full resolution), so
the writer caps out near 10 images/s. That is far above CPU inference, but it bounds a
multi-GPU pool; ``store_stride: 2`` cuts the data fourfold.

Resuming: writes are atomic and the manifest comes last, so a killed or failed run leaves
complete shards that no manifest names. A rerun adopts them, keeps the shards of the previous
manifest and extracts only image ids found in neither; shards of another model live under
another fingerprint folder. Bad input stops the stage with a message naming the file, or with
``extract.on_error: skip`` is recorded in the manifest's ``skipped`` list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import DatasetConfig, ExtractConfig, JobConfig, ModelConfig, config_hash
from pipeline.data import DataError, Sample, label_dtype, list_samples, load_sample
from pipeline.models import load_model, model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import (
    MANIFEST_NAME,
    SHARD_PATTERN,
    ImageRecord,
    Manifest,
    ShardInfo,
    describe_shard,
    read_manifest,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)
_SHARD_NAME = re.compile(r"part-(\d+)\.parquet")


def content_hash(ds: DatasetConfig, ex: ExtractConfig) -> str:
    """Hash of the options that change stored rows (not which images are listed).

    ``limit``, ``include`` and the data paths only choose images, so changing them keeps the
    existing shards valid; label remapping, corruption, tags and storage options do not.
    """
    keys = {
        "dataset": ds.model_dump(
            mode="json",
            include={"format", "split", "role", "domain", "ignore_index", "label_map",
                     "corruption"},
        ),
        "extract": ex.model_dump(
            mode="json", include={"store_stride", "label_resolution", "store_image"}
        ),
    }
    blob = json.dumps(keys, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack equal-shaped arrays; keep ragged ones as an object array (Ray's variable tensors)."""
    if len({(a.shape, a.dtype) for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def decode_row(row: dict[str, Any], cfg: DatasetConfig, num_classes: int) -> dict[str, Any]:
    """Ray Data read step: decode one listed image and its labels.

    Args:
        row: ``image_id``, ``uri`` and ``label_uri`` ("" when the image has no label).
        cfg: the dataset's config.
        num_classes: classes the model scores.

    Returns:
        The row plus ``image`` (H, W, 3) uint8, ``labels`` (H, W) uint8/uint16 and ``error``
        ("" when fine; otherwise the message naming the file, with empty arrays).
    """
    sample = Sample(row["image_id"], row["uri"], row["label_uri"] or None)
    try:
        image, labels = load_sample(sample, cfg, num_classes)
        error = ""
    except DataError as err:
        image = np.zeros((0, 0, 3), np.uint8)
        labels = np.zeros((0, 0), label_dtype(num_classes, cfg.ignore_index))
        error = str(err)
    return {**row, "image": image, "labels": labels, "error": error}


def _reduce(logits: torch.Tensor, stride: int) -> torch.Tensor:
    """Area-downsample (C, h, w) logits by ``stride`` (mean over each stride x stride cell).

    Averaging rather than subsampling keeps each stored value representative of the pixels
    it covers; with bilinear upsampling on read it round-trips smooth maps closely.
    """
    if stride == 1:
        return logits
    h, w = logits.shape[-2:]
    size = (math.ceil(h / stride), math.ceil(w / stride))
    return F.adaptive_avg_pool2d(logits[None], size)[0]


class LogitPredictor:
    """Ray Data actor: runs the model on decoded batches and prepares rows for the shards.

    Plain Python, so it also runs without Ray (tests call it directly).

    Args:
        model_cfg: the model to load with :func:`pipeline.models.load_model`.
        extract_cfg: storage options (stride, label resolution, image).
        threads: torch intra-op threads (Ray sets 1 per logical CPU by default).
        use_gpu: put the model on the GPU that Ray assigned to this actor.
    """

    def __init__(
        self, model_cfg: ModelConfig, extract_cfg: ExtractConfig, threads: int = 1,
        use_gpu: bool = False,
    ) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_model(model_cfg).to(self.device).eval()
        self.num_classes = model_cfg.num_classes
        self.cfg = extract_cfg

    @torch.inference_mode()
    def _logits(self, images: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(images)).to(self.device)
        return self.model(x).float().cpu()

    def _predict_group(self, images: list[np.ndarray], uris: list[str]) -> list[Any]:
        """Logits per image, or the error message for images whose output is unusable."""
        try:
            return list(self._logits(images))
        except ValueError:
            if len(images) == 1:
                raise
        # Rerun one by one so only the offending images are reported.
        out: list[Any] = []
        for image, uri in zip(images, uris, strict=True):
            try:
                out.append(self._logits([image])[0])
            except ValueError as err:
                out.append(f"Expected usable model output for image {uri}, but got: {err}")
        return out

    def _store(self, logits: torch.Tensor, image: np.ndarray, size: tuple[int, int]) -> tuple:
        if self.cfg.label_resolution:
            logits = F.interpolate(logits[None], size=size, mode="bilinear",
                                   align_corners=False)[0]
        else:
            logits = _reduce(logits, self.cfg.store_stride)
        h, w = logits.shape[-2:]
        stored_image = None
        if self.cfg.store_image:
            stored_image = image
            if image.shape[:2] != (h, w):
                pil = Image.fromarray(image).resize((w, h), Image.BILINEAR)
                stored_image = np.asarray(pil, dtype=np.uint8)
        return logits.to(torch.float16).contiguous().numpy(), stored_image

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map a decoded batch to shard rows.

        Args:
            batch: columns ``image_id``, ``uri``, ``label_uri``, ``image``, ``labels``,
                ``error`` (see :func:`decode_row`).

        Returns:
            Columns ``image_id``, ``uri``, ``error``, ``labels``, ``logits`` (C, h, w) float16
            and, with ``store_image``, ``image`` (h, w, 3) uint8. Rows with an error carry
            empty arrays.
        """
        n = len(batch["image_id"])
        images, labels = list(batch["image"]), list(batch["labels"])
        errors = [str(e) for e in batch["error"]]
        uris = [str(u) for u in batch["uri"]]
        logits: list[np.ndarray] = [np.zeros((self.num_classes, 0, 0), np.float16)] * n
        stored: list[np.ndarray] = [np.zeros((0, 0, 3), np.uint8)] * n
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault(images[i].shape, []).append(i)
        # The model takes one (N, H, W, 3) tensor, so images of different sizes run apart.
        for idx in groups.values():
            results = self._predict_group([images[i] for i in idx], [uris[i] for i in idx])
            for i, result in zip(idx, results, strict=True):
                if isinstance(result, str):
                    errors[i] = result
                    continue
                logits[i], image = self._store(result, images[i], labels[i].shape)
                if image is not None:
                    stored[i] = image
        out = {
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "error": np.array(errors, dtype=object),
            "labels": _column(labels),
            "logits": _column(logits),
        }
        if self.cfg.store_image:
            out["image"] = _column(stored)
        return out


def _pool_resources(requested: int | None, blocks: int) -> dict[str, Any]:
    """Actor pool size and per-actor resources, from what the cluster has free now.

    Ray Data hangs when an actor pool holds every CPU (ray-project/ray#44687): read tasks never
    get scheduled. One CPU (half of a lone CPU) is therefore always left for them. Without a
    request the pool has one actor per GPU, or one per two free CPUs; never more actors than
    input blocks, since extra ones would only start up to sit idle. CPU actors split the
    cluster's cores between them as torch threads.
    """
    free = ray.available_resources()
    cpus, gpus = float(free.get("CPU", 0.0)), int(free.get("GPU", 0.0))
    reserve = 1.0 if cpus >= 2 else cpus / 2
    if gpus >= 1:
        size = min(requested or gpus, gpus)
    else:
        limit = max(1, int(cpus - reserve))
        size = min(requested or max(1, int(cpus) // 2), limit)
    size = max(1, min(size, blocks))
    if requested is not None and size < min(requested, blocks):
        warnings.warn(
            f"`extract.num_actors`={requested} exceeds what the cluster has free "
            f"({cpus:g} CPU, {gpus} GPU, one CPU kept for read tasks); using {size}",
            stacklevel=3,
        )
    total_cpus = float(ray.cluster_resources().get("CPU", cpus))
    return {
        "size": size,
        "num_gpus": 1 if gpus >= 1 else 0,
        "num_cpus": max(0.01, min(1.0, (cpus - reserve) / size)),
        "threads": max(1, int(total_cpus // size)),
        # Decode tasks fit in the reserve; on CPU-only clusters they then ask for the same CPUs
        # as the actors, so Ray Data fuses them into the actor stage (see module docstring).
        "read_cpus": min(1.0, reserve),
    }


def _existing_shards(
    directory: Path, ds: DatasetConfig, fingerprint: str, content: str
) -> list[ShardInfo]:
    """Shards a rerun keeps: the previous manifest's (if present on disk) plus orphans."""
    shards: list[ShardInfo] = []
    if (directory / MANIFEST_NAME).is_file():
        old = read_manifest(directory)
        if old.model_fingerprint != fingerprint:
            raise ValueError(
                f"Expected manifest {directory / MANIFEST_NAME} to be for model {fingerprint}, "
                f"but got {old.model_fingerprint}"
            )
        if old.content_hash != content:
            raise ValueError(
                f"Expected dataset {ds.name!r} in {directory} to have been extracted with the "
                f"same label/corruption/storage options (content hash {content}), but got "
                f"{old.content_hash}: use another output folder or dataset name"
            )
        for shard in old.shards:
            if (directory / shard.file).is_file():
                shards.append(shard)
            else:
                warnings.warn(
                    f"Shard {directory / shard.file} named in the manifest is missing; its "
                    f"images are extracted again",
                    stacklevel=3,
                )
    known = {s.file for s in shards}
    ids = {i for s in shards for i in s.image_ids}
    for leftover in sorted(directory.glob(".part-*.tmp")):
        leftover.unlink()
    for path in sorted(directory.glob(SHARD_PATTERN)):
        if path.name in known:
            continue
        try:
            info = describe_shard(path)
        except ValueError as err:
            warnings.warn(f"Removing unreadable orphan shard: {err}", stacklevel=3)
            path.unlink()
            continue
        if ids.isdisjoint(info.image_ids):
            logger.info("%s: adopting %d images from unfinished run (%s)", ds.name, info.rows,
                        path.name)
            shards.append(info)
            ids.update(info.image_ids)
        else:
            path.unlink()
    return shards


class _ShardWriter:
    """Buffers rows per shape and writes a shard whenever a buffer is full."""

    def __init__(self, directory: Path, first_index: int, rows_per_shard: int) -> None:
        self.directory = directory
        self.index = first_index
        self.rows_per_shard = rows_per_shard
        self.buffers: dict[tuple, list[ImageRecord]] = {}
        self.written: list[ShardInfo] = []

    def add(self, record: ImageRecord) -> None:
        key = (record.logits.shape, record.labels.shape, record.labels.dtype.str,
               None if record.image is None else record.image.shape)
        buf = self.buffers.setdefault(key, [])
        buf.append(record)
        if len(buf) >= self.rows_per_shard:
            self._write(key)

    def _write(self, key: tuple) -> None:
        path = self.directory / f"part-{self.index:05d}.parquet"
        self.written.append(write_shard(path, self.buffers.pop(key)))
        self.index += 1

    def flush(self) -> None:
        for key in list(self.buffers):
            self._write(key)


def _next_index(directory: Path) -> int:
    """The first shard number above every shard file present (kept or adopted)."""
    found = (_SHARD_NAME.fullmatch(p.name) for p in directory.glob(SHARD_PATTERN))
    return max((int(m.group(1)) for m in found if m), default=-1) + 1


def _extract_dataset(
    cfg: JobConfig, ds: DatasetConfig, paths: RunPaths, fingerprint: str, chash: str
) -> Path:
    directory = paths.dataset_dir(ds.name)
    directory.mkdir(parents=True, exist_ok=True)
    content = content_hash(ds, cfg.extract)
    kept = _existing_shards(directory, ds, fingerprint, content)
    done = {i for s in kept for i in s.image_ids}
    todo = [s for s in list_samples(ds) if s.image_id not in done]
    writer = _ShardWriter(directory, _next_index(directory), cfg.extract.rows_per_shard)
    skipped: list[dict[str, str]] = []
    start = time.perf_counter()
    if todo:
        logger.info("%s: %d images to extract (%d already stored)", ds.name, len(todo), len(done))
        rows = _stream(cfg, ds, todo)
        for row in rows:
            if row["error"]:
                if cfg.extract.on_error == "fail":
                    raise DataError(f"Dataset {ds.name!r}: {row['error']}")
                logger.warning("%s: skipping: %s", ds.name, row["error"])
                skipped.append({"uri": str(row["uri"]), "reason": str(row["error"])})
                continue
            labels = row["labels"]
            writer.add(ImageRecord(
                dataset=ds.name, domain=ds.domain, role=ds.role, image_id=str(row["image_id"]),
                uri=str(row["uri"]), height=int(labels.shape[0]), width=int(labels.shape[1]),
                model_fingerprint=fingerprint, labels=labels, logits=row["logits"],
                image=row.get("image") if cfg.extract.store_image else None,
            ))
        writer.flush()
    elapsed = time.perf_counter() - start
    n_new = sum(s.rows for s in writer.written)
    manifest = Manifest(
        dataset=ds.name, role=ds.role, domain=ds.domain, reference=ds.reference,
        num_classes=cfg.model.num_classes, class_names=cfg.model.names(),
        ignore_index=ds.ignore_index, model_fingerprint=fingerprint, config_hash=chash,
        shards=kept + writer.written, skipped=skipped,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        content_hash=content,
    )
    if manifest.n_images == 0:
        raise DataError(
            f"Expected dataset {ds.name!r} to yield at least one usable image, but all "
            f"{len(skipped)} were skipped; first reason: {skipped[0]['reason']}"
        )
    write_manifest(directory, manifest)
    rate = n_new / elapsed if elapsed > 0 else 0.0
    logger.info(
        "%s: %d new images (%d skipped, %d stored) in %.1f s, %.2f images/s -> %s",
        ds.name, n_new, len(skipped), manifest.n_images, elapsed, rate, directory,
    )
    return directory


def _stream(cfg: JobConfig, ds: DatasetConfig, todo: list[Sample]) -> Iterator[dict[str, Any]]:
    """Run decode + inference on Ray Data and yield result rows as they arrive."""
    items = [{"image_id": s.image_id, "uri": s.uri, "label_uri": s.label_uri or ""}
             for s in todo]
    num_classes = cfg.model.num_classes
    # One block per model batch; actors beyond the block count would only sit idle.
    blocks = max(1, math.ceil(len(items) / cfg.extract.batch_size))
    pool = _pool_resources(cfg.extract.num_actors, blocks)
    dataset = (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map(decode_row, fn_kwargs={"cfg": ds, "num_classes": num_classes},
             num_cpus=pool["read_cpus"])
        .map_batches(
            LogitPredictor,
            fn_constructor_kwargs={
                "model_cfg": cfg.model, "extract_cfg": cfg.extract,
                "threads": pool["threads"], "use_gpu": pool["num_gpus"] > 0,
            },
            batch_size=cfg.extract.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pool["size"]),
            num_cpus=pool["num_cpus"],
            num_gpus=pool["num_gpus"],
        )
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        columns = list(batch)
        for i in range(len(batch["image_id"])):
            yield {c: batch[c][i] for c in columns}


def run(cfg: JobConfig) -> dict[str, Path]:
    """Extract logits of every configured dataset into shards under ``cfg.output``.

    Starts local Ray when none is running (``RAY_ADDRESS`` connects to a cluster instead).

    Args:
        cfg: the run config.

    Returns:
        Dataset name -> dataset folder holding the shards and ``manifest.json``.

    Raises:
        DataError: bad input under ``on_error: fail``, an empty dataset, or no usable image.
        ValueError: options that contradict each other or an earlier extraction in the same
            folder.
    """
    if cfg.extract.label_resolution and cfg.extract.store_stride != 1:
        raise ValueError(
            f"Expected `extract.store_stride` to be 1 with `extract.label_resolution`, but got "
            f"{cfg.extract.store_stride}"
        )
    fingerprint = model_fingerprint(cfg.model)
    paths = RunPaths(Path(cfg.output), fingerprint)
    chash = config_hash(cfg)
    if not ray.is_initialized():
        ray.init()
    return {ds.name: _extract_dataset(cfg, ds, paths, fingerprint, chash) for ds in cfg.datasets}
