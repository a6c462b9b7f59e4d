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

    .venv/bin/python benchmarks/evaluate.py --profile            # CPU, three shapes
    .venv/bin/python benchmarks/evaluate.py --profile --device cuda --images 64

``--profile`` runs the evaluator in this process (no Ray) on synthetic shards of three shapes,
CamVid-size (11 x 360 x 480), Cityscapes at stride 4 (19 x 256 x 512) and ADE20K-size
(150 x 128 x 128) labels, logits stored at ``--stride``, with ``uncalibrated``, temperature,
selective (published: hard gate, T_mis = 1e10) and LTS, and prints the cost per image x
calibrator of each stage: Parquet read + decode, float16 -> float32, upsampling (shared by an
image's calibrators, so divided among them), row building (per shard, divided likewise), then
per calibrator its forward, softmax, statistics and label-free features. Beside it: the
statistics kernel alone (:func:`pipeline.metrics.image_stats` on the same probabilities) and
evaluations per second (from a second, untimed pass). Goals: on the CPU a pointwise
calibrator's whole cost <= 2x the kernel alone; on one GPU >= 200 image x calibrator
evaluations per second at cityscapes/4.
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
        "datasets": [{"name": "bench", "role": "test", "domain": "day",
                      "images": str(root / "data"), "labels": str(root / "data")}],
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


PROFILE_SHAPES = {
    "camvid": (11, 360, 480),
    "cityscapes/4": (19, 256, 512),
    "ade20k": (150, 128, 128),
}
PROFILE_CALIBRATORS = {
    "temperature": ("temperature", {}),
    "selective": ("selective", {"t_mis": 1e10, "t_cor": 1.0, "gate": "hard",
                                "features": "logprobs", "epochs": 1}),
    "lts": ("lts", {"epochs": 1}),
}


def _fit_profile_calibrators(run_dir: Path, c: int, seed: int) -> dict[str, str]:
    """Fit the profiled calibrators on small synthetic maps; label -> artifact folder."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, c, 24, 32, generator=g) * 4
    labels = torch.where(torch.rand(4, 24, 32, generator=g) < 0.7, logits.argmax(1),
                         torch.randint(0, c, (4, 24, 32), generator=g))
    images = torch.rand(4, 3, 24, 32, generator=g)
    artifacts = {}
    for label, (name, options) in PROFILE_CALIBRATORS.items():
        cal = build_calibrator(name, c, **options)
        kind = type(cal)
        if kind.spatial:
            cal.fit(logits, labels, images=images)
        else:
            cal.fit(logits.permute(0, 2, 3, 1).reshape(-1, c), labels.reshape(-1))
        folder = run_dir / "artifacts" / label
        save(cal, folder, class_names=None, ignore_index=255)
        artifacts[label] = str(folder)
    return artifacts


def profile(args: argparse.Namespace) -> None:
    """Per image x calibrator cost of each evaluation stage, in this process."""
    import pyarrow as pa

    from pipeline import evaluate

    device = evaluate.resolve_device("true" if args.device == "cuda" else "false")
    print(f"== evaluate --profile on {device}: {args.images} images per shape, logits at "
          f"stride {args.stride}; torch threads {torch.get_num_threads()}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for shape_name, (c, h, w) in PROFILE_SHAPES.items():
        with tempfile.TemporaryDirectory(prefix="segcal-profile-") as tmp:
            cfg = build_run(Path(tmp), args.images, h, w, c, args.stride, args.seed)
            paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
            artifacts = _fit_profile_calibrators(Path(tmp), c, args.seed)
            targets = evaluate.plan_targets(cfg, paths)
            items = evaluate._work_items(targets)
            # CPU: this thread's CPU time (torch and numba run single-threaded here), which
            # other processes' load does not inflate; CUDA: synchronised wall time.
            cuda = device.type == "cuda"
            timer = evaluate.StageTimer(sync=cuda,
                                        clock=time.perf_counter if cuda else time.thread_time)
            evaluator = evaluate.ShardEvaluator(
                artifacts, n_bins=15, boundary_width=2, threads=1,
                use_gpu="true" if device.type == "cuda" else "false", timer=timer,
            )
            # Warm-up on one shard (numba caches, CUDA context), then the timed pass.
            evaluator(pa.Table.from_pylist(items[:1]))
            timer.seconds.clear()
            for item in items:
                evaluator(pa.Table.from_pylist([item]))
            # Throughput from a second pass without the timer (its CUDA syncs cost time).
            evaluator.timer = None
            start = time.perf_counter()
            for item in items:
                evaluator(pa.Table.from_pylist([item]))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            # The statistics kernel alone, on the uncalibrated probabilities of a few images.
            kernel = _kernel_alone(items[0], c, h, w, min(args.images, 8))
        labels = ["uncalibrated", *artifacts]
        n_evals = args.images * len(labels)
        shared = {k: v for k, v in timer.seconds.items() if "|" not in k}
        print(f"\n{shape_name}: {c} x {h} x {w} labels, {args.images} images x {len(labels)} "
              f"calibrations = {n_evals / wall:.1f} image x calibrator evaluations/s "
              f"({wall:.2f} s wall, untimed pass)")
        unit = "ms" if cuda else "CPU ms"
        print(f"  {unit + ' per image x calibrator':<28}" + "".join(f"{x:>14}" for x in labels))
        for stage, seconds in shared.items():
            cost = seconds / n_evals * 1e3
            print(f"  {stage + ' (shared)':<28}" + "".join(f"{cost:>14.2f}" for _ in labels))
        totals = dict.fromkeys(labels, sum(shared.values()) / n_evals * 1e3)
        # Every per-calibrator stage the evaluator timed ("<stage>|<label>"), in its order.
        stages = dict.fromkeys(k.split("|")[0] for k in timer.seconds if "|" in k)
        for stage in stages:
            cells = []
            for label in labels:
                ms = timer.seconds.get(f"{stage}|{label}", 0.0) / args.images * 1e3
                totals[label] += ms
                cells.append(f"{ms:>14.2f}")
            print(f"  {stage:<28}" + "".join(cells))
        print(f"  {'total':<28}" + "".join(f"{totals[x]:>14.2f}" for x in labels))
        print(f"  statistics kernel alone (image_stats, CPU): {kernel * 1e3:.2f} ms; temperature's "
              f"total / kernel = {totals['temperature'] / (kernel * 1e3):.2f}x (goal <= 2x on "
              "the CPU)")


def _kernel_alone(item: dict, c: int, h: int, w: int, n: int) -> float:
    """Mean CPU seconds of ``image_stats`` on upsampled uncalibrated probabilities."""
    from pipeline.evaluate_rows import _iter_shard
    from pipeline.metrics import first_argmax, image_stats
    from pipeline.shards import upsample_logits

    times = []
    for i, record in enumerate(_iter_shard(Path(item["path"]), item["sha256"], item["rows"])):
        if i == n:
            break
        logits = upsample_logits(record.logits, (h, w))
        probs = torch.softmax(logits, 0)
        labels = torch.from_numpy(record.labels.astype(np.int64))
        preds = first_argmax(logits)
        t0 = time.thread_time()
        image_stats(probs, labels, validate_args=False, preds=preds)
        times.append(time.thread_time() - t0)
    return float(np.mean(times))


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
        if args.num_actors is not None:
            cfg = cfg.model_copy(update={
                "evaluate": cfg.evaluate.model_copy(update={"num_actors": args.num_actors}),
            })
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
    shards = -(-n // ROWS_PER_SHARD)
    return {
        "images": n, "shards": shards, "seconds": seconds,
        "pixels_per_s": n * args.height * args.width / seconds,
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
    parser.add_argument("--num-actors", type=int, default=None,
                        help="evaluate.num_actors (default: one per free CPU, at most one per "
                             "shard, so 50 images get 1 actor and 500 images get 2 on 2 CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="per image x calibrator cost of each stage, in this process")
    parser.add_argument("--images", type=int, default=16, help="images per shape (--profile)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where --profile scores")
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
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
    print(f"actors: {args.num_actors or 'default'}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'images':>7} {'shards':>7} {'seconds':>8} {'pixels/s':>11} {'RSS base MiB':>13} "
          f"{'RSS peak MiB':>13} {'driver peak MiB':>16}")
    for r in results:
        print(f"{r['images']:>7} {r['shards']:>7} {r['seconds']:>8.1f} {r['pixels_per_s']:>11.3g} "
              f"{r['baseline_mib']:>13.0f} {r['peak_mib']:>13.0f} {r['driver_peak_mib']:>16.0f}")
    if len(results) >= 2:
        first, last = results[0], results[-1]
        ratio = last["peak_mib"] / first["peak_mib"]
        driver = last["driver_peak_mib"] / first["driver_peak_mib"]
        print(f"peak memory ratio {last['images']}/{first['images']} images: {ratio:.3f}x "
              f"(driver + Ray processes), {driver:.3f}x (driver alone); goal <= 1.2x")


if __name__ == "__main__":
    main()
