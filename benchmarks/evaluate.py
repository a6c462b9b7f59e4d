"""Benchmark stage 3: evaluation throughput and peak memory for 50 and for 500 images.

    .venv/bin/python benchmarks/evaluate.py                     # 50 and 500 images, 180x240
    .venv/bin/python benchmarks/evaluate.py --height 360 --width 480 --sizes 20 200

Each size runs in a fresh process on a synthetic run folder (random float16 logits stored at
``--stride``, random labels, one fitted temperature artifact, so two calibrations per image:
``uncalibrated`` and ``temperature``) through ``pipeline.evaluate.run`` on local Ray Data.

- throughput: label pixels per second of wall time of ``evaluate.run`` (each pixel is scored
  under both calibrations), Ray start-up excluded;
- peak memory: the largest sum of RSS over the driver and every process it started (raylet,
  GCS, Ray workers and the evaluator actors), sampled every 50 ms from /proc while
  ``evaluate.run`` runs; and the driver's own peak RSS (``ru_maxrss``) for comparison.

The goal is a memory ratio (500 / 50 images) within 1.2x: evaluation must not hold per-image
data beyond the image being processed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.calibrators import build_calibrator, save  # noqa: E402
from pipeline.config import JobConfig, config_hash, parse_config  # noqa: E402
from pipeline.extract import content_hash  # noqa: E402
from pipeline.models import model_fingerprint  # noqa: E402
from pipeline.paths import RunPaths  # noqa: E402
from pipeline.shards import ImageRecord, Manifest, write_manifest, write_shard  # noqa: E402

ROWS_PER_SHARD = 64


def build_run(root: Path, n: int, h: int, w: int, c: int, stride: int, seed: int) -> JobConfig:
    """A run folder with one synthetic test set of ``n`` images and a temperature artifact."""
    weights = root / "model.pt"
    weights.write_bytes(b"synthetic")
    cfg = parse_config({
        "output": str(root / "run"),
        "model": {"kind": "torchscript", "path": str(weights), "num_classes": c},
        "datasets": [{"name": "bench", "role": "test", "domain": "day", "images": str(root),
                      "labels": str(root)}],
        "extract": {"store_stride": stride},
        "evaluate": {"bootstrap": 1000},
    })
    paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
    ds = cfg.datasets[0]
    rng = np.random.default_rng(seed)
    shards = []
    for start in range(0, n, ROWS_PER_SHARD):
        records = [
            ImageRecord(
                dataset=ds.name, domain=ds.domain, role=ds.role, image_id=f"img{i:05d}",
                uri=f"img{i:05d}.png", height=h, width=w,
                model_fingerprint=paths.model_fingerprint,
                labels=rng.integers(0, c, (h, w), dtype=np.uint8),
                logits=(rng.standard_normal((c, h // stride, w // stride)) * 4).astype(np.float16),
                image=rng.integers(0, 256, (h // stride, w // stride, 3), dtype=np.uint8),
            )
            for i in range(start, min(start + ROWS_PER_SHARD, n))
        ]
        part = paths.dataset_dir(ds.name) / f"part-{start // ROWS_PER_SHARD:05d}.parquet"
        shards.append(write_shard(part, records))
    write_manifest(paths.dataset_dir(ds.name), Manifest(
        dataset=ds.name, role=ds.role, domain=ds.domain, reference=None, num_classes=c,
        class_names=cfg.model.names(), ignore_index=ds.ignore_index,
        model_fingerprint=paths.model_fingerprint, config_hash=config_hash(cfg), shards=shards,
        content_hash=content_hash(ds, cfg.extract),
    ))
    g = torch.Generator().manual_seed(seed)
    ts = build_calibrator("temperature", c).fit(
        torch.randn(4096, c, generator=g) * 4, torch.randint(0, c, (4096,), generator=g)
    )
    save(ts, paths.artifact_dir("temperature"), class_names=cfg.model.names(), ignore_index=255)
    return cfg


def _tree_rss(root_pid: int) -> int:
    """Sum of RSS (bytes) over ``root_pid`` and all its descendants, read from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/statm") as f:
                resident = int(f.read().split()[1])
        except OSError:  # the process ended meanwhile
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        rss[pid] = resident * page
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _tree_rss(os.getpid()))
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def measure(args: argparse.Namespace, n: int) -> dict[str, float]:
    """Build a run of ``n`` images, evaluate it on local Ray, return timings and peaks."""
    import ray

    from pipeline import evaluate

    with tempfile.TemporaryDirectory(prefix="segcal-bench-") as tmp:
        cfg = build_run(Path(tmp), n, args.height, args.width, args.classes, args.stride,
                        args.seed)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            time.sleep(2.0)  # let Ray's prestarted workers settle before the baseline
            baseline = _tree_rss(os.getpid())
            sampler = _PeakSampler()
            sampler.start()
            start = time.perf_counter()
            evaluate.run(cfg)
            seconds = time.perf_counter() - start
            peak = sampler.stop()
        finally:
            ray.shutdown()
    return {
        "images": n, "seconds": seconds, "pixels_per_s": n * args.height * args.width / seconds,
        "baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20,
        "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=240)
    parser.add_argument("--classes", type=int, default=11)
    parser.add_argument("--stride", type=int, default=2, choices=[1, 2, 4])
    parser.add_argument("--num-cpus", type=int, default=None, help="ray.init num_cpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, args.child)))
        return

    passed = sys.argv[1:]
    results = []
    for n in args.sizes:
        # A fresh process per size: peak RSS and Ray's worker pool start from the same state.
        out = subprocess.run(
            [sys.executable, __file__, *passed, "--child", str(n)], check=True,
            capture_output=True, text=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"evaluate: {args.height}x{args.width} labels, {args.classes} classes, logits at "
          f"stride {args.stride}, calibrations: uncalibrated + temperature")
    print(f"{'images':>7} {'seconds':>8} {'pixels/s':>11} {'RSS base MiB':>13} "
          f"{'RSS peak MiB':>13} {'driver peak MiB':>16}")
    for r in results:
        print(f"{r['images']:>7} {r['seconds']:>8.1f} {r['pixels_per_s']:>11.3g} "
              f"{r['baseline_mib']:>13.0f} {r['peak_mib']:>13.0f} {r['driver_peak_mib']:>16.0f}")
    if len(results) >= 2:
        first, last = results[0], results[-1]
        ratio = last["peak_mib"] / first["peak_mib"]
        driver = last["driver_peak_mib"] / first["driver_peak_mib"]
        print(f"peak memory ratio {last['images']}/{first['images']} images: {ratio:.3f}x "
              f"(driver + Ray processes), {driver:.3f}x (driver alone); goal <= 1.2x")


if __name__ == "__main__":
    main()
