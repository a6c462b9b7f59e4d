"""Matrix scaling and Dirichlet scaling: a full C x C linear map plus bias, ODIR-regularised."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_float, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.training import optimise
from pipeline.calibrators.wording import number

__all__ = ["DirichletScaling", "MatrixScaling"]

_DEFAULT_GRID = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class _LinearScaling(Calibrator):
    """``features(logits) @ weight.T + bias`` with ODIR on the off-diagonal weights and the bias.

    ODIR (Kull et al. 2019): lambda * (sum of squared off-diagonal weights / (C (C - 1)) +
    sum of squared biases / C), added to the mean NLL. Starts at the identity map.
    """

    distributed = True

    def __init__(
        self,
        num_classes: int,
        *,
        odir: float = 1e-2,
        odir_grid: Sequence[float] | None = _DEFAULT_GRID,
        max_iter: int = 100,
    ) -> None:
        check_float("odir", odir, ge=0)
        if odir_grid is not None:
            if not isinstance(odir_grid, (list, tuple)) or not odir_grid:
                raise ValueError(
                    f"Expected `odir_grid` to be a non-empty list of floats or None, but got "
                    f"{odir_grid!r}"
                )
            for value in odir_grid:
                check_float("odir_grid", value, ge=0)
        check_int("max_iter", max_iter, ge=1)
        super().__init__(num_classes, odir=odir, odir_grid=odir_grid, max_iter=max_iter)
        self.weight = nn.Parameter(torch.eye(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        # The strength in use (options["odir"], or the grid's pick); a buffer so it is saved.
        self.register_buffer("odir_lambda", torch.tensor(float(odir)))

    @abstractmethod
    def _features(self, logits: Tensor) -> Tensor:
        """(P, C) or (N, C, H, W) logits -> the linear map's inputs, same shape (along dim 1)."""

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        features = self._features(logits)
        if features.dim() == 4:  # the map in place: no copy to (P, C) points and back
            bias = self.bias.reshape(1, -1, 1, 1)
            return torch.einsum("kc,nchw->nkhw", self.weight, features) + bias
        return features @ self.weight.t() + self.bias

    def _odir_penalty(self) -> Tensor:
        c = self.num_classes
        off_diagonal = self.weight - torch.diag(torch.diagonal(self.weight))
        return self.odir_lambda * (
            off_diagonal.pow(2).sum() / (c * (c - 1)) + self.bias.pow(2).sum() / c
        )

    def loss(
        self,
        logits: Tensor,
        labels: Tensor,
        image: Tensor | None = None,
        *,
        ignore_index: int | None = None,
    ) -> Tensor:
        """Mean NLL plus the ODIR penalty at the current strength ``odir_lambda``."""
        nll = super().loss(logits, labels, image, ignore_index=ignore_index)
        return nll + self._odir_penalty()

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        """L-BFGS on the mean NLL + ODIR; with held-out data, along the grid from strong to weak.

        The features are computed once (the closure only runs the linear map). Each strength
        starts from the previous one's solution (a continuation path from the strongest
        penalty, where the problem is best conditioned), which reaches a lower held-out NLL in
        fewer iterations than restarting every strength from the identity. Across workers
        each one's loss is weighted by its share of the fit pixels (so the summed loss is the
        global objective); the held-out pick runs on the held-out data every worker holds.
        """
        grid = self.options["odir_grid"]
        with_grid = heldout is not None and grid is not None
        lambdas = sorted(grid, reverse=True) if with_grid else [self.options["odir"]]
        features = self._features(data.logits).detach()
        held_features = self._features(heldout.logits).detach() if with_grid else None
        with torch.no_grad():
            self.weight.copy_(torch.eye(self.num_classes))
            self.bias.zero_()

        share = reduce.share(len(data.labels))

        def loss() -> Tensor:
            nll = F.cross_entropy(features @ self.weight.t() + self.bias, data.labels)
            return (nll + self._odir_penalty()) * share

        best_nll, best_state = float("inf"), None
        for lam in lambdas:
            self.odir_lambda.fill_(lam)
            optimise(loss, self.parameters(), max_iter=self.options["max_iter"], reduce=reduce)
            if not with_grid:
                return
            with torch.no_grad():
                logits = held_features @ self.weight.t() + self.bias
                nll = float(F.cross_entropy(logits, heldout.labels))
            if nll < best_nll:
                best_nll, best_state = nll, {k: v.clone() for k, v in self.state_dict().items()}
        self.load_state_dict(best_state)

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The size of the map, its diagonal and off-diagonal magnitude and the ODIR strength."""
        if "diag_mean" not in summary:
            return None
        return (f"a full {num_classes}x{num_classes} linear map: diagonal mean "
                f"{number(summary['diag_mean'])}, off-diagonal mean |w| "
                f"{number(summary['offdiag_abs_mean'])}, ODIR strength "
                f"{number(summary.get('odir'))}")

    def summary(self) -> dict[str, Any]:
        """The ODIR strength used and the mean diagonal / off-diagonal magnitude of the map."""
        weight = self.weight.detach()
        off_diagonal = weight - torch.diag(torch.diagonal(weight))
        return {
            "odir": float(self.odir_lambda),
            "diag_mean": float(torch.diagonal(weight).mean()),
            "offdiag_abs_mean": float(off_diagonal.abs().sum())
            / (self.num_classes * (self.num_classes - 1)),
        }


@register
class MatrixScaling(_LinearScaling):
    """Matrix scaling: ``W @ logits + b`` per pixel, full W (C x C), ODIR-regularised.

    With a held-out set the ODIR strength is picked from ``odir_grid`` by held-out NLL;
    otherwise ``odir`` is used. May change the argmax.

    Args:
        num_classes: The class count C.
        odir: ODIR strength lambda without held-out data. Defaults to ``1e-2``.
        odir_grid: Strengths tried with held-out data; None always uses ``odir``.
            Defaults to ``[0, 1e-4, 1e-3, 1e-2, 1e-1, 1]``.
        max_iter: L-BFGS iterations per ODIR strength. Defaults to ``100``.

    References:
        Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
        probabilities with Dirichlet calibration", NeurIPS 2019.
    """

    name = "matrix"

    def _features(self, logits: Tensor) -> Tensor:
        return logits


@register
class DirichletScaling(_LinearScaling):
    """Dirichlet calibration: ``W @ log_softmax(logits) + b`` per pixel, ODIR-regularised.

    Same options as `MatrixScaling`; at initialisation it returns the log-probabilities
    (calibrated probabilities equal the model's).

    References:
        Kull et al., "Beyond temperature scaling: Obtaining well-calibrated multiclass
        probabilities with Dirichlet calibration", NeurIPS 2019.
    """

    name = "dirichlet"

    def _features(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=1)
