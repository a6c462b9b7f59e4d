"""Benchmark: wall time of the temperature and selective fits, local vs Ray Train workers.

Fits each calibrator on the same synthetic sampled pixels (default 1M x 19 classes, logits
over-confident by a temperature of 2.5) in ``local`` mode and in ``ray`` mode with a
``TorchTrainer`` of 1 and 2 workers, through `pipeline.fit.fit_spec` (what ``segcal fit``
runs per calibrator). Ray wall times include the trainer start (worker group, process group,
dataset split), which dominates at this size on a small machine; rank 0's own read and train
seconds are printed beside them. Prints a table, the ratios to local, and the fitted values
(the temperatures must agree to 1e-3).

Run:
    .venv/bin/python benchmarks/fit.py                 # 1M pixels, selective epochs 2, 1 thread
    .venv/bin/python benchmarks/fit.py --pixels 200000 --epochs 1 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

from pipeline.calibrators import FitData
from pipeline.config import CalibratorSpec, JobConfig
from pipeline.fit import fit_spec


def synthetic(n: int, classes: int, temperature: float, seed: int) -> FitData:
    """(n, C) logits and labels drawn from softmax(logits / temperature)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0 * temperature
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g)
    return FitData(logits, labels.squeeze(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--heldout", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--epochs", type=int, default=2, help="selective: selector epochs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the local fits (a Ray worker holds 1 CPU)")
    args = parser.parse_args()
    # One thread each, as a Ray Train worker with {"CPU": 1} runs: on a busy 2-core machine two
    # intra-op threads made the local selective fit 5x slower, not faster.
    torch.set_num_threads(args.threads)

    fit = synthetic(args.pixels, args.classes, 2.5, seed=0)
    heldout = synthetic(args.heldout, args.classes, 2.5, seed=1)
    specs = [
        CalibratorSpec(name="temperature"),
        CalibratorSpec(name="selective", options={"epochs": args.epochs}),
    ]
    runs = [("local", 1), ("ray", 1), ("ray", 2)]
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
        object_store_memory=1 << 30,
    )
    print(f"{args.pixels:,} fit + {args.heldout:,} held-out pixels, {args.classes} classes, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    times: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory() as output:
        for spec in specs:
            for mode, workers in runs:
                cfg = JobConfig.model_validate({
                    "output": output,
                    "model": {"kind": "torchscript", "path": "unused.pt",
                              "num_classes": args.classes},
                    "datasets": [],
                    "fit": {"mode": mode, "num_workers": workers, "seed": 0},
                })
                start = time.perf_counter()
                calibrator, extra = fit_spec(cfg, spec, fit, heldout)
                times[spec.name, mode, workers] = time.perf_counter() - start
                inside = extra.get("ray", {})
                worker = (f"(worker: read {inside['load_seconds']:.2f} s, train "
                          f"{inside['train_seconds']:.2f} s)" if inside else "")
                print(f"  {spec.name:<12} {mode:<5} workers={workers}  "
                      f"{times[spec.name, mode, workers]:7.2f} s {worker:<36} "
                      f"{calibrator.summary()}")
    ray.shutdown()

    print(f"\n{'calibrator':<12} {'local s':>9} {'ray-1 s':>9} {'ray-2 s':>9} "
          f"{'ray-1/local':>12} {'ray-2/local':>12} {'ray-2/ray-1':>12}")
    for spec in specs:
        local, one, two = (times[spec.name, m, w] for m, w in runs)
        print(f"{spec.name:<12} {local:9.2f} {one:9.2f} {two:9.2f} {one / local:12.2f} "
              f"{two / local:12.2f} {two / one:12.2f}")


if __name__ == "__main__":
    main()
