"""Stage 2: fit every configured calibrator on the calibration shards and write its artifact.

``run(cfg)`` reads the shards of the datasets with role ``calibration``, splits them by image
into a fit part and a held-out part, samples pixels (pointwise calibrators) or strided whole
maps (spatial ones), fits each entry of ``cfg.calibrators`` and writes
``OUTPUT/artifacts/<label>/`` with `pipeline.calibrators.save`. Everything is validated and
every calibrator fitted before the first artifact is written, so a failed run leaves the
previous artifacts untouched.

Three modes (``fit.mode``); ``auto`` is one of the other two, decided by `resolve_mode`:

- ``local``: ``calibrator.fit(..., heldout=...)`` in-process.
- ``ray``: ``ray.train.torch.TorchTrainer`` runs for each group of calibrators that fit on the
  same datasets: as many runs at once as the cluster has room for
  (`pipeline.fit_ray.concurrent_runs`), each fitting its share of the group's calibrators in
  turn, so independent calibrators fit
  concurrently and start-up is paid once per run. The driver keeps no fit pixels: it checks
  and counts the fit images and hands out references to them (`FitSource`); each worker gets
  its share with ``ray.train.get_dataset_shard``, reads those images from the shards and
  samples them by the same seeded rule, then runs the very same ``calibrator.fit`` with a
  `pipeline.calibrators.reduce.DistributedReduce` hook that all-reduces the sums, counts, loss
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

Clean reference (issue 14): a calibrator that defines ``reference_options(clean)`` (the
adaptive temperatures) is given, as extra options, what it computes from the clean calibration
fit data of its layout, so that it knows the in-domain images even when it fits on corrupted
copies too (its temperature, feature statistics and gate band come from the clean images).

Oracle (issue 14): every labelled test set (role ``test``) also gets an oracle temperature,
fitted on that set's own labelled pixels and written to ``OUTPUT/artifacts/oracle_ts/<set>/``
(`pipeline.oracle`): a bound on what one temperature could do there, never a candidate.

Layout: `pipeline.fit_plan` (the jobs and every check before data is read),
`pipeline.sampling` (the split, pixel sampling, maps, `FitSource`), `pipeline.fit_ray` (the
Train worker loop and runs) and `pipeline.oracle` are this stage's lower modules.

Run it with ``segcal fit CONFIG`` or ``python jobs/fit.py CONFIG``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from pipeline.calibrators import Calibrator, FitData, build_calibrator, save
from pipeline.config import FIT_OPTIONS, CalibratorSpec, JobConfig
from pipeline.fit_plan import FitJob, plan_jobs, read_manifests, spec_options
from pipeline.fit_ray import concurrent_runs, fit_ray, runs_that_fit, train_loop_per_worker
from pipeline.metrics import ece
from pipeline.models import model_fingerprint
from pipeline.oracle import fit_oracles, save_oracles
from pipeline.paths import RunPaths
from pipeline.sampling import (
    FitSource,
    check_classes,
    concat_fit_data,
    fit_samples,
    record_key,
    record_map,
    sample_pixel_indices,
    sample_pixels,
    split_heldout,
)
from pipeline.shards import Manifest, data_fingerprint, iter_dataset
from pipeline.storage import is_local

__all__ = [
    "FIT_OPTIONS",
    "FitSource",
    "fit_spec",
    "fit_specs",
    "heldout_metrics",
    "record_map",
    "resolve_mode",
    "run",
    "sample_pixel_indices",
    "sample_pixels",
    "split_heldout",
    "train_loop_per_worker",
]

logger = logging.getLogger(__name__)

# ``fit.mode: auto``'s cost model, as benchmarks/fit.py prints it ("auto cost model";
# benchmarks/results/fit_2core_20M.txt, 20M pixels x 19 classes on the 2-core machine): a local
# fit's seconds per million fit pixels and calibrator (the mean over the pointwise
# calibrators, one thread), and Ray Train's start-up per run (worker group, process group,
# dataset split). The 1M-pixel run measured 9.16 s and 12.3 s.
LOCAL_SECONDS_PER_MPIXEL = 11.12
RAY_STARTUP_SECONDS = 17.1
# The Ray dataset of each layout: sampled pixels (pointwise calibrators) or maps (spatial ones).
_LAYOUTS = {False: "pixels", True: "maps"}


# --------------------------------------------------------------------------------------------
# Reading: one pass over every calibration dataset.


@dataclass
class _Samples:
    """One calibration dataset's fit and held-out samples (fit: `FitSource` in ray mode)."""

    fit: FitData | FitSource
    heldout: FitData | None
    fit_maps: FitData | FitSource | None
    heldout_maps: FitData | None



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
        check_classes(record, cfg.model.num_classes)
        key, is_held = record_key(record), record.image_id in heldout_ids
        if stream and not is_held:
            labels = record.labels.astype(np.int64)
            valid = labels != manifest.ignore_index
            if not valid.any():  # no pixel to fit (a fully ignored map adds nothing either)
                continue
            where = directory.resolve() if is_local(directory) else directory  # a URI as is
            refs.append((str(where), shard_of[record.image_id], record.image_id,
                         manifest.ignore_index))
            counts["pixels"] += min(fit.pixels_per_image, int(valid.sum()))
            step = fit.map_stride
            counts["maps"] += int(valid[::step, ::step].sum())
            map_sizes.add(labels[::step, ::step].shape)
            continue
        points, grid = fit_samples(
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
        return concat_fit_data([data for _, data in sorted(parts, key=lambda p: p[0])])

    if stream:
        return _Samples(
            FitSource(tuple(refs), False, counts["pixels"]), ordered(pixels[True]),
            FitSource(tuple(refs), True, counts["maps"], common_ignore) if with_maps else None,
            ordered(maps[True]),
        )
    return _Samples(
        ordered(pixels[False]), ordered(pixels[True]), ordered(maps[False]), ordered(maps[True])
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
# fit.mode: auto.


def _parallel_fits(cfg: JobConfig, n_calibrators: int) -> int:
    """How many fit processes run at once in Ray Train mode: concurrent runs (at most one per
    calibrator, `pipeline.fit_ray.concurrent_runs`) x ``fit.num_workers``.

    Reads the running Ray cluster (joining ``RAY_ADDRESS`` if set); without one, this machine's
    CPUs and GPUs, which a local Ray runtime would have.
    """
    import ray

    from pipeline.runtime import init_ray

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if ray.is_initialized() or (address and address != "local"):
        init_ray()
        total = ray.cluster_resources()
        cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    else:
        cpus, gpus = float(os.cpu_count() or 1), float(torch.cuda.device_count())
    if cfg.fit.use_gpu and gpus < cfg.fit.num_workers:
        return 0  # the workers could not be placed
    return runs_that_fit(cpus, gpus, cfg.fit, n_calibrators) * cfg.fit.num_workers


def resolve_mode(cfg: JobConfig, fit_pixels: int, n_calibrators: int) -> str:
    """``fit.mode`` with ``auto`` decided: Ray Train only where it is expected to be faster.

    The estimate uses the cost model benchmarks/fit.py measured: fitting locally takes
    `LOCAL_SECONDS_PER_MPIXEL` per million fit pixels and calibrator, one after another; Ray
    Train pays `RAY_STARTUP_SECONDS` and then spreads the same work over every fit process the
    cluster holds at once (`_parallel_fits`). So a small fit, or a cluster with no more room
    than this process, stays local. Both constants were measured with one torch thread per fit, as
    a Train worker with one CPU runs; a local fit with more threads can be faster than the
    model says, so on a many-core machine ``auto`` may pick Ray Train where local would have
    been about as fast.

    Args:
        cfg: The run config (``fit.mode``, ``fit.num_workers``, ``fit.use_gpu``).
        fit_pixels: The fit pixels per calibrator (an estimate is enough).
        n_calibrators: The calibrators to fit.

    Returns:
        ``"local"`` or ``"ray"``.

    Example:
        >>> from pipeline.config import JobConfig
        >>> cfg = JobConfig.model_validate({"output": "runs/x", "datasets": [],
        ...     "model": {"kind": "torchscript", "path": "m.pt", "num_classes": 19},
        ...     "fit": {"mode": "ray"}})
        >>> resolve_mode(cfg, 10, 1)
        'ray'
    """
    if cfg.fit.mode != "auto":
        return cfg.fit.mode
    parallel = _parallel_fits(cfg, n_calibrators)
    local = LOCAL_SECONDS_PER_MPIXEL * fit_pixels / 1e6 * n_calibrators
    ray_train = RAY_STARTUP_SECONDS + local / max(parallel, 1)
    mode = "ray" if parallel >= 2 and ray_train < local else "local"
    logger.info(
        "fit.mode auto: %s (%d calibrators x %.2g fit pixels: about %.0f s local, %.0f s with "
        "Ray Train on %d parallel fits)", mode, n_calibrators, fit_pixels, local, ray_train,
        parallel,
    )
    return mode


def _with_mode(cfg: JobConfig, mode: str) -> JobConfig:
    return cfg.model_copy(update={"fit": cfg.fit.model_copy(update={"mode": mode})})


# --------------------------------------------------------------------------------------------
# The stage.


def fit_specs(
    cfg: JobConfig,
    specs: Sequence[CalibratorSpec],
    data: dict[bool, tuple[FitData | FitSource, FitData | None]],
    *,
    indices: Sequence[int] | None = None,
    reference: dict[bool, FitData | FitSource | None] | None = None,
) -> list[tuple[Calibrator, dict[str, Any]]]:
    """Fit calibrator specs on in-memory data, in ``cfg.fit.mode`` (what `run` does).

    ``local``: each calibrator's ``fit`` in this process. ``ray``: TorchTrainer runs of
    ``cfg.fit.num_workers`` workers, as many at once as the cluster holds
    (`pipeline.fit_ray.concurrent_runs`), fit them, each worker running the same ``fit`` on
    its shard of the rows (see
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
        reference: ``{spatial: clean fit data}``: a calibrator with ``reference_options``
            gets what it computes from the clean data of its layout as extra options (unless
            its spec sets ``reference``). None: no reference is given.

    Returns:
        Per spec, the fitted calibrator and ``{"mode", "seconds"[, "ray"]}``: ``seconds`` is
        the fit itself; ``ray`` holds the run's timings, Ray Train's start-up apart.
    """
    if cfg.fit.mode == "auto":
        fit_pixels = max((_n_valid(fit) for fit, _ in data.values()), default=0)
        cfg = _with_mode(cfg, resolve_mode(cfg, fit_pixels, len(specs)))
    indices = list(range(len(specs))) if indices is None else list(indices)
    calibrators, options = [], []
    for spec, index in zip(specs, indices, strict=True):
        options.append(spec_options(cfg, spec, index)[0])
        calibrators.append(build_calibrator(spec.name, cfg.model.num_classes, **options[-1]))
        clean = None if reference is None else reference.get(type(calibrators[-1]).spatial)
        if (clean is not None and hasattr(calibrators[-1], "reference_options")
                and "reference" not in options[-1]):
            # The clean reference travels as options: Ray Train workers rebuild the same module.
            if isinstance(clean, FitSource):
                clean = reference[type(calibrators[-1]).spatial] = clean.load(cfg.fit)
            options[-1] = {**options[-1], **calibrators[-1].reference_options(clean)}
            calibrators[-1] = build_calibrator(spec.name, cfg.model.num_classes, **options[-1])
    extras: list[dict[str, Any]] = [{"mode": "local"} for _ in specs]
    remote = []
    if cfg.fit.mode == "ray":
        from pipeline.runtime import init_ray

        init_ray()  # before Ray Train would start Ray itself, on every interface
        for i, calibrator in enumerate(calibrators):
            if calibrator.distributed:
                remote.append(i)
            else:
                logger.warning("%r has no distributed fit; fitting it in the driver",
                               specs[i].key)
    # Independent calibrators fit concurrently: as many TorchTrainer runs at once as the
    # cluster has room for, each fitting its share of the calibrators in turn. A run's driver
    # side only waits on its controller actor (TorchTrainer.fit supports non-main threads).
    n_runs = concurrent_runs(cfg, len(remote)) if remote else 0
    runs = [remote[k::n_runs] for k in range(n_runs)]

    def fit_run(run: list[int]) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
        jobs = [
            {"label": specs[i].key, "name": specs[i].name, "options": options[i],
             "layout": _LAYOUTS[type(calibrators[i]).spatial]}
            for i in run
        ]
        layouts = {job["layout"] for job in jobs}
        return fit_ray(cfg, jobs, {_LAYOUTS[s]: part for s, part in data.items()
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


def _remove_save_leftovers(artifacts: Path) -> None:
    """Remove the folders a killed `save` left in ``artifacts`` (``.<label>.*.tmp``, ``.*.old``).

    `save` builds an artifact in ``.<label>.<random>.tmp`` and moves the old one into
    ``.<label>.<random>.old`` while it swaps; a driver killed in between leaves both behind,
    where `pipeline.registry.add_run` would copy them into the registry and
    `pipeline.registry.artifact_digest` would count them (so an identical refit would no longer
    be recognised). Called before the artifacts are written: the stage holds the output lock
    (`pipeline.paths.output_lock`), so no other save in this folder is live.
    """
    if not artifacts.is_dir():
        return
    leftovers = [p for pattern in (".*.tmp", ".*.old") for p in artifacts.rglob(pattern)]
    for path in sorted(leftovers, key=lambda p: len(p.parts)):
        if path.is_dir():
            logger.info("removing %s, left by a killed fit", path)
            shutil.rmtree(path, ignore_errors=True)


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
    jobs = plan_jobs(cfg)
    paths = RunPaths.for_run(cfg, model_fingerprint(cfg.model))
    calibration = cfg.datasets_with_role("calibration")
    manifests = read_manifests(cfg, paths, [d.name for d in calibration])
    if cfg.fit.mode == "auto":  # decided before reading: ray mode leaves fit pixels in shards
        images = sum(m.n_images for m in manifests.values())
        estimate = int(images * (1 - cfg.fit.heldout_fraction) * cfg.fit.pixels_per_image)
        cfg = _with_mode(cfg, resolve_mode(cfg, estimate, len(jobs)))
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
        return concat_fit_data([getattr(samples[n], attr) for n in names])

    # Every calibrator is scored on the same clean held-out images (the fit images when
    # nothing valid is held out).
    split = "heldout" if parts(clean, False, True) is not None else "fit"
    if heldout_ids and split == "fit":
        logger.warning("The held-out images hold no valid pixel; metrics are on fit data")
    scored = {spatial: parts(clean, spatial, split == "heldout")
              for spatial in {job.spatial for job in jobs}}
    # Nothing held out in ray mode: the fit images are scored, so the driver reads them after all.
    scored = {k: v.load(cfg.fit) if isinstance(v, FitSource) else v for k, v in scored.items()}
    # The clean fit data, for calibrators that need to know the in-domain images (loaded once).
    reference: dict[bool, FitData | FitSource | None] = {
        spatial: parts(clean, spatial, False) for spatial in {job.spatial for job in jobs}
    }
    # Calibrators that fit on the same datasets share one fit (one Ray Train run).
    groups: dict[tuple[str, ...], list[FitJob]] = {}
    for job in jobs:
        groups.setdefault(job.datasets, []).append(job)
    results: dict[int, tuple[Calibrator, dict[str, Any]]] = {}
    for datasets, group in groups.items():
        data = {spatial: (parts(datasets, spatial, False), parts(datasets, spatial, True))
                for spatial in {job.spatial for job in group}}
        fitted_group = fit_specs(cfg, [job.spec for job in group], data,
                                 indices=[job.index for job in group], reference=reference)
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

    oracles = fit_oracles(cfg, paths)

    _remove_save_leftovers(paths.artifacts)  # a killed fit's swap folders
    # Only now, with every fit done, replace artifacts (each save is an atomic swap).
    written = {
        job.label: save(
            calibrator, paths.artifact_dir(job.label), class_names=cfg.model.names(),
            ignore_index=ignore_index, metrics=metrics, data_fingerprint=fingerprint,
        )
        for job, calibrator, metrics, fingerprint in fitted
    }
    save_oracles(cfg, paths, oracles)
    return written
