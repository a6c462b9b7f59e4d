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
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import Calibrator, load
from pipeline.calibrators.artifacts import CARD, read_card
from pipeline.config import DatasetConfig, JobConfig, config_hash
from pipeline.label_free import (
    CONF_EDGES,
    FEATURE_COLUMNS,
    LABEL_FREE_COLUMNS,
    PRED_HIST_COLUMN,
    image_features,
)
from pipeline.metrics import N_SCORE_BINS, ImageStats, catalogue, first_argmax
from pipeline.metrics import functional as MF
from pipeline.metrics.confidence import confidence_sums
from pipeline.metrics.stats import stats_from_image_sums
from pipeline.metrics.torch_stats import image_stats_torch, prepare_targets
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
    ImageRecord,
    Manifest,
    content_hash,
    decode_table,
    file_sha256,
    read_manifest,
    upsample_logits,
)

logger = logging.getLogger(__name__)

UNCALIBRATED = "uncalibrated"
HELDOUT_SUFFIX = "-heldout"
# summary.csv last: the refresh stage treats it as the marker of a finished evaluation.
TABLES = (PER_IMAGE, DOMAIN_SHIFT, BEST, LABEL_FREE, SUMMARY)
MONITOR = "monitor"
# Rows that are bounds, not calibrators one could ship: left out of label_free.csv.
_BOUNDS = ("oracle_ts",)

KEY_COLUMNS = ("dataset", "domain", "reference", "role", "calibrator")
"""Columns naming a summary row (``reference`` is the reference domain of a shifted set)."""

METRIC_COLUMNS = catalogue.metric_names()
"""Metrics of a summary row, from the catalogue (`pipeline.metrics.catalogue`). ``mis_*``/
``flag_*`` are the selector's misprediction detection (NaN for calibrators without a selector);
``msp_*`` the ``1 - max p`` baseline. A pixel is flagged when its score exceeds 0.5."""


def _summary_columns() -> tuple[str, ...]:
    # The bootstrap interval of img_ece follows its mean and spread.
    at = METRIC_COLUMNS.index("img_ece_std") + 1
    return (*KEY_COLUMNS, "n_images", "n_pixels", *METRIC_COLUMNS[:at], "img_ece_lo",
            "img_ece_hi", *METRIC_COLUMNS[at:])


SUMMARY_COLUMNS = _summary_columns()

SHIFT_METRICS = catalogue.shift_metrics()

_IMAGE_COLUMNS = ("dataset", "domain", "reference", "role", "image_id", "calibrator")


# The label-free features of :func:`pipeline.label_free.image_features`, by column: the
# contract's four, plus the pixels per predicted class (it lets the accuracy estimate see a
# shift of the predicted classes).
_FEATURE_TYPES = {
    "lf_n_pixels": pa.int64(), "lf_conf_sum": pa.float64(), "lf_entropy_sum": pa.float64(),
    "lf_conf_hist": pa.list_(pa.int64()), PRED_HIST_COLUMN: pa.list_(pa.int64()),
}
_FEATURES = (*FEATURE_COLUMNS, PRED_HIST_COLUMN)


def _row_schema() -> pa.Schema:
    """Arrow schema of a per-image row (list types do not depend on C or the bin counts)."""
    stats = pa.Table.from_pylist([ImageStats.zero(2, 1).to_row()]).schema
    meta = [pa.field(name, pa.string()) for name in _IMAGE_COLUMNS]
    features = [pa.field(name, _FEATURE_TYPES[name]) for name in _FEATURES]
    return pa.schema([*meta, pa.field("img_ece", pa.float64()), *stats, *features])


ROW_SCHEMA = _row_schema()


# ---------------------------------------------------------------------------------------------
# Per image: logits -> calibrators -> one ImageStats row each


def _image_tensor(record: ImageRecord) -> torch.Tensor | None:
    """The stored RGB image as (1, 3, H, W) float in [0, 1] at label resolution, or None."""
    if record.image is None:
        return None
    image = torch.tensor(record.image).permute(2, 0, 1)[None].float().div_(255.0)
    size = (record.height, record.width)
    if tuple(image.shape[-2:]) != size:
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    return image.clamp_(0.0, 1.0)


