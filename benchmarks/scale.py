"""Scale on paper: shard storage, extraction and evaluation hours for public val sets.

    .venv/bin/python benchmarks/scale.py
    .venv/bin/python benchmarks/scale.py --gpu-images-per-s 25 --calibrators 8 --workers 1 8 32

Two parts, kept apart in the output:

MEASURED here, per image, on synthetic images with each dataset's shapes (a few images, a few
repeats; ``torch.set_num_threads(1)``, so every CPU figure is one core's; CPU time of this
process, which the other jobs on a shared machine inflate less than wall time):

- shard bytes: a shard of ``--shard-images`` images written with
  :func:`pipeline.shards.write_shard` (labels, float16 logits and the stored RGB image, as
  ``extract.store_image`` does by default), file size / images, split by column;
- writer CPU: that ``write_shard`` call (encode, zstd, sha256, atomic write). In stage 1 write
  tasks do this on any free CPU of the cluster (see ``pipeline/extract.py``);
- decode CPU: one input image and its label PNG at label resolution through
  :func:`pipeline.data.decode.load_image` / ``load_label`` (synthetic flat-region images, which
  decode faster than photographs: a lower bound). Decode tasks run on any free CPU too;
- reduce CPU: the ``store_stride`` area reduction and float16 cast on a CPU
  (``pipeline.extract.reduce_logits``): the model actor's cost on CPU-only clusters; with a GPU it
  runs on the device and costs the host nothing;
- evaluation: shard read (sha256 + :func:`pipeline.shards.read_shard`), per image;
  :func:`pipeline.shards.upsample_logits` to label resolution; and one calibration, i.e.
  :func:`pipeline.evaluate.image_rows` with one fitted temperature calibrator (calibrate, float32
  softmax, :func:`pipeline.metrics.image_stats`) minus the upsample it includes; plus the
  peak RSS of that call (``VmHWM``, reset through ``/proc/self/clear_refs``).

EXTRAPOLATED from those figures (nothing below is measured): storage = bytes/image x images;
evaluation = read + upsample + (K + 1) x calibration per image (K calibrators plus
``uncalibrated``, each costed as temperature scaling: a lower bound for LTS or selective
scaling) on N single-core workers, one Ray Data work item per shard of ``--rows-per-shard``
images as ``pipeline.evaluate`` schedules them; extraction = images / (N x min(G, CPU cap)) on
N GPUs, the CPU cap being ``--cpus-per-gpu`` / (decode + writer CPU s), what the CPUs beside
one GPU can decode and write per second; G = ``--gpu-images-per-s`` is an ASSUMPTION about the
model (no GPU here), never measured. Ray's fixed start-up per stage call (about 8 s on the H200
node, ``benchmarks/results/``) is not included.

Synthetic logits are smooth, not white noise, because zstd's ratio depends on it: per-class
offsets plus bicubic-upsampled Gaussian fields at four scales (fractions of the image height),
drawn at the model's native output resolution and, for models that return full-resolution
logits, upsampled bilinearly as SegFormer does. The scales were tuned so that on CamVid's shape
the logits column compresses like real ESPNet CamVid logits; when the ESPNet weights and CamVid
are present (``SEGCAL_ESPNET_WEIGHTS`` / ``CAMVID_ROOT`` or ../shared) the script re-checks that
anchor first (and the stored-image generator against real CamVid frames). Labels are the argmax
of perturbed logits (piecewise constant, like real labels); images are flat-coloured regions with
shading and faint noise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812

from pipeline.calibrators import build_calibrator  # noqa: E402
from pipeline.config import EvalConfig, ExtractConfig  # noqa: E402
from pipeline.data.decode import load_image, load_label  # noqa: E402
from pipeline.evaluate import image_rows  # noqa: E402
from pipeline.extract import reduce_logits  # noqa: E402  (the actor's own reduction)
from pipeline.shards import (  # noqa: E402
    ImageRecord,
    file_sha256,
    read_shard,
    upsample_logits,
    write_shard,
)

IGNORE_INDEX = 255
# (fraction of the image height, amplitude) of the smooth fields, and the per-class offset
# std: tuned on ESPNet CamVid logits (std ~3, mean |lag-1 difference| ~0.25 per input pixel).
SCALES = ((1 / 180, 0.36), (1 / 90, 0.36), (1 / 22, 0.6), (1 / 5.6, 1.2))
OFFSET_STD = 2.5


@dataclass(frozen=True)
class Spec:
    """One dataset as extracted: image count, classes and every resolution involved.

    ``native`` is the model's own output resolution; ``output`` what the model wrapper returns
    (``native``, or label resolution for models that upsample); ``stride`` is
    ``extract.store_stride``, applied to ``output``.
    """

    name: str
    images: int
    classes: int
    labels: tuple[int, int]
    native: tuple[int, int]
    output: tuple[int, int]
    stride: int

    @property
    def stored(self) -> tuple[int, int]:
        """Resolution of the stored logits (``reduce_logits`` rounds up)."""
        return math.ceil(self.output[0] / self.stride), math.ceil(self.output[1] / self.stride)


SPECS = (
    # SegFormer-style: 512x512 input, logits at 1/4, labels ~512x683 (resized short side).
    Spec("ADE20K val", 2000, 150, (512, 683), (128, 128), (128, 128), 1),
    # Logits returned at full resolution (upsampled from 1/4), stored at stride 4 or 1.
    Spec("Cityscapes val", 500, 19, (1024, 2048), (256, 512), (1024, 2048), 4),
    Spec("Cityscapes val", 500, 19, (1024, 2048), (256, 512), (1024, 2048), 1),
    Spec("BDD100K val", 1000, 19, (720, 1280), (180, 320), (720, 1280), 4),
)


def smooth_logits(classes: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """(C, H, W) float32 synthetic logits at a model's native output resolution."""
    h, w = size
    x = (OFFSET_STD * torch.randn(classes, 1, 1, generator=g)).expand(classes, h, w).clone()
    for fraction, amplitude in SCALES:
        gh = min(h, max(2, round(1 / fraction)))
        gw = min(w, max(2, round(gh * w / h)))
        z = torch.randn(1, classes, gh, gw, generator=g)
        x += amplitude * F.interpolate(z, size=(h, w), mode="bicubic", align_corners=False)[0]
    return x


