"""Benchmark of the exact, mergeable metrics (a script, not a test).

    .venv/bin/python benchmarks/metrics.py                 # defaults: ~2-3 min on 2 busy cores
    .venv/bin/python benchmarks/metrics.py --pixels 2e6 --stream 2e7 --tm-drift 0   # quick

Prints, on synthetic 19-class images of ``--size`` squared:
1. the ECE of a ``--stream``-pixel stream (a pool of images replayed, so generation stays
   cheap) beside an independent float64 NumPy reference, at two stream lengths, with our peak
   memory: tracemalloc's high-water mark above the baseline during each ``image_stats`` call
   (numba's small per-block scratch is not traced), and the process's peak RSS;
2. on one input of ``--pixels`` pixels, the throughput of ``image_stats`` (every statistic:
   top-label/boundary/classwise bins, confusion, NLL, Brier, ACE, score histograms), image by
   image and summed with ``+``, on one thread and on as many threads as torch uses (one image
   per thread), beside torchmetrics' ``multiclass_calibration_error`` on the whole
   (N, C, H, W) tensor, and their ratios (wall and CPU time; CPU time counts all threads);
3. torchmetrics' float32 drift: its binning kernel on ``--tm-drift`` top-label confidences with
   a known ECE of 0.05;
4. the public ``pipeline.metrics.ece`` (top-label bins only) beside torchmetrics'
   ``multiclass_calibration_error`` and a bare ``probs.amax(1)`` on the same ``--ece-images``
   x 19 x ``--ece-size``^2 float32 tensor, best of ``--repeat``, with the goals (>= 3x
   torchmetrics, <= 2x amax); with CUDA, also the torch statistics pass
   (:func:`pipeline.metrics.torch_stats.image_stats_torch`) per image on the GPU against
   ``image_stats`` on the CPU (goal >= 20x).
"""

from __future__ import annotations

import argparse
import math
import resource
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_calibration_error
from torchmetrics.functional.classification.calibration_error import _ce_compute

from pipeline.metrics import ImageStats, ece, image_stats
from pipeline.metrics.torch_stats import image_stats_torch


def make_images(n: int, c: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation-like probabilities (n, c, size, size) float32 and labels (n, size, size).

    Labels are blocks of 16x16 pixels (so there are boundaries); the prediction is the label
    on 85% of the blocks and of the pixels, and the logits peak on it (mean confidence ~0.93),
    so the probabilities are over-confident like an uncalibrated network's.
    """
    g = torch.Generator().manual_seed(seed)
    blocks = size // 16
    coarse = torch.randint(0, c, (n, blocks, blocks), generator=g)
    labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)
    wrong = torch.rand(n, size, size, generator=g) > 0.85
    pred = torch.where(wrong, torch.randint(0, c, (n, size, size), generator=g), labels)
    logits = torch.randn(n, c, size, size, generator=g) * 1.5
    logits.scatter_add_(1, pred[:, None], torch.full((n, 1, size, size), 7.0))
    return torch.softmax(logits, dim=1), labels


def reference_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Top-label bins of one image in float64 NumPy, independently of pipeline.metrics."""
    conf = probs.max(0).astype(np.float64).ravel()
    correct = (probs.argmax(0) == labels).ravel()
    # (b/n, (b+1)/n] with 0 in bin 0; conf * n is exact in float64 for float32 conf.
    bins = np.clip(np.ceil(conf * n_bins) - 1, 0, n_bins - 1).astype(np.int64)
    return (
        np.bincount(bins, minlength=n_bins),
        np.bincount(bins, weights=conf, minlength=n_bins),
        np.bincount(bins[correct], minlength=n_bins),
    )


def throughput(args: argparse.Namespace) -> None:
    n = max(1, round(args.pixels / args.size**2))
    probs, labels = make_images(n, args.classes, args.size, args.seed)
    pixels = probs.numel() // args.classes
    print(f"== throughput: {n} images of {args.size}x{args.size}, {args.classes} classes, "
          f"{pixels / 1e6:.1f}M pixels, float32; torch threads: {torch.get_num_threads()}")

    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads)

    def ours() -> ImageStats:
        return sum(image_stats(probs[i], labels[i]) for i in range(n))

    def ours_threads() -> ImageStats:
        # One image per thread: the compiled pass and NumPy's sort release the GIL.
        return sum(pool.map(lambda i: image_stats(probs[i], labels[i]), range(n)))

    def theirs() -> float:
        return float(multiclass_calibration_error(probs, labels, num_classes=args.classes))

    results = {}
    for name, fn in (("ours", ours), ("ours_threads", ours_threads), ("tm", theirs)):
        walls, cpus = [], []
        for _ in range(args.repeat):
            w0, c0 = time.perf_counter(), time.process_time()
            value = fn()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        results[name] = (min(walls), min(cpus), value)
    pool.shutdown()
    w_tm, c_tm, tm_ece = results["tm"]
    labels_ = {
        "ours": "ours image_stats, 1 thread       ",
        "ours_threads": f"ours image_stats, {threads} threads      ",
        "tm": f"torchmetrics, {threads} torch threads    ",
    }
    for name, label in labels_.items():
        wall, cpu, _ = results[name]
        print(f"{label}: wall {wall:6.2f} s  cpu {cpu:6.2f} s  -> "
              f"{pixels / wall / 1e6:6.1f} M pixels/s")
    w1, c1, stats = results["ours"]
    wn = results["ours_threads"][0]
    print(f"speed-up over torchmetrics (best of {args.repeat}): {w_tm / wn:.1f}x wall with "
          f"{threads} threads each, {w_tm / w1:.1f}x wall with our 1 thread, "
          f"{c_tm / c1:.1f}x cpu time")
    print(f"ECE ours {stats.ece():.6f}  torchmetrics {tm_ece:.6f} (float32 sums)  "
          f"[ours also: pixel acc {stats.pixel_acc():.3f}, image-wise ECE "
          f"{stats.image_ece_mean():.4f}, ACE {stats.ace():.4f}, SCE {stats.sce():.5f}, "
          f"NLL {stats.nll():.4f}, mIoU {stats.miou():.3f}, boundary ECE "
          f"{stats.boundary_ece():.4f}, MSP AUROC {stats.msp_auroc():.3f}]")


