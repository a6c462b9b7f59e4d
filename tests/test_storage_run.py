"""``segcal run`` with ``output: s3://...``: every stage against a real S3 server on loopback.

The run folder lives at the URI: shards and manifests are written there by Ray Data's write
tasks and read there by Ray Train's workers (which keep their checkpoints there too); the rest
is pushed from the driver's mirror. A second machine (another cache folder)
sees the run as current; a manifest lost at the URI is rebuilt from the shards already there;
an image changed at its source is extracted again and its old shard replaced at the URI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.models import load_model, model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import iter_dataset, read_manifest
from tests.extract_helpers import NUM_CLASSES, write_pairs
from tests.s3_helpers import BUCKET, as_client, s3_server

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
URI = f"s3://{BUCKET}/runs/toy"


def _segcal(env: dict, *argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "segcal"), *argv], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _stages(done: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in done.stdout.splitlines()
                if line.split(":")[0] in ("extract", "fit", "evaluate", "report"))


def test_run_with_its_output_on_s3(tmp_path):
    write_pairs(tmp_path / "cal", 6, (12, 16), seed=0)
    write_pairs(tmp_path / "test", 4, (12, 16), seed=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output": URI,
        "model": {"kind": "python", "path": "tests.extract_helpers:tiny_net",
                  "num_classes": NUM_CLASSES},
        "datasets": [
            {"name": "cal", "role": "calibration", "domain": "day",
             "images": str(tmp_path / "cal" / "img"), "labels": str(tmp_path / "cal" / "lab")},
            {"name": "test", "role": "test", "domain": "day",
             "images": str(tmp_path / "test" / "img"), "labels": str(tmp_path / "test" / "lab")},
        ],
        "extract": {"batch_size": 2, "rows_per_shard": 2, "num_actors": 1},
        "calibrators": [{"name": "temperature", "label": "ts"}],
        "fit": {"mode": "ray", "num_workers": 1, "epochs": 2, "pixels_per_image": 64},
        "evaluate": {"bootstrap": 0, "num_actors": 1},
    }))
    with s3_server() as s3env, as_client(s3env):
        import fsspec

        fs = fsspec.filesystem("s3")
        env = {**os.environ, "SEGCAL_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)

        first = _segcal(env, "run", str(config))
        assert set(_stages(first).values()) == {"ran"}

        cfg = load_config(config)
        paths = RunPaths(Path("/unused"), model_fingerprint(cfg.model), store=URI)
        keys = {p[len(URI) - 5 + 1:] for p in fs.find(URI)}  # relative to the run folder
        shards_at = f"shards/{paths.model_fingerprint[:12]}"
        for name in ("config.resolved.yaml", "summary.csv", "per_image.parquet", "report.html",
                     "artifacts/ts/calibrator.json", "artifacts/ts/model.safetensors",
                     ".stages/evaluate.json", f"{shards_at}/cal/manifest.json",
                     f"{shards_at}/test/manifest.json"):
            assert name in keys, f"{name} is not at {URI}: {sorted(keys)}"
        assert not [k for k in keys if k.endswith((".tmp", ".lock"))]
        resolved = yaml.safe_load(fs.cat_file(f"{URI}/config.resolved.yaml"))
        assert resolved["output"] == URI

        # The shards at the URI hold the model's logits (to float16).
        model = load_model(cfg.model)
        manifest = read_manifest(paths.dataset_dir("cal"))
        assert manifest.n_images == 6
        assert len(manifest.shards) == 3
        for record in iter_dataset(paths.dataset_dir("cal")):
            image = np.array(Image.open(record.uri))
            expected = model(torch.from_numpy(image)[None])[0].half().numpy()
            np.testing.assert_allclose(record.logits, expected, rtol=1e-3, atol=1e-5)

        # Run again on this machine, then on a new one: every stage is current (extract always
        # runs; it finds every image stored and does not start Ray).
        current = {"extract": "ran", "fit": "current, skipped", "evaluate": "current, skipped",
                   "report": "current, skipped"}
        assert _stages(_segcal(env, "run", str(config))) == current
        other = {**env, "SEGCAL_CACHE": str(tmp_path / "other-machine")}
        assert _stages(_segcal(other, "-v", "run", str(config))) == current
        fs.invalidate_cache()
        assert (fs.cat_file(f"{URI}/summary.csv")
                == next((tmp_path / "other-machine").rglob("summary.csv")).read_bytes())

        # A run killed before its manifest was written: the shards at the URI are adopted,
        # nothing is extracted again, and fit and evaluate stay current.
        fs.rm_file(f"{URI}/{shards_at}/cal/manifest.json")
        again = _segcal(env, "-v", "extract", str(config))
        assert "adopting" in again.stderr
        fs.invalidate_cache()  # another process changed the bucket since this one listed it
        rebuilt = read_manifest(paths.dataset_dir("cal"))
        assert sorted((s.file, s.sha256) for s in rebuilt.shards) == \
            sorted((s.file, s.sha256) for s in manifest.shards)
        assert _stages(_segcal(env, "run", str(config))) == current

        # An image changed at the source: its shard is rewritten at the URI without the stale
        # row, the new row is extracted, and the old shard object goes after the manifest.
        changed = tmp_path / "cal" / "img" / "f00.png"
        Image.fromarray(np.full((12, 16, 3), 200, np.uint8)).save(changed)
        os.utime(changed, (1, 1))  # an mtime unlike the stored one, even within a second
        _segcal(env, "extract", str(config))
        fs.invalidate_cache()
        after = read_manifest(paths.dataset_dir("cal"))
        assert after.changes == {"added": 0, "changed": 1, "removed": 0}
        old_files = {s.file for s in manifest.shards}
        new_files = {s.file for s in after.shards}
        assert len(old_files - new_files) == 1
        listed = {p.rsplit("/", 1)[-1] for p in fs.find(f"{URI}/{shards_at}/cal")}
        assert listed == new_files | {"manifest.json"}
        record = next(r for r in iter_dataset(paths.dataset_dir("cal")) if r.uri == str(changed))
        expected = model(torch.from_numpy(np.array(Image.open(changed)))[None])[0].half().numpy()
        np.testing.assert_allclose(record.logits, expected, rtol=1e-3, atol=1e-5)