class StageTimer:
    """Time per evaluation stage (``benchmarks/evaluate.py --profile``).

    ``timer(stage)`` is a context manager that adds the time spent inside it to
    ``seconds[stage]``; on CUDA it synchronises first, so that each stage is charged for its
    own kernels. Stages of one calibrator are named ``"<stage>|<calibrator>"``; the others
    are shared by an image's calibrators. ``clock`` may be ``time.thread_time`` (CPU time of
    a single-threaded evaluator, robust to other processes' load) instead of wall time.
    """

    def __init__(self, sync: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = {}
        self.sync = sync
        self.clock = clock

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the body as ``stage``."""
        if self.sync:
            torch.cuda.synchronize()
        start = self.clock()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + self.clock() - start


def _no_timer(stage: str) -> AbstractContextManager[None]:
    return nullcontext()


def image_stats_per_calibrator(
    record: ImageRecord,
    calibrators: Mapping[str, Calibrator | None],
    *,
    n_bins: int,
    boundary_width: int,
    ignore_index: int | None,
    device: torch.device | str = "cpu",
    timer: Callable[[str], AbstractContextManager[None]] = _no_timer,
    stats_backend: str = "auto",
    labelled: bool = True,
) -> list[tuple[str, ImageStats, dict[str, Any]]]:
    """One image's statistics and label-free features under each calibrator.

    See :func:`image_rows` (which turns them into rows) for the arguments.

    Returns:
        ``[(label, stats, features), ...]``: ``features`` as
        :func:`pipeline.label_free.image_features` gives them (with the predicted-class
        counts), computed on the same probabilities and predictions as ``stats``; for an
        unlabelled image ``stats`` is empty
        (``ImageStats.zero``: no scored pixel, ``n_images`` 0).
    """
    device = torch.device(device)
    if stats_backend not in ("auto", "numba", "torch"):
        raise ValueError(
            f"Expected `stats_backend` to be auto, numba or torch, but got {stats_backend!r}"
        )
    if stats_backend == "numba" and device.type != "cpu":
        raise ValueError(f"Expected the CPU for `stats_backend`='numba', but got {device}")
    use_numba = stats_backend == "numba" or (stats_backend == "auto" and device.type == "cpu")
    size = (record.height, record.width)
    c = record.logits.shape[0]
    if tuple(record.labels.shape) != size:
        raise ValueError(
            f"Expected the labels of image {record.image_id!r} of shape {size} (its height and "
            f"width), but got {tuple(record.labels.shape)}"
        )
    with timer("float16 -> float32"):
        # A copy: shard arrays are read-only views of Arrow buffers. To a GPU the float16
        # values travel as they are stored (half the bytes) and widen there, exactly.
        if device.type == "cpu":
            logits = torch.from_numpy(np.array(record.logits, dtype=np.float32))
        else:
            logits = torch.from_numpy(np.array(record.logits)).to(device).float()
    with timer("upsampling"):
        logits = upsample_logits(logits, size)[None]
        image = None
        if any(cal is not None and type(cal).spatial for cal in calibrators.values()):
            image = _image_tensor(record)
            image = None if image is None else image.to(device)
    with timer("statistics"):
        if not labelled:
            pass  # a monitor image: its label plane is all ignore_index, nothing to score
        elif use_numba:
            labels2d = record.labels
            if labels2d.dtype != np.int64:
                labels2d = labels2d.astype(np.int64)
            labels = labels2d.reshape(-1)
            valid = MF.valid_mask(labels, c, ignore_index)
            boundary = MF.boundary_mask(labels2d, boundary_width).reshape(-1)
        else:
            targets = prepare_targets(record.labels, c, ignore_index=ignore_index,
                                      boundary_width=boundary_width, device=device)
    rows = []
    with torch.inference_mode():
        for label, calibrator in calibrators.items():
            score = None
            calibrated = logits
            if calibrator is not None:
                with timer(f"calibrator forward|{label}"):
                    cal_image = image if type(calibrator).spatial else None
                    calibrated, score = calibrator.calibrate_with_score(logits, cal_image)
            with timer(f"softmax|{label}"):
                probs = torch.softmax(calibrated[0], dim=0)
            # Predictions from the logits, not the probabilities: a huge temperature (selective
            # scaling's T_mis = 1e10) leaves logits that differ by ~1e-9, which a float32
            # softmax rounds to exact ties, while dividing by it never reorders the logits.
            with timer(f"statistics|{label}"):
                if use_numba:
                    preds = first_argmax(calibrated[0]).reshape(-1)  # torch's is ~20x slower
                else:
                    pred_map = calibrated[0].argmax(0)  # the first maximum, as on the CPU
                if not labelled:
                    stats = ImageStats.zero(c, n_bins)
                elif use_numba:
                    flat_score = None
                    if score is not None:
                        flat_score = MF.as_scores(score.reshape(-1).double().numpy(),
                                                  labels.shape)
                    sums = MF.image_sums(
                        probs.numpy().reshape(c, -1), labels, valid, boundary, flat_score,
                        n_bins, N_SCORE_BINS, check=False, preds=preds,
                    )
                    stats = stats_from_image_sums(sums, n_bins, c)
                else:
                    stats = image_stats_torch(
                        probs, n_bins=n_bins, validate_args=False, targets=targets,
                        preds=pred_map,
                        mis_score=None if score is None else score.reshape(size),
                    )
            with timer(f"label-free features|{label}"):
                if use_numba:
                    features = _features_cpu(probs, calibrated[0], preds)
                else:
                    features = image_features(probs, preds=pred_map)
            rows.append((label, stats, features))
    return rows


def _features_cpu(probs: torch.Tensor, logits: torch.Tensor, preds: np.ndarray) -> dict[str, Any]:
    """:func:`pipeline.label_free.image_features` with ``preds``, in one fused numba pass.

    The CPU path's form (:func:`pipeline.metrics.confidence.confidence_sums`: no (C, P)
    temporaries, one logarithm per pixel): the same pixel count, confidence histogram and
    predicted-class counts, the confidence sum to float64 rounding and the entropy sum, taken
    from the logits, to about 1e-9 relative (1e-6 at worst, float32 probabilities).

    Args:
        probs: (C, H, W) float32 CPU softmax of ``logits``.
        logits: (C, H, W) CPU logits, ``probs``' dtype.
        preds: (H * W,) int64 first argmax of ``logits``.
    """
    c = probs.shape[0]
    conf_sum, entropy_sum, hist = confidence_sums(
        probs.numpy().reshape(c, -1), logits.numpy().reshape(c, -1), preds, CONF_EDGES[1:-1])
    return {
        "lf_n_pixels": int(preds.size), "lf_conf_sum": conf_sum, "lf_entropy_sum": entropy_sum,
        "lf_conf_hist": hist, PRED_HIST_COLUMN: np.bincount(preds, minlength=c).astype(np.int64),
    }


def image_rows(
    record: ImageRecord,
    calibrators: Mapping[str, Calibrator | None],
    *,
    meta: Mapping[str, str | None],
    n_bins: int,
    boundary_width: int,
    ignore_index: int | None,
    device: torch.device | str = "cpu",
    timer: Callable[[str], AbstractContextManager[None]] = _no_timer,
    stats_backend: str = "auto",
    labelled: bool = True,
) -> list[dict[str, Any]]:
    """One image's statistics rows, one per calibrator.

    The stored logits are upsampled to label resolution, each calibrator is applied (spatial
    ones also get the image, upsampled alike) and the image is reduced to an ImageStats row
    plus its label-free features (:data:`pipeline.label_free.FEATURE_COLUMNS` and
    ``lf_pred_hist``, over every pixel, ignore ones included: unlabelled sets have no mask).
    The labels are checked, and their valid and boundary pixels found, once per image. On the
    CPU the statistics come from the numba kernel; on another device from its torch twin
    (:mod:`pipeline.metrics.torch_stats`), where the logits already are.

    Args:
        record: the image's stored logits (C, h, w), labels (H, W) and optional image.
        calibrators: label -> fitted calibrator (on ``device``); None means ``uncalibrated``.
        meta: ``dataset``, ``domain``, ``reference``, ``role`` for the rows.
        n_bins: confidence bins.
        boundary_width: boundary width in pixels.
        ignore_index: label value left out of every metric.
        device: where to calibrate and score.
        timer: ``timer(stage)`` context manager charging each stage (see :class:`StageTimer`).
        stats_backend: ``"auto"`` (numba on the CPU, torch elsewhere), ``"numba"`` or
            ``"torch"`` (tests run the GPU path's code on the CPU with it).
        labelled: False for an image of a ``monitor`` set: only the features are computed;
            the label statistics are zeros (``n_images`` 0, so ``img_ece`` is NaN).

    Returns:
        Rows with the keys of :data:`ROW_SCHEMA`.
    """
    stats = image_stats_per_calibrator(
        record, calibrators, n_bins=n_bins, boundary_width=boundary_width,
        ignore_index=ignore_index, device=device, timer=timer, stats_backend=stats_backend,
        labelled=labelled,
    )
    return [
        {**meta, "image_id": record.image_id, "calibrator": label,
         "img_ece": s.image_ece_mean(), **s.to_row(),
         **{k: np.asarray(f[k]).tolist() for k in _FEATURES}}
        for label, s, f in stats
    ]


def rows_table(
    keys: Sequence[Mapping[str, str | None]],
    stats: Sequence[ImageStats],
    features: Sequence[Mapping[str, Any]],
) -> pa.Table:
    """A :data:`ROW_SCHEMA` table of rows, built column by column from the stats' arrays.

    The same table as ``pa.Table.from_pylist`` of :func:`image_rows`' dicts, without the
    Python lists: every list column is one concatenation of NumPy arrays plus offsets.

    Args:
        keys: per row, the string columns (``dataset``, ``domain``, ``reference``, ``role``,
            ``image_id``, ``calibrator``).
        stats: per row, its statistics.
        features: per row, its label-free features (:data:`FEATURE_COLUMNS` and
            ``lf_pred_hist``).
    """
    columns: list[pa.Array] = []
    for field in ROW_SCHEMA:
        name = field.name
        if name in _IMAGE_COLUMNS:
            columns.append(pa.array([k[name] for k in keys], field.type))
        elif name == "img_ece":
            columns.append(pa.array([s.image_ece_mean() for s in stats], field.type))
        elif name in _FEATURE_TYPES:
            values = [f[name] for f in features]
            if pa.types.is_list(field.type):
                columns.append(_list_array([np.asarray(v).reshape(-1) for v in values],
                                           field.type))
            else:
                columns.append(pa.array(values, field.type))
        elif pa.types.is_list(field.type):
            parts = [np.asarray(getattr(s, name)).reshape(-1) for s in stats]
            columns.append(_list_array(parts, field.type))
        else:
            columns.append(pa.array([getattr(s, name) for s in stats], field.type))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)


def _list_array(parts: Sequence[np.ndarray], type_: pa.ListType) -> pa.Array:
    """One list value per 1-D array: a single concatenation plus offsets."""
    offsets = np.zeros(len(parts) + 1, np.int32)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    values = np.concatenate(parts) if parts else np.zeros(0)
    values = values.astype(type_.value_type.to_pandas_dtype(), copy=False)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _iter_shard(path: Path, sha256: str, rows: int) -> Iterator[ImageRecord]:
    """Records of one shard, one at a time, after checking it against its manifest entry."""
    digest = file_sha256(path)
    if digest != sha256:
        raise ValueError(
            f"Expected shard {path} to have sha256 {sha256} as in its manifest, but got "
            f"{digest} (truncated or modified)"
        )
    shard = pq.ParquetFile(path)
    if shard.metadata.num_rows != rows:
        raise ValueError(
            f"Expected shard {path} to hold {rows} rows, but got {shard.metadata.num_rows}"
        )
    # One row per batch: only one image's logits are decoded at a time.
    for batch in shard.iter_batches(batch_size=1):
        yield from decode_table(pa.Table.from_batches([batch]))


def resolve_device(use_gpu: object) -> torch.device:
    """The device an evaluator scores on: ``"auto"`` takes CUDA when this process sees a GPU.

    Args:
        use_gpu: ``"auto"``, True or False (the strings ``"true"``/``"false"`` too).

    Raises:
        ValueError: On another value.
        RuntimeError: With True when no CUDA device is visible.
    """
    value = str(use_gpu).lower()
    if value not in ("auto", "true", "false"):
        raise ValueError(
            f"Expected `evaluate.use_gpu` to be auto, true or false, but got {use_gpu!r}"
        )
    if value == "false":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if value == "true":
        raise RuntimeError(
            "Expected a CUDA device for `evaluate.use_gpu`=true, but torch sees none"
        )
    return torch.device("cpu")


class ShardEvaluator:
    """Ray Data UDF (a callable class, so each actor loads the calibrators once).

    Each input row names one shard file and the image ids to evaluate in it; each output row
    holds one image x calibrator's statistics (:data:`ROW_SCHEMA`). Each shard is read once,
    image by image, and every calibrator is applied to an image before the next is decoded.

    Args:
        artifacts: calibrator label -> artifact folder.
        n_bins: confidence bins.
        boundary_width: boundary width in pixels.
        threads: torch intra-op threads for this actor (None leaves torch's default).
        use_gpu: ``"auto"`` (CUDA when this actor sees a GPU), True or False; on a GPU the
            calibrators and the statistics run there and only the sums come back.
        timer: optional :class:`StageTimer` charging each stage (profiling).
        oracles: test set -> its oracle temperature's artifact folder, applied to that set
            only as calibrator ``oracle_ts`` (see :func:`pipeline.fit.fit_oracles`).
    """

    def __init__(
        self,
        artifacts: Mapping[str, str],
        *,
        n_bins: int,
        boundary_width: int,
        threads: int | None = None,
        use_gpu: object = "auto",
        timer: StageTimer | None = None,
        oracles: Mapping[str, str] | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(use_gpu)
        self.calibrators: dict[str, Calibrator | None] = {UNCALIBRATED: None}
        self.calibrators.update(
            {label: load(path).to(self.device) for label, path in artifacts.items()}
        )
        self.oracles = {name: load(path).to(self.device)
                        for name, path in (oracles or {}).items()}
        self.n_bins = n_bins
        self.boundary_width = boundary_width
        self.timer = timer

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Evaluate the shards named in ``batch`` (columns of :func:`_work_items`)."""
        timer = self.timer or _no_timer
        keys: list[dict[str, str | None]] = []
        stats: list[ImageStats] = []
        features: list[dict[str, Any]] = []
        for item in batch.to_pylist():
            keep = set(item["image_ids"])
            meta = {k: item[k] for k in ("dataset", "domain", "reference", "role")}
            labelled = item.get("labelled", True)
            calibrators = self.calibrators
            if item["dataset"] in self.oracles:  # a test set's own temperature, there only
                calibrators = {**calibrators, ORACLE: self.oracles[item["dataset"]]}
            records = _iter_shard(Path(item["path"]), item["sha256"], item["rows"])
            while True:
                with timer("Parquet read + decode"):
                    record = next(records, None)
                if record is None:
                    break
                if record.image_id in keep:
                    for label, image_stats, feats in image_stats_per_calibrator(
                        record, calibrators, n_bins=self.n_bins,
                        boundary_width=self.boundary_width, ignore_index=item["ignore_index"],
                        device=self.device, timer=timer, labelled=labelled,
                    ):
                        keys.append({**meta, "image_id": record.image_id, "calibrator": label})
                        stats.append(image_stats)
                        features.append(feats)
        with timer("row building"):
            return rows_table(keys, stats, features)


# ---------------------------------------------------------------------------------------------
# Aggregation (pandas; no Ray needed)


def bootstrap_interval(
    values: np.ndarray, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    Resamples are drawn in chunks, so memory stays at about 100 x len(values) indices.

    Args:
        values: (N,) float per-image values (NaNs are dropped).
        resamples: number of bootstrap resamples; 0 gives (NaN, NaN).
        seed: seed of the resampling; with the same N, the same images are drawn (paired
            comparison across calibrators of one dataset).
        level: coverage of the interval.

    Returns:
        ``(lo, hi)``; both equal the value for a single value; NaN without values.

    Example:
        >>> lo, hi = bootstrap_interval(np.array([0.1, 0.2, 0.3, 0.4]), resamples=200, seed=0)
        >>> bool(lo <= 0.25 <= hi)
        True
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if resamples == 0 or values.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 100):
        idx = rng.integers(0, values.size, size=(min(100, resamples - start), values.size))
        means.append(values[idx].mean(axis=1))
    lo, hi = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _metrics(total: ImageStats) -> dict[str, float]:
    """The summary metrics of summed statistics (the catalogue's)."""
    return catalogue.compute(total)


class Aggregator:
    """Adds per-image rows, batch by batch, into per dataset x calibrator totals.

    Keeps one :class:`ImageStats` per dataset x calibrator and one float per image (its ECE,
    for the bootstrap), never the rows themselves.

    Args:
        bootstrap: bootstrap resamples for ``img_ece_lo``/``img_ece_hi`` (0: NaN).
        seed: bootstrap seed.
    """

    def __init__(self, *, bootstrap: int, seed: int) -> None:
        self.bootstrap = bootstrap
        self.seed = seed
        self.totals: dict[tuple[str, ...], ImageStats] = {}
        self._ece: list[pd.DataFrame] = []

    def add(self, rows: pd.DataFrame) -> None:
        """Add a batch of per-image rows (columns of :data:`ROW_SCHEMA`).

        Rows of ``monitor`` sets are left out: they have no labels, hence no metrics.
        """
        rows = rows[rows["role"] != MONITOR]
        if rows.empty:
            return
        rows = rows.assign(reference=rows["reference"].fillna(""))
        for key, group in rows.groupby(list(KEY_COLUMNS), sort=False):
            part = ImageStats.sum_rows(group)
            self.totals[key] = self.totals[key] + part if key in self.totals else part
        self._ece.append(rows[["dataset", "calibrator", "image_id", "img_ece"]])

    def summary(self) -> pd.DataFrame:
        """One row per dataset x calibrator with :data:`SUMMARY_COLUMNS`."""
        if not self.totals:
            raise ValueError("Expected at least one per-image row to summarise, but got none")
        ece = pd.concat(self._ece, ignore_index=True).sort_values("image_id", kind="stable")
        per_group = {k: g["img_ece"].to_numpy() for k, g in ece.groupby(["dataset", "calibrator"])}
        records = []
        for key, total in self.totals.items():
            row: dict[str, Any] = dict(zip(KEY_COLUMNS, key, strict=True))
            row["reference"] = row["reference"] or None
            row["n_images"], row["n_pixels"] = total.n_images, total.n_pixels
            row.update(_metrics(total))
            row["img_ece_lo"], row["img_ece_hi"] = bootstrap_interval(
                per_group[(row["dataset"], row["calibrator"])],
                resamples=self.bootstrap, seed=self.seed,
            )
            records.append(row)
        return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))

    def domain_totals(self, datasets: Iterable[str]) -> dict[str, ImageStats]:
        """Per calibrator, the statistics of ``datasets`` pooled (exact, by adding sums)."""
        wanted = set(datasets)
        pooled: dict[str, ImageStats] = {}
        for (dataset, *_, calibrator), total in self.totals.items():
            if dataset in wanted:
                pooled[calibrator] = pooled[calibrator] + total if calibrator in pooled else total
        return pooled


