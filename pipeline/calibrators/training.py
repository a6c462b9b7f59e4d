"""Fit helpers shared by the calibrators: the optimisation loops, mini-batch plans and samplers.

`optimise` is the loop every gradient-trained fit runs (full-batch L-BFGS or AdamW steps) and
`batch_plan` splits a global mini-batch over workers. For the calibrators that train networks
(selective scaling, LTS, IBTS): the AdamW loop with held-out early stopping
(`train_with_early_stopping`), the mini-batch samplers over pixels (`pixel_batches`,
`balanced_order`) and over whole maps (`map_batches`), and the checks and chunked held-out
losses of calibrators that train on whole (N, C, H, W) maps. Everything goes through the
`Reduce` hook, so the same steps run in-process and in each Ray Train worker.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.calibrators.base import FitData
from pipeline.calibrators.checks import check_choice, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce

__all__ = [
    "balanced_order",
    "batch_plan",
    "chunked_mean",
    "map_batches",
    "optimise",
    "pixel_batches",
    "require_images",
    "require_maps",
    "spatial_input",
    "train_with_early_stopping",
    "with_valid_pixels",
]


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
# Pixel samplers and the training loop.


def balanced_order(targets: Tensor, generator: torch.Generator) -> Tensor:
    """A shuffled epoch of indices in which the minority target is duplicated to balance.

    Every index of the majority class appears once; the minority class is repeated
    ``majority // minority`` times plus a random remainder drawn without replacement, so both
    classes appear exactly ``majority`` times (the paper's duplication of mispredicted pixels).

    Args:
        targets: (P,) int64 in {0, 1} (1 = mispredicted), both values present.
        generator: The CPU generator for the remainder and the shuffle.

    Returns:
        (2 * majority,) int64 indices into ``targets``, on ``targets``' device.

    Example:
        >>> order = balanced_order(torch.tensor([0, 0, 0, 0, 1]), torch.Generator().manual_seed(0))
        >>> torch.tensor([0, 0, 0, 0, 1])[order].bincount().tolist()
        [4, 4]
    """
    cpu = targets.cpu()
    groups = [torch.nonzero(cpu == 0).squeeze(1), torch.nonzero(cpu == 1).squeeze(1)]
    major, minor = sorted(groups, key=len, reverse=True)
    repeats, remainder = divmod(len(major), len(minor))
    extra = minor[torch.randperm(len(minor), generator=generator)[:remainder]]
    order = torch.cat([major, minor.repeat(repeats), extra])
    return order[torch.randperm(len(order), generator=generator)].to(targets.device)


def train_with_early_stopping(
    module: nn.Module,
    batch_loss: Callable[[], Tensor],
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    weight_decay: float,
    heldout_loss: Callable[[], float] | None,
    patience: int,
    weight: float = 1.0,
    reduce: Reduce = LOCAL,
) -> None:
    """AdamW mini-batch epochs on ``module``; keep the state with the lowest held-out loss.

    ``heldout_loss`` runs with ``module`` in eval mode and without gradients before training
    (so an initialisation that is already good, e.g. at the TS solution, can win) and after
    each epoch; training stops after ``patience`` epochs without improvement. Across workers
    each worker's batch loss counts with ``weight`` (its share of the global batch, see
    `batch_plan`), gradients are summed, buffers (BatchNorm statistics) are averaged before
    each held-out evaluation, and rank 0's held-out value decides, so all stop together.

    Args:
        module: The network whose parameters are trained and whose state is kept.
        batch_loss: Draws the next mini-batch and returns its loss.
        steps_per_epoch: Mini-batches per epoch.
        epochs: The most epochs.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        heldout_loss: The held-out model-pick loss, or None to train all epochs.
        patience: Epochs without improvement before stopping.
        weight: This worker's weight of its batch loss (1.0 in-process).
        reduce: The reduce hook.
    """
    best: dict[str, Any] = {"loss": math.inf, "state": None, "stale": 0}

    def evaluate() -> bool:
        if heldout_loss is None:
            return False
        reduce.sync(module)
        module.eval()
        with torch.no_grad():
            # Every worker holds the same state and held-out data: rank 0 scores, all follow.
            value = reduce.agree(heldout_loss() if reduce.rank == 0 else math.inf)
        module.train()
        if value < best["loss"]:
            best.update(loss=value, state=copy.deepcopy(module.state_dict()), stale=0)
            return False
        best["stale"] += 1
        return best["stale"] >= patience

    evaluate()
    optimise(
        batch_loss if weight == 1.0 else lambda: batch_loss() * weight, module.parameters(),
        method="adamw", max_iter=epochs * steps_per_epoch, lr=lr, weight_decay=weight_decay,
        callback=lambda step, _: (step + 1) % steps_per_epoch == 0 and evaluate(),
        reduce=reduce,
    )
    if best["state"] is not None:
        module.load_state_dict(best["state"])
    else:
        reduce.sync(module)
    module.eval()


def pixel_batches(
    targets: Tensor, batch_size: int, balance: bool, generator: torch.Generator,
    reduce: Reduce = LOCAL,
) -> tuple[Iterator[Tensor], int, float]:
    """Endless mini-batches of pixel indices, reshuffled (and rebalanced) every epoch.

    Returns the iterator, the number of batches per epoch (of the global epoch, see
    `batch_plan`) and this worker's loss weight; a short last batch is dropped, since
    BatchNorm cannot train on a single pixel. A worker balances its own shard.
    """
    n_wrong = int(targets.sum())
    n_right = len(targets) - n_wrong
    balance_here = balance and n_wrong > 0 and n_right > 0
    epoch_len = 2 * max(n_wrong, n_right) if balance_here else len(targets)
    global_len = epoch_len
    if reduce is not LOCAL and balance:
        # Steps per epoch follow the global balanced epoch, as in one process.
        wrong, right = reduce.sum_floats(float(n_wrong), float(n_right))
        global_len = 2 * int(max(wrong, right))
    size, steps, weight = batch_plan(epoch_len, batch_size, reduce, min_size=2)
    if global_len != epoch_len:
        steps = global_len // min(batch_size, global_len)

    def draw() -> Iterator[Tensor]:
        while True:
            if balance_here:
                order = balanced_order(targets, generator)
            else:
                order = torch.randperm(len(targets), generator=generator).to(targets.device)
            yield from order[: epoch_len // size * size].split(size)

    return draw(), steps, weight


# --------------------------------------------------------------------------------------------
# Calibrators that train on whole maps.


def with_valid_pixels(data: FitData) -> FitData:
    """Drop maps with no valid pixel: their mean loss is undefined."""
    if data.ignore_index is None:
        return data
    keep = (data.labels != data.ignore_index).flatten(1).any(1)
    if bool(keep.all()):
        return data
    images = None if data.images is None else data.images[keep]
    return FitData(data.logits[keep], data.labels[keep], images, data.ignore_index)


def require_maps(logits: Tensor, name: str) -> Tensor:
    """Spatial calibrators need whole maps: refuse (P, C) pixels."""
    if logits.dim() != 4:
        raise ValueError(
            "Expected `logits` of shape (N, C, H, W) for the spatial calibrator '" + name
            + "', but got " + str(logits.shape)
        )
    return logits


def spatial_input(
    features: Tensor, image: Tensor | None, use_image: bool, name: str
) -> Tensor:
    """(N, D, H, W) features, with the (N, 3, H, W) image appended when ``use_image``."""
    if not use_image:
        return features
    if image is None:
        raise ValueError(
            "Expected an `image` (or `images`) for '" + name + "' with use_image=True, but got "
            "None"
        )
    return torch.cat([features, image], 1)


def require_images(data: FitData, heldout: FitData | None, use_image: bool) -> None:
    """Fail before any fitting when a calibrator built with ``use_image`` gets no images."""
    for prefix, part in (("", data), ("heldout.", heldout)):
        if use_image and part is not None and part.images is None:
            raise ValueError(
                f"Expected `{prefix}images` (N, 3, H, W) for a calibrator built with "
                "use_image=True, but got None"
            )


def map_batches(
    n: int, size: int, generator: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of map indices; a short last batch is dropped."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        yield from order[: n // size * size].split(size)


def chunked_mean(
    data: FitData, size: int, mean_loss: Callable[[Tensor, Tensor, Tensor | None], Tensor]
) -> float:
    """A per-pixel mean loss over all maps of ``data``, ``size`` maps at a time.

    Each chunk's mean is weighted by its valid-pixel count, which gives the exact overall mean
    of unweighted per-pixel losses (and a close one for class-weighted losses).
    """
    total, count = 0.0, 0
    for start in range(0, len(data.labels), size):
        labels = data.labels[start : start + size]
        valid = labels.numel() if data.ignore_index is None else int(
            (labels != data.ignore_index).sum()
        )
        if valid == 0:
            continue
        images = None if data.images is None else data.images[start : start + size]
        total += float(mean_loss(data.logits[start : start + size], labels, images)) * valid
        count += valid
    return total / count
