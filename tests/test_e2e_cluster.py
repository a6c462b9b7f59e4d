"""End to end on a real (local) Ray cluster: submit a run, refresh twice, and a failing job.

The first refresh follows new calibration images (only those are extracted) and promotes (no
champion yet); the second has no new images but a changed fit option, so it extracts nothing,
refits, re-evaluates the champion on the same shards and records its decision with the numbers.

A head is started with ``ray start --head --block`` on loopback ports picked for this test, with
``RAY_AUTH_MODE=disabled`` and a temporary ``HOME`` (Ray writes an auth token under ``~/.ray`` on
first start otherwise). Jobs go through the real ``segcal submit --follow`` console script, so
the project is uploaded as ``working_dir`` and ``jobs/*.py`` run as Ray jobs.

The cluster is stopped by terminating the ``ray start --block`` process (its reaper then stops the
node's processes) and its process group, never with ``ray stop``, which would stop every Ray
instance on the machine, the session's ``ray_local`` runtime included.

Run alone: ``.venv/bin/python -m pytest tests/test_e2e_cluster.py -q`` (about a minute or two).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from PIL import Image

from pipeline import registry
from pipeline.config import load_config
from pipeline.models import model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import read_manifest
from tests.extract_helpers import NUM_CLASSES

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SIZE = 16
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 300


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _wait_for_jobs_api(address: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{address}/api/jobs/", timeout=5).status_code == 200:
                return
        time.sleep(1)
    pytest.fail(f"Ray's job API did not come up in {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local head node, its dashboard on a free loopback port; stopped after the module."""
    base = tmp_path_factory.mktemp("e2e")
    home = base / "home"
    home.mkdir()
    # Ray's socket paths must stay under ~107 characters: a short temp root, not pytest's.
    temp = Path(tempfile.mkdtemp(prefix="segcal-e2e-", dir="/tmp"))
    gcs, dash, client, agent_http, agent_grpc, metrics, runtime_env, nm, om = _free_ports(9)
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray swaps 127.0.0.1 for the machine's network address unless told this is a
        # single-machine cluster; keep every Ray connection on loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Job entrypoints run `python`: make it this virtualenv's.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={nm}",
        f"--object-manager-port={om}",
        "--num-cpus=4",
        f"--object-store-memory={256 * 1024 * 1024}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    log = base / "ray_start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_jobs_api(address, proc, log)
        yield {"address": address, "env": env, "base": base}
    finally:
        # SIGTERM to `ray start --block` ends it; its reaper then stops the node's processes.
        # The process group catches anything left; nothing outside this group is touched.
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _write_images(folder: Path, stems: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "lab").mkdir(parents=True, exist_ok=True)
    for stem in stems:
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        lab = rng.integers(0, NUM_CLASSES, (SIZE, SIZE), dtype=np.uint8)
        Image.fromarray(img).save(folder / "img" / f"{stem}.png")
        Image.fromarray(lab).save(folder / "lab" / f"{stem}.png")


@pytest.fixture(scope="module")
def project(ray_head) -> Path:
    """Tiny PNG datasets (calibration, in-domain test, a darkened copy as shift) + a config."""
    base = ray_head["base"]
    _write_images(base / "cal", [f"c{i}" for i in range(6)], seed=0)
    _write_images(base / "test", [f"t{i}" for i in range(4)], seed=1)
    config = {
        "output": "out",
        "model": {
            "kind": "python",
            "path": "tests.extract_helpers:tiny_net",
            "num_classes": NUM_CLASSES,
        },
        "datasets": [
            {
                "name": "cal",
                "role": "calibration",
                "domain": "day",
                "images": "cal/img",
                "labels": "cal/lab",
            },
            {
                "name": "test-day",
                "role": "test",
                "domain": "day",
                "images": "test/img",
                "labels": "test/lab",
            },
            {
                "name": "test-dusk",
                "role": "test",
                "domain": "dusk",
                "reference": "day",
                "images": "test/img",
                "labels": "test/lab",
                "corruption": {"kind": "dark", "severity": 3},
            },
        ],
        "extract": {"batch_size": 4, "num_actors": 1},
        "calibrators": [{"name": "temperature", "label": "ts"}],
        "fit": {"mode": "local", "epochs": 2, "pixels_per_image": 64},
        "evaluate": {"bootstrap": 0, "num_actors": 1},
        "refresh": {"registry": "registry", "tolerance": 0.002},
    }
    path = base / "e2e.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _segcal(ray_head, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "segcal"), *argv],
        env=ray_head["env"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )


def _submit(ray_head, config: Path, stage: str, *extra: str) -> subprocess.CompletedProcess:
    return _segcal(
        ray_head, "submit", str(config), stage, "--address", ray_head["address"], "--follow", *extra
    )