def domain_shift(
    summary: pd.DataFrame, aggregator: Aggregator, references: Mapping[str, list[str]]
) -> pd.DataFrame:
    """Each shifted dataset beside its reference domain, per calibrator, with deltas.

    Args:
        summary: the summary table.
        aggregator: holds the totals, so that a reference domain spread over several datasets
            is pooled exactly.
        references: reference domain -> the datasets that make it up.

    Returns:
        Columns ``dataset, domain, reference, reference_datasets, calibrator`` and, for every
        metric m of :data:`SHIFT_METRICS`, ``m_reference``, ``m`` and ``m_delta`` (shifted
        minus reference).
    """
    columns = ["dataset", "domain", "reference", "reference_datasets", "calibrator"]
    for m in SHIFT_METRICS:
        columns += [f"{m}_reference", m, f"{m}_delta"]
    records = []
    shifted = summary[summary["reference"].notna() & (summary["role"] == "test")]
    pooled = {ref: aggregator.domain_totals(names) for ref, names in references.items()}
    for row in shifted.itertuples(index=False):
        ref_total = pooled.get(row.reference, {}).get(row.calibrator)
        if ref_total is None:
            continue
        ref = _metrics(ref_total)
        out = {
            "dataset": row.dataset, "domain": row.domain, "reference": row.reference,
            "reference_datasets": "+".join(references[row.reference]),
            "calibrator": row.calibrator,
        }
        for m in SHIFT_METRICS:
            value = getattr(row, m)
            out[f"{m}_reference"], out[m], out[f"{m}_delta"] = ref[m], value, value - ref[m]
        records.append(out)
    return pd.DataFrame.from_records(records, columns=columns)


