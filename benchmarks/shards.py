"""Benchmark the shard layout: write and read CPU time per image, and bytes, old vs new.

The same records (CamVid frames from ../shared or CAMVID_ROOT, else generated images, with
11 x 90 x 120 float16 logits, labels at full resolution and a 90 x 120 thumbnail: the null
model's output at ``store_stride: 1``) are written and read in two layouts:

- current: one ``fixed_size_binary`` value per image, multi-byte values as byte planes
  (:mod:`pipeline.shards`);
- previous: Arrow ``fixed_shape_tensor`` columns (Parquet lists) with byte-stream split on the
  logits, as shards were written before; :func:`pipeline.shards.read_shard` still reads them.

CPU time, one thread, best of three::

    .venv/bin/python benchmarks/shards.py [--images 64]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.shards import ImageRecord, encode_records, read_shard, write_shard  # noqa: E402

_LEGACY_OPTIONS = {"compression": "zstd",
                   "use_dictionary": ["dataset", "domain", "role", "model_fingerprint"],
                   "use_byte_stream_split": ["logits.list.element"]}


def records(n: int) -> list[ImageRecord]:
    """``n`` records from CamVid val frames when available, else generated ones."""
    data = Path(os.environ.get("CAMVID_ROOT", ROOT.parent / "shared" / "data" / "camvid"))
    files = sorted((data / "val").glob("*.png"))[:n]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if files:
            f = files[i % len(files)]
            image = np.asarray(Image.open(f).convert("RGB"))
            labels = np.asarray(Image.open(data / "valannot" / f.name))
        else:
            image = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
            labels = rng.integers(0, 11, (360, 480), dtype=np.uint8)
        thumb = np.asarray(Image.fromarray(image).resize((120, 90), Image.BILINEAR))
        logits = np.repeat(thumb.transpose(2, 0, 1) / 255.0, 4, axis=0)[:11].astype(np.float16)
        out.append(ImageRecord("bench", "day", "test", f"i{i}", f"i{i}.png", 360, 480, "f" * 64,
                               labels, logits, thumb))
    return out


def legacy_bytes(recs: list[ImageRecord]) -> bytes:
    """The records as a Parquet file in the previous layout (fixed-shape tensor columns)."""
    table = encode_records(recs)
    for name in ("labels", "logits", "image"):
        values = np.stack([getattr(r, name) for r in recs])
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, pa.FixedShapeTensorArray.from_numpy_ndarray(values))
    buf = io.BytesIO()
    pq.write_table(table, buf, **_LEGACY_OPTIONS)
    return buf.getvalue()


def cpu_ms(fn, n: int) -> float:  # noqa: ANN001
    """Best of three runs of ``fn()``, in CPU milliseconds per image."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1000 * best / n


def main(argv: list[str] | None = None) -> None:
    """Print write/read CPU ms per image and MB per image for both layouts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args(argv)
    recs = records(args.images)
    n = len(recs)
    with tempfile.TemporaryDirectory() as tmp:
        new, old = Path(tmp) / "new.parquet", Path(tmp) / "old.parquet"
        write_new = cpu_ms(lambda: write_shard(new, recs), n)
        write_old = cpu_ms(lambda: old.write_bytes(legacy_bytes(recs)), n)
        read_new = cpu_ms(lambda: read_shard(new), n)
        read_old = cpu_ms(lambda: read_shard(old), n)
        size_new, size_old = new.stat().st_size / n / 1e6, old.stat().st_size / n / 1e6
    print(f"{n} images; CPU ms per image (best of 3), MB per image")
    print(f"{'layout':<26}{'write':>8}{'read':>8}{'MB':>8}")
    print(f"{'binary values (current)':<26}{write_new:8.2f}{read_new:8.2f}{size_new:8.3f}")
    print(f"{'fixed-shape tensors':<26}{write_old:8.2f}{read_old:8.2f}{size_old:8.3f}")
    print(f"ratios old/new: write {write_old / write_new:.1f}x, read {read_old / read_new:.1f}x, "
          f"size {size_old / size_new:.2f}x")


if __name__ == "__main__":
    main()
