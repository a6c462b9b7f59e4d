"""Temperature scaling: one temperature T for all pixels, fitted by NLL."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_float, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.wording import number

__all__ = ["TemperatureScaling", "fit_temperature"]

# (rows, tolerance) of the cheap estimates on strided subsamples; the full-data Newton steps
# then only polish the last one (usually 2 steps).
_WARM_STARTS = ((8192, 1e-2), (65536, 1e-3))


def _nll_derivatives(
    shifted: Tensor, beta: float, work: Tensor, ones: Tensor
) -> tuple[float, float]:
    """Sums over rows of E_p[d] and Var_p[d] for p = softmax(beta * d), d = ``shifted``."""
    torch.mul(shifted, beta, out=work).exp_()  # shifted <= 0, so no overflow for beta > 0
    # Row sums as matrix-vector products: much faster than sum(dim=1) over 19-wide rows.
    s0 = work @ ones
    s1 = work.mul_(shifted) @ ones
    s2 = work.mul_(shifted) @ ones
    mean = s1 / s0
    var = s2 / s0 - mean * mean
    return float(mean.sum(dtype=torch.float64)), float(var.sum(dtype=torch.float64))


def _newton(
    shifted: Tensor, target_sum: float, beta: float, *, lo: float, hi: float, tol: float,
    max_iter: int, reduce: Reduce = LOCAL,
) -> float:
    """Safeguarded Newton on the inverse temperature beta (the NLL is convex in beta).

    ``target_sum`` is already global; the row sums of each step are reduced over workers.
    """
    (n,) = reduce.sum_floats(float(shifted.shape[0]))
    work = torch.empty_like(shifted)
    ones = torch.ones(shifted.shape[1], dtype=shifted.dtype, device=shifted.device)
    for _ in range(max_iter):
        mean_sum, var_sum = reduce.sum_floats(*_nll_derivatives(shifted, beta, work, ones))
        grad, hess = (mean_sum - target_sum) / n, var_sum / n
        if grad > 0:
            hi = beta
        else:
            lo = beta
        new = beta - grad / hess if hess > 0 else math.nan
        if not lo < new < hi:  # outside the bracket (or no curvature): bisect in log space
            new = math.sqrt(lo * hi)
        done = abs(new - beta) <= tol * beta
        beta = new
        if done:
            break
    return beta


def fit_temperature(
    logits: Tensor,
    labels: Tensor,
    *,
    t_min: float = 1e-3,
    t_max: float = 1e3,
    tol: float = 1e-4,
    max_iter: int = 50,
    reduce: Reduce = LOCAL,
) -> float:
    """The temperature T in [t_min, t_max] that minimises the mean NLL of softmax(logits / T).

    With beta = 1 / T and d = logits - rowmax, NLL(beta) = mean(logsumexp(beta * d)) -
    beta * mean(d[label]), which is convex in beta with derivatives mean(E_p[d]) - mean(d[label])
    and mean(Var_p[d]). A safeguarded Newton iteration therefore needs one exp pass per step:
    it first converges on strided subsamples of rows, then polishes on all rows (usually 2
    steps). No autograd, no repeated log-softmax: one exp and three multiply-adds per step.
    Across workers the sufficient statistics of each step (row count, the three sums) are
    all-reduced, so every worker takes the same steps as one process on all rows.

    Args:
        logits: (P, C) float logits of valid pixels.
        labels: (P,) int64 labels in [0, C).
        t_min: Smallest temperature returned.
        t_max: Largest temperature returned.
        tol: Relative Newton step on beta at which the iteration stops; that last step is
            still taken, and Newton converges quadratically, so the error is far below it.
        max_iter: Newton steps per phase.
        reduce: The reduce hook: ``logits`` / ``labels`` are this worker's rows.

    Returns:
        The fitted temperature.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(20000, 4, generator=g) * 4
        >>> y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
        >>> round(fit_temperature(z * 2, y), 1)
        2.0
    """
    logits = logits.float()
    shifted = logits - logits.amax(dim=1, keepdim=True)
    target = shifted.gather(1, labels.reshape(-1, 1)).squeeze(1)
    lo, hi = 1.0 / t_max, 1.0 / t_min
    beta = 1.0
    (n,) = reduce.sum_floats(float(shifted.shape[0]))
    for rows, rough_tol in _WARM_STARTS:
        stride = int(n) // rows
        if stride > 1:
            (target_sum,) = reduce.sum_floats(float(target[::stride].sum(dtype=torch.float64)))
            beta = _newton(
                shifted[::stride].contiguous(), target_sum, beta, lo=lo, hi=hi, tol=rough_tol,
                max_iter=max_iter, reduce=reduce,
            )
    (target_sum,) = reduce.sum_floats(float(target.sum(dtype=torch.float64)))
    beta = _newton(
        shifted, target_sum, beta, lo=lo, hi=hi, tol=tol, max_iter=max_iter, reduce=reduce
    )
    return 1.0 / beta


@register
class TemperatureScaling(Calibrator):
    """Temperature scaling: ``logits / T`` with one T > 0, fitted by NLL.

    Argmax never changes. The fit is `fit_temperature` (Newton on 1 / T), whose sufficient
    statistics are all-reduced in Ray Train mode.

    Args:
        num_classes: The class count C.
        t_min: Smallest temperature the in-process fit returns. Defaults to ``1e-3``.
        t_max: Largest temperature the in-process fit returns. Defaults to ``1e3``.
        max_iter: Newton steps per phase of the in-process fit. Defaults to ``50``.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.

    Example:
        >>> ts = TemperatureScaling(3)
        >>> _ = ts.fit(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([0, 2]))
        >>> ts(torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """

    name = "temperature"
    distributed = True

    def __init__(
        self, num_classes: int, *, t_min: float = 1e-3, t_max: float = 1e3, max_iter: int = 50
    ) -> None:
        check_float("t_min", t_min, gt=0)
        check_float("t_max", t_max, gt=t_min)
        check_int("max_iter", max_iter, ge=1)
        super().__init__(num_classes, t_min=t_min, t_max=t_max, max_iter=max_iter)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @property
    def temperature(self) -> float:
        """The fitted temperature T."""
        return float(self.log_temperature.detach().exp())

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        return logits / self.log_temperature.exp()

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        t = fit_temperature(
            data.logits, data.labels, t_min=self.options["t_min"], t_max=self.options["t_max"],
            max_iter=self.options["max_iter"], reduce=reduce,
        )
        with torch.no_grad():
            self.log_temperature.fill_(math.log(t))

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """``one temperature, T = 1.31``."""
        if "temperature" not in summary:
            return None
        return f"one temperature, T = {number(summary['temperature'])}"

    def summary(self) -> dict[str, Any]:
        """The fitted temperature."""
        return {"temperature": self.temperature}
