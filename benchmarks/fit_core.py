"""Temperature fit on 1M pixels x 19 classes, one core: our Newton fit vs autograd L-BFGS.

Run: ``.venv/bin/python benchmarks/fit_core.py [--pixels 1000000] [--classes 19]``

The baseline is what one would write first: ``torch.optim.LBFGS`` (strong-Wolfe line search)
over ``cross_entropy(logits / exp(log_t), labels)`` with autograd. Both see the same float32
logits with a known temperature of 1.7; the fitted temperatures are printed beside the times.
CPU time (``time.process_time``) is printed beside wall time because on a shared machine the
wall time mostly measures the other processes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators import fit_temperature, optimise


def _data(pixels: int, classes: int, t_star: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    true = torch.randn(pixels, classes, generator=g) * 3
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    return true * t_star, labels


def _baseline(logits: torch.Tensor, labels: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    optimise(lambda: F.cross_entropy(logits / log_t.exp(), labels), [log_t])
    return float(log_t.detach().exp())


def _best_of(repeats: int, fn, *args) -> tuple[float, float, float]:  # noqa: ANN001
    """Best wall time, best CPU time of this process, and the last result."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), result


def main() -> None:
    """Print both fit times, the fitted temperatures and the speed-up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits, labels = _data(args.pixels, args.classes, t_star=1.7)
    _baseline(logits[:1000], labels[:1000])  # warm up torch.optim's lazy imports
    ours_wall, ours_cpu, ours_t = _best_of(args.repeats, fit_temperature, logits, labels)
    base_wall, base_cpu, base_t = _best_of(max(1, args.repeats - 2), _baseline, logits, labels)
    # CPU time is what an idle core would need; wall time suffers on a shared machine.
    print(f"pixels x classes : {args.pixels} x {args.classes}, 1 thread, best of runs")
    print(f"fit_temperature  : {ours_wall:.3f} s wall, {ours_cpu:.3f} s CPU  (T = {ours_t:.5f})")
    print(f"LBFGS + autograd : {base_wall:.3f} s wall, {base_cpu:.3f} s CPU  (T = {base_t:.5f})")
    print(f"speed-up         : {base_wall / ours_wall:.1f}x wall, {base_cpu / ours_cpu:.1f}x CPU")

if __name__ == "__main__":
    main()
