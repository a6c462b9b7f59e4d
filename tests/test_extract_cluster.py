"""Extraction on a two-node Ray cluster on this machine, the model actors pinned to the second.

``ray start --head`` plus ``ray start --address ...`` with a custom resource ``extract_node``,
both on loopback, each with two logical CPUs; ``segcal extract`` then runs as a driver with
``RAY_ADDRESS`` and ``extract.actor_resources: {extract_node: 1}``. The shards are written by
Ray Data tasks wherever they run (both nodes share this machine's file system, as nodes of a
real cluster share a network file system); the driver writes only the manifest. The model
factory records the node it was built on, so the test checks the placement, not just the
output. Nodes are stopped through their ``ray start --block`` processes, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
from tests.s3_helpers import BUCKET, as_client, s3_server
from tests.test_e2e_cluster import _free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:  # both at once: each node's reaper takes seconds to stop its processes
        proc.terminate()
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        # Whatever the reaper has not stopped by then lives in the node's process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_nodes(env: dict, count: int, procs: list[subprocess.Popen], logs: list[Path]):
    probe = ("import ray; ray.init(); "
             "print(sum(n['Alive'] for n in ray.nodes()), "
             "ray.cluster_resources().get('extract_node', 0))")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs, strict=True):
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, timeout=60)
        if out.returncode == 0 and out.stdout.split()[:1] == [str(count)]:
            return
        time.sleep(2)
    pytest.fail("the two-node cluster did not come up in 120 s")


@pytest.fixture(scope="module")
def s3env():
    """An S3 server on loopback for the nodes to write to, or None without moto/s3fs."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        yield None
        return
    with s3_server() as env:
        yield env


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3env):
    base = tmp_path_factory.mktemp("nodes")
    (base / "home").mkdir()
    (base / "nodelog").mkdir()
    temp = Path(tempfile.mkdtemp(prefix="segcal-2n-", dir="/tmp"))  # short socket paths
    gcs, *ports = _free_ports(14)
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0",
           # "1": a cluster of several nodes (on loopback: --node-ip-address below).
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
           "PYTHONPATH": str(ROOT), "SEGCAL_TEST_NODE_LOG": str(base / "nodelog"),
           "RAY_ADDRESS": f"127.0.0.1:{gcs}",
           # The nodes' object-store credentials, as a real cluster's come from its role.
           **(s3env or {})}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              f"--object-store-memory={128 * 1024 * 1024}", "--disable-usage-stats"]
    head = [str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--include-dashboard=false",
            f"--temp-dir={temp}", f"--ray-client-server-port={ports[0]}",
            f"--node-manager-port={ports[1]}", f"--object-manager-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
            f"--metrics-export-port={ports[5]}", f"--runtime-env-agent-port={ports[6]}", *common]
    worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
              '--resources={"extract_node": 1}',
              f"--node-manager-port={ports[7]}", f"--object-manager-port={ports[8]}",
              f"--dashboard-agent-listen-port={ports[9]}",
              f"--dashboard-agent-grpc-port={ports[10]}",
              f"--metrics-export-port={ports[11]}", f"--runtime-env-agent-port={ports[12]}",
              *common]
    logs = [base / "head.log", base / "worker.log"]
    procs = [_start(head, {k: v for k, v in env.items() if k != "RAY_ADDRESS"}, logs[0])]
    try:
        time.sleep(3)
        procs.append(_start(worker, env, logs[1]))
        _wait_for_nodes(env, 2, procs, logs)
        yield {"env": env, "base": base}
    finally:
        _stop(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _extract(two_nodes, output: str, data: Path, rows_per_shard: int, **env: str) -> Path:
    """``segcal extract`` of ``data`` into ``output`` on the two nodes; returns the config."""
    base = two_nodes["base"]
    for log in (base / "nodelog").iterdir():
        log.unlink()
    config = data.parent / f"{data.name}.yaml"
    config.write_text(yaml.safe_dump({
        "output": output,
        "model": {"kind": "python", "path": "tests.extract_helpers:node_recording_net",
                  "num_classes": NUM_CLASSES},
        "datasets": [{"name": "toy", "role": "test", "domain": "day",
                      "images": str(data / "img"), "labels": str(data / "lab")}],
        "extract": {"batch_size": 2, "rows_per_shard": rows_per_shard,
                    "actor_resources": {"extract_node": 1}},
    }))
    done = subprocess.run([str(BIN / "segcal"), "extract", str(config)],
                          env={**two_nodes["env"], **env}, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    placements = [p.read_text().split() for p in (base / "nodelog").iterdir()]
    assert placements, "the model was never built in an actor"
    assert all(on_worker == "True" for _, on_worker in placements)
    return config


def _check_shards(config: Path, directory, count: int) -> None:
    """The manifest lists exactly the shards there, which hold the model's logits."""
    manifest = read_manifest(directory)
    assert manifest.n_images == count
    assert sorted(p.name for p in directory.glob("part-*.parquet")) == \
        sorted(s.file for s in manifest.shards)
    model = load_model(load_config(config).model)
    for record in iter_dataset(directory):
        image = np.array(Image.open(record.uri))
        expected = model(torch.from_numpy(image)[None])[0].half().numpy()
        # float16 of the same float32 computation, on another process: one float16 step apart.
        np.testing.assert_allclose(record.logits, expected, rtol=1e-3, atol=1e-5)


def test_extract_on_two_nodes_with_actors_on_the_second(two_nodes):
    base = two_nodes["base"]
    write_pairs(base / "data", 10, (12, 16))
    config = _extract(two_nodes, str(base / "out"), base / "data", 3)
    cfg = load_config(config)
    directory = RunPaths(Path(cfg.output), model_fingerprint(cfg.model)).dataset_dir("toy")
    _check_shards(config, directory, 10)


def test_extract_on_two_nodes_to_s3(two_nodes, s3env):
    """The same, with ``output`` in a bucket: the second node's tasks write the shards there."""
    if s3env is None:
        pytest.skip("moto[server] and s3fs (dev extra) serve S3 on loopback")
    base = two_nodes["base"]
    write_pairs(base / "data-s3", 6, (12, 16), seed=3)
    uri = f"s3://{BUCKET}/two-nodes"
    config = _extract(two_nodes, uri, base / "data-s3", 2, SEGCAL_CACHE=str(base / "cache"))
    fingerprint = model_fingerprint(load_config(config).model)
    with as_client(s3env):
        _check_shards(config, RunPaths(Path("/unused"), fingerprint, store=uri)
                      .dataset_dir("toy"), 6)
