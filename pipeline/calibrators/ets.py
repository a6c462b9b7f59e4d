"""Ensemble temperature scaling (ETS): a convex mix of the tempered, raw and uniform softmax."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.temperature import fit_temperature
from pipeline.calibrators.training import optimise
from pipeline.calibrators.wording import number

__all__ = ["EnsembleTemperatureScaling"]


@register
class EnsembleTemperatureScaling(Calibrator):
    """ETS: ``p = w0 softmax(z / T) + w1 softmax(z) + w2 / C``; calibrated logits are ``log p``.

    The weights w = softmax(``weight_logits``) lie on the simplex with w0, w1 > 0, so the class
    ranking, and the argmax, never change. The in-process fit follows the paper: T by
    temperature scaling, then w by L-BFGS on the NLL with T fixed.

    Args:
        num_classes: The class count C.
        max_iter: L-BFGS iterations for the weights. Defaults to ``100``.

    References:
        Zhang, Kailkhura and Han, "Mix-n-Match: Ensemble and Compositional Methods for
        Uncertainty Calibration in Deep Learning", ICML 2020.
    """

    name = "ets"
    distributed = True

    def __init__(self, num_classes: int, *, max_iter: int = 100) -> None:
        check_int("max_iter", max_iter, ge=1)
        super().__init__(num_classes, max_iter=max_iter)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.weight_logits = nn.Parameter(torch.zeros(3))

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        log_w = torch.log_softmax(self.weight_logits, dim=0)
        tempered = torch.log_softmax(logits / self.log_temperature.exp(), dim=1)
        raw = torch.log_softmax(logits, dim=1)
        # log of the mixture without leaving log space; the uniform part is one number.
        mixed = torch.logaddexp(tempered + log_w[0], raw + log_w[1])
        return torch.logaddexp(mixed, log_w[2] - math.log(self.num_classes))

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        t = fit_temperature(data.logits, data.labels, reduce=reduce)
        share = reduce.share(len(data.labels))
        with torch.no_grad():
            self.log_temperature.fill_(math.log(t))
            self.weight_logits.zero_()
        self.log_temperature.requires_grad_(False)
        try:
            optimise(
                lambda: self.loss(data.logits, data.labels) * share, [self.weight_logits],
                max_iter=self.options["max_iter"], reduce=reduce,
            )
        finally:
            self.log_temperature.requires_grad_(True)

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The temperature and the weights of its mixture with the raw and uniform outputs."""
        if "temperature" not in summary:
            return None
        mix = " / ".join(number(x) for x in summary.get("weights") or [])
        return (f"one temperature, T = {number(summary['temperature'])}, mixed with the raw and "
                f"the uniform distribution (weights {mix})")

    def summary(self) -> dict[str, Any]:
        """The temperature and the three mixture weights (tempered, raw, uniform)."""
        return {
            "temperature": float(self.log_temperature.detach().exp()),
            "weights": torch.softmax(self.weight_logits.detach(), dim=0).tolist(),
        }
