"""The CPU-side steps of extraction: decoding listed images and writing shards.

Kept free of torch, so that the Ray task workers running them start in a fraction of a second
(importing torch with its CUDA libraries takes seconds per process on a GPU node, and a node
runs a decode or write worker per CPU). :mod:`pipeline.extract` runs them as Ray Data stages.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data import DataError, Sample, label_dtype, load_sample
from pipeline.shards import ImageRecord, write_shard
from pipeline.storage import location


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack equal-shaped arrays; keep ragged ones as an object array (Ray's variable tensors)."""
    if len({(a.shape, a.dtype) for a in arrays}) == 1:
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


def decode_row(row: dict[str, Any], cfg: DatasetConfig, num_classes: int) -> dict[str, Any]:
    """Decode one listed image and its labels.

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
    except Exception as err:  # every per-image failure is the image's, for on_error: skip
        image = np.zeros((0, 0, 3), np.uint8)
        labels = np.zeros((0, 0), label_dtype(num_classes, cfg.ignore_index))
        error = str(err) if isinstance(err, DataError) else (
            f"Expected image {row['uri']} to decode, but got {type(err).__name__}: {err}")
    return {**row, "image": image, "labels": labels, "error": error}


def decode_batch(
    batch: dict[str, np.ndarray], cfg: DatasetConfig, num_classes: int
) -> dict[str, np.ndarray]:
    """Ray Data decode step: :func:`decode_row` over a batch of listed images (CPU tasks)."""
    rows = [
        decode_row({"image_id": i, "uri": u, "label_uri": lu}, cfg, num_classes)
        for i, u, lu in zip(batch["image_id"], batch["uri"], batch["label_uri"], strict=True)
    ]
    return {
        "image_id": batch["image_id"],
        "uri": batch["uri"],
        "source": batch["source"] if "source" in batch else np.full(len(rows), "", object),
        "image": _column([r["image"] for r in rows]),
        "labels": _column([r["labels"] for r in rows]),
        "error": np.array([r["error"] for r in rows], dtype=object),
    }


def _stored_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The RGB image resized (PIL bilinear) to the logits' (h, w), for the shard."""
    if image.shape[:2] == size:
        return image
    pil = Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def shard_name(image_ids: list[str]) -> str:
    """A shard's file name, derived from the ids it holds, so writers need no coordination.

    Example:
        >>> shard_name(["b", "a"]) == shard_name(["a", "b"])
        True
    """
    digest = hashlib.sha256("\0".join(sorted(image_ids)).encode()).hexdigest()
    return f"part-{digest[:20]}.parquet"


def write_shards(
    batch: dict[str, np.ndarray], *, directory: str, dataset: str, domain: str, role: str,
    fingerprint: str, store_image: bool,
) -> dict[str, np.ndarray]:
    """Ray Data write step: write a batch of predicted rows as shards, on a CPU worker.

    Rows are grouped by shape (one shape per shard); each group becomes one shard, written
    atomically under a name derived from its image ids. Only metadata goes back to the driver.

    Returns:
        Column ``meta``: one JSON object per shard (``{"shard": ShardInfo fields}``) and per
        failed row (``{"skipped": {"uri": ..., "reason": ...}}``).
    """
    meta: list[str] = []
    groups: dict[tuple, list[ImageRecord]] = {}
    for i in range(len(batch["image_id"])):
        uri, error = str(batch["uri"][i]), str(batch["error"][i])
        if error:
            meta.append(json.dumps({"skipped": {"uri": uri, "reason": error}}))
            continue
        labels, logits = batch["labels"][i], batch["logits"][i]
        image = _stored_image(batch["image"][i], logits.shape[-2:]) if store_image else None
        record = ImageRecord(
            dataset=dataset, domain=domain, role=role, image_id=str(batch["image_id"][i]),
            uri=uri, height=int(labels.shape[0]), width=int(labels.shape[1]),
            model_fingerprint=fingerprint, labels=labels, logits=logits, image=image,
            source=str(batch["source"][i]) if "source" in batch else "",
        )
        key = (logits.shape, labels.shape, labels.dtype.str)
        groups.setdefault(key, []).append(record)
    for records in groups.values():
        path = location(directory) / shard_name([r.image_id for r in records])
        meta.append(json.dumps({"shard": asdict(write_shard(path, records))}))
    return {"meta": np.array(meta, dtype=object)}
