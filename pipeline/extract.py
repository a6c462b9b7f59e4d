"""Stage 1: run the model over every dataset with Ray Data and store the logits as shards.

Per dataset, on a cluster with GPUs::

    listing + source fingerprints (driver)
      -> ray.data.from_items, one block per model batch
      -> map_batches(decode_batch)               CPU tasks: read, corrupt, validate
      -> map_batches(LogitPredictor,             the model: one actor per GPU (else per two
                     ActorPoolStrategy)          CPUs); stride reduction, resize and float16
                                                 cast on the device before the copy back
      -> map_batches(write_shards,               CPU tasks: group by shape, encode, compress,
                     batch_size=rows_per_shard)  write each shard atomically where it is
      -> driver: shard metadata only -> shards.write_manifest, last

On a CPU-only cluster every step competes for the same cores, so the three run in one
:class:`ExtractWorker` actor per CPU (a block of up to ``rows_per_shard`` images decoded,
inferred and written in one process): no trip through the object store between steps and one
Ray task per block instead of three. Either way work happens where the data is, and no logit
passes through the driver. The output folder must therefore be one every node reaches (a
shared file system; on one machine, any folder). The GPU actors' request for a GPU keeps Ray
Data from fusing the decode tasks into their stage, where decoding would run serially with the
model.

Shard names derive from the image ids they hold (:func:`shard_name`), so writers on any node
need no coordination. Writes are atomic and the manifest comes last, so a killed or failed run
leaves complete shards that no manifest names; a rerun adopts them, keeps the shards of the
previous manifest and extracts only image ids found in neither. Each row carries its sources'
fingerprint (size and mtime, or a sha256 with ``extract.verify_sources: hash``): a rerun
re-extracts images whose files changed since, drops those whose files are gone, and rewrites
the shards that held them; the old shard files are removed only after the new manifest is
written. Shards of another model live under another fingerprint folder. Bad input stops the
stage with a message naming the file, or with ``extract.on_error: skip`` is recorded in the
manifest's ``skipped`` list (up to ``extract.max_skipped_fraction`` of the dataset).

A ``monitor`` set (unlabelled) goes the same way without label files: its rows store the logits
and the image with a label plane of ``ignore_index`` (see :mod:`pipeline.shards`), its source
fingerprints cover the image alone, and its manifest says ``labelled: false``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F

from pipeline.config import DatasetConfig, ExtractConfig, JobConfig, ModelConfig, config_hash
from pipeline.data import (
    DataError,
    Sample,
    list_all_samples,
    select_samples,
    source_fingerprint,
)
from pipeline.extract_io import (
    _column,
    decode_batch,
    shard_name,
    write_shards,
)
from pipeline.extract_plan import _image_bytes, _pool_resources, block_rows, default_batch_size
from pipeline.models import load_model, model_fingerprint
from pipeline.paths import RunPaths
from pipeline.runtime import init_ray
from pipeline.shards import (
    MANIFEST_NAME,
    SHARD_PATTERN,
    Manifest,
    ShardInfo,
    content_hash,
    describe_shard,
    read_manifest,
    read_shard,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)


def reduce_logits(logits: torch.Tensor, stride: int) -> torch.Tensor:
    """Area-downsample (..., C, h, w) logits by ``stride`` (mean over each stride x stride cell).

    Averaging rather than subsampling keeps each stored value representative of the pixels
    it covers; with bilinear upsampling on read it round-trips smooth maps closely.
    """
    if stride == 1:
        return logits
    h, w = logits.shape[-2:]
    size = (math.ceil(h / stride), math.ceil(w / stride))
    if logits.ndim == 3:
        return F.adaptive_avg_pool2d(logits[None], size)[0]
    return F.adaptive_avg_pool2d(logits, size)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LogitPredictor:
    """Ray Data actor: runs the model on decoded batches, logits out at the stored resolution.

    Everything after the model happens on its device before the copy back: the reduction by
    ``store_stride`` (or the resize to label resolution) and the cast to float16, so a GPU
    actor sends back a sixteenth of the float32 output at ``store_stride: 2``. Images stay at
    full resolution here; :func:`write_shards` resizes them on a CPU worker.

    Plain Python, so it also runs without Ray (tests call it directly).

    Args:
        model_cfg: the model to load with :func:`pipeline.models.load_model`.
        extract_cfg: storage options (stride, label resolution, precision).
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
        self.autocast = _AUTOCAST[extract_cfg.precision]

    @torch.inference_mode()
    def _logits(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        """(N, C, h, w) float16 logits on the CPU, reduced or resized on the device."""
        x = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            # Pinned memory lets the copy overlap the previous batch's work.
            x = x.pin_memory().to(self.device, non_blocking=True)
        autocast = (contextlib.nullcontext() if self.autocast is None
                    else torch.autocast(self.device.type, dtype=self.autocast))
        with autocast:
            logits = self.model(x)
        logits = logits.float()
        if self.cfg.label_resolution:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        else:
            logits = reduce_logits(logits, self.cfg.store_stride)
        return logits.to(torch.float16).cpu()

    def _predict_group(
        self, images: list[np.ndarray], uris: list[str], size: tuple[int, int]
    ) -> list[Any]:
        """Logits per image, or the error message for images the model fails on."""
        try:
            return list(self._logits(images, size).numpy())
        except Exception:
            if len(images) == 1:
                return [self._error(images[0], uris[0], size)]
        # Rerun one by one so only the offending images are reported.
        return [self._error(image, uri, size) for image, uri in zip(images, uris, strict=True)]

    def _error(self, image: np.ndarray, uri: str, size: tuple[int, int]) -> Any:
        try:
            return self._logits([image], size).numpy()[0]
        except Exception as err:  # any model failure is this image's, reported per image
            what = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
            return f"Expected usable model output for image {uri}, but got: {what}{err}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map a decoded batch to rows for :func:`write_shards`.

        Args:
            batch: columns ``image_id``, ``uri``, ``image``, ``labels``, ``error`` (see
                :func:`decode_batch`).

        Returns:
            Columns ``image_id``, ``uri``, ``error``, ``labels``, ``logits`` (C, h, w) float16
            and, with ``store_image``, ``image`` (H, W, 3) uint8 at full resolution. Rows with
            an error carry empty arrays.
        """
        n = len(batch["image_id"])
        images, labels = list(batch["image"]), list(batch["labels"])
        errors = [str(e) for e in batch["error"]]
        uris = [str(u) for u in batch["uri"]]
        logits: list[np.ndarray] = [np.zeros((self.num_classes, 0, 0), np.float16)] * n
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            if not errors[i]:
                groups.setdefault(images[i].shape, []).append(i)
        # The model takes one (N, H, W, 3) tensor, so images of different sizes run apart.
        for idx in groups.values():
            results = self._predict_group([images[i] for i in idx], [uris[i] for i in idx],
                                          labels[idx[0]].shape)
            for i, result in zip(idx, results, strict=True):
                if isinstance(result, str):
                    errors[i] = result
                else:
                    logits[i] = result
        out = {
            "image_id": batch["image_id"],
            "uri": batch["uri"],
            "source": batch["source"] if "source" in batch else np.full(n, "", object),
            "error": np.array(errors, dtype=object),
            "labels": _column(labels),
            "logits": _column(logits),
        }
        if self.cfg.store_image:
            out["image"] = batch["image"]
        return out


class ExtractWorker:
    """Ray Data actor for CPU-only clusters: decode, model and shard writes in one process.

    Without GPUs every step competes for the same cores, so splitting them into separate
    Ray Data stages buys no overlap and costs a trip through the object store and a task
    per stage: each block (up to ``rows_per_shard`` images) is decoded, run through the model
    in batches of ``batch_size`` and written here. One single-threaded worker per CPU.

    Args:
        model_cfg: the model to load.
        extract_cfg: storage options (stride, label resolution, precision, batch size).
        dataset: the dataset's config (decoding).
        batch_size: images per model call.
        threads: torch intra-op threads.
        write: keyword arguments of :func:`write_shards` (folder, names, fingerprint).
    """

    def __init__(
        self, model_cfg: ModelConfig, extract_cfg: ExtractConfig, dataset: DatasetConfig,
        batch_size: int, threads: int, write: dict[str, Any],
    ) -> None:
        self.predictor = LogitPredictor(model_cfg, extract_cfg, threads=threads)
        self.dataset = dataset
        self.batch_size = batch_size
        self.write = write

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Listed rows in (``image_id``, ``uri``, ``label_uri``, ``source``), metadata out."""
        decoded = decode_batch(batch, self.dataset, self.predictor.num_classes)
        n, step = len(decoded["image_id"]), self.batch_size
        parts = [self.predictor({k: v[i : i + step] for k, v in decoded.items()})
                 for i in range(0, n, step)]
        joined = {k: [row for part in parts for row in part[k]] for k in parts[0]}
        rows = {k: _column(v) if k in ("labels", "logits", "image") else np.array(v, object)
                for k, v in joined.items()}
        return write_shards(rows, **self.write)


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


def _extract_dataset(
    cfg: JobConfig, ds: DatasetConfig, paths: RunPaths, fingerprint: str, chash: str
) -> Path:
    directory = paths.dataset_dir(ds.name)
    directory.mkdir(parents=True, exist_ok=True)
    content = content_hash(ds, cfg.extract)
    kept = _existing_shards(directory, ds, fingerprint, content)
    every = list_all_samples(ds)
    samples = select_samples(ds, every)
    sources = {s.image_id: source_fingerprint(s, cfg.extract.verify_sources) for s in samples}
    stored = _stored_sources(kept)
    changed = {i for i, src in sources.items() if stored.get(i) and stored[i] != src}
    removed = set(stored) - {s.image_id for s in every}
    # Shards holding stale rows are rewritten without them; the old files go once the new
    # manifest no longer names them, so a failure before that leaves the old state intact.
    kept, obsolete = _without(directory, kept, changed | removed, sources)
    done = {i for s in kept for i in s.image_ids}
    todo = [s for s in samples if s.image_id not in done]
    changes = {"added": len([s for s in todo if s.image_id not in stored]),
               "changed": len(changed), "removed": len(removed)}
    written: list[ShardInfo] = []
    skipped: list[dict[str, str]] = []
    start = time.perf_counter()
    if changed or removed:
        logger.info("%s: %d images changed at the source, %d removed", ds.name, len(changed),
                    len(removed))
    if not todo:
        logger.info("%s: nothing new to extract (%d images stored)", ds.name, len(done))
    else:
        logger.info("%s: %d images to extract (%d already stored)", ds.name, len(todo), len(done))
        init_ray()  # only now: a rerun with nothing new never starts Ray
        for meta in _stream(cfg, ds, todo, sources, directory, fingerprint):
            if "shard" in meta:
                written.append(ShardInfo(**meta["shard"]))
                continue
            if cfg.extract.on_error == "fail":
                raise DataError(f"Dataset {ds.name!r}: {meta['skipped']['reason']}")
            logger.warning("%s: skipping: %s", ds.name, meta["skipped"]["reason"])
            skipped.append(meta["skipped"])
    cap, total = cfg.extract.max_skipped_fraction, len(done) + len(todo)
    if len(skipped) > cap * total:
        raise DataError(
            f"Expected dataset {ds.name!r} to skip at most {cap:.0%} of its {total} images "
            f"(`extract.max_skipped_fraction`), but {len(skipped)} were skipped; first "
            f"reasons: {[s['reason'] for s in skipped[:3]]}"
        )
    elapsed = time.perf_counter() - start
    n_new = sum(s.rows for s in written)
    manifest = Manifest(
        dataset=ds.name, role=ds.role, domain=ds.domain, reference=ds.reference,
        num_classes=cfg.model.num_classes, class_names=cfg.model.names(),
        ignore_index=ds.ignore_index, model_fingerprint=fingerprint, config_hash=chash,
        shards=kept + sorted(written, key=lambda s: s.file),
        skipped=sorted(skipped, key=lambda s: s["uri"]),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        content_hash=content,
        changes=changes,
        labelled=ds.role != "monitor",
    )
    stored = manifest.stored_ids()
    manifest.selected = [s.image_id for s in samples if s.image_id in stored]
    if not manifest.selected:
        raise DataError(
            f"Expected dataset {ds.name!r} to yield at least one usable image, but all "
            f"{len(skipped)} were skipped; first reason: {skipped[0]['reason']}"
        )
    write_manifest(directory, manifest)
    for name in obsolete:
        (directory / name).unlink(missing_ok=True)
    rate = n_new / elapsed if elapsed > 0 else 0.0
    logger.info(
        "%s: %d new images (%d skipped, %d stored) in %.1f s, %.2f images/s -> %s",
        ds.name, n_new, len(skipped), manifest.n_images, elapsed, rate, directory,
    )
    return directory


def _stored_sources(shards: list[ShardInfo]) -> dict[str, str]:
    """Image id -> the source fingerprint its stored row was made from ("" when unknown)."""
    out: dict[str, str] = {}
    for shard in shards:
        sources = shard.sources if len(shard.sources) == shard.rows else [""] * shard.rows
        out.update(zip(shard.image_ids, sources, strict=True))
    return out


def _without(
    directory: Path, shards: list[ShardInfo], stale: set[str], sources: dict[str, str]
) -> tuple[list[ShardInfo], list[str]]:
    """Shards without the ``stale`` rows, and the files that then become obsolete.

    A shard holding stale rows is rewritten with the rest under a new name (the old file is
    deleted by the caller after the manifest is written); one holding only stale rows goes.
    Rows whose fingerprint is unknown (shards from before fingerprints) get today's.
    """
    kept: list[ShardInfo] = []
    obsolete: list[str] = []
    for shard in shards:
        if stale.isdisjoint(shard.image_ids):
            if len(shard.sources) != shard.rows:
                shard = replace(shard, sources=[sources.get(i, "") for i in shard.image_ids])
            kept.append(shard)
            continue
        obsolete.append(shard.file)
        rest = [r for r in read_shard(directory / shard.file) if r.image_id not in stale]
        if rest:
            for r in rest:
                r.source = r.source or sources.get(r.image_id, "")
            path = directory / shard_name([r.image_id for r in rest])
            kept.append(write_shard(path, rest))
    return kept, obsolete


def _stream(
    cfg: JobConfig, ds: DatasetConfig, todo: list[Sample], sources: dict[str, str],
    directory: Path, fingerprint: str,
) -> Iterator[dict[str, Any]]:
    """Run decode, inference and shard writes on Ray Data; yield the writers' metadata."""
    items = [{"image_id": s.image_id, "uri": s.uri, "label_uri": s.label_uri or "",
              "source": sources[s.image_id]} for s in todo]
    num_classes = cfg.model.num_classes
    gpu = ray.available_resources().get("GPU", 0.0) >= 1
    batch_size = cfg.extract.batch_size or default_batch_size(gpu)
    write = {"directory": str(directory), "dataset": ds.name, "domain": ds.domain,
             "role": ds.role, "fingerprint": fingerprint, "store_image": cfg.extract.store_image}
    if not gpu:
        dataset = _cpu_dataset(cfg, ds, items, batch_size, write)
    else:
        # [1] input blocks sized from the image count and the CPUs: decode tasks spread over
        #     every free CPU and run ahead of inference, each big enough to amortise Ray's
        #     per-task cost; actors beyond the block count would only sit idle.
        rows = block_rows(len(items), float(ray.available_resources().get("CPU", 1.0)),
                          batch_size, _image_bytes(todo[0].uri))
        blocks = math.ceil(len(items) / rows)
        pool = _pool_resources(cfg.extract.num_actors, blocks, cfg.extract.actor_resources,
                               cfg.extract.actors_per_gpu)
        task_cpus = pool["task_cpus"]
        dataset = (
            ray.data.from_items(items, override_num_blocks=blocks)
            .map_batches(decode_batch, fn_kwargs={"cfg": ds, "num_classes": num_classes},
                         batch_size=batch_size, batch_format="numpy", num_cpus=task_cpus)
            # [2] the model: one actor per GPU (or actors_per_gpu sharing one), logits
            #     reduced and cast on the device
            .map_batches(
                LogitPredictor,
                fn_constructor_kwargs={
                    "model_cfg": cfg.model, "extract_cfg": cfg.extract,
                    "threads": pool["threads"], "use_gpu": True,
                },
                batch_size=batch_size,
                batch_format="numpy",
                # A GPU actor finishes a batch in tens of milliseconds: a deeper queue of
                # decoded batches per actor (Ray's default is 2) keeps it fed.
                compute=ray.data.ActorPoolStrategy(size=pool["size"],
                                                   max_tasks_in_flight_per_actor=8),
                num_cpus=pool["num_cpus"],
                num_gpus=pool["num_gpus"],
                resources=cfg.extract.actor_resources or None,
            )
            # [3] shards written by CPU workers where the logits are; only metadata returns
            .map_batches(write_shards, fn_kwargs=write,
                         batch_size=cfg.extract.rows_per_shard, batch_format="numpy",
                         num_cpus=task_cpus)
        )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for meta in batch["meta"]:
            yield json.loads(meta)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s: Ray Data execution:\n%s", ds.name, dataset.stats())


def _cpu_dataset(
    cfg: JobConfig, ds: DatasetConfig, items: list[dict[str, str]], batch_size: int,
    write: dict[str, Any],
) -> Any:
    """CPU-only clusters: one stage of :class:`ExtractWorker` actors, one per free CPU."""
    cpus = float(ray.available_resources().get("CPU", 1.0))
    rows = min(block_rows(len(items), cpus, batch_size, _image_bytes(items[0]["uri"])),
               cfg.extract.rows_per_shard)
    blocks = math.ceil(len(items) / rows)
    pool = _pool_resources(cfg.extract.num_actors, blocks, cfg.extract.actor_resources)
    return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ExtractWorker,
        fn_constructor_kwargs={"model_cfg": cfg.model, "extract_cfg": cfg.extract,
                               "dataset": ds, "batch_size": batch_size,
                               "threads": pool["threads"], "write": write},
        batch_size=rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool["size"]),
        num_cpus=pool["num_cpus"],
        resources=cfg.extract.actor_resources or None,
    )


def run(cfg: JobConfig) -> dict[str, Path]:
    """Extract logits of every configured dataset into shards under ``cfg.output``.

    Starts local Ray, on loopback, when none is running and some image needs extracting
    (``RAY_ADDRESS`` connects to a cluster instead; see :func:`pipeline.runtime.init_ray`);
    a rerun with nothing new says so and never starts Ray.

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
    paths = RunPaths.for_run(cfg, fingerprint)
    chash = config_hash(cfg)
    return {ds.name: _extract_dataset(cfg, ds, paths, fingerprint, chash) for ds in cfg.datasets}
