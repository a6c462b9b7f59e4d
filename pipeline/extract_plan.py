"""How extraction is laid out on the cluster: actor pool, per-task CPUs, block and batch sizes.

Decisions from what the cluster has free when a dataset starts (``ray.available_resources``),
kept apart from :mod:`pipeline.extract`, which builds the Ray Data pipeline from them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import fsspec
import ray
from PIL import Image


def default_batch_size(gpu: bool) -> int:
    """Images per model call when the config sets none: 16 on a GPU, 4 on CPU cores.

    On a GPU small batches leave it idle between copies; on CPU larger ones only add memory
    (the cores are saturated from a few images on).
    """
    return 16 if gpu else 4


_BLOCK_BYTES = 64 * 1024 * 1024  # decoded bytes per input block, at most (unless one batch)


def block_rows(n: int, cpus: float, batch_size: int, image_bytes: int) -> int:
    """Images per input block: about four blocks per CPU, whole model batches, <= 64 MiB.

    Ray Data pays tens of milliseconds per task (more on a busy machine), as much as decoding
    a few PNGs costs: blocks of one model batch (4 images on CPU) left the cores mostly idle.
    Four blocks per CPU keep every core busy until the end; the byte cap keeps big images
    (Cityscapes: 6 MiB each decoded with labels) from making huge blocks.

    Example:
        >>> block_rows(1200, 2, 4, 700_000)  # CamVid on 2 CPUs: 14 blocks
        96
        >>> block_rows(400, 16, 16, 700_000)  # CamVid on a 16-CPU GPU node: 25 blocks
        16
    """
    rows = math.ceil(n / max(1.0, 4 * cpus))
    rows = min(rows, max(1, _BLOCK_BYTES // max(1, image_bytes)))
    return max(batch_size, math.ceil(rows / batch_size) * batch_size)


def _image_bytes(uri: str) -> int:
    """Decoded bytes of one image and its labels, from the first file's header (1 MB if not)."""
    try:
        with fsspec.open(uri, "rb") as f, Image.open(f) as img:
            width, height = img.size
    except Exception:  # the decode step reports unreadable files with their name
        return 1 << 20
    return width * height * 5  # RGB + 16-bit labels


def _pool_resources(
    requested: int | None,
    blocks: int,
    actor_resources: dict[str, float] | None = None,
    per_gpu: int = 1,
) -> dict[str, Any]:
    """Actor pool size and per-actor resources, from what the cluster has free now.

    GPU clusters get ``per_gpu`` actors per GPU (``extract.actors_per_gpu``, each asking for
    ``1 / per_gpu`` of one), each with up to one CPU for its host-side work; decode and write
    tasks (``task_cpus`` each) take the other CPUs. On CPU-only clusters the pool has one
    single-threaded actor per free CPU that decodes, infers and writes itself: torch threads
    that wait for work spin, so more threads per actor than cores per actor only burn CPU.
    At least one logical CPU always stays outside the pool: Ray Data hangs
    when an actor pool holds every CPU (ray-project/ray#44687). Never more actors than input
    blocks, since extra ones would only start up to sit idle, nor than the free amount of
    each custom resource in ``actor_resources`` allows.

    Raises:
        ValueError: the cluster offers none of a resource in ``actor_resources``.
    """
    free = ray.available_resources()
    cpus, gpus = float(free.get("CPU", 0.0)), int(free.get("GPU", 0.0))
    reserve = 1.0 if cpus >= 2 else cpus / 2
    if gpus >= 1:
        size = min(requested or gpus * per_gpu, gpus * per_gpu)
    else:
        size = min(requested or max(1, int(cpus)), max(1, int(cpus)))
    for key, amount in (actor_resources or {}).items():
        fit = int(float(free.get(key, 0.0)) // amount)
        if fit < 1:
            raise ValueError(
                f"Expected the cluster to have {amount:g} of resource {key!r} free for each "
                f"model actor (`extract.actor_resources`), but it has "
                f"{float(free.get(key, 0.0)):g}: declare it with `ray start --resources`"
            )
        size = min(size if requested or gpus else fit, fit)
    size = max(1, min(size, blocks))
    if requested is not None and size < min(requested, blocks):
        warnings.warn(
            f"`extract.num_actors`={requested} exceeds what the cluster has free "
            f"({cpus:g} CPU, {gpus} GPU, one CPU kept for decode and write tasks); using {size}",
            stacklevel=3,
        )
    total_cpus = float(ray.cluster_resources().get("CPU", cpus))
    return {
        "size": size,
        "num_gpus": 1 / per_gpu if gpus >= 1 else 0,
        "num_cpus": max(0.01, min(1.0, (cpus - reserve) / size)),
        "threads": 1 if gpus >= 1 else max(1, int(total_cpus // size)),
        "task_cpus": min(reserve, 1.0 if gpus >= 1 else 0.5),
    }
