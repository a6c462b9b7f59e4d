"""Benchmark stage 1: extraction against the model alone and a plain single-process loop.

All three run the same model over the same images, in one run:

(a) the model alone: forward passes on a batch that already sits on the device (no decode, the
    logits stay there): what the hardware can do;
(b) a plain single-process loop: decode each image and label, run the model in batches, copy
    the logits back, keep nothing;
(c) ``pipeline.extract.run`` on local Ray with the stage's default options (plus the flags
    below): decode tasks, the model's actor pool, shards written by the workers.

It also measures the machine's decode-only rate (every CPU decoding image + label pairs in its
own process), since with a near-free model that is the ceiling of any extraction. Printed:
images/s of each, the CPU count, (c)/(b), (c)/min(a, decode-only rate), shard MB per image and
MB/s written, and with ``--precision`` other than fp32 the largest logit difference against
fp32 on the benchmark's images.

Models: ``espnet`` (the authors' CamVid weights, from ../shared or SEGCAL_ESPNET_WEIGHTS),
``deeplab`` (torchvision DeepLabV3-ResNet50 with random weights, 19 classes, on 1024x2048
images; needs torchvision) and ``null`` (a TorchScript module that average-pools the input to
1/4 and repeats it to the class count: near-free, so what remains is the pipeline's own
overhead). Images: CamVid frames (360x480, train + val + test, repeated when ``--images``
exceeds them) from ../shared or CAMVID_ROOT, else generated ones::

    .venv/bin/python benchmarks/extract.py --model null --images 600       # any machine
    .venv/bin/python benchmarks/extract.py --model espnet --device cuda --stride 4
    .venv/bin/python benchmarks/extract.py --model deeplab --device cuda --stride 4 --images 64

``--output URI`` writes the stage's shards to an object store instead of a local folder
(credentials and endpoint from the environment, as for ``segcal``); ``--output local-s3`` starts
an S3 server on loopback for it (moto, from the dev extra: a single Python process on this
machine's CPUs, so a floor for what a real object store costs, not a figure for one)::

    .venv/bin/python benchmarks/extract.py --model null --images 600 --output local-s3
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
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
from pipeline.data import list_samples, load_sample  # noqa: E402
from pipeline.data.readers import Sample  # noqa: E402
from pipeline.models import load_model  # noqa: E402

# ESPNet's input recipe ((bgr - mean) / std) / 255 with mean/std in 0..255 units, BGR order,
# written as the wrapper's (x * scale - mean) / std with scale = 1/255.
ESPNET_MEAN = (110.331055, 108.40889, 105.03321)
ESPNET_STD = (72.12569, 72.690765, 69.904335)


class NullNet(nn.Module):
    """Near-free logits of the configured shape: the input pooled to 1/4, repeated to C."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x, 4, ceil_mode=True)
        reps = (self.num_classes + 2) // 3
        return pooled.repeat(1, reps, 1, 1)[:, : self.num_classes]


def _default(env: str, fallback: Path) -> Path | None:
    path = Path(os.environ[env]) if os.environ.get(env) else fallback
    return path if path.exists() else None


def _link_camvid(data: Path, dest: Path, n: int) -> None:
    """``n`` image/label pairs under ``dest/img`` and ``dest/lab`` as symlinks to CamVid."""
    if (data / "images").is_dir():  # a flat images/ + labels/ copy (the device bundle)
        pairs = [(p, data / "labels" / p.name) for p in sorted((data / "images").glob("*.png"))]
    else:
        pairs = [(p, data / f"{split}annot" / p.name) for split in ("train", "val", "test")
                 for p in sorted((data / split).glob("*.png"))]
    (dest / "img").mkdir(parents=True)
    (dest / "lab").mkdir(parents=True)
    for i in range(n):
        image, label = pairs[i % len(pairs)]
        name = f"{i // len(pairs)}_{image.name}"
        (dest / "img" / name).symlink_to(image)
        (dest / "lab" / name).symlink_to(label)