def synthetic_image(regions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: one colour per region of ``regions`` (H, W), shading and faint noise.

    Flat regions with slight noise compress in a shard like real CamVid frames (about 0.9x
    raw); a smooth gradient with stronger noise would compress worse than raw.
    """
    palette = rng.integers(0, 256, (int(regions.max()) + 1, 3))
    yy, xx = np.mgrid[0 : regions.shape[0], 0 : regions.shape[1]]
    img = palette[regions] + 20 * np.sin(xx[..., None] / 50 + yy[..., None] / 70)
    return np.clip(img + rng.normal(0, 1, img.shape), 0, 255).astype(np.uint8)


def make_record(spec: Spec, i: int, seed: int) -> tuple[ImageRecord, float]:
    """One synthetic image as the extract stage stores it, and the actor CPU s it took."""
    g = torch.Generator().manual_seed(seed * 1000 + i)
    native = smooth_logits(spec.classes, spec.native, g)
    # Labels: argmax of the logits plus a coarse perturbation, so that the model is mostly
    # right and the labels are piecewise constant like real ones.
    noisy = native + 2.0 * smooth_logits(spec.classes, spec.native, g)
    labels = upsample_logits(noisy, spec.labels).argmax(0).numpy().astype(np.uint8)
    output = native
    if spec.output != spec.native:
        output = F.interpolate(native[None], size=spec.output, mode="bilinear",
                               align_corners=False)[0]
    start = time.process_time()
    stored = reduce_logits(output, spec.stride).to(torch.float16).contiguous().numpy()
    actor_s = time.process_time() - start
    record = ImageRecord(
        dataset=spec.name, domain="day", role="test", image_id=f"img{i:05d}",
        uri=f"img{i:05d}.png", height=spec.labels[0], width=spec.labels[1],
        model_fingerprint="synthetic", labels=labels, logits=stored,
        image=synthetic_image(stored.argmax(0), np.random.default_rng(seed * 1000 + i)),
    )
    return record, actor_s


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median CPU and wall seconds of ``fn`` over ``repeats`` calls, after a warm-up call."""
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        start, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - start)
        wall.append(time.perf_counter() - start_wall)
    return float(np.median(cpu)), float(np.median(wall))


