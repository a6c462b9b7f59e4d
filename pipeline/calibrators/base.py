"""The `Calibrator` base class, input checks, fit data, the reduce hook and the optimisation loop.

Every calibrator is a small ``nn.Module``: ``forward(logits, image=None)`` maps logits to
calibrated logits of the same shape and is TorchScript-compilable, and ``fit`` runs its one
training loop. That loop is also the distributed one: ``fit(..., reduce=...)`` takes a `Reduce`,
the identity in-process and `DistributedReduce` (``torch.distributed`` all-reduce) inside each
Ray Train worker, where ``logits`` / ``labels`` are that worker's shard of the fit data. Every
sum, count, loss value and gradient over fit data goes through the hook, so the same steps
(warm starts, grids, refits, early stopping) run with global quantities on every worker
(nanoGPT's DDP wrapping of its own loop, without DDP's module wrapper).

Writing a calibrator: subclass `Calibrator`, set ``name`` (and ``spatial = True`` when it needs
whole (N, C, H, W) maps), check options in ``__init__`` with the ``check_*`` helpers and pass
them on to ``super().__init__(num_classes, **options)``, then implement ``_calibrate`` (no input
checks; scriptable) and ``_fit``; override ``loss``, ``summary`` and ``mis_score`` as needed.
A ``_fit(data, heldout, reduce)`` that reduces what it computes over ``data`` sets
``distributed = True``; held-out data is whole on every worker and needs no reduction.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

try:  # Python 3.11+
    from typing import Self
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import Self

__all__ = [
    "LOCAL",
    "Calibrator",
    "DistributedReduce",
    "FitData",
    "Reduce",
    "check_bool",
    "check_choice",
    "check_float",
    "check_images",
    "check_int",
    "check_labels",
    "check_logits",
    "from_points",
    "optimise",
    "to_points",
]


# --------------------------------------------------------------------------------------------
# Option checks (constructor arguments): ValueError / TypeError in torchmetrics' wording.


def check_int(name: str, value: Any, *, ge: int | None = None) -> None:
    """Check that option ``name`` is an int (not a bool), at least ``ge`` when given.

    Raises:
        TypeError: When ``value`` is not an int.
        ValueError: When ``value < ge``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {value!r}")
    if ge is not None and value < ge:
        raise ValueError(f"Expected `{name}` to be an int >= {ge}, but got {value!r}")