def _generate(dest: Path, n: int, size: tuple[int, int], num_classes: int) -> None:
    """``n`` seeded PNG image/label pairs of ``size`` under ``dest/img`` and ``dest/lab``."""
    rng = np.random.default_rng(0)
    (dest / "img").mkdir(parents=True)
    (dest / "lab").mkdir(parents=True)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(min(n, 16)):  # 16 distinct frames, linked to reach n
        phase = rng.uniform(0, 6.28, 3)
        img = 127 + 100 * np.sin(xx[..., None] / 37.0 + yy[..., None] / 23.0 + phase)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(dest / "img" / f"f{i:05d}.png")
        lab = ((xx // 48 + yy // 36 + i) % num_classes).astype(np.uint8)
        Image.fromarray(lab).save(dest / "lab" / f"f{i:05d}.png")
    for i in range(16, n):
        for sub in ("img", "lab"):
            (dest / sub / f"f{i:05d}.png").symlink_to(dest / sub / f"f{i % 16:05d}.png")


def build_config(args: argparse.Namespace, tmp: Path) -> JobConfig:
    """The run config for ``args.model`` on ``args.images`` images under ``tmp``."""
    data = tmp / "data"
    num_classes = 19 if args.model == "deeplab" else 11
    if args.model == "deeplab":
        _generate(data, args.images, (1024, 2048), num_classes)
    elif args.data is not None and not args.synthetic:
        _link_camvid(args.data, data, args.images)
    else:
        _generate(data, args.images, (360, 480), num_classes)
    camvid = args.model != "deeplab" and args.data is not None and not args.synthetic
    model: dict = {"num_classes": num_classes}
    if args.model == "espnet":
        if args.weights is None:
            raise SystemExit("--model espnet needs the ESPNet weights (--weights)")
        model.update(kind="espnet", path=str(args.weights), input_size=[360, 480],
                     channel_order="bgr", scale=1 / 255, mean=[m / 255 for m in ESPNET_MEAN],
                     std=list(ESPNET_STD))
    elif args.model == "deeplab":
        from torchvision.models.segmentation import deeplabv3_resnet50

        torch.manual_seed(0)
        path = tmp / "deeplab.pt"
        scripted = torch.jit.script(_TorchvisionOut(deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)))
        scripted.save(str(path))
        model.update(kind="torchscript", path=str(path), mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225])
    else:
        path = tmp / "null.pt"
        torch.jit.script(NullNet(num_classes)).save(str(path))
        model.update(kind="torchscript", path=str(path))
    extract: dict = {"store_stride": args.stride, "precision": args.precision,
                     "actors_per_gpu": args.actors_per_gpu}
    if args.batch_size is not None:
        extract["batch_size"] = args.batch_size
    return parse_config({
        "output": args.output or str(tmp / "out"),
        "model": model,
        "datasets": [{"name": "bench", "role": "test", "domain": "day",
                      "images": str(data / "img"), "labels": str(data / "lab"),
                      "ignore_index": 11 if camvid else 255}],
        "extract": extract,
    })


