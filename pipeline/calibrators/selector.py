"""Selective scaling's selector and group temperatures, as pure functions on tensors.

The selector's per-pixel inputs (`selector_features`: the log-probabilities, with ``rich`` also
max probability, margin and entropy), the paper's MLP selector (`mlp_selector`), and the NLL fit
of the two groups' temperatures T_cor / T_mis given the selector's gate
(`fit_group_temperatures`). `pipeline.calibrators.selective` builds `SelectiveScaling` from
them; `pipeline.calibrators.selective_spatial` swaps the MLP for a conv net over the features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.training import optimise

__all__ = ["N_RICH", "fit_group_temperatures", "mlp_selector", "selector_features"]

# Rich features added beside the C log-probabilities: max probability, margin, entropy.
N_RICH = 3
# Least T_cor weight (pixels) for a class to get its own T_cor when `per_class_t_cor`.
_MIN_CLASS_PIXELS = 100


# --------------------------------------------------------------------------------------------
# The selector: its per-pixel features and the paper's MLP.


def selector_features(logits: Tensor, rich: bool) -> Tensor:
    """The selector's per-pixel inputs, computed along dim 1.

    Args:
        logits: (P, C) or (N, C, H, W) float logits.
        rich: Append max probability, top-1 minus top-2 probability margin and entropy.

    Returns:
        (P, D) or (N, D, H, W) float features, D = C (+ 3 when ``rich``): the log-probabilities
        first.

    Example:
        >>> selector_features(torch.zeros(2, 4), rich=True)[0]
        tensor([-1.3863, -1.3863, -1.3863, -1.3863,  0.2500,  0.0000,  1.3863])
    """
    log_probs = logits.log_softmax(1)
    if not rich:
        return log_probs
    probs = log_probs.exp()
    # Top-2 by two max reductions: topk over a short dim 1 is several times slower on CPU.
    # Ties leave the margin at 0, as topk does.
    top1 = probs.amax(1, keepdim=True)
    is_top = probs == top1
    ties = is_top.sum(1, keepdim=True) > 1
    top2 = torch.where(ties, top1, probs.masked_fill(is_top, 0.0).amax(1, keepdim=True))
    entropy = -(probs * log_probs).sum(1, keepdim=True)
    return torch.cat([log_probs, top1, top1 - top2, entropy], 1)


def mlp_selector(dim: int) -> nn.Sequential:
    """The paper's MLP: Linear(D, D) at the identity, D -> 2D -> D with BN + ReLU, then D -> 2."""
    first = nn.Linear(dim, dim)
    with torch.no_grad():
        first.weight.copy_(torch.eye(dim))
        first.bias.zero_()
    return nn.Sequential(
        first, nn.BatchNorm1d(dim), nn.ReLU(),
        nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.ReLU(),
        nn.Linear(2 * dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
        nn.Linear(dim, 2),
    )


# --------------------------------------------------------------------------------------------
# The group temperature fit.


def fit_group_temperatures(
    logits: Tensor,
    labels: Tensor,
    gate: Tensor,
    *,
    t_cor: float | None,
    t_mis: float | None,
    per_class_t_cor: bool = False,
    t_min: float = 0.05,
    max_iter: int = 100,
    reduce: Reduce = LOCAL,
) -> tuple[Tensor, float]:
    """Fit T_cor and/or T_mis by the NLL of ``logits / (gate * T_mis + (1 - gate) * T_cor[k])``.

    k is each pixel's predicted class (T_cor is one value per class when ``per_class_t_cor``,
    else shared). A hard gate (0/1) fits each group on its own pixels; a soft gate fits both
    jointly. Each fitted temperature is ``t_min + exp(a)``, optimised in ``a`` with L-BFGS: the
    floor stops a soft gate from collapsing to T ~ p_mis * T_mis with T_cor -> 0, which would
    make every pixel the selector trusts one-hot. A per-class fit starts from the shared fit,
    and a class with less than 100 pixels of T_cor weight keeps the shared value.

    Args:
        logits: (P, C) float logits of valid pixels.
        labels: (P,) int64 labels in [0, C).
        gate: (P,) float in [0, 1], the weight of T_mis per pixel.
        t_cor: A fixed T_cor, or None to fit it.
        t_mis: A fixed T_mis, or None to fit it.
        per_class_t_cor: Fit one T_cor per predicted class (needs ``t_cor=None``).
        t_min: Floor of the fitted temperatures.
        max_iter: L-BFGS iterations.
        reduce: The reduce hook: the pixels are this worker's shard.

    Returns:
        ``(t_cor, t_mis)``: a (C,) float32 tensor of per-class T_cor (all equal unless
        ``per_class_t_cor``) and the T_mis value.

    Raises:
        ValueError: When ``per_class_t_cor`` is set with a fixed ``t_cor``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(20000, 3, generator=g) * 3
        >>> y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
        >>> gate = (torch.arange(20000) % 2).float()
        >>> t_cor, t_mis = fit_group_temperatures(z * gate[:, None].add(1), y, gate, t_cor=None,
        ...                                       t_mis=None)
        >>> round(float(t_cor[0]), 1), round(t_mis, 1)
        (1.0, 2.0)
    """
    if per_class_t_cor and t_cor is not None:
        raise ValueError(
            f"Expected `t_cor` to be None (fitted) when `per_class_t_cor` is set, but got {t_cor}"
        )
    num_classes, device = logits.shape[1], logits.device
    if t_cor is not None and t_mis is not None:
        return torch.full((num_classes,), float(t_cor)), t_mis
    start_cor = start_mis = 1.0
    if per_class_t_cor:
        shared, start_mis = fit_group_temperatures(
            logits, labels, gate, t_cor=None, t_mis=t_mis, t_min=t_min, max_iter=max_iter,
            reduce=reduce,
        )
        start_cor = float(shared[0])

    def free(start: float, size: tuple[int, ...]) -> Tensor:
        """The free parameter a of T = t_min + exp(a), at T = ``start``."""
        value = math.log(max(start - t_min, 1e-6))
        return torch.full(size, value, device=device, requires_grad=True)

    a_cor = None if t_cor is not None else free(start_cor, (num_classes if per_class_t_cor else 1,))
    a_mis = None if t_mis is not None else free(start_mis, ())
    predicted = logits.argmax(1)
    gate = gate.to(logits.dtype)
    # Classes with little T_cor weight keep the shared value instead of over-fitting a few pixels.
    support = reduce.sum(torch.zeros(num_classes, device=device).index_add_(0, predicted, 1 - gate))
    own = (support >= _MIN_CLASS_PIXELS)[predicted]
    share = reduce.share(len(labels))

    def nll() -> Tensor:
        cor = t_cor if a_cor is None else t_min + a_cor.exp()
        if per_class_t_cor:
            cor = torch.where(own, cor[predicted], start_cor)
        mis = t_mis if a_mis is None else t_min + a_mis.exp()
        temperature = gate * mis + (1 - gate) * cor
        return F.cross_entropy(logits / temperature.unsqueeze(1), labels) * share

    optimise(nll, [a for a in (a_cor, a_mis) if a is not None], max_iter=max_iter, reduce=reduce)
    # Fixed values are returned as given, not through a float32 round trip.
    fitted_cor = torch.tensor([t_cor]) if a_cor is None else t_min + a_cor.detach().exp().cpu()
    if per_class_t_cor:
        fitted_cor[support.cpu() < _MIN_CLASS_PIXELS] = start_cor
    fitted_mis = t_mis if a_mis is None else t_min + float(a_mis.detach().exp())
    return fitted_cor.expand(num_classes).clone(), fitted_mis
