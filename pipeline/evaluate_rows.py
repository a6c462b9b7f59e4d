"""Stage 3, per image: stored logits -> each calibrator -> one row of statistics and features.

`ShardEvaluator` (the Ray Data actor of :mod:`pipeline.evaluate`) reads a shard once and turns
every image into one row per calibrator (:func:`image_rows`): mergeable statistics
(:class:`pipeline.metrics.ImageStats`) where the image has labels, and the label-free features
of :mod:`pipeline.label_free`, on the CPU with the numba kernels or on a GPU with their torch
twins. :data:`ROW_SCHEMA` is the schema of ``per_image.parquet``.
"""

from __future__ import annotations

import ctypes
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import Calibrator, load
from pipeline.calibrators.artifacts import CARD, WEIGHTS
from pipeline.evaluate_tables import UNCALIBRATED
from pipeline.label_free import (
    CONF_EDGES,
    FEATURE_COLUMNS,
    PRED_HIST_COLUMN,
    image_features,
)
from pipeline.metrics import N_SCORE_BINS, ImageStats, first_argmax
from pipeline.metrics.checks import as_scores, valid_mask
from pipeline.metrics.confidence import confidence_sums
from pipeline.metrics.per_image import boundary_mask, image_sums
from pipeline.metrics.stats import stats_from_image_sums
from pipeline.metrics.torch_stats import image_stats_torch, prepare_targets
from pipeline.paths import (
    ORACLE,
)
from pipeline.shards import (
    ImageRecord,
    decode_table,
    logits_float32,
    readable_copy,
    upsample_logits,
)
from pipeline.storage import location

logger = logging.getLogger(__name__)

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
            logits = logits_float32(record.logits)
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
            valid = valid_mask(labels, c, ignore_index)
            boundary = boundary_mask(labels2d, boundary_width).reshape(-1)
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
                        flat_score = as_scores(score.reshape(-1).double().numpy(),
                                               labels.shape)
                    sums = image_sums(
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
    counts = np.zeros(c, np.int64)
    conf_sum, entropy_sum, hist = confidence_sums(
        probs.numpy().reshape(c, -1), logits.numpy().reshape(c, -1), preds, CONF_EDGES[1:-1],
        pred_counts=counts)
    return {
        "lf_n_pixels": int(preds.size), "lf_conf_sum": conf_sum, "lf_entropy_sum": entropy_sum,
        "lf_conf_hist": hist, PRED_HIST_COLUMN: counts,
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


def _iter_shard(path: Any, sha256: str, rows: int) -> Iterator[ImageRecord]:
    """Records of one shard, one at a time, after checking it against its manifest entry.

    ``path`` is a local path or a ``upath.UPath`` at the run's URI (see `pipeline.storage`).
    """
    with readable_copy(path) as (local, digest):
        if digest != sha256:
            raise ValueError(
                f"Expected shard {path} to have sha256 {sha256} as in its manifest, but got "
                f"{digest} (truncated or modified)"
            )
        shard = pq.ParquetFile(local)
        yield from _shard_rows(path, shard, rows)


def _shard_rows(path: Any, shard: pq.ParquetFile, rows: int) -> Iterator[ImageRecord]:
    if shard.metadata.num_rows != rows:
        raise ValueError(
            f"Expected shard {path} to hold {rows} rows, but got {shard.metadata.num_rows}"
        )
    # One row per batch: only one image's logits are decoded at a time.
    for batch in shard.iter_batches(batch_size=1):
        yield from decode_table(pa.Table.from_batches([batch]))


# <malloc.h>: glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _reuse_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of unmapping them.

    Each image x calibrator allocates several (C, H, W) float32 maps (10 MB at Cityscapes/4):
    the calibrated logits, the probabilities, ... With glibc's defaults, blocks of this size are
    given back to the kernel when freed (a trimmed heap top, or their own mmap), so the next
    image's maps fault in, and zero, every page again: ~4,000 page faults per Cityscapes/4
    image, 1.5-2 ms of CPU time in each of the forward and the softmax. Keeping them (mmap
    threshold 32 MiB, trim threshold 256 MiB) turns those into reuses of the same memory; the
    process's resident memory then stays at its largest per-image working set instead of
    returning to the baseline between images. Values are untouched: every byte an evaluation
    reads, it wrote first. Does nothing outside glibc.

    Returns:
        Whether the options were set.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: the constants are its own
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 256 << 20))


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


def artifact_files(directory: str | Path) -> dict[str, bytes]:
    """The files `pipeline.calibrators.load` reads from an artifact folder, as bytes."""
    return {name: (Path(directory) / name).read_bytes() for name in (CARD, WEIGHTS)}


def _load(artifact: str | Mapping[str, bytes]) -> Calibrator:
    """`pipeline.calibrators.load` of an artifact folder or of :func:`artifact_files`' bytes."""
    if isinstance(artifact, str | Path):
        return load(artifact)
    unknown = set(artifact) - {CARD, WEIGHTS}
    if unknown:
        raise ValueError(f"Expected artifact files {[CARD, WEIGHTS]}, but got {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="segcal-artifact-") as tmp:
        for name, data in artifact.items():
            (Path(tmp) / name).write_bytes(data)
        return load(tmp)


class ShardEvaluator:
    """Ray Data UDF (a callable class, so each actor loads the calibrators once).

    Each input row names one shard file and the image ids to evaluate in it; each output row
    holds one image x calibrator's statistics (:data:`ROW_SCHEMA`). Each shard is read once,
    image by image, and every calibrator is applied to an image before the next is decoded.

    Args:
        artifacts: calibrator label -> artifact folder, or its files' bytes
            (:func:`artifact_files`: what the stage ships, so actors need not see the driver's
            disk).
        n_bins: confidence bins.
        boundary_width: boundary width in pixels.
        threads: torch intra-op threads for this actor (None leaves torch's default).
        use_gpu: ``"auto"`` (CUDA when this actor sees a GPU), True or False; on a GPU the
            calibrators and the statistics run there and only the sums come back.
        timer: optional :class:`StageTimer` charging each stage (profiling).
        oracles: test set -> its oracle temperature's artifact (as ``artifacts``), applied to
            that set only as calibrator ``oracle_ts`` (see :func:`pipeline.fit.fit_oracles`).
    """

    def __init__(
        self,
        artifacts: Mapping[str, str | Mapping[str, bytes]],
        *,
        n_bins: int,
        boundary_width: int,
        threads: int | None = None,
        use_gpu: object = "auto",
        timer: StageTimer | None = None,
        oracles: Mapping[str, str | Mapping[str, bytes]] | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(use_gpu)
        if self.device.type == "cpu":  # the (C, H, W) maps live in this process's heap
            _reuse_freed_memory()
        self.calibrators: dict[str, Calibrator | None] = {UNCALIBRATED: None}
        self.calibrators.update(
            {label: _load(value).to(self.device) for label, value in artifacts.items()}
        )
        self.oracles = {name: _load(value).to(self.device)
                        for name, value in (oracles or {}).items()}
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
            records = _iter_shard(location(item["path"]), item["sha256"], item["rows"])
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