def check_float(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    """Check that option ``name`` is a finite real number within the given bounds.

    Raises:
        TypeError: When ``value`` is not an int or float.
        ValueError: When ``value`` is not finite or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a float, but got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite float, but got {value!r}")
    for bound, op, ok in (
        (gt, ">", lambda b: value > b),
        (ge, ">=", lambda b: value >= b),
        (lt, "<", lambda b: value < b),
        (le, "<=", lambda b: value <= b),
    ):
        if bound is not None and not ok(bound):
            raise ValueError(f"Expected `{name}` to be a float {op} {bound}, but got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Check that option ``name`` is a bool.

    Raises:
        TypeError: When ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Check that option ``name`` is one of ``choices``.

    Raises:
        ValueError: When ``value`` is not in ``choices``.
    """
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, but got {value!r}")


# --------------------------------------------------------------------------------------------
# Tensor checks (data). `check_logits` and `check_images` run inside the scripted `forward`,
# hence the TorchScript-friendly formatting.


def _fmt_shape(shape: list[int]) -> str:
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def check_logits(logits: Tensor, num_classes: int, name: str = "logits") -> None:
    """Check a logit tensor: float, (N, C, H, W) or (P, C), C == ``num_classes``, finite, non-empty.

    Args:
        logits: The tensor to check.
        num_classes: The expected class count C.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``logits`` is not a floating-point tensor.
        ValueError: When the shape, class count, size or values are wrong.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(logits)}")
    if not logits.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a float tensor, but got dtype {logits.dtype}")
    if logits.dim() != 2 and logits.dim() != 4:
        raise ValueError(
            f"Expected `{name}` of shape (N, C, H, W) or (P, C), but got {_fmt_shape(logits.shape)}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"Expected `{name}` to have {num_classes} classes in dim 1, but got shape "
            f"{_fmt_shape(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, but got {_fmt_shape(logits.shape)}")
    # The extremes propagate NaN and hold any inf: ~10x faster than isfinite(...).all().
    if not (bool(torch.isfinite(logits.amax())) and bool(torch.isfinite(logits.amin()))):
        raise ValueError(f"Expected `{name}` to be finite, but got NaN or inf values")


def check_images(images: Tensor, logits: Tensor, name: str = "images") -> None:
    """Check images against their logits: float (N, 3, H, W) in [0, 1], same N, H, W.

    Args:
        images: The tensor to check.
        logits: The (N, C, H, W) logits the images belong to.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``images`` is not a floating-point tensor.
        ValueError: When the shape does not match or values leave [0, 1].
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(images)}")
    if not images.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a float tensor, but got dtype {images.dtype}")
    if logits.dim() != 4:
        raise ValueError(
            f"Expected logits of shape (N, C, H, W) when `{name}` are given, but got "
            f"{_fmt_shape(logits.shape)}"
        )
    if (
        images.dim() != 4
        or images.shape[1] != 3
        or images.shape[0] != logits.shape[0]
        or images.shape[2:] != logits.shape[2:]
    ):
        expected = [logits.shape[0], 3, logits.shape[2], logits.shape[3]]
        raise ValueError(
            f"Expected `{name}` of shape {_fmt_shape(expected)}, but got {_fmt_shape(images.shape)}"
        )
    if not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError(f"Expected `{name}` to hold values in [0, 1], but got values outside")


def check_labels(
    labels: Any, logits: Tensor, ignore_index: int | None, name: str = "labels"
) -> None:
    """Check labels against their logits: integer, shape of ``logits`` without dim 1, in range.

    Args:
        labels: (N, H, W) or (P,) integer tensor.
        logits: The (N, C, H, W) or (P, C) logits, already checked.
        ignore_index: Label value that marks pixels to skip, or None.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``labels`` is not an integer tensor.
        ValueError: When the shape does not match or a label is outside [0, C) and not ignored.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {labels.dtype}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"Expected `{name}` of shape {expected}, but got {tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    values = labels.long()  # shards hold uint8/uint16, which lack comparison kernels
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bool(bad.any()):
        value = int(values[bad][0])
        raise ValueError(
            f"Expected `{name}` in [0, {num_classes}) or equal to `ignore_index`={ignore_index}, "
            f"but got {value}"
        )


# --------------------------------------------------------------------------------------------
# The reduce hook: how a fit loop sees the other workers' shards of its fit data.


class Reduce:
    """Sums across the workers that each hold a shard of the fit data: here, one process.

    The identity: ``fit`` without a ``reduce`` argument runs with `LOCAL`, and every method
    returns its input unchanged, so the in-process fit is the plain loop.
    """

    rank: int = 0
    world_size: int = 1

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over workers (same shape on every worker)."""
        return value

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        """Float64 sums of python numbers over workers."""
        return values

    def gather(self, value: Tensor) -> Tensor:
        """Every worker's ``value`` concatenated along dim 0 (rank order)."""
        return value

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every worker, so that all take the same decision."""
        return value

    def grads(self, params: Sequence[Tensor]) -> None:
        """Sum the gradients of ``params`` over workers, in place."""

    def sync(self, module: nn.Module) -> None:
        """Average ``module``'s floating buffers (e.g. BatchNorm statistics) over workers."""

    def share(self, count: int) -> float:
        """This worker's share of a global count: ``count / sum(count)``; 1.0 here."""
        (total,) = self.sum_floats(float(count))
        return count / total if total else 0.0


LOCAL = Reduce()


