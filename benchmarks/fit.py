"""Benchmark: each calibrator's fit in-process vs in Ray Train workers, start-up apart.

Every registered calibrator (or those named with ``--calibrators``) is fitted on the same
synthetic data (logits over-confident by a temperature of 2.5): pointwise ones on sampled pixels
(default 1M fit + 200k held-out, 19 classes), spatial ones on maps. First in ``local`` mode,
one calibrator at a time, then in ``ray`` mode through `pipeline.fit.fit_specs`, which fits all
of them in as many concurrent ``TorchTrainer`` runs as the cluster holds (per worker count),
each worker running the calibrator's own ``fit`` on its shard with gradients and statistics
all-reduced. Ray Train's start-up (worker and process group, dataset split, checkpoint) is paid
once per run and printed apart from each calibrator's own fit seconds (rank 0) and the shard
read. Held-out NLL is printed beside each
time: local and Ray must agree (see tests/test_fit_ray.py).

Run:
    .venv/bin/python benchmarks/fit.py                               # 1M pixels, 1 thread
    .venv/bin/python benchmarks/fit.py --pixels 20000000 --workers 1 2 4
    .venv/bin/python benchmarks/fit.py --pixels 100000 --maps 16 --calibrators temperature lts
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
import torch

from pipeline.calibrators import CALIBRATORS, FitData, list_calibrators
from pipeline.config import CalibratorSpec, JobConfig
from pipeline.fit import fit_specs, heldout_metrics


def pixels(n: int, classes: int, temperature: float, seed: int) -> FitData:
    """(n, C) logits and labels drawn from softmax(logits / temperature)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 2.0 * temperature
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g)
    return FitData(logits, labels.squeeze(1))


def maps(n: int, classes: int, size: int, temperature: float, seed: int) -> FitData:
    """(n, C, size, size) smooth logit maps, labels drawn from them, random images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, classes, size // 4, size // 4, generator=g) * 2.0 * temperature
    logits = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    probs = torch.softmax(logits / temperature, 1).movedim(1, -1).reshape(-1, classes)
    labels = torch.multinomial(probs, 1, generator=g).reshape(n, size, size)
    return FitData(logits, labels, torch.rand(n, 3, size, size, generator=g), 255)


def _cfg(output: str, classes: int, mode: str, workers: int) -> JobConfig:
    return JobConfig.model_validate({
        "output": output,
        "model": {"kind": "torchscript", "path": "unused.pt", "num_classes": classes},
        "datasets": [],
        "fit": {"mode": mode, "num_workers": workers, "seed": 0},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--heldout", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--maps", type=int, default=32, help="fit maps (spatial calibrators)")
    parser.add_argument("--size", type=int, default=64, help="map side (pixels)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the mini-batch fits")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--calibrators", nargs="+", default=list_calibrators())
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the local fits (a Ray worker holds 1 CPU)")
    args = parser.parse_args()
    # One thread each, as a Ray Train worker with {"CPU": 1} runs: on a busy 2-core machine two
    # intra-op threads made the local selective fit 5x slower, not faster.
    torch.set_num_threads(args.threads)
    specs = [
        CalibratorSpec(name=name, options={"epochs": args.epochs} if "epochs" in
                       inspect.signature(CALIBRATORS[name].__init__).parameters else {})
        for name in args.calibrators
    ]
    data = {
        False: (pixels(args.pixels, args.classes, 2.5, 0),
                pixels(args.heldout, args.classes, 2.5, 1)),
        True: (maps(args.maps, args.classes, args.size, 2.5, 2),
               maps(max(args.maps // 4, 1), args.classes, args.size, 2.5, 3)),
    }
    ray.init(
        num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
        object_store_memory=1 << 30,
    )
    print(f"{args.pixels:,} fit + {args.heldout:,} held-out pixels, {args.maps} maps of "
          f"{args.size}x{args.size}, {args.classes} classes, {os.cpu_count()} CPUs, torch "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    seconds: dict[tuple[str, str], float] = {}
    startups: list[float] = []
    nll: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as output:
        for spec in specs:
            start = time.perf_counter()
            [(calibrator, _)] = fit_specs(_cfg(output, args.classes, "local", 1), [spec], data)
            seconds[spec.key, "local"] = time.perf_counter() - start
            nll[spec.key, "local"] = heldout_metrics(calibrator, data[calibrator.spatial][1])["nll"]
        for workers in args.workers:
            run = f"ray-{workers}"
            start = time.perf_counter()
            fitted = fit_specs(_cfg(output, args.classes, "ray", workers), specs, data)
            wall = time.perf_counter() - start
            trainer_runs = list({id(e["ray"]): e["ray"] for _, e in fitted}.values())
            print(f"{run}: {len(trainer_runs)} concurrent TorchTrainer run(s), {wall:.1f} s in all")
            for t in trainer_runs:
                startups.append(t["startup_seconds"])
                print(f"  {t['calibrators_in_run']} calibrator(s): start-up "
                      f"{t['startup_seconds']:.1f} s, shard read {t['load_seconds']:.1f} s, "
                      f"fits {sum(t['fit_seconds'].values()):.1f} s")
            for spec, (calibrator, extra) in zip(specs, fitted, strict=True):
                seconds[spec.key, run] = extra["seconds"]
                held = data[calibrator.spatial][1]
                nll[spec.key, run] = heldout_metrics(calibrator, held)["nll"]
    ray.shutdown()

    # fit.mode: auto's cost model (pipeline.fit.LOCAL_SECONDS_PER_MPIXEL, RAY_STARTUP_SECONDS):
    # the mean local seconds per million fit pixels over the pointwise calibrators fitted here,
    # and the mean Train start-up per run.
    pointwise = [s.key for s in specs if not CALIBRATORS[s.name].spatial]
    if pointwise:
        per_mpixel = sum(seconds[k, "local"] for k in pointwise) / len(pointwise)
        print(f"\nauto cost model: local {per_mpixel / (args.pixels / 1e6):.2f} s per million fit "
              f"pixels and calibrator (mean of {len(pointwise)}); Ray Train start-up "
              f"{sum(startups) / max(len(startups), 1):.1f} s per run (mean of {len(startups)})")

    runs = ["local"] + [f"ray-{w}" for w in args.workers]
    print("\nfit seconds (ray: the calibrator's fit on rank 0, start-up and shard read apart) "
          "and held-out NLL")
    print(f"{'calibrator':<18}" + "".join(f"{r + ' s':>11}" for r in runs)
          + "".join(f"{r + ' NLL':>13}" for r in runs))
    for spec in specs:
        print(f"{spec.key:<18}" + "".join(f"{seconds[spec.key, r]:11.2f}" for r in runs)
              + "".join(f"{nll[spec.key, r]:13.5f}" for r in runs))


if __name__ == "__main__":
    main()
