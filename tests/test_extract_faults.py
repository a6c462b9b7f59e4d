"""Extraction under faults: the driver SIGKILLed while shards are written, then rerun; a model
actor SIGKILLed mid-run, which Ray Data replaces and retries.

``segcal extract`` runs as its own process (its own local Ray, on loopback); the test kills
its whole process group with SIGKILL once the first shards exist, reruns the same command, and
checks every stored row against the files and the model: every image once, its labels, its
logits (to one float16 step: batches form differently in another process), and no temporary
file left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
SEGCAL = Path(sys.executable).parent / "segcal"


def _config(base: Path, output: str) -> Path:
    path = base / f"{output}.yaml"
    path.write_text(yaml.safe_dump({
        "output": str(base / output),
        "model": {"kind": "python", "path": "tests.extract_helpers:tiny_net",
                  "num_classes": NUM_CLASSES},
        "datasets": [{"name": "toy", "role": "test", "domain": "day",
                      "images": str(base / "data" / "img"), "labels": str(base / "data" / "lab")}],
        "extract": {"batch_size": 2, "rows_per_shard": 2},
    }))
    return path


def _env(base: Path) -> dict:
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return env


def _records(config: Path) -> dict:
    cfg = load_config(config)
    directory = RunPaths(Path(cfg.output), model_fingerprint(cfg.model)).dataset_dir("toy")
    return directory, {r.image_id: r for r in iter_dataset(directory)}


def test_driver_killed_during_extraction_resumes_to_the_clean_result(tmp_path):
    (tmp_path / "home").mkdir()
    write_pairs(tmp_path / "data", 40, (48, 64))
    env = _env(tmp_path)
    killed = _config(tmp_path, "killed")
    directory = RunPaths(tmp_path / "killed", model_fingerprint(
        load_config(killed).model)).dataset_dir("toy")

    proc = subprocess.Popen([str(SEGCAL), "extract", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(directory.glob("part-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "extraction ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (directory / "manifest.json").exists()  # killed before the manifest

    done = subprocess.run([str(SEGCAL), "extract", str(killed)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, resumed = _records(killed)
    assert sorted(resumed) == [f"f{i:02d}" for i in range(40)]
    model = load_model(load_config(killed).model)
    for image_id, r in resumed.items():
        image = np.array(Image.open(tmp_path / "data" / "img" / f"{image_id}.png"))
        labels = np.array(Image.open(tmp_path / "data" / "lab" / f"{image_id}.png"))
        np.testing.assert_array_equal(r.labels, labels)
        expected = model(torch.from_numpy(image)[None])[0].half().numpy()
        np.testing.assert_allclose(r.logits, expected, rtol=1e-3, atol=1e-5)
    assert read_manifest(directory).n_images == 40
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]


@pytest.mark.ray
def test_a_model_actor_killed_mid_extraction_is_replaced_and_the_result_complete(ray_local,
                                                                                 tmp_path):
    import shutil
    import threading

    from pipeline import extract
    from pipeline.config import parse_config
    from tests.extract_helpers import PID_LOG

    shutil.rmtree(PID_LOG, ignore_errors=True)
    Path(PID_LOG).mkdir()
    write_pairs(tmp_path / "data", 48, (24, 32))
    cfg = parse_config({
        "output": str(tmp_path / "out"),
        "model": {"kind": "python", "path": "tests.extract_helpers:pid_recording_net",
                  "num_classes": NUM_CLASSES},
        "datasets": [{"name": "toy", "role": "test", "domain": "day",
                      "images": str(tmp_path / "data" / "img"),
                      "labels": str(tmp_path / "data" / "lab")}],
        "extract": {"batch_size": 2, "rows_per_shard": 2},
    })
    directory = RunPaths(tmp_path / "out", model_fingerprint(cfg.model)).dataset_dir("toy")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            extract.run(cfg)
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not list(directory.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = int(sorted(Path(PID_LOG).iterdir())[0].name)
    assert not (directory / "manifest.json").exists()  # still running
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    shutil.rmtree(PID_LOG, ignore_errors=True)
    assert not errors, errors
    manifest = read_manifest(directory)
    assert sorted(manifest.image_ids()) == [f"f{i:02d}" for i in range(48)]
    ids = [i for shard in manifest.shards for i in shard.image_ids]
    assert len(ids) == len(set(ids)) == 48  # every image once, whatever was retried
    model = load_model(cfg.model)
    for r in iter_dataset(directory):
        image = np.array(Image.open(r.uri))
        expected = model(torch.from_numpy(image)[None])[0].half().numpy()
        np.testing.assert_allclose(r.logits, expected, rtol=1e-3, atol=1e-5)