class DistributedReduce(Reduce):
    """`Reduce` over a ``torch.distributed`` process group (a Ray Train worker group).

    Every method is a collective: all workers must call it, in the same order. Collectives run
    on ``device``: by default the current GPU under NCCL (which only reduces GPU tensors),
    else the CPU (gloo); results come back on the inputs' devices.

    Args:
        device: The device the collectives run on; None picks it from the backend.

    Raises:
        RuntimeError: Without an initialised process group.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "Expected an initialised torch.distributed process group for "
                "DistributedReduce, but got none; run it inside a Ray Train worker"
            )
        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        self._dist = dist
        self.device = torch.device("cpu") if device is None else device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sum(self, value: Tensor) -> Tensor:
        """The sum of ``value`` over workers."""
        out = value.detach().to(self.device, copy=True)
        self._dist.all_reduce(out)
        return out.to(value.device)

    def sum_floats(self, *values: float) -> tuple[float, ...]:
        """Float64 sums of python numbers over workers."""
        return tuple(self.sum(torch.tensor(values, dtype=torch.float64)).tolist())

    def gather(self, value: Tensor) -> Tensor:
        """Every worker's ``value`` concatenated along dim 0 (rank order)."""
        sizes = [torch.zeros((), dtype=torch.int64, device=self.device)
                 for _ in range(self.world_size)]
        self._dist.all_gather(sizes, torch.tensor(len(value), device=self.device))
        counts = [int(size) for size in sizes]
        padded = torch.zeros((max(counts), *value.shape[1:]), dtype=value.dtype,
                             device=self.device)
        padded[: len(value)] = value.detach().to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._dist.all_gather(parts, padded)
        out = torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
        return out.to(value.device)

    def agree(self, value: float) -> float:
        """Rank 0's ``value`` on every worker."""
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._dist.broadcast(out, src=0)
        return float(out)

    def grads(self, params: Sequence[Tensor]) -> None:
        """Sum gradients over workers in one flat all-reduce (absent gradients count as 0)."""
        if not params:
            return
        flat = self.sum(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ]))
        offset = 0
        for p in params:
            part = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
            offset += p.numel()

    def sync(self, module: nn.Module) -> None:
        """Average floating buffers over workers (integer ones, e.g. step counts, agree)."""
        for buffer in module.buffers():
            if buffer.is_floating_point():
                buffer.copy_(self.sum(buffer) / self.world_size)


def batch_plan(
    n_local: int, batch_size: int, reduce: Reduce, *, min_size: int = 1
) -> tuple[int, int, float]:
    """Mini-batches of a loop over ``n`` global rows: (local batch size, steps per epoch, weight).

    In-process: ``size = min(batch_size, n)`` rows per step and ``n // size`` steps per epoch.
    Across workers every worker takes the same number of steps, each on its share of the
    global batch, and weights its batch-mean loss by that share, so that the summed gradient is
    the gradient of the global batch's mean.

    Args:
        n_local: Rows (pixels or maps) this worker holds.
        batch_size: Rows per step, over all workers.
        reduce: The reduce hook.
        min_size: Smallest local batch (BatchNorm needs 2 pixels).

    Returns:
        ``(size, steps, weight)``; ``weight`` is 1.0 in-process.
    """
    (n,) = reduce.sum_floats(float(n_local))
    size = min(batch_size, int(n))
    steps = int(n) // size
    if reduce.world_size == 1:
        return size, steps, 1.0
    local = min(n_local, max(min_size, round(size * n_local / n)))
    (total,) = reduce.sum_floats(float(local))
    return local, steps, local / total


# --------------------------------------------------------------------------------------------
# Shape helpers for pointwise calibrators (scriptable).


def to_points(logits: Tensor) -> Tensor:
    """(N, C, H, W) or (P, C) -> (P, C), channels last (a view when possible)."""
    if logits.dim() == 4:
        return logits.movedim(1, -1).reshape(-1, logits.shape[1])
    return logits


def from_points(points: Tensor, like: Tensor) -> Tensor:
    """Inverse of `to_points`: (P, C) back to the layout of ``like``."""
    if like.dim() == 4:
        n, _, h, w = like.shape
        return points.reshape(n, h, w, points.shape[1]).movedim(-1, 1)
    return points


