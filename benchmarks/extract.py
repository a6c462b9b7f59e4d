"""Benchmark stage 1: the pipeline's Ray Data extraction against a plain torch loop.

Both run the same model over the same images:

(a) a single-process loop: decode each image with PIL, run the model in batches, keep nothing;
(b) ``pipeline.extract.run`` on local Ray: decode tasks, an actor pool, shards written.

Prints images/s for both and their ratio, Ray's start-up time on its own, and the shard bytes
per image against raw float32 logits. By default it uses ESPNet on CamVid test images when
../shared is present (or CAMVID_ROOT / SEGCAL_ESPNET_WEIGHTS, or --data / --weights), else a
synthetic small conv net on generated images::

    .venv/bin/python benchmarks/extract.py                   # ESPNet, 40 CamVid test images
    .venv/bin/python benchmarks/extract.py --synthetic --images 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.config import JobConfig, parse_config  # noqa: E402
from pipeline.data import list_samples, load_image  # noqa: E402
from pipeline.models import load_model  # noqa: E402

# ESPNet's input recipe ((bgr - mean) / std) / 255 with mean/std in 0..255 units, BGR order,
# written as the wrapper's (x * scale - mean) / std with scale = 1/255.
ESPNET_MEAN = (110.331055, 108.40889, 105.03321)
ESPNET_STD = (72.12569, 72.690765, 69.904335)


def _default(env: str, fallback: Path) -> Path | None:
    path = Path(os.environ[env]) if os.environ.get(env) else fallback
    return path if path.exists() else None


def espnet_config(data: Path, weights: Path, out: Path, n: int, batch_size: int) -> JobConfig:
    """Config for ESPNet on ``n`` seeded CamVid test images."""
    return parse_config({
        "output": str(out),
        "model": {"kind": "espnet", "path": str(weights), "num_classes": 11,
                  "input_size": [360, 480], "channel_order": "bgr", "scale": 1 / 255,
                  "mean": [m / 255 for m in ESPNET_MEAN], "std": list(ESPNET_STD)},
        "datasets": [{"name": "camvid-test", "role": "test", "domain": "day",
                      "images": str(data / "test"), "labels": str(data / "testannot"),
                      "ignore_index": 11, "limit": n}],
        "extract": {"batch_size": batch_size},
    })


class SmallNet(nn.Module):
    """A small encoder with logits at 1/4 resolution (about 1 GFLOP per 360x480 image)."""

    def __init__(self, num_classes: int = 11) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def synthetic_config(tmp: Path, out: Path, n: int, batch_size: int) -> JobConfig:
    """Config for a TorchScript SmallNet on ``n`` generated 360x480 images."""
    rng = np.random.default_rng(0)
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    yy, xx = np.mgrid[0:360, 0:480]
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        img = 127 + 100 * np.sin(xx[..., None] / 37.0 + yy[..., None] / 23.0 + phase)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(tmp / "img" / f"s{i:04d}.png")
        Image.fromarray(((xx // 48 + yy // 36) % 11).astype(np.uint8)).save(
            tmp / "lab" / f"s{i:04d}.png"
        )
    torch.manual_seed(0)
    torch.jit.script(SmallNet().eval()).save(str(tmp / "small.pt"))
    return parse_config({
        "output": str(out),
        "model": {"kind": "torchscript", "path": str(tmp / "small.pt"), "num_classes": 11},
        "datasets": [{"name": "synthetic", "role": "test", "domain": "day",
                      "images": str(tmp / "img"), "labels": str(tmp / "lab"),
                      "ignore_index": 255}],
        "extract": {"batch_size": batch_size},
    })


def plain_loop(cfg: JobConfig, uris: list[str], batch_size: int) -> tuple[float, tuple]:
    """(a): seconds for decode + model over ``uris`` in one process, and the logits' shape."""
    model = load_model(cfg.model)
    model(torch.from_numpy(load_image(uris[0]))[None])  # warm-up, as the actor's first batch
    start = time.perf_counter()
    for i in range(0, len(uris), batch_size):
        batch = np.stack([load_image(u) for u in uris[i : i + batch_size]])
        logits = model(torch.from_numpy(batch))
    return time.perf_counter() - start, tuple(logits.shape[1:])


def main(argv: list[str] | None = None) -> None:
    """Run (a) and (b) and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_default("CAMVID_ROOT",
                                                               SHARED / "data" / "camvid"))
    parser.add_argument("--weights", type=Path, default=_default(
        "SEGCAL_ESPNET_WEIGHTS", SHARED / "models" / "espnet" / "espnet_p_2_q_8_camvid.pth"))
    parser.add_argument("--synthetic", action="store_true", help="ignore real data and weights")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    args = parser.parse_args(argv)

    import ray

    from pipeline import extract

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        real = not args.synthetic and args.data is not None and args.weights is not None
        if real:
            cfg = espnet_config(args.data, args.weights, tmp / "out", args.images,
                                args.batch_size)
        else:
            cfg = synthetic_config(tmp, tmp / "out", args.images, args.batch_size)
        uris = [s.uri for s in list_samples(cfg.datasets[0])]
        for uri in uris:  # same page cache for both runs
            Path(uri).read_bytes()
        print(f"model: {cfg.model.kind} {cfg.model.path}\nimages: {len(uris)} "
              f"(batch {args.batch_size}), torch threads {torch.get_num_threads()}, "
              f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}", flush=True)

        plain_s, logit_shape = plain_loop(cfg, uris, args.batch_size)
        plain_rate = len(uris) / plain_s
        print(f"(a) plain torch loop:   {plain_s:7.1f} s  {plain_rate:6.2f} images/s", flush=True)

        start = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        (directory,) = extract.run(cfg).values()
        ray_s = time.perf_counter() - start
        ray.shutdown()
        ray_rate = len(uris) / ray_s
        print(f"(b) Ray Data extract:   {ray_s:7.1f} s  {ray_rate:6.2f} images/s "
              f"(ray.init {init_s:.1f} s not included)")
        print(f"(b)/(a) time ratio:     {ray_s / plain_s:.2f}x  (goal <= 1.25x)")

        shard_bytes = sum(p.stat().st_size for p in directory.glob("part-*.parquet"))
        raw = 4 * int(np.prod(logit_shape))
        print(f"shard bytes per image:  {shard_bytes / len(uris) / 1e6:.2f} MB (logits "
              f"float16 + labels + image), raw float32 logits {raw / 1e6:.2f} MB "
              f"{logit_shape}: {shard_bytes / len(uris) / raw:.2f}x")


if __name__ == "__main__":
    main()