def _rss_mib(fn: Callable[[], object]) -> tuple[float, float]:
    """This process's resident memory (MiB) before ``fn`` and at its peak while it runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_mib("VmRSS")
    fn()
    return before, _status_mib("VmHWM")


def _status_mib(key: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith(key)).split()[1]) / 1024


def measure(spec: Spec, n_images: int, repeats: int, seed: int, tmp: Path) -> dict[str, float]:
    """The measured per-image figures of one dataset."""
    made = [make_record(spec, i, seed) for i in range(n_images)]
    records = [r for r, _ in made]
    out: dict[str, float] = {"actor_s": float(np.median([s for _, s in made]))}

    path = tmp / f"{spec.name.split()[0]}-s{spec.stride}.parquet"
    cpu, wall = timed(lambda: write_shard(path, records), repeats)
    out["writer_s"], out["writer_wall_s"] = cpu / n_images, wall / n_images
    out["bytes"] = path.stat().st_size / n_images
    out["decode_s"] = _decode_s(spec, seed, tmp, repeats)
    out.update({f"bytes_{k}": v for k, v in _column_sizes(path, n_images).items()})
    r = records[0]
    out["raw_bytes"] = r.logits.nbytes + r.labels.nbytes + r.image.nbytes

    def read() -> None:
        file_sha256(path)
        read_shard(path)

    out["read_s"] = timed(read, repeats)[0] / n_images
    record = read_shard(path)[0]  # read-only Arrow views, as evaluation gets them
    made.clear()  # frees the written images; evaluation reads them back
    records.clear()
    size = (record.height, record.width)
    out["upsample_s"] = timed(lambda: upsample_logits(record.logits, size), repeats)[0]

    g = torch.Generator().manual_seed(seed)
    ts = build_calibrator("temperature", spec.classes).fit(
        torch.randn(4096, spec.classes, generator=g) * 4,
        torch.randint(0, spec.classes, (4096,), generator=g),
    )
    ev = EvalConfig()

    def rows() -> None:
        image_rows(record, {"temperature": ts},
                   meta={"dataset": spec.name, "domain": "day", "reference": None,
                         "role": "test"},
                   n_bins=ev.n_bins, boundary_width=ev.boundary_width,
                   ignore_index=IGNORE_INDEX)

    out["rows_s"] = timed(rows, repeats)[0]
    out["calibration_s"] = max(out["rows_s"] - out["upsample_s"], 0.0)
    out["rss_before_mib"], out["peak_mib"] = _rss_mib(rows)
    upsampled = upsample_logits(record.logits, size)
    out["softmax_s"] = timed(lambda: torch.softmax(upsampled, dim=0), repeats)[0]
    return out


def _decode_s(spec: Spec, seed: int, tmp: Path, repeats: int) -> float:
    """CPU s to decode one synthetic input PNG and its label PNG at label resolution."""
    from PIL import Image

    h, w = spec.labels
    regions = np.add.outer(np.arange(h) // 37, np.arange(w) // 53) % 7
    image, label = tmp / "decode-image.png", tmp / "decode-label.png"
    Image.fromarray(synthetic_image(regions, np.random.default_rng(seed))).save(image)
    Image.fromarray(regions.astype(np.uint8)).save(label)
    return timed(lambda: (load_image(str(image)), load_label(str(label))), repeats)[0]


def _column_bytes(records: list[ImageRecord], column: str, tmp: Path) -> float:
    """Compressed bytes per image of one column in a shard of ``records``."""
    path = tmp / "column.parquet"
    write_shard(path, records)
    return _column_sizes(path, len(records))[column]


def _column_sizes(path: Path, n_images: int) -> dict[str, float]:
    """Compressed bytes per image of the logits, labels and image columns of a shard."""
    meta = pq.ParquetFile(path).metadata
    sizes = dict.fromkeys(("logits", "labels", "image"), 0.0)
    for k in range(meta.num_row_groups):
        group = meta.row_group(k)
        for j in range(group.num_columns):
            name = group.column(j).path_in_schema.split(".")[0]
            if name in sizes:
                sizes[name] += group.column(j).total_compressed_size / n_images
    return sizes


def anchor(seed: int, tmp: Path) -> dict[str, float] | None:
    """Shard MB/image of real ESPNet CamVid logits and frames, and of the generators."""
    weights = Path(os.environ.get("SEGCAL_ESPNET_WEIGHTS")
                   or SHARED / "models/espnet/espnet_p_2_q_8_camvid.pth")
    data = Path(os.environ.get("CAMVID_ROOT") or SHARED / "data/camvid")
    if not (weights.is_file() and (data / "test").is_dir()):
        return None
    from pipeline.config import load_config  # noqa: PLC0415
    from pipeline.data import load_image  # noqa: PLC0415
    from pipeline.models import load_model  # noqa: PLC0415

    # The demo's own model section (recipe, dropped void channel), with these weights.
    os.environ["SEGCAL_ESPNET_WEIGHTS"] = str(weights)
    os.environ["CAMVID_ROOT"] = str(data)
    model = load_model(load_config(ROOT / "configs" / "camvid_quick.yaml").model).eval()
    frames = [load_image(str(u)) for u in sorted((data / "test").glob("*.png"))[:2]]
    with torch.inference_mode():
        real = [model(torch.from_numpy(f)[None])[0].float() for f in frames]
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    c, h, w = real[0].shape
    fake = [smooth_logits(c, (h, w), g) for _ in frames]

    def shard(logits: list[torch.Tensor], images: list[np.ndarray]) -> list[ImageRecord]:
        return [
            ImageRecord("camvid", "day", "test", f"i{i}", "u", h, w, "fp",
                        np.zeros((h, w), np.uint8), x.to(torch.float16).numpy(), im)
            for i, (x, im) in enumerate(zip(logits, images, strict=True))
        ]

    fake_images = [synthetic_image(x.argmax(0).numpy(), rng) for x in fake]
    return {
        "real_logits": _column_bytes(shard(real, frames), "logits", tmp),
        "fake_logits": _column_bytes(shard(fake, frames), "logits", tmp),
        "real_image": _column_bytes(shard(real, frames), "image", tmp),
        "fake_image": _column_bytes(shard(real, fake_images), "image", tmp),
        "raw_image": frames[0].nbytes,
    }


def _label(spec: Spec) -> str:
    return f"{spec.name} (stride {spec.stride})"


def _shape(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def _hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:.2g}" if hours < 10 else f"{hours:.0f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.2g} min" if seconds < 3600 else f"{seconds / 3600:.2g} h"


@dataclass(frozen=True)
class Plan:
    """Extrapolated costs of one dataset (seconds unless named otherwise)."""

    worker_mib: float  # one evaluation worker: process baseline + one image's working set

    eval_per_image: float  # CPU s per image: read + upsample + (K + 1) calibrations
    eval_walls: list[float]  # per N in --workers
    busy: int  # evaluation workers with work at the largest N (one shard each at most)
    cpu_cap: float  # images/s the CPUs beside one GPU can decode and write
    per_gpu: float  # images/s one GPU delivers: min(G, cpu_cap)
    extract_walls: list[float]  # per N GPUs


def plan(
    spec: Spec, m: dict[str, float], args: argparse.Namespace, baseline_mib: float
) -> Plan:
    """Extrapolate one dataset's measured per-image figures (see the module docstring)."""
    per_image = m["read_s"] + m["upsample_s"] + (args.calibrators + 1) * m["calibration_s"]
    shards = math.ceil(spec.images / args.rows_per_shard)
    shard_s = min(args.rows_per_shard, spec.images) * per_image
    cpu_cap = args.cpus_per_gpu / (m["decode_s"] + m["writer_s"])
    per_gpu = min(args.gpu_images_per_s, cpu_cap)
    return Plan(
        worker_mib=baseline_mib + m["peak_mib"] - m["rss_before_mib"],
        eval_per_image=per_image,
        eval_walls=[math.ceil(shards / n) * shard_s for n in args.workers],
        busy=min(args.workers[-1], shards),
        cpu_cap=cpu_cap,
        per_gpu=per_gpu,
        extract_walls=[spec.images / (n * per_gpu) for n in args.workers],
    )


