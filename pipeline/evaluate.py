"""Stage 3: evaluate every calibrator on every test set and aggregate the metrics with pandas.

Run it with ``segcal evaluate CONFIG`` (or ``pipeline.evaluate.run(cfg)``) after extract and fit.

For every test and monitor dataset (plus the held-out part of the calibration set, named
``<dataset>-heldout``, when ``evaluate.include_heldout``) and every configured calibrator plus
``uncalibrated``, a Ray Data pipeline over the shard files upsamples each image's stored logits
to label resolution, applies the calibrator and reduces the image to one row of mergeable
statistics (:class:`pipeline.metrics.ImageStats`) and label-free features
(:func:`pipeline.label_free.image_features`: confidence and entropy sums and a confidence
histogram over all pixels, from the same probabilities). Each shard is read once for all
calibrators. When the cluster has GPUs (``evaluate.use_gpu``: auto, the default, or true) the
actors take one each and calibrate and score there, with the torch twin of the statistics
kernel (:mod:`pipeline.metrics.torch_stats`); otherwise one single-threaded actor per CPU uses
the numba kernel. Only the image being processed is ever
held per pixel, and the driver streams the rows to ``per_image.parquet`` while adding them into
one running total per dataset x calibrator, so memory does not grow with the number of images
(only one float per image, its ECE, is kept for the bootstrap). pandas then writes:

- ``per_image.parquet``: one row per image x calibrator (the statistics, plus ``img_ece``
  and the label-free feature columns :data:`pipeline.label_free.FEATURE_COLUMNS` and
  ``lf_pred_hist``, the pixels per predicted class). A monitor
  set's rows have only the features: their label statistics are zeros (``n_images`` 0) and
  ``img_ece`` is NaN.
- ``summary.csv``: one row per labelled dataset x calibrator (see :data:`SUMMARY_COLUMNS`);
  monitor sets have none.
- ``domain_shift.csv``: each shifted test dataset beside its reference domain, with deltas.
- ``best.csv``: the best calibrator per test domain by image-wise ECE (ties: NLL).
- ``label_free.csv``: per test or monitor set x calibrator, what can be said without labels:
  a drift score against the held-out calibration images with its alarm, and estimated pixel
  accuracy (ATC, DoC) and image-wise ECE, beside the true values where labels exist (see
  :func:`label_free_table`). Written before ``summary.csv``, which stays the last table.

New files are written to a temporary folder inside ``OUTPUT`` and moved into place only when
every table is complete, so a failed or killed evaluation leaves the earlier tables (and the
report, which :mod:`pipeline.report` writes) as they were.

Layout: this module plans (targets, artifacts), runs the Ray Data pipeline and writes the
tables; :mod:`pipeline.evaluate_rows` turns one image into its rows (the actor's work) and
:mod:`pipeline.evaluate_tables` sums rows into the summary, domain-shift and best tables. Their
public names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.calibrators import load
from pipeline.calibrators.artifacts import CARD, read_card
from pipeline.config import DatasetConfig, JobConfig, config_hash
from pipeline.evaluate_rows import (  # the per-image half; its names are this stage's API too
    _FEATURES,
    ROW_SCHEMA,
    ShardEvaluator,
    StageTimer,
    artifact_files,
    image_rows,
    image_stats_per_calibrator,
    resolve_device,
    rows_table,
)
from pipeline.evaluate_tables import (  # the aggregation half, likewise
    HELDOUT_SUFFIX,
    KEY_COLUMNS,
    METRIC_COLUMNS,
    MONITOR,
    SHIFT_METRICS,
    SUMMARY_COLUMNS,
    UNCALIBRATED,
    Aggregator,
    best_per_domain,
    bootstrap_interval,
    domain_shift,
)
from pipeline.label_free import (
    LABEL_FREE_COLUMNS,
)
from pipeline.paths import (
    BEST,
    DOMAIN_SHIFT,
    LABEL_FREE,
    ORACLE,
    PER_IMAGE,
    SUMMARY,
    RunPaths,
    atomic_write_text,
    scratch_dir,
)
from pipeline.sampling import oracle_artifacts, split_heldout
from pipeline.shards import (
    MANIFEST_NAME,
    Manifest,
    content_hash,
    read_manifest,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HELDOUT_SUFFIX", "KEY_COLUMNS", "METRIC_COLUMNS", "MONITOR", "ROW_SCHEMA", "SHIFT_METRICS",
    "SUMMARY_COLUMNS", "TABLES", "UNCALIBRATED", "Aggregator", "ShardEvaluator", "StageTimer",
    "Target", "best_per_domain", "bootstrap_interval", "check_artifacts", "domain_shift",
    "image_rows", "image_stats_per_calibrator", "label_free_table", "plan_targets",
    "reference_datasets", "resolve_device", "rows_table", "run",
]

# summary.csv last: the refresh stage treats it as the marker of a finished evaluation.
TABLES = (PER_IMAGE, DOMAIN_SHIFT, BEST, LABEL_FREE, SUMMARY)
# Rows that are bounds, not calibrators one could ship: left out of label_free.csv.
_BOUNDS = ("oracle_ts",)


def _feature_rows(per_image: Path, datasets: Sequence[str]) -> pd.DataFrame:
    """The feature columns (and ``img_ece``) of ``datasets``' rows, read back from ``per_image``.

    Rows come sorted by ``image_id`` (frame order for video ids such as CamVid's), whatever
    order the evaluators returned them in, so the drift test's block bootstrap sees neighbouring
    frames together and the table does not depend on scheduling.
    """
    # img_ece too: fit_reference uses the labelled reference images' true image-wise ECE.
    columns = ["dataset", "calibrator", "image_id", "img_ece", *_FEATURES]
    if not datasets:
        return pd.DataFrame(columns=columns)
    table = pq.read_table(per_image, columns=columns,
                          filters=[("dataset", "in", list(datasets))])
    rows = table.to_pandas()
    return rows.sort_values(["image_id", "dataset"], kind="stable").reset_index(drop=True)


def label_free_table(
    per_image: Path,
    summary: pd.DataFrame,
    aggregator: Aggregator,
    targets: Sequence[Target],
    *,
    seed: int = 0,
) -> pd.DataFrame:
    """``label_free.csv``: drift and label-free estimates per test or monitor set x calibrator.

    Each calibrator's reference is its own rows of the held-out calibration images (every
    ``<calibration>-heldout`` set without a ``corruption``, pooled: corrupted copies are not
    the domain a drift is measured from) with their true pixel accuracy
    (:func:`pipeline.label_free.fit_reference`); each set's estimates come from its own rows
    of that calibrator (:func:`pipeline.label_free.estimate`). The drift score compares the
    uncalibrated rows of the held-out images with the set's (:func:`pipeline.label_free.drift`),
    so every calibrator row of a set carries the same drift. ``true_pixel_acc`` and
    ``true_img_ece`` are the summary's ``pixel_acc`` and ``img_ece`` for a labelled (test) set,
    NaN for a monitor set. Bounds (``oracle_ts``) get no row. Per set, only that set's rows are
    read back from ``per_image``, so memory holds one set at a time.

    Args:
        per_image: the per-image table (:data:`ROW_SCHEMA`, with the feature columns).
        summary: the summary table (the true values of the labelled sets).
        aggregator: the totals, for the held-out images' pooled pixel accuracy per calibrator.
        targets: the evaluated datasets (:func:`plan_targets`).
        seed: seed of the drift test's resampling.

    Returns:
        Columns :data:`pipeline.label_free.LABEL_FREE_COLUMNS`, one row per (test or monitor
        set, calibrator) in target then calibrator order; no rows when no held-out calibration
        images were evaluated (``evaluate.include_heldout: false`` or
        ``fit.heldout_fraction: 0``).
    """
    from pipeline import label_free as LF

    heldout = [t.name for t in targets if t.name.endswith(HELDOUT_SUFFIX)
               and t.config.role == "calibration" and t.config.corruption is None]
    sets = [t for t in targets if t.config.role in ("test", MONITOR)]
    if not heldout:
        if sets:
            logger.warning("no held-out calibration images: %s has no rows", LABEL_FREE)
        return pd.DataFrame(columns=list(LABEL_FREE_COLUMNS))
    reference_rows = _feature_rows(per_image, heldout)
    pooled = aggregator.domain_totals(heldout)
    references = {
        cal: LF.fit_reference(rows.reset_index(drop=True), pooled[cal].pixel_acc())
        for cal, rows in reference_rows.groupby("calibrator", sort=False)
        if cal in pooled and cal not in _BOUNDS
    }
    uncalibrated_reference = reference_rows[reference_rows["calibrator"] == UNCALIBRATED]
    truth = summary.set_index(["dataset", "calibrator"])
    records = []
    for t in sets:
        rows = _feature_rows(per_image, [t.name])
        set_drift = LF.drift(
            uncalibrated_reference.reset_index(drop=True),
            rows[rows["calibrator"] == UNCALIBRATED].reset_index(drop=True),
            seed=seed,
        )
        for cal, group in rows.groupby("calibrator", sort=False):
            if cal not in references:
                continue
            est = LF.estimate(group.reset_index(drop=True), references[cal])
            labelled = t.labelled and (t.name, cal) in truth.index
            records.append({
                "dataset": t.name, "domain": t.config.domain, "reference": t.config.reference,
                "role": t.config.role, "calibrator": cal, "n_images": len(group),
                "drift_score": set_drift.score, "drift_threshold": set_drift.threshold,
                "drift_alarm": bool(set_drift.alarm),
                "est_pixel_acc": est["est_pixel_acc"],
                "est_pixel_acc_doc": est["est_pixel_acc_doc"],
                "est_img_ece": est["est_img_ece"],
                "true_pixel_acc": truth.loc[(t.name, cal), "pixel_acc"] if labelled else math.nan,
                "true_img_ece": truth.loc[(t.name, cal), "img_ece"] if labelled else math.nan,
            })
    table = pd.DataFrame.from_records(records, columns=list(LABEL_FREE_COLUMNS))
    labels = list(dict.fromkeys([UNCALIBRATED, *summary["calibrator"], *references]))
    return _ordered(table, targets, labels) if len(table) else table


# ---------------------------------------------------------------------------------------------
# Planning: what to evaluate, checked before any work starts


@dataclass(frozen=True)
class Target:
    """One dataset (or the held-out part of one) to evaluate."""

    name: str
    config: DatasetConfig
    directory: Path
    manifest: Manifest
    image_ids: frozenset[str]

    @property
    def labelled(self) -> bool:
        """False for a ``monitor`` set: its rows get label-free features only."""
        return self.config.role != MONITOR and self.manifest.labelled


def _check_manifest(
    cfg: JobConfig, ds: DatasetConfig, directory: Path, fingerprint: str
) -> Manifest:
    try:
        manifest = read_manifest(directory)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Expected dataset {ds.name!r} of config {cfg.source or '<dict>'} to have a "
            f"manifest at {directory / MANIFEST_NAME}, but it is missing: run `segcal extract` "
            "first"
        ) from None
    where = directory / MANIFEST_NAME
    if manifest.model_fingerprint != fingerprint:
        raise ValueError(
            f"Expected the shards in {where} to come from model {fingerprint[:12]} of config "
            f"{cfg.source or '<dict>'}, but they come from {manifest.model_fingerprint[:12]}"
        )
    # content_hash covers only what changes the stored rows (dataset tags, labels, corruption,
    # store options), unlike the manifest's config_hash, which covers the whole config: adding
    # a calibrator or a test set must not invalidate what was extracted.
    expected = content_hash(ds, cfg.extract)
    if manifest.content_hash != expected:
        raise ValueError(
            f"Expected the shards in {where} to match config {cfg.source or '<dict>'} "
            f"(content hash {expected}, config hash {config_hash(cfg)}), but they were "
            f"extracted with content hash {manifest.content_hash!r} by config hash "
            f"{manifest.config_hash}: re-run `segcal extract` or use another output folder"
        )
    if manifest.num_classes != cfg.model.num_classes:
        raise ValueError(
            f"Expected {where} to hold {cfg.model.num_classes} classes as in `model.num_classes`, "
            f"but got {manifest.num_classes}"
        )
    return manifest


def plan_targets(cfg: JobConfig, paths: RunPaths) -> list[Target]:
    """The datasets to evaluate, with their manifests checked.

    In order: the held-out calibration sets, the test sets, the monitor sets (config order
    within each).

    A config may have monitor sets and no test set (the nightly case: a labelled calibration
    set and the night's unlabelled images); ``summary.csv`` then holds the held-out rows only.

    Raises:
        ValueError: neither a test nor a monitor dataset; monitor sets without a held-out
            calibration part to compare them with; shards of another model or config;
            class-count mismatch.
        FileNotFoundError: a dataset without a manifest.
    """
    tests = cfg.datasets_with_role("test")
    monitors = cfg.datasets_with_role(MONITOR)
    if not tests and not monitors:
        raise ValueError(
            f"Expected at least one dataset with role 'test' or 'monitor' in config "
            f"{cfg.source or '<dict>'}, but got none"
        )
    targets = []
    if cfg.evaluate.include_heldout and cfg.fit.heldout_fraction > 0:
        # The fit stage's own rule, applied to the union of the calibration sets' ids as there
        # (corrupted copies of an image share its id, so they are held out together).

        calibration = [
            (ds, _check_manifest(cfg, ds, paths.dataset_dir(ds.name), paths.model_fingerprint))
            for ds in cfg.datasets_with_role("calibration")
        ]
        union = {i for _, m in calibration for i in m.image_ids()}
        heldout = split_heldout(union, cfg.fit.heldout_fraction, cfg.fit.seed)
        for ds, manifest in calibration:
            ids = frozenset(manifest.image_ids() & heldout)
            if ids:
                targets.append(Target(ds.name + HELDOUT_SUFFIX, ds, paths.dataset_dir(ds.name),
                                      manifest, ids))
    if monitors and not targets:
        raise ValueError(
            f"Expected held-out calibration images for the monitor sets "
            f"{[d.name for d in monitors]} of config {cfg.source or '<dict>'} (their drift and "
            f"label-free estimates are measured against them), but got none: set "
            f"`evaluate.include_heldout: true` and `fit.heldout_fraction` > 0 (got "
            f"{cfg.evaluate.include_heldout} and {cfg.fit.heldout_fraction})"
        )
    for ds in [*tests, *monitors]:
        directory = paths.dataset_dir(ds.name)
        manifest = _check_manifest(cfg, ds, directory, paths.model_fingerprint)
        targets.append(Target(ds.name, ds, directory, manifest, frozenset(manifest.image_ids())))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"Expected unique evaluation names, but got {names}")
    return targets


def reference_datasets(targets: Sequence[Target]) -> dict[str, list[str]]:
    """Reference domain -> the evaluated datasets that make it up.

    A reference names a domain. It is made of the unshifted test datasets of that domain or,
    when there are none, the held-out calibration sets of that domain.

    Raises:
        ValueError: a shifted dataset whose reference domain has no evaluated dataset.
    """
    refs: dict[str, list[str]] = {}
    for t in targets:
        ref = t.config.reference
        if ref is None or t.config.role != "test" or ref in refs:
            continue
        same = [u for u in targets if u.config.domain == ref and u.config.reference is None
                and u.labelled]
        chosen = [u.name for u in same if u.config.role == "test"] or [u.name for u in same]
        if not chosen:
            raise ValueError(
                f"Expected a test dataset (or a held-out calibration set) of domain {ref!r}, "
                f"the `reference` of dataset {t.name!r}, but there is none"
            )
        refs[ref] = chosen
    return refs


def check_artifacts(cfg: JobConfig, paths: RunPaths, targets: Sequence[Target]) -> dict[str, str]:
    """Artifact folders of the configured calibrators, checked against the shards' classes.

    Returns:
        Calibrator label -> artifact folder.

    Raises:
        FileNotFoundError: a configured calibrator without an artifact.
        ValueError: an artifact of another calibrator, or whose classes differ from the
            shards'.
    """
    artifacts = {}
    for spec in cfg.calibrators:
        directory = paths.artifact_dir(spec.key)
        try:
            card = read_card(directory)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"Expected an artifact for calibrator {spec.key!r} at {directory}, but it is "
                "missing: run `segcal fit` first"
            ) from None
        where = directory / CARD
        if card["name"] != spec.name:
            raise ValueError(
                f"Expected {where} to hold calibrator {spec.name!r} as configured for label "
                f"{spec.key!r}, but it holds {card['name']!r}"
            )
        for t in targets:
            names = card["class_names"]
            if card["num_classes"] != t.manifest.num_classes or (
                names is not None and names != t.manifest.class_names
            ):
                raise ValueError(
                    f"Expected the classes of artifact {where} ({card['num_classes']}: {names}) "
                    f"to equal those of the shards in {t.directory / MANIFEST_NAME} "
                    f"({t.manifest.num_classes}: {t.manifest.class_names})"
                )
        load(directory)  # fail here, not inside a Ray actor, on a corrupt artifact
        artifacts[spec.key] = str(directory)
    return artifacts


def _work_items(targets: Sequence[Target]) -> list[dict[str, Any]]:
    """One item per shard file holding at least one image to evaluate."""
    items = []
    for t in targets:
        for shard in t.manifest.shards:
            ids = [i for i in shard.image_ids if i in t.image_ids]
            if ids:
                items.append({
                    "path": str(t.directory / shard.file), "sha256": shard.sha256,
                    "rows": shard.rows, "image_ids": ids, "dataset": t.name,
                    "domain": t.config.domain, "reference": t.config.reference,
                    "role": t.config.role, "ignore_index": t.manifest.ignore_index,
                    "labelled": t.labelled,
                })
    return items


# ---------------------------------------------------------------------------------------------
# Execution: Ray Data (run) or in-process (tests, debugging)


def _pool(
    requested: int | None, n_items: int, use_gpu: object = "auto"
) -> tuple[int, float, int, int]:
    """Actor pool size, CPUs, GPUs and torch threads per actor.

    With GPUs free (and ``use_gpu`` auto or true): one actor per GPU, each scoring on its GPU
    with one CPU for reading and decoding its shards. Otherwise one single-threaded actor per
    free CPU: the per-image work (a calibrator forward and one numba pass) is mostly serial,
    so actors scale better than threads. Ray Data hangs when an actor pool holds every CPU
    (ray-project/ray#44687): the read tasks never get scheduled, so the actors share all but
    one CPU (half of a lone CPU) by asking for fractional CPUs.

    Raises:
        RuntimeError: ``use_gpu`` true on a cluster without a free GPU.
    """
    import ray

    free_resources = ray.available_resources()
    free = float(free_resources.get("CPU", 1.0))
    gpus = int(free_resources.get("GPU", 0.0))
    mode = str(use_gpu).lower()
    if mode == "true" and gpus < 1:
        raise RuntimeError(
            "Expected a free GPU in the Ray cluster for `evaluate.use_gpu`=true, but got none"
        )
    reserve = 1.0 if free >= 2 else free / 2
    if gpus >= 1 and mode != "false":
        size = max(1, min(requested or gpus, gpus, n_items))
        if requested is not None and size < min(requested, n_items):
            warnings.warn(
                f"`evaluate.num_actors`={requested} exceeds the {gpus} free GPUs; using {size}",
                stacklevel=3,
            )
        return size, max(0.01, min(1.0, (free - reserve) / size)), 1, 1
    limit = max(1, int(free))
    size = max(1, min(requested or limit, limit, n_items))
    if requested is not None and size < min(requested, n_items):
        warnings.warn(
            f"`evaluate.num_actors`={requested} exceeds the {free:g} free CPUs; using {size}",
            stacklevel=3,
        )
    num_cpus = max(0.01, min(1.0, (free - reserve) / size))
    return size, num_cpus, 0, 1


def _batches_ray(
    items: list[dict[str, Any]], evaluator_kwargs: dict[str, Any], num_actors: int | None
) -> Iterator[pa.Table]:
    import ray

    from pipeline.runtime import init_ray

    init_ray()
    use_gpu = evaluator_kwargs.get("use_gpu", "auto")
    size, num_cpus, num_gpus, threads = _pool(num_actors, len(items), use_gpu)
    # [1] one block per shard file, so that the shards spread over the actors
    shards = ray.data.from_items(items, override_num_blocks=len(items))
    # [2] an actor pool of evaluators, each holding the loaded calibrators (on its GPU if any)
    rows = shards.map_batches(
        ShardEvaluator,
        fn_constructor_kwargs={**evaluator_kwargs, "threads": threads,
                               "use_gpu": "true" if num_gpus else "false"},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
    # [3] stream the small rows back to the driver as they are produced
    yield from rows.iter_batches(batch_size=None, batch_format="pyarrow")


def _batches_local(
    items: list[dict[str, Any]], evaluator_kwargs: dict[str, Any]
) -> Iterator[pa.Table]:
    evaluator = ShardEvaluator(**evaluator_kwargs)
    for item in items:
        yield evaluator(pa.Table.from_pylist([item]))


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    # repr-precision floats: the tables are read back by the report and by tests.
    atomic_write_text(path, df.to_csv(index=False, float_format="%.17g"))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _use_gpu(cfg: JobConfig) -> object:
    """``evaluate.use_gpu``: auto, true or false."""
    return cfg.evaluate.use_gpu


def run(cfg: JobConfig, *, local: bool = False) -> Path:
    """Evaluate every configured calibrator and ``uncalibrated`` on the test sets.

    Starts local Ray when none is running (``RAY_ADDRESS`` connects to a cluster instead).

    Args:
        cfg: the run config (``cfg.evaluate`` holds the options).
        local: evaluate in this process without Ray (tests and debugging); the results are
            the same.

    Returns:
        The output folder, holding ``per_image.parquet``, ``summary.csv``,
        ``domain_shift.csv``, ``best.csv`` and ``label_free.csv``.

    Raises:
        FileNotFoundError: a dataset without a manifest, a calibrator without an artifact.
        ValueError: neither a test nor a monitor dataset; monitor sets without held-out
            calibration images; shards of another model or config; artifact classes that differ
            from the shards'; a reference domain without a dataset.
    """
    from pipeline.models import model_fingerprint

    output = Path(cfg.output)
    paths = RunPaths.for_run(cfg, model_fingerprint(cfg.model))
    targets = plan_targets(cfg, paths)
    references = reference_datasets(targets)
    artifacts = check_artifacts(cfg, paths, targets)
    oracles = oracle_artifacts(cfg, paths)
    items = _work_items(targets)
    # The artifacts' bytes, not their folders: actors on other nodes cannot see the driver's
    # disk (a run at a URI keeps them in the driver's mirror, see pipeline.storage).
    kwargs = {"artifacts": {k: artifact_files(v) for k, v in artifacts.items()},
              "n_bins": cfg.evaluate.n_bins,
              "boundary_width": cfg.evaluate.boundary_width, "use_gpu": _use_gpu(cfg),
              "oracles": {k: artifact_files(v) for k, v in oracles.items()}}
    logger.info("evaluating %d calibrators + uncalibrated on %d datasets (%d shards)",
                len(artifacts), len(targets), len(items))

    output.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(output, "evaluate")
    try:
        batches = _batches_local(items, kwargs) if local else _batches_ray(
            items, kwargs, cfg.evaluate.num_actors)
        aggregator = Aggregator(bootstrap=cfg.evaluate.bootstrap, seed=cfg.evaluate.seed)
        with pq.ParquetWriter(tmp / PER_IMAGE, ROW_SCHEMA, compression="zstd") as writer:
            for batch in batches:
                batch = batch.cast(ROW_SCHEMA)
                writer.write_table(batch)
                aggregator.add(batch.to_pandas())
        _fsync(tmp / PER_IMAGE)
        summary = _ordered(aggregator.summary(), targets, ["uncalibrated", ORACLE, *artifacts])
        _write_csv(summary, tmp / SUMMARY)
        _write_csv(domain_shift(summary, aggregator, references), tmp / DOMAIN_SHIFT)
        _write_csv(best_per_domain(summary), tmp / BEST)
        _write_csv(label_free_table(tmp / PER_IMAGE, summary, aggregator, targets,
                                    seed=cfg.evaluate.seed), tmp / LABEL_FREE)
        for name in TABLES:
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("evaluation tables written to %s", output)
    return output


def _ordered(summary: pd.DataFrame, targets: Sequence[Target], labels: list[str]) -> pd.DataFrame:
    """Rows in config order of datasets, then calibrators (uncalibrated first)."""
    dataset_rank = {t.name: i for i, t in enumerate(targets)}
    label_rank = {label: i for i, label in enumerate(labels)}
    order = np.lexsort(
        (summary["calibrator"].map(label_rank), summary["dataset"].map(dataset_rank))
    )
    return summary.iloc[order].reset_index(drop=True)