def stream(args: argparse.Namespace, pool: tuple[torch.Tensor, torch.Tensor], pixels: int) -> None:
    probs, labels = pool
    per_image = args.size**2
    n = max(1, round(pixels / per_image))
    total = ImageStats.zero(args.classes)
    ref_count, ref_correct = np.zeros(15, np.int64), np.zeros(15, np.int64)
    ref_sums: list[np.ndarray] = []
    ref_cache: dict[int, tuple[np.ndarray, ...]] = {}  # the reference's bins of a pool image
    tracemalloc.start()
    peak = 0
    t_ours = 0.0
    for i in range(n):
        p, lab = probs[i % len(probs)], labels[i % len(labels)]
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        total = total + image_stats(p, lab)
        t_ours += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1] - base)
        k = i % len(probs)
        if k not in ref_cache:
            ref_cache[k] = reference_bins(p.numpy(), lab.numpy(), 15)
        count, conf_sum, correct = ref_cache[k]
        ref_count += count
        ref_correct += correct
        ref_sums.append(conf_sum)
    tracemalloc.stop()
    # Exactly rounded sum of the per-image float64 bin sums.
    conf_ref = np.array([math.fsum(col) for col in np.array(ref_sums).T])
    ece_ref = float(np.abs(conf_ref - ref_correct).sum() / ref_count.sum())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"stream {n * per_image / 1e6:7.1f}M pixels: ECE ours {total.ece():.15f}  "
          f"float64 reference {ece_ref:.15f}  |diff| {abs(total.ece() - ece_ref):.1e}  "
          f"ours {n * per_image / t_ours / 1e6:.1f} M px/s  "
          f"peak (tracemalloc, per call) {peak / 2**20:.1f} MiB  process peak RSS {rss:.0f} MiB")


def tm_drift(pixels: int, seed: int) -> None:
    """torchmetrics' float32 binning on confidences 0.95 that are right 90% of the time."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.full((pixels,), 0.95)
    acc = (torch.rand(pixels, generator=g) < 0.9).float()
    true = abs(0.95 - float(acc.double().mean()))
    value = float(_ce_compute(conf, acc, 15, norm="l1"))
    print(f"== torchmetrics float32 drift: {pixels / 1e6:.0f}M pixels, true ECE {true:.4f}, "
          f"torchmetrics {value:.4f}")


def _best(fn, repeat: int, sync: bool = False) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls and the last result."""
    times, value = [], None
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        value = fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), value