def verdict(spec: Spec, m: dict[str, float], p: Plan, args: argparse.Namespace) -> str:
    """Plain words: what limits this dataset first, and which stage dominates."""
    n = args.workers[-1]
    parts = []
    if p.cpu_cap < args.gpu_images_per_s:
        parts.append(f"the {args.cpus_per_gpu} CPUs beside each GPU decode and write only "
                     f"{p.cpu_cap:.1f} img/s, below the GPU's assumed {args.gpu_images_per_s:g}")
    else:
        parts.append(f"extraction is GPU-bound (its CPUs could feed {p.cpu_cap:.0f} img/s per "
                     "GPU) and scales with the GPU count")
    if p.busy < n:
        parts.append(f"evaluation spreads over only {p.busy} workers "
                     f"({math.ceil(spec.images / args.rows_per_shard)} shards)")
    parts.append(f"at N={n}, evaluation takes {_minutes(p.eval_walls[-1])} against "
                 f"extraction's {_minutes(p.extract_walls[-1])}, so "
                 + ("evaluation CPU dominates" if p.eval_walls[-1] > p.extract_walls[-1]
                    else "extraction dominates"))
    parts.append(f"storage {spec.images * m['bytes'] / 1e9:.1f} GB")
    return f"- **{_label(spec)}**: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-images-per-s", type=float, default=10.0,
                        help="ASSUMED model throughput per GPU (images/s), not measured")
    parser.add_argument("--cpus-per-gpu", type=int, default=16,
                        help="CPUs beside each GPU for decode and write tasks (16: one H200 node)")
    parser.add_argument("--calibrators", type=int, default=8,
                        help="K calibrators evaluated (plus uncalibrated)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32],
                        help="N: CPU evaluation workers, and GPUs for extraction")
    parser.add_argument("--shard-images", type=int, default=3,
                        help="synthetic images per measured shard (2 for full-res Cityscapes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows-per-shard", type=int, default=ExtractConfig().rows_per_shard)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-anchor", action="store_true",
                        help="skip the real ESPNet CamVid check of the generators")
    args = parser.parse_args()
    args.workers = sorted(args.workers)
    torch.set_num_threads(1)
    started = time.perf_counter()
    baseline_mib = _status_mib("VmRSS")  # after imports: about what an evaluator starts with
    K, G, workers = args.calibrators, args.gpu_images_per_s, args.workers  # noqa: N806

    print("# segcal scale on paper\n")
    print(f"torch.set_num_threads(1): every CPU figure is one core's. {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}. Times are CPU seconds of this process, "
          f"median of {args.repeats} repeats after a warm-up. Process RSS after imports "
          f"{baseline_mib:.0f} MiB.\n")

    with tempfile.TemporaryDirectory(prefix="segcal-scale-") as tmp:
        check = None if args.skip_anchor else anchor(args.seed, Path(tmp))
        results = []
        for spec in SPECS:
            n = min(args.shard_images, 2) if spec.stored == spec.labels else args.shard_images
            results.append((spec, measure(spec, n, args.repeats, args.seed, Path(tmp))))

    print("## Measured on this machine (per image, 1 thread)\n")
    if check is None:
        why = "--skip-anchor" if args.skip_anchor else "no ESPNet weights or CamVid found"
        print(f"Generator check: skipped ({why}).\n")
    else:
        print(f"Generator check, CamVid 360x480, 2 test images, shard MB/image: logits "
              f"(11 classes) real ESPNet {check['real_logits'] / 1e6:.2f} vs synthetic "
              f"{check['fake_logits'] / 1e6:.2f}; stored image real "
              f"{check['real_image'] / 1e6:.2f} vs synthetic {check['fake_image'] / 1e6:.2f} "
              f"(raw {check['raw_image'] / 1e6:.2f}).\n")
    print("| dataset | C | labels | stored logits | shard MB/img (logits / labels / image) "
          "| raw MB/img between stages | decode CPU s/img | writer CPU (wall) s/img "
          "| reduce CPU s/img | read s/img "
          "| upsample s/img | calibration s/img (softmax64 alone) "
          "| eval RSS MiB (before / peak) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec, m in results:
        print(f"| {_label(spec)} | {spec.classes} | {_shape(spec.labels)} | "
              f"{_shape(spec.stored)} | {m['bytes'] / 1e6:.2f} ({m['bytes_logits'] / 1e6:.2f} / "
              f"{m['bytes_labels'] / 1e6:.3f} / {m['bytes_image'] / 1e6:.3f}) | "
              f"{m['raw_bytes'] / 1e6:.1f} | {m['decode_s']:.3f} | "
              f"{m['writer_s']:.3f} ({m['writer_wall_s']:.3f}) | "
              f"{m['actor_s']:.3f} | "
              f"{m['read_s']:.3f} | {m['upsample_s']:.3f} | {m['calibration_s']:.3f} "
              f"({m['softmax_s']:.3f}) | "
              f"{m['rss_before_mib']:.0f} / {m['peak_mib']:.0f} |")
    print("\nwriter = pipeline.shards.write_shard (encode, zstd, sha256, write, fsync; its wall "
          "time also counts the wait for a shared CPU and for the disk); decode = input and "
          "label PNG (synthetic, a lower bound for photographs); reduce = "
          "store_stride reduction + float16 cast on a CPU (on the GPU with one); "
          "read = sha256 + read_shard; calibration = "
          "pipeline.evaluate.image_rows with one temperature calibrator (calibrate, softmax, "
          "image_stats) minus upsample; softmax = torch.softmax alone on the "
          "upsampled logits; RSS = this whole process around that call.\n")

    plans = [(spec, m, plan(spec, m, args, baseline_mib)) for spec, m in results]
    print("## Extrapolated from the measured figures (not measured)\n")
    print(f"### Storage and evaluation: K = {K} calibrators + uncalibrated, N single-core "
          f"workers, one work item per shard of {args.rows_per_shard} images\n")
    print("| dataset | images | shards GB | eval CPU s/img | eval core-h | "
          + " | ".join(f"wall h, N={n}" for n in workers)
          + f" | busy workers at N={workers[-1]} | RAM for them, GiB |")
    print("|---|---|---|---|---|" + "---|" * len(workers) + "---|---|")
    for spec, m, p in plans:
        print(f"| {_label(spec)} | {spec.images} | {spec.images * m['bytes'] / 1e9:.1f} | "
              f"{p.eval_per_image:.2f} | {_hours(spec.images * p.eval_per_image)} | "
              + " | ".join(_hours(w) for w in p.eval_walls)
              + f" | {p.busy} | {p.busy * p.worker_mib / 1024:.0f} |")
    print("\neval CPU s/img = read + upsample + (K + 1) x calibration, every calibrator costed "
          "as temperature scaling (LTS, selective scaling cost more). wall = ceil(shards / N) "
          "x one shard's time: a shard is the unit of work, so workers beyond the shard count "
          "idle (a smaller `rows_per_shard` spreads small sets). RAM = busy workers x (RSS after "
          "imports + the peak's rise over its before), Ray's own per-worker overhead "
          "excluded.\n")

    print(f"### Extraction: G = {G:g} images/s per GPU, an ASSUMPTION (no GPU here), "
          "not a measurement\n")
    print(f"| dataset | CPU cap img/s per GPU ({args.cpus_per_gpu} CPUs) | img/s per GPU | "
          + " | ".join(f"wall h, N={n} GPUs" for n in workers) + " |")
    print("|---|---|---|" + "---|" * len(workers))
    for spec, _, p in plans:
        print(f"| {_label(spec)} | {p.cpu_cap:.0f} | {p.per_gpu:.1f} | "
              + " | ".join(_hours(w) for w in p.extract_walls) + " |")
    print(f"\nwall = images / (N x min(G, CPU cap)); CPU cap = {args.cpus_per_gpu} / (decode + "
          "writer CPU s): decode and write tasks run on every CPU beside the GPUs, and the "
          "driver only collects shard metadata. Not included: host-device copies, object-store "
          "transfers between the stages (raw MB/img above), Ray's start-up (~8 s per stage "
          "call on the H200 node) and scheduling.\n")

    print(f"### Where it bottlenecks first (G = {G:g} img/s per GPU assumed, K = {K})\n")
    for spec, m, p in plans:
        print(verdict(spec, m, p, args))
    print(f"\nscript wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