# --------------------------------------------------------------------------------------------
# Fit data.


@dataclass(frozen=True)
class FitData:
    """Logits, labels and optional images a calibrator fits on (or picks hyper-parameters with).

    Pointwise calibrators receive them flattened to valid pixels: ``logits`` (P, C) float32,
    ``labels`` (P,) int64 and ``ignore_index`` None. Spatial ones receive whole maps:
    ``logits`` (N, C, H, W) float32, ``labels`` (N, H, W) int64, ``images`` (N, 3, H, W) or None,
    with ``ignore_index`` marking pixels to skip.
    """

    logits: Tensor
    labels: Tensor
    images: Tensor | None = None
    ignore_index: int | None = None


def _as_fit_data(heldout: Any, ignore_index: int | None) -> FitData:
    if isinstance(heldout, FitData):
        if heldout.ignore_index is None:
            return FitData(heldout.logits, heldout.labels, heldout.images, ignore_index)
        return heldout
    if isinstance(heldout, (tuple, list)) and len(heldout) in (2, 3):
        images = heldout[2] if len(heldout) == 3 else None
        return FitData(heldout[0], heldout[1], images, ignore_index)
    raise TypeError(
        "Expected `heldout` to be a FitData or a (logits, labels[, images]) tuple, but got "
        f"{type(heldout).__name__}"
    )


# --------------------------------------------------------------------------------------------
# The base class.


