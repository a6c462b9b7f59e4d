"""Vector scaling: a per-class scale and bias on the logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.training import optimise
from pipeline.calibrators.wording import spread

__all__ = ["VectorScaling"]


@register
class VectorScaling(Calibrator):
    """Vector scaling: ``logits * scale + bias`` with per-class ``scale`` and ``bias`` (C,).

    Starts at the identity (scale 1, bias 0); fitted by full-batch L-BFGS on the NLL. May change
    the argmax.

    Args:
        num_classes: The class count C.
        max_iter: L-BFGS iterations. Defaults to ``200``.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """

    name = "vector"
    distributed = True

    def __init__(self, num_classes: int, *, max_iter: int = 200) -> None:
        check_int("max_iter", max_iter, ge=1)
        super().__init__(num_classes, max_iter=max_iter)
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        # Broadcast over dim 1 for both (P, C) and (N, C, H, W).
        shape = [1, self.num_classes] + [1] * (logits.dim() - 2)
        return logits * self.scale.reshape(shape) + self.bias.reshape(shape)

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        share = reduce.share(len(data.labels))
        optimise(
            lambda: self.loss(data.logits, data.labels) * share, self.parameters(),
            max_iter=self.options["max_iter"], reduce=reduce,
        )

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The spread of the per-class scales and biases."""
        if "scale" not in summary:
            return None
        return (f"one scale and one bias per class (scales {spread(summary['scale'])}; biases "
                f"{spread(summary['bias'])})")

    def summary(self) -> dict[str, Any]:
        """The fitted per-class scales and biases."""
        return {"scale": self.scale.detach().tolist(), "bias": self.bias.detach().tolist()}
