"""Entropy-gated temperature scaling, the Meta-Cal variant compared in the selective paper."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_float
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.temperature import fit_temperature
from pipeline.calibrators.wording import number

__all__ = ["MetaCalScaling"]

_DEFAULT_GRID = (0.5, 0.75, 0.9, 0.95, 0.99, 1.0)


def _entropy(log_probs: Tensor) -> Tensor:
    """Shannon entropy (nats) over dim 1."""
    return -(log_probs.exp() * log_probs).sum(dim=1)


@register
class MetaCalScaling(Calibrator):
    """Meta-Cal-style gate on temperature scaling: high-entropy pixels become (near) uniform.

    A pixel whose temperature-scaled prediction has entropy above ``threshold`` is treated as
    rejected: its logits are divided by ``gate_temperature`` (default 1e4), which makes its
    probabilities uniform up to ~1e-4 relative while keeping its argmax; every other pixel
    gets ``logits / T``. Meta-Cal assigns rejected samples the uniform distribution; we keep
    their argmax so that segmentation accuracy and mIoU never change, as for every other
    scaling method in the selective-scaling paper's comparison.

    The in-process fit: T by temperature scaling, then the threshold as the ``quantile`` of the
    fit pixels' entropies; with held-out data the quantile is picked from ``quantile_grid`` by
    held-out NLL (1.0 means "never gate", i.e. plain temperature scaling). Across workers T
    comes from all-reduced statistics and the quantile from every worker's entropies gathered.

    Args:
        num_classes: The class count C.
        quantile: Entropy quantile used as threshold without held-out data. Defaults to ``0.95``.
        quantile_grid: Quantiles tried with held-out data; None always uses ``quantile``.
            Defaults to ``[0.5, 0.75, 0.9, 0.95, 0.99, 1.0]``.
        gate_temperature: Temperature applied to gated pixels (> 1). Defaults to ``1e4``.

    References:
        Ma and Blaschko, "Meta-Cal: Well-controlled Post-hoc Calibration by Ranking", ICML 2021;
        Wang, Gong and Wang, "On Calibrating Semantic Segmentation Models: Analyses and An
        Algorithm", CVPR 2023.
    """

    name = "meta_cal"
    distributed = True

    def __init__(
        self,
        num_classes: int,
        *,
        quantile: float = 0.95,
        quantile_grid: Sequence[float] | None = _DEFAULT_GRID,
        gate_temperature: float = 1e4,
    ) -> None:
        check_float("quantile", quantile, gt=0, le=1)
        if quantile_grid is not None:
            if not isinstance(quantile_grid, (list, tuple)) or not quantile_grid:
                raise ValueError(
                    "Expected `quantile_grid` to be a non-empty list of floats in (0, 1] or "
                    f"None, but got {quantile_grid!r}"
                )
            for value in quantile_grid:
                check_float("quantile_grid", value, gt=0, le=1)
        check_float("gate_temperature", gate_temperature, gt=1)
        super().__init__(
            num_classes, quantile=quantile, quantile_grid=quantile_grid,
            gate_temperature=gate_temperature,
        )
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.register_buffer("threshold", torch.tensor(math.inf))
        self.register_buffer("quantile", torch.tensor(float(quantile)))
        self.gate_temperature = float(gate_temperature)

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        tempered = logits / self.log_temperature.exp()
        gated = _entropy(torch.log_softmax(tempered, dim=1)) > self.threshold
        return torch.where(gated.unsqueeze(1), logits / self.gate_temperature, tempered)

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        t = fit_temperature(data.logits, data.labels, reduce=reduce)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(t))
            # The quantile is an order statistic of all fit pixels: gather them (4 bytes each).
            entropy = reduce.gather(_entropy(torch.log_softmax(data.logits / t, dim=1)))
        grid = self.options["quantile_grid"]
        if heldout is None or grid is None:
            quantile = self.options["quantile"]
        else:
            with torch.no_grad():
                tempered = torch.log_softmax(heldout.logits / t, dim=1)
                held_entropy = _entropy(tempered)
                nll_tempered = F.nll_loss(tempered, heldout.labels, reduction="none")
                gated = torch.log_softmax(heldout.logits / self.gate_temperature, dim=1)
                nll_gated = F.nll_loss(gated, heldout.labels, reduction="none")
            scores = [
                float(torch.where(held_entropy > _threshold(entropy, q), nll_gated, nll_tempered)
                      .mean())
                for q in grid
            ]
            quantile = grid[scores.index(min(scores))]
        self.threshold.fill_(_threshold(entropy, quantile))
        self.quantile.fill_(quantile)

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The temperature and which pixels the entropy gate hands the uniform distribution."""
        threshold = summary.get("threshold")
        gate = ("nothing gated" if threshold is None else
                f"pixels with entropy above {number(threshold)} nats (the "
                f"{number(summary.get('quantile'))} quantile) get the uniform distribution")
        return f"one temperature, T = {number(summary.get('temperature'))}; {gate}"

    def summary(self) -> dict[str, Any]:
        """The temperature, the entropy threshold (nats) and the quantile it came from."""
        return {
            "temperature": float(self.log_temperature.detach().exp()),
            # None when nothing is gated (JSON has no inf).
            "threshold": float(self.threshold) if math.isfinite(self.threshold) else None,
            "quantile": float(self.quantile),
            "gate_temperature": self.gate_temperature,
        }


def _threshold(entropy: Tensor, quantile: float) -> float:
    """The ``quantile`` of ``entropy`` (P,) by order statistic; inf for 1.0 (never gate)."""
    if quantile >= 1.0:
        return math.inf
    k = min(max(math.ceil(quantile * entropy.numel()), 1), entropy.numel())
    return float(entropy.kthvalue(k).values)