class Calibrator(nn.Module, ABC):
    """Post-hoc calibrator: logits in, calibrated logits out.

    Args:
        num_classes: The class count C (>= 2).
        **options: The subclass's checked, json-able constructor options; kept in ``options``
            so that ``build_calibrator(name, num_classes, **options)`` rebuilds the module.

    Raises:
        TypeError: When ``num_classes`` is not an int or an option is not json-able.
        ValueError: When ``num_classes < 2``.
    """

    name: ClassVar[str]
    spatial: ClassVar[bool] = False
    # True when ``_fit(data, heldout, reduce)`` reduces over fit-data shards (Ray Train mode);
    # an instance may clear it (a selective calibrator whose base cannot run sharded).
    distributed: bool = False

    def __init__(self, num_classes: int, **options: Any) -> None:
        super().__init__()
        check_int("num_classes", num_classes, ge=2)
        try:
            # Round-trip so that `options` equals what a loaded JSON card gives (tuples -> lists).
            self.options: dict[str, Any] = json.loads(json.dumps(options, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise TypeError(f"Expected json-able calibrator options, but got {options!r}") from err
        self.num_classes = num_classes
        # A buffer, so that the fitted state travels in state_dict / safetensors.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    # -- inference ---------------------------------------------------------------------------

    def forward(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """Calibrate logits.

        Args:
            logits: (N, C, H, W) or (P, C) float logits.
            image: Optional (N, 3, H, W) float image in [0, 1]; used by spatial calibrators.

        Returns:
            Calibrated float32 logits, same shape as ``logits``.

        Raises:
            RuntimeError: When called before ``fit`` (or ``load``).
            TypeError, ValueError: On malformed ``logits`` or ``image``.
        """
        if not bool(self.fitted):
            raise RuntimeError(
                "Expected a fitted calibrator, but `forward` was called before `fit`; call "
                "`fit(...)` or load a fitted one with `pipeline.calibrators.load(dir)`"
            )
        check_logits(logits, self.num_classes)
        if image is not None:
            check_images(image, logits, "image")
        return self._calibrate(logits.float(), image)

    @abstractmethod
    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        """Calibrate float32 logits without input checks; must be TorchScript-compilable."""

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        logits: Tensor,
        labels: Tensor,
        image: Tensor | None = None,
        *,
        ignore_index: int | None = None,
    ) -> Tensor:
        """The training objective: mean NLL of the calibrated logits (plus any regulariser).

        Differentiable in the parameters; does not require a fitted module. Labels equal to
        ``ignore_index`` are excluded.

        Args:
            logits: (N, C, H, W) or (P, C) float logits.
            labels: (N, H, W) or (P,) integer labels.
            image: Optional (N, 3, H, W) float image in [0, 1].
            ignore_index: Label value to skip, or None.

        Returns:
            A scalar tensor.
        """
        calibrated = self._calibrate(logits.float(), image)
        return F.cross_entropy(
            calibrated, labels.long(), ignore_index=-100 if ignore_index is None else ignore_index
        )

    def fit(
        self,
        logits: Tensor,
        labels: Tensor,
        *,
        ignore_index: int | None = None,
        images: Tensor | None = None,
        heldout: FitData | tuple[Tensor, ...] | None = None,
        seed: int = 0,
        reduce: Reduce = LOCAL,
    ) -> Self:
        """Fit on logits and labels; pixels labelled ``ignore_index`` are excluded.

        Args:
            logits: (N, C, H, W) or (P, C) float logits.
            labels: (N, H, W) or (P,) integer labels in [0, C) or ``ignore_index``.
            ignore_index: Label value to skip, or None.
            images: Optional (N, 3, H, W) float images in [0, 1] (spatial calibrators).
            heldout: Optional held-out data, a `FitData` or (logits, labels[, images]) tuple,
                used to pick hyper-parameters or early-stop.
            seed: Seed for any randomness in the fit (torch's global RNG is restored after).
            reduce: `LOCAL` (default): ``logits`` / ``labels`` are all the fit data. A
                `DistributedReduce`: they are this worker's shard, and every worker calls
                ``fit`` with the same ``heldout`` and ``seed`` (needs ``distributed``).

        Returns:
            ``self``, fitted and in eval mode.

        Raises:
            TypeError, ValueError: On malformed inputs, or no pixel left after ignoring.
            RuntimeError: A sharded fit of a calibrator that is not ``distributed``.
        """
        check_int("seed", seed)
        if ignore_index is not None:
            check_int("ignore_index", ignore_index)
        data = self._prepare(FitData(logits, labels, images, ignore_index), "")
        held = None
        if heldout is not None:
            held = self._prepare(_as_fit_data(heldout, ignore_index), "heldout.")
        if reduce is not LOCAL and not self.distributed:
            raise RuntimeError(
                f"Expected a calibrator with `distributed = True` for a sharded fit, but "
                f"{type(self).__name__} fits in one process only"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.train()
            if reduce is LOCAL:
                self._fit(data, held)
            else:
                self._fit(data, held, reduce)
        self.fitted.fill_(True)
        return self.eval()

    @abstractmethod
    def _fit(self, data: FitData, heldout: FitData | None, *args: Any) -> None:
        """Fit the parameters on checked data (see `FitData` for the layouts).

        A ``distributed`` calibrator's ``_fit`` takes a third argument, the `Reduce` hook
        (default `LOCAL`; passed only for a sharded fit): ``data`` is then this worker's shard,
        and every sum, count or gradient over it must go through the hook.
        """

    def _prepare(self, data: FitData, prefix: str) -> FitData:
        """Check data; move it to the module's device; flatten to valid pixels if pointwise."""
        check_logits(data.logits, self.num_classes, prefix + "logits")
        check_labels(data.labels, data.logits, data.ignore_index, prefix + "labels")
        if data.images is not None:
            check_images(data.images, data.logits, prefix + "images")
        device = self.fitted.device
        logits = data.logits.to(device=device, dtype=torch.float32)
        labels = data.labels.to(device=device, dtype=torch.long)
        valid = None if data.ignore_index is None else labels != data.ignore_index
        if valid is not None and not bool(valid.any()):
            raise ValueError(
                f"Expected `{prefix}labels` to hold at least one pixel not equal to "
                f"`ignore_index`={data.ignore_index}, but all are ignored"
            )
        if self.spatial:
            images = None if data.images is None else data.images.to(device, torch.float32)
            return FitData(logits, labels, images, data.ignore_index)
        logits, labels = to_points(logits), labels.reshape(-1)
        if valid is not None:
            valid = valid.reshape(-1)
            logits, labels = logits[valid], labels[valid]
        return FitData(logits, labels)

    # -- description -------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Json-able fitted values for the artifact card, e.g. ``{"temperature": 1.32}``."""
        return {}

    def mis_score(self, logits: Tensor, image: Tensor | None = None) -> Tensor | None:
        """Per-pixel probability of a misprediction, (N, H, W) or (P,); None for non-selectors."""
        return None

    def calibrate_with_score(
        self, logits: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """``(self(logits, image), self.mis_score(logits, image))``, sharing work where it can.

        Selectors override it to run the selector once for both; evaluation calls this.
        """
        return self(logits, image), self.mis_score(logits, image)

    def extra_repr(self) -> str:
        """Show the class count and options in ``repr``."""
        return f"num_classes={self.num_classes}, options={self.options}"


# --------------------------------------------------------------------------------------------
# The optimisation loop every gradient-trained fit runs (in-process and in Ray Train workers).


def optimise(
    loss_fn: Callable[[], Tensor],
    params: Iterable[Tensor],
    *,
    method: Literal["lbfgs", "adamw"] = "lbfgs",
    max_iter: int = 100,
    lr: float | None = None,
    weight_decay: float = 0.0,
    tol: float = 1e-7,
    callback: Callable[[int, float], bool] | None = None,
    reduce: Reduce = LOCAL,
) -> float:
    """Minimise ``loss_fn()`` over ``params``.

    ``lbfgs`` runs full-batch L-BFGS with a strong-Wolfe line search (``lr`` default 1.0);
    ``adamw`` runs ``max_iter`` AdamW steps (``lr`` default 1e-3), where ``loss_fn`` may draw
    a new mini-batch on each call and ``callback(step, loss)`` returning True stops early.
    With a `DistributedReduce`, ``loss_fn`` returns this worker's share of the global loss
    (e.g. its mean times `Reduce.share` of its rows): loss values and gradients are summed over
    workers, so every worker takes the same steps on the global objective.

    Args:
        loss_fn: Computes the scalar loss (gradients are zeroed and backpropagated here).
        params: The tensors to optimise.
        method: ``"lbfgs"`` or ``"adamw"``.
        max_iter: L-BFGS iterations or AdamW steps.
        lr: Learning rate; None picks the method's default.
        weight_decay: AdamW weight decay.
        tol: L-BFGS gradient and change tolerance.
        callback: AdamW only: called after each step with (step, loss); True stops.
        reduce: The reduce hook (`LOCAL`: the identity).

    Returns:
        The last (global) loss value.

    Raises:
        ValueError: On an unknown method or a non-finite loss.
    """
    check_choice("method", method, ["lbfgs", "adamw"])
    check_int("max_iter", max_iter, ge=1)
    params = [p for p in params if p.requires_grad]

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = reduced = loss_fn()
        if reduce is not LOCAL:
            reduced = reduce.sum(loss)
        if not bool(torch.isfinite(reduced)):
            raise ValueError(
                f"Expected a finite training loss, but got {float(reduced.detach())}"
            )
        loss.backward()
        reduce.grads(params)
        return reduced

    if method == "lbfgs":
        optimiser = torch.optim.LBFGS(
            params, lr=1.0 if lr is None else lr, max_iter=max_iter, tolerance_grad=tol,
            tolerance_change=tol * 1e-2, history_size=20, line_search_fn="strong_wolfe",
        )
        optimiser.step(closure)
        with torch.no_grad():
            return float(reduce.sum(loss_fn()))
    optimiser = torch.optim.AdamW(
        params, lr=1e-3 if lr is None else lr, weight_decay=weight_decay
    )
    loss = float("nan")
    for step in range(max_iter):
        loss = float(optimiser.step(closure).detach())
        if callback is not None and callback(step, loss):
            break
    return loss