def public_ece(args: argparse.Namespace) -> None:
    """Public ece vs torchmetrics vs a bare amax, side by side on one tensor."""
    import os

    probs, labels = make_images(args.ece_images, args.classes, args.ece_size, args.seed + 2)
    ece(probs[:1], labels[:1])  # compile / load from cache
    print(f"== public ece: {tuple(probs.shape)} float32 ({probs.numel() * 4 / 2**20:.0f} MiB), "
          f"torch threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t_amax, _ = _best(lambda: probs.amax(1), args.repeat)
    t_ours, ours = _best(lambda: ece(probs, labels), args.repeat)
    t_tm, tm = _best(lambda: float(multiclass_calibration_error(
        probs, labels, num_classes=args.classes)), args.repeat)
    print(f"probs.amax(1)         {t_amax:7.3f} s")
    print(f"pipeline.metrics.ece  {t_ours:7.3f} s  ECE {ours:.6f}")
    print(f"torchmetrics          {t_tm:7.3f} s  ECE {tm:.6f}")
    print(f"ours vs torchmetrics: {t_tm / t_ours:.1f}x faster (goal >= 3x: "
          f"{'met' if t_tm / t_ours >= 3 else 'MISSED'}); ours / amax: {t_ours / t_amax:.2f}x "
          f"(goal <= 2x: {'met' if t_ours / t_amax <= 2 else 'MISSED'})")
    if not torch.cuda.is_available():
        print("CUDA: not available, GPU figures skipped")
        return
    n = probs.shape[0]
    t_cpu, _ = _best(lambda: [image_stats(probs[i], labels[i]) for i in range(n)], args.repeat)
    gp, gl = probs.cuda(), labels.cuda()
    image_stats_torch(gp[0], gl[0])
    t_gpu, _ = _best(lambda: [image_stats_torch(gp[i], gl[i]) for i in range(n)], args.repeat,
                     sync=True)
    t_gece, _ = _best(lambda: float(multiclass_calibration_error(
        gp, gl, num_classes=args.classes)), args.repeat, sync=True)
    print(f"statistics pass per image: CPU numba {t_cpu / n * 1e3:.1f} ms, CUDA torch "
          f"{t_gpu / n * 1e3:.2f} ms -> {t_cpu / t_gpu:.1f}x (goal >= 20x: "
          f"{'met' if t_cpu / t_gpu >= 20 else 'MISSED'}); torchmetrics on CUDA {t_gece:.3f} s "
          f"for all {n} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=float, default=1e7, help="throughput input size")
    parser.add_argument("--size", type=int, default=512, help="image side (pixels)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeat", type=int, default=2, help="timing repeats (best kept)")
    parser.add_argument("--stream", type=float, default=2e8, help="long stream, pixels")
    parser.add_argument("--pool", type=int, default=8, help="distinct images in the stream")
    parser.add_argument("--tm-drift", type=float, default=4e7, help="0 to skip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ece-images", type=int, default=10, help="0 to skip the ece section")
    parser.add_argument("--ece-size", type=int, default=1024, help="multiple of 16")
    parser.add_argument("--only-ece", action="store_true", help="run only the ece section")
    args = parser.parse_args()
    if args.only_ece:
        public_ece(args)
        return

    t0 = time.perf_counter()
    image_stats(torch.full((args.classes, 8, 8), 1 / args.classes), torch.zeros(8, 8).long())
    print(f"first call (numba compile, or load from its cache): {time.perf_counter() - t0:.2f} s")
    # The stream first, so the process's peak RSS reflects it, not the throughput input.
    print(f"== stream: {args.pool} distinct {args.size}x{args.size} images replayed; "
          "float64 reference in NumPy")
    pool = make_images(args.pool, args.classes, args.size, args.seed + 1)
    for pixels in (args.stream / 4, args.stream):
        stream(args, pool, int(pixels))
    throughput(args)
    if args.tm_drift:
        tm_drift(int(args.tm_drift), args.seed)
    if args.ece_images:
        public_ece(args)


if __name__ == "__main__":
    main()