class _TorchvisionOut(nn.Module):
    """torchvision's dict output as a plain tensor, so the model scripts."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


# --------------------------------------------------------------------------- references


def _decode(sample: Sample) -> int:
    image = np.asarray(Image.open(sample.uri).convert("RGB"))
    labels = np.asarray(Image.open(sample.label_uri))
    return image.shape[0] + labels.shape[0]


def decode_only_rate(samples: list[Sample], procs: int) -> float:
    """Images/s of plain PIL decoding of image + label in ``procs`` processes (the ceiling)."""
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(_decode, samples[:procs])  # start-up and imports outside the timing
        start = time.perf_counter()
        pool.map(_decode, samples, chunksize=8)
        return len(samples) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_alone_rate(cfg: JobConfig, samples: list[Sample], device: torch.device,
                     batch: int, precision: str) -> float:
    """(a): images/s of the model on a batch resident on ``device`` (no decode, no copy back)."""
    model = load_model(cfg.model).to(device)
    images = [load_sample(s, cfg.datasets[0], cfg.model.num_classes)[0]
              for s in samples[:batch]]
    x = torch.from_numpy(np.stack(images)).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    reps = max(3, 64 // batch)
    autocast = contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype)
    with autocast:
        model(x)
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            model(x)
        _sync(device)
    return reps * batch / (time.perf_counter() - start)


def plain_loop_rate(cfg: JobConfig, samples: list[Sample], device: torch.device,
                    batch: int) -> float:
    """(b): images/s of decode + model + logits copied back in one process, nothing kept."""
    model = load_model(cfg.model).to(device)
    ds, c = cfg.datasets[0], cfg.model.num_classes
    model(torch.from_numpy(load_sample(samples[0], ds, c)[0])[None].to(device))  # warm-up
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        images = np.stack([load_sample(s, ds, c)[0] for s in samples[i : i + batch]])
        model(torch.from_numpy(images).to(device)).cpu()
    return len(samples) / (time.perf_counter() - start)


def precision_error(cfg: JobConfig, samples: list[Sample], device: torch.device,
                    precision: str) -> float:
    """Largest |logit - fp32 logit| over the first 8 images under ``precision`` autocast."""
    model = load_model(cfg.model).to(device)
    images = [load_sample(s, cfg.datasets[0], cfg.model.num_classes)[0] for s in samples[:8]]
    x = torch.from_numpy(np.stack(images)).to(device)
    ref = model(x)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast(device.type, dtype=dtype):
        low = model(x).float()
    return float((low - ref).abs().max())


def profile_steps(cfg: JobConfig, samples: list[Sample]) -> None:
    """CPU milliseconds per image of each step of the stage, run in this process, 1 thread.

    CPU time (not wall time) so the figures hold on a busy machine: plain PIL decoding, the
    stage's decode step (PIL plus label checks), the model actor and the shard writer.
    """
    from pipeline import extract

    torch.set_num_threads(1)
    ds, ex = cfg.datasets[0], cfg.extract
    batch = ex.batch_size or extract.default_batch_size(gpu=False)
    items = {"image_id": np.array([s.image_id for s in samples]),
             "uri": np.array([s.uri for s in samples]),
             "label_uri": np.array([s.label_uri or "" for s in samples])}
    predictor = extract.LogitPredictor(cfg.model, ex, threads=1)
    batches = [{k: v[i : i + batch] for k, v in items.items()}
               for i in range(0, len(samples), batch)]
    costs: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        start = time.process_time()
        out = fn(*args, **kwargs)
        costs[name] = costs.get(name, 0.0) + time.process_time() - start
        return out

    out_dir = Path(tempfile.mkdtemp())
    for s in samples:
        timed("plain PIL decode", _decode, s)
    for b in batches:
        decoded = timed("decode step", extract.decode_batch, b, cfg=ds,
                        num_classes=cfg.model.num_classes)
        predicted = timed("model actor", predictor, decoded)
        timed("shard writer", extract.write_shards, predicted, directory=str(out_dir),
              dataset=ds.name, domain=ds.domain, role=ds.role, fingerprint="f" * 64,
              store_image=ex.store_image)
    for name, seconds in costs.items():
        print(f"    {name:<18} {1000 * seconds / len(samples):7.2f} CPU ms per image")


@contextlib.contextmanager
def _output(args: argparse.Namespace, tmp: Path):  # noqa: ANN202
    """``--output local-s3``: an S3 server on loopback for the run (its env set meanwhile)."""
    if args.output != "local-s3":
        yield
        return
    from tests.s3_helpers import BUCKET, as_client, s3_server

    with s3_server() as env, as_client({**env, "SEGCAL_CACHE": str(tmp / "cache")}):
        args.output = f"s3://{BUCKET}/bench"
        yield


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Run (a), (b), the decode-only rate and (c), and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["espnet", "deeplab", "null"], default=None,
                        help="default: espnet when its weights are found, else null")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: cuda when available")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--stride", type=int, choices=[1, 2, 4], default=1,
                        help="extract.store_stride (the stage's default is 1)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--actors-per-gpu", type=int, default=1,
                        help="extract.actors_per_gpu: model actors sharing each GPU")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="extract.batch_size (default: the stage's default)")
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all)")
    parser.add_argument("--data", type=Path, default=_default("CAMVID_ROOT",
                                                               SHARED / "data" / "camvid"))
    parser.add_argument("--weights", type=Path, default=_default(
        "SEGCAL_ESPNET_WEIGHTS", SHARED / "models" / "espnet" / "espnet_p_2_q_8_camvid.pth"))
    parser.add_argument("--synthetic", action="store_true", help="generated images, not CamVid")
    parser.add_argument("--stats", action="store_true",
                        help="print Ray Data's per-stage statistics of the stage run")
    parser.add_argument("--output", default=None,
                        help="write the shards to this URI (s3://bucket/folder, ...), or "
                             "`local-s3`: to an S3 server started on loopback")
    parser.add_argument("--profile", action="store_true",
                        help="also print CPU ms per image of each step (in-process)")
    args = parser.parse_args(argv)
    args.model = args.model or ("espnet" if args.weights is not None else "null")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    import logging

    import ray

    from pipeline import extract

    if args.stats:
        logging.basicConfig(level=logging.WARNING)
        logging.getLogger("pipeline.extract").setLevel(logging.DEBUG)

    cpus = args.num_cpus or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp_name, _output(args, Path(tmp_name)):
        tmp = Path(tmp_name)
        cfg = build_config(args, tmp)
        batch = cfg.extract.batch_size or extract.default_batch_size(device.type == "cuda")
        camvid = args.model != "deeplab" and args.data is not None and not args.synthetic
        samples = list_samples(cfg.datasets[0])
        for s in samples:  # the same page cache for every measurement
            Path(s.uri).read_bytes()
            Path(s.label_uri or s.uri).read_bytes()
        print(f"model: {args.model} on {device}, precision {args.precision}, "
              f"store_stride {args.stride}, batch {batch}\nimages: {len(samples)} "
              f"{'CamVid' if camvid else 'generated'}, "
              f"cpus {cpus}, load average {os.getloadavg()[0]:.1f}", flush=True)

        if args.profile:
            print("profile (CPU time, one thread, no Ray):")
            profile_steps(cfg, samples)
        alone = model_alone_rate(cfg, samples, device, batch, args.precision)
        print(f"(a) model alone:              {alone:8.1f} images/s", flush=True)
        plain = plain_loop_rate(cfg, samples, device, batch)
        print(f"(b) plain single-process loop: {plain:8.1f} images/s", flush=True)
        decode = decode_only_rate(samples, cpus)
        print(f"    decode only, {cpus} processes:  {decode:8.1f} images/s", flush=True)
        if args.precision != "fp32":
            err = precision_error(cfg, samples, device, args.precision)
            print(f"    {args.precision} vs fp32: largest logit difference {err:.4g}")

        start = time.perf_counter()
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        init_s = time.perf_counter() - start
        from pipeline.storage import mirrored

        with mirrored(cfg) as run_cfg:
            start = time.perf_counter()
            (directory,) = extract.run(run_cfg).values()
            stage_s = time.perf_counter() - start
        ray.shutdown()
        stage = len(samples) / stage_s
        shard_bytes = sum(p.stat().st_size for p in directory.glob("part-*.parquet"))
        if args.output:
            print(f"    shards written to {directory}")
        print(f"(c) pipeline.extract.run:     {stage:8.1f} images/s "
              f"({stage_s:.1f} s; ray.init {init_s:.1f} s not included)")
        ceiling = min(alone, decode)
        print(f"(c)/(b) = {stage / plain:.2f}x    (c)/min(a, decode-only) = "
              f"{stage / ceiling:.2f}x")
        print(f"shards: {shard_bytes / len(samples) / 1e6:.3f} MB per image, "
              f"{shard_bytes / stage_s / 1e6:.1f} MB/s written")


if __name__ == "__main__":
    main()