def best_per_domain(summary: pd.DataFrame) -> pd.DataFrame:
    """The best calibrator per test domain by image-wise ECE, ties broken by NLL.

    Oracle rows (``oracle_ts``: fitted on the set's own labels) are bounds and never ranked.
    A domain spread over several test datasets is pooled: image-wise ECE weighted by images,
    NLL by pixels (both exact, as each is a mean over images or pixels).

    Args:
        summary: the summary table (rows of role ``test`` are ranked).

    Returns:
        One row per domain: ``domain, datasets, n_images, best, img_ece, nll,
        uncalibrated_img_ece, uncalibrated_nll, reduction`` where ``reduction`` is the
        relative drop of image-wise ECE against ``uncalibrated`` (0.34 = 34% lower).

    Example:
        >>> s = pd.DataFrame({"dataset": ["d"] * 3, "domain": ["dusk"] * 3,
        ...     "role": ["test"] * 3, "calibrator": ["uncalibrated", "a", "b"],
        ...     "n_images": [2] * 3, "n_pixels": [8] * 3,
        ...     "img_ece": [0.1, 0.05, 0.05], "nll": [1.0, 0.9, 0.8]})
        >>> best_per_domain(s)[["domain", "best", "reduction"]].to_dict("records")
        [{'domain': 'dusk', 'best': 'b', 'reduction': 0.5}]
    """
    columns = ["domain", "datasets", "n_images", "best", "img_ece", "nll",
               "uncalibrated_img_ece", "uncalibrated_nll", "reduction"]
    # Oracle rows (a temperature fitted on the set's own labels) are bounds, never candidates.
    oracle = summary["calibrator"].astype(str).str.contains("oracle", case=False)
    test = summary[(summary["role"] == "test") & ~oracle]
    records = []
    for domain, rows in test.groupby("domain", sort=False):
        pooled = rows.groupby("calibrator", sort=False).apply(
            lambda g: pd.Series({
                "img_ece": np.average(g["img_ece"], weights=g["n_images"]),
                "nll": np.average(g["nll"], weights=g["n_pixels"]),
                "n_images": int(g["n_images"].sum()),
            }),
            include_groups=False,
        )
        ranked = pooled.reset_index().sort_values(["img_ece", "nll", "calibrator"],
                                                  kind="stable")
        best = ranked.iloc[0]
        base = pooled.loc[UNCALIBRATED] if UNCALIBRATED in pooled.index else None
        base_ece = math.nan if base is None else float(base["img_ece"])
        records.append({
            "domain": domain,
            "datasets": "+".join(dict.fromkeys(rows["dataset"])),
            "n_images": int(best["n_images"]),
            "best": best["calibrator"],
            "img_ece": float(best["img_ece"]),
            "nll": float(best["nll"]),
            "uncalibrated_img_ece": base_ece,
            "uncalibrated_nll": math.nan if base is None else float(base["nll"]),
            "reduction": (base_ece - float(best["img_ece"])) / base_ece if base_ece else math.nan,
        })
    return pd.DataFrame.from_records(records, columns=columns)


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
    paths = RunPaths(output, model_fingerprint(cfg.model))
    targets = plan_targets(cfg, paths)
    references = reference_datasets(targets)
    artifacts = check_artifacts(cfg, paths, targets)
    oracles = oracle_artifacts(cfg, paths)
    items = _work_items(targets)
    kwargs = {"artifacts": artifacts, "n_bins": cfg.evaluate.n_bins,
              "boundary_width": cfg.evaluate.boundary_width, "use_gpu": _use_gpu(cfg),
              "oracles": oracles}
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
