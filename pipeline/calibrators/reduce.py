"""The reduce hook: how a fit loop sees the other workers' shards of its fit data.

A calibrator's ``fit(..., reduce=...)`` takes a `Reduce`: `LOCAL`, the identity, in-process,
and `DistributedReduce` (``torch.distributed`` collectives: gloo on the CPU, NCCL on the GPU)
inside each Ray Train worker, where the fit data is that worker's shard. Every sum, count, loss
value and gradient over fit data goes through the hook, so one training loop runs with global
quantities on every worker (nanoGPT's DDP wrapping of its own loop, without DDP's module
wrapper). `pipeline.calibrators.training` holds the loops built on it (`optimise`,
`batch_plan`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["LOCAL", "DistributedReduce", "Reduce"]


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