def _shards(config: Path) -> dict[str, list[tuple[str, str]]]:
    cfg = load_config(config)
    paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
    return {
        ds.name: [(s.file, s.sha256) for s in read_manifest(paths.dataset_dir(ds.name)).shards]
        for ds in cfg.datasets
    }


def test_submit_run_then_refresh_twice(ray_head, project):
    base = ray_head["base"]
    out, reg = base / "out", base / "registry"

    # 1. The whole pipeline as one Ray job.
    proc = _submit(ray_head, project, "run")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("raysubmit_")
    assert (out / "report.html").stat().st_size > 0
    summary = pd.read_csv(out / "summary.csv")
    assert {"test-day", "test-dusk"} <= set(summary["dataset"])
    assert {"ts", "uncalibrated"} <= set(summary["calibrator"])
    before = _shards(project)
    n_cal = sum(1 for _ in (base / "cal" / "img").iterdir())

    # 2. New labelled images arrive; the nightly refresh extracts only those and promotes
    #    (there is no champion yet). The darkened test set raises the drift alarm: the refresh
    #    still decides, and submit passes on the alarm's exit code 4.
    _write_images(base / "cal", ["c6", "c7"], seed=2)
    proc = _submit(ray_head, project, "refresh", "--", "--registry", str(reg))
    assert proc.returncode == 4, proc.stdout[-6000:] + proc.stderr[-3000:]
    after = _shards(project)
    assert set(before["cal"]) < set(after["cal"])  # old shards kept, new ones added
    assert after["test-day"] == before["test-day"]
    cfg = load_config(project)
    cal_dir = RunPaths(Path(cfg.output), model_fingerprint(cfg.model)).dataset_dir("cal")
    assert read_manifest(cal_dir).n_images == n_cal + 2
    first = registry.history(reg)[-1]
    assert first["sources"]["cal"] == {"added": 2, "changed": 0, "removed": 0}
    assert first["decision"] == "promoted"
    assert first["reason"] == "no champion yet"
    assert first["drift_alarm"] is True
    assert first["label_free"]["alarms"] == ["test-dusk"]
    assert registry.current(reg) == first["challenger"]
    assert (reg / "current" / "artifacts" / "ts").is_dir()

    # 3. No new images, but a changed fit option: extraction adds nothing, the calibrators are
    #    refitted, the champion is re-evaluated on the same shards, and the decision is recorded
    #    with its numbers and reason.
    proc = _submit(
        # Another pixel sample, so the refitted temperature differs: an identical calibrator
        # (e.g. after changing `fit.epochs`, which temperature scaling ignores) is recognised
        # as the champion and not compared.
        ray_head, project, "refresh", "--set", "fit.pixels_per_image=48", "--", "--registry",
        str(reg), "--no-drift-exit",
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert _shards(project) == after
    second = registry.history(reg)[-1]
    assert second["drift_alarm"] is True  # recorded, though --no-drift-exit exits 0
    assert second["sources"]["cal"] == {"added": 0, "changed": 0, "removed": 0}
    assert second["stages_ran"] == ["extract", "fit", "evaluate", "report"]
    assert second["champion"] == first["challenger"]
    assert second["reason"]
    rows = {(c["dataset"], c["calibrator"]): c for c in second["comparisons"]}
    assert set(rows) == {("cal-heldout", "ts"), ("test-day", "ts"), ("test-dusk", "ts")}
    # Same images, same champion artifacts: its numbers today are those it was promoted with.
    champ = registry.read_summary(reg, first["challenger"]).set_index(["dataset", "calibrator"])
    for key, row in rows.items():
        assert row["champion"] == pytest.approx(champ.loc[key, "img_ece"], abs=1e-9)
    promoted = all(r["challenger"] <= r["champion"] + 0.002 for r in rows.values())
    assert second["decision"] == ("promoted" if promoted else "kept")
    assert registry.current(reg) == (second["challenger"] if promoted else first["challenger"])

    status = _segcal(ray_head, "status", str(reg))
    assert status.returncode == 0
    assert status.stdout.startswith(f"current: {registry.current(reg)}")


def test_failing_job_exits_nonzero(ray_head, project):
    # Valid config, but the images are not there on the cluster: the job itself fails, in its
    # preflight (before Ray work), with the data-error exit code 2 that submit passes on.
    proc = _submit(
        ray_head,
        project,
        "extract",
        "--set",
        f"output={ray_head['base'] / 'bad-out'}",
        "--set",
        "datasets.0.images=/nonexistent/segcal-e2e",
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "/nonexistent/segcal-e2e" in proc.stdout + proc.stderr
