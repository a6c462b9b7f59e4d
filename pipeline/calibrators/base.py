"""The `Calibrator` base class, the `FitData` it fits on, and the (P, C) layout helpers.

Every calibrator is a small ``nn.Module``: ``forward(logits, image=None)`` maps logits to
calibrated logits of the same shape and is TorchScript-compilable, and ``fit`` runs its one
training loop. That loop is also the distributed one: ``fit(..., reduce=...)`` takes a `Reduce`
(`pipeline.calibrators.reduce`), the identity in-process and `DistributedReduce` inside each
Ray Train worker, where ``logits`` / ``labels`` are that worker's shard of the fit data.

Writing a calibrator: subclass `Calibrator`, set ``name`` (and ``spatial = True`` when it needs
whole (N, C, H, W) maps), check options in ``__init__`` with the ``check_*`` helpers
(`pipeline.calibrators.checks`) and pass them on to ``super().__init__(num_classes,
**options)``, then implement ``_calibrate`` (no input checks; scriptable) and ``_fit`` (with
the shared loops of `pipeline.calibrators.training`: `optimise`, `batch_plan`, ...); override
``loss``, ``summary`` and ``mis_score`` as needed. A ``_fit(data, heldout, reduce)`` that
reduces what it computes over ``data`` sets ``distributed = True``; held-out data is whole on
every worker and needs no reduction.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

try:  # Python 3.11+
    from typing import Self
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import Self

from pipeline.calibrators.checks import check_images, check_int, check_labels, check_logits
from pipeline.calibrators.reduce import LOCAL, Reduce

__all__ = ["Calibrator", "FitData", "from_points", "to_points"]


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
    # True when the calibration adapts to each unlabelled target image (label-free features):
    # a nightly refresh counts such a calibrator only when told to (``--allow-adaptive``).
    adapts_to_target: ClassVar[bool] = False
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

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """A card's fitted values (``summary``) in plain words, for the report.

        None when this class has no words of its own or the summary lacks what they need; the
        report then lists the values as they are (`pipeline.calibrators.describe`).
        """
        return None

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
