"""Stage 2 on Ray Train: every worker runs the calibrators' own ``fit`` on its shard.

`fit_ray` starts one ``TorchTrainer`` run for a list of calibrators; `train_loop_per_worker`
is its worker loop. `pipeline.fit.fit_specs` decides what runs where (`concurrent_runs`).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.calibrators import FitData, build_calibrator
from pipeline.calibrators.reduce import DistributedReduce
from pipeline.config import FitConfig, JobConfig
from pipeline.sampling import FitSource
from pipeline.storage import location, remove_tree

__all__ = ["concurrent_runs", "fit_ray", "train_loop_per_worker"]

logger = logging.getLogger(__name__)

# Rows per Arrow block of the Ray dataset: enough blocks to balance workers, few enough to be cheap.
_BLOCK_ROWS = 65536


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
    """A Ray dataset of `FitSource` image references (no tensors), padded like `_padded`.

    One row per run of consecutive images of one shard file (about ``2 * multiple`` runs in
    all, cut at shard boundaries), so that a worker decodes the few shard files its images
    are in rather than every file. Ray Data hands rows to the workers in turn.
    """
    import ray.data

    size = max(1, len(source.images) // (2 * multiple))
    items: list[dict[str, Any]] = []
    for d, f, i, g in source.images:
        last = items[-1] if items else None
        if last and (last["dir"], last["file"]) == (d, f) and len(last["ids"]) < size:
            last["ids"].append(i)
        else:
            items.append({"dir": d, "file": f, "ids": [i], "ignore": g, "pad": False})
    items = [{**item, "ids": "\n".join(item["ids"])} for item in items]
    items += [{**items[0], "pad": True} for _ in range((-len(items)) % multiple)]
    return ray.data.from_items(items)


def _source_rows(shard: Any, fit: Any, source: dict[str, Any]) -> dict[str, Tensor]:
    """Read and sample this worker's share of `FitSource` images from their shards."""
    images = []
    for batch in shard.iter_batches(batch_format="numpy"):
        for j in range(len(batch["pad"])):
            if not batch["pad"][j]:
                where = (str(batch["dir"][j]), str(batch["file"][j]))
                images += [(*where, i, int(batch["ignore"][j]))
                           for i in str(batch["ids"][j]).split("\n")]
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


def runs_that_fit(cpus: float, gpus: float, fit: FitConfig, n_jobs: int) -> int:
    """TorchTrainer runs that fit at once in ``cpus`` and ``gpus``: each takes
    ``fit.num_workers`` CPUs (GPUs with ``fit.use_gpu``) and one more CPU, which stays free for
    Ray Data's split coordination (Train workers that hold every CPU starve it). At most one
    run per job, and at least one run.
    """
    workers = fit.num_workers
    room = int(cpus // (workers + 1))
    if fit.use_gpu:
        room = min(room, int(gpus // workers))
    return max(1, min(n_jobs, room))


def concurrent_runs(cfg: JobConfig, n_jobs: int) -> int:
    """TorchTrainer runs the cluster holds at once (`runs_that_fit`); 1 when Ray is not started
    yet (the trainer starts it)."""
    import ray

    if not ray.is_initialized():
        return 1
    total = ray.cluster_resources()
    return runs_that_fit(total.get("CPU", 0.0), total.get("GPU", 0.0), cfg.fit, n_jobs)


def fit_ray(
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
    # Every worker node must reach it: the run's URI when it has one (see pipeline.storage).
    storage = location(cfg.store) / "ray_train" if cfg.store else \
        Path(cfg.output).resolve() / "ray_train"
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
    remove_tree(storage / name)
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


