"""The Ray runtime segcal starts or joins: loopback by default, RAY_ADDRESS honoured.

The unit tests replace ``ray.init``; ``test_plain_segcal_run_listens_on_loopback_only`` runs a
real ``segcal run`` on a tiny project in a child process (without the Makefile's
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and records every listening socket of it and of every
process it starts, as long as it runs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from PIL import Image

from pipeline import runtime
from tests.extract_helpers import NUM_CLASSES

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 420


@pytest.fixture
def fake_ray(monkeypatch):
    """``ray.init`` recorded, not run; Ray's single-machine switch restored after the test."""
    calls: list[dict] = []

    def init(**kwargs):
        # Every start passes Ray the level of its own loggers (-v or not), checked apart.
        assert kwargs.pop("logging_level") in (logging.INFO, logging.WARNING), kwargs
        calls.append(kwargs)

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(runtime, "_watch_node", lambda: calls.append("watch"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(runtime.BIND_ENV, raising=False)
    monkeypatch.delenv(runtime.RAY_SINGLE_MACHINE_ENV, raising=False)
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    return calls


def test_local_start_is_on_loopback(fake_ray):
    from ray._private import ray_constants, services

    runtime.init_ray()
    assert fake_ray == [{"address": "local", "dashboard_host": "127.0.0.1"}, "watch"]
    assert os.environ[runtime.RAY_SINGLE_MACHINE_ENV] == "0"
    assert ray_constants.ENABLE_RAY_CLUSTER is False
    # What Ray then makes of the node's address (the one every Ray process binds to).
    assert services.get_node_ip_address() == "127.0.0.1"


@pytest.mark.parametrize("address", ["10.0.0.1:6379", "auto"])
def test_ray_address_is_joined(fake_ray, monkeypatch, address):
    monkeypatch.setenv("RAY_ADDRESS", address)
    runtime.init_ray()
    assert fake_ray == [{}]  # ray.init() reads RAY_ADDRESS itself
    assert runtime.RAY_SINGLE_MACHINE_ENV not in os.environ


def test_ray_address_local_starts_on_loopback(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    runtime.init_ray()
    assert fake_ray == [{"address": "local", "dashboard_host": "127.0.0.1"}, "watch"]


def test_bind_all_opts_out(fake_ray, monkeypatch, caplog):
    monkeypatch.setenv(runtime.BIND_ENV, "all")
    runtime.init_ray()
    assert fake_ray == [{"address": "local"}, "watch"]
    assert runtime.RAY_SINGLE_MACHINE_ENV not in os.environ
    assert "every network interface" in caplog.text


def test_bad_bind_value(fake_ray, monkeypatch):
    monkeypatch.setenv(runtime.BIND_ENV, "0.0.0.0")
    with pytest.raises(ValueError, match=r"Expected `SEGCAL_RAY_BIND` to be one of \['loopback'"):
        runtime.init_ray()
    assert fake_ray == []


def test_initialised_ray_is_left_alone(fake_ray, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    runtime.init_ray()
    assert fake_ray == []


# --- a real `segcal run` -----------------------------------------------------------------------


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _listening(root_pid: int) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening socket of ``root_pid`` and its tree."""
    import psutil  # Ray ships it; importing ray first puts it on the path

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((name, conn.laddr.ip, conn.laddr.port))
    return found


def _tiny_project(base: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("cal", 4), ("test", 2)):
        for sub in ("img", "lab"):
            (base / split / sub).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            lab = rng.integers(0, NUM_CLASSES, (16, 16), dtype=np.uint8)
            Image.fromarray(img).save(base / split / "img" / f"{i}.png")
            Image.fromarray(lab).save(base / split / "lab" / f"{i}.png")
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
                "name": "test",
                "role": "test",
                "domain": "day",
                "images": "test/img",
                "labels": "test/lab",
            },
        ],
        "extract": {"batch_size": 4, "num_actors": 1},
        "calibrators": [{"name": "temperature", "label": "ts"}],
        "fit": {"epochs": 2, "pixels_per_image": 64},
        "evaluate": {"bootstrap": 0, "num_actors": 1},
    }
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_plain_segcal_run_listens_on_loopback_only(tmp_path):
    config = _tiny_project(tmp_path)
    home = tmp_path / "home"  # Ray writes an auth token under ~/.ray on first start
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SEGCAL_RAY"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [str(BIN / "segcal"), "run", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= _listening(proc.pid)
            time.sleep(0.3)
        assert proc.poll() is not None, f"segcal run did not end in {RUN_TIMEOUT_S}s"
        output = proc.stdout.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    exposed = sorted(s for s in seen if not _is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Ray's core servers were seen listening and the run went through every stage, so the
    # check above is not vacuous.
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in seen}, seen
    assert proc.returncode == 0, output[-4000:]
    assert (tmp_path / "out" / "summary.csv").is_file()


_DRIVER = """
import sys, time, ray
from pipeline.runtime import init_ray
init_ray()
ray.get(ray.remote(lambda: 1).remote())
print("READY", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_killed_driver_leaves_no_ray_process(tmp_path):
    # Without the watcher, Ray's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed driver
    # by about 60 s (see pipeline/runtime.py); with it they are gone within a few seconds.
    import psutil

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SEGCAL_RAY"))}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _DRIVER],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 60
        names: set[str] = set()
        while (
            time.monotonic() < deadline
            and not {
                "ray::DashboardAgent",
                "ray::RuntimeEnvAgent",
            }
            <= names
        ):
            time.sleep(0.5)
            tree = psutil.Process(proc.pid).children(recursive=True)
            names = {p.name() for p in tree if p.is_running()}
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + runtime.WATCH_GRACE_S + 20
        while time.monotonic() < deadline:
            alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive:
                break
            time.sleep(0.5)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_ray_info_lines_only_with_verbose_logging(monkeypatch):
    import logging

    from pipeline import runtime

    data = logging.getLogger("ray.data")
    auth = logging.getLogger(runtime._TOKEN_AUTH_LOGGER)
    monkeypatch.setattr(data, "level", logging.INFO)
    monkeypatch.setattr(auth, "level", logging.NOTSET)
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.INFO)  # segcal -v
    assert runtime._ray_logging_level() == logging.INFO
    assert data.level == logging.INFO
    assert auth.level == logging.NOTSET
    monkeypatch.setattr(root, "level", logging.WARNING)  # the default
    assert runtime._ray_logging_level() == logging.WARNING
    assert data.level == logging.WARNING
    assert auth.level == logging.ERROR


_START_RAY = """
import logging, sys
logging.basicConfig(level=getattr(logging, sys.argv[1]))
import ray
from pipeline.runtime import init_ray
init_ray()
ray.shutdown()
"""


@pytest.mark.parametrize("level", ["WARNING", "INFO"])
def test_starting_ray_prints_its_notices_only_when_verbose(level):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run(
        [sys.executable, "-c", _START_RAY, level], capture_output=True, text=True, env=env,
        timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    quiet = level == "WARNING"
    assert ("Started a local Ray instance" in out) is not quiet, out
    assert ("Token authentication is enabled" in out) is not quiet, out
