"""Job submission: entrypoint, uploaded files, address checks, auth headers and log following.

No Ray cluster here (tests/test_e2e_cluster.py submits to a real one): a loopback HTTP server plays
the job server's version endpoint, and a fake client plays a job's life.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import submit as sub

# --- pure pieces -------------------------------------------------------------------------------


def test_entrypoint_quotes_arguments():
    cmd = sub.entrypoint("refresh", "configs/my run.yaml", ["--registry", "/mnt/reg x"])
    assert cmd == "python jobs/refresh.py 'configs/my run.yaml' --registry '/mnt/reg x'"
    with pytest.raises(ValueError, match=r"Expected `stage` to be one of \['run'"):
        sub.entrypoint("train", "c.yaml")


def test_every_job_has_an_entry_point():
    root = Path(sub.__file__).resolve().parents[1]
    assert sorted(p.stem for p in (root / "jobs").glob("*.py")) == sorted(sub.JOBS)


def test_config_argument_relative_inside_project(tmp_path, caplog):
    (tmp_path / "configs").mkdir()
    inside = tmp_path / "configs" / "a.yaml"
    assert sub.config_argument(inside, root=tmp_path) == "configs/a.yaml"
    assert not caplog.records
    outside = tmp_path.parent / "elsewhere.yaml"
    assert sub.config_argument(outside, root=tmp_path) == str(outside.resolve())
    assert "must exist at the same path on the cluster" in caplog.text


@pytest.mark.parametrize(
    ("address", "ok"),
    [
        pytest.param("http://127.0.0.1:8265", True, id="http"),
        pytest.param("https://ray.example.org/", True, id="https-trailing-slash"),
        pytest.param("127.0.0.1:8265", False, id="no-scheme"),
        pytest.param("ray://head:10001", False, id="ray-client"),
        pytest.param("http://", False, id="no-host"),
    ],
)
def test_check_address(address, ok):
    if ok:
        assert sub.check_address(address) == address.rstrip("/")
    else:
        with pytest.raises(ValueError, match="Expected `address` to be the dashboard URL"):
            sub.check_address(address)


def test_runtime_env_uploads_code_not_outputs(tmp_path):
    # Ray's own packer is the oracle for what the excludes leave out.
    from ray._private.runtime_env.packaging import create_package

    files = [
        "pipeline/cli.py",
        "jobs/run.py",
        "configs/a.yaml",
        "tests/test_x.py",
        "runs/demo/summary.csv",
        ".venv/bin/python",
        ".git/HEAD",
        "pipeline/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/v",
        "segcal.egg-info/PKG-INFO",
        "weights.pth",
        "tests/runs/keep.txt",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    renv = sub.runtime_env({"A": "1"}, root=tmp_path)
    assert renv["working_dir"] == str(tmp_path)
    assert renv["env_vars"] == {"A": "1"}
    create_package(
        str(tmp_path),
        tmp_path.parent / "pkg.zip",
        include_gitignore=False,
        excludes=renv["excludes"],
    )
    names = set(zipfile.ZipFile(tmp_path.parent / "pkg.zip").namelist())
    assert names == {
        "pipeline/cli.py",
        "jobs/run.py",
        "configs/a.yaml",
        "tests/test_x.py",
        "tests/runs/keep.txt",
    }


def test_explicit_address_hides_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    with sub._explicit_address():
        assert "RAY_ADDRESS" not in os.environ
    assert os.environ["RAY_ADDRESS"] == "10.0.0.1:6379"


# --- connecting --------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connect_unreachable_address():
    with pytest.raises(sub.SubmitError, match=r"Cannot reach the Ray job server at http://127"):
        sub.connect(f"http://127.0.0.1:{_free_port()}")


@pytest.fixture
def job_server():
    """A loopback HTTP server answering /api/version like Ray's; ``mode`` picks its behaviour."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["headers"].append(self.headers.get("Authorization"))
            if state["mode"] == "not-ray":
                self.send_error(404)
            elif state["mode"] == "token" and self.headers.get("Authorization") != "Bearer s3cret":
                self.send_error(401, "Unauthorized: Missing authentication token")
            else:
                body = json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    state = {"mode": "ok", "headers": []}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state["address"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_connect_not_a_ray_server(job_server):
    job_server["mode"] = "not-ray"
    with pytest.raises(sub.SubmitError, match="Cannot use the Ray job server .* 404"):
        sub.connect(job_server["address"])


def test_connect_ignores_ray_address_env(job_server, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_free_port()}")
    client = sub.connect(job_server["address"])
    assert client.get_address() == job_server["address"]


def test_connect_refused_credentials(job_server):
    job_server["mode"] = "token"
    with pytest.raises(sub.SubmitError, match="refused the credentials(.|\n)*RAY_AUTH_TOKEN"):
        sub.connect(job_server["address"])


def test_connect_sends_ray_token(job_server, tmp_path):
    # Token mode is process-wide Ray state; a child process keeps this test session untouched.
    job_server["mode"] = "token"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "s3cret",
        "HOME": str(tmp_path),
    }
    code = f"from pipeline.submit import connect; connect({job_server['address']!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "Bearer s3cret" in job_server["headers"]


# --- submitting and following ------------------------------------------------------------------


class FakeClient:
    """Plays one job: its log chunks, then its terminal status."""

    def __init__(self, status="SUCCEEDED", exit_code=None, chunks=("a\n", "b\n"), drop=False):
        from ray.job_submission import JobStatus

        self.final = JobStatus(status)
        self.statuses = [JobStatus.RUNNING, self.final]
        self.exit_code = exit_code
        self.chunks = chunks
        self.drop = drop
        self.submitted: dict = {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return "raysubmit_123"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.drop:
            raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.final

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(message="it broke", driver_exit_code=self.exit_code)


@pytest.mark.parametrize(
    ("status", "exit_code", "expected"),
    [
        pytest.param("SUCCEEDED", 0, 0, id="succeeded"),
        pytest.param("FAILED", 3, 3, id="failed-with-code"),
        pytest.param("FAILED", None, 1, id="failed-without-code"),
        pytest.param("STOPPED", None, 1, id="stopped"),
    ],
)
def test_follow_returns_job_status(status, exit_code, expected, monkeypatch):
    monkeypatch.setattr(sub, "POLL_S", 0.0)
    out = io.StringIO()
    assert sub.follow_job(FakeClient(status, exit_code), "raysubmit_123", out=out) == expected
    assert out.getvalue() == "a\nb\n"


def test_follow_survives_a_dropped_log_stream(monkeypatch, caplog):
    monkeypatch.setattr(sub, "POLL_S", 0.0)
    out = io.StringIO()
    assert sub.follow_job(FakeClient(drop=True), "raysubmit_123", out=out) == 0
    assert "ended early" in caplog.text


@pytest.mark.parametrize("follow", [False, True], ids=["no-follow", "follow"])
def test_submit_builds_the_job(follow, monkeypatch, tmp_path):
    client = FakeClient("FAILED", 1)
    monkeypatch.setattr(sub, "connect", lambda address: client)
    monkeypatch.setattr(sub, "POLL_S", 0.0)
    (tmp_path / "configs").mkdir()
    out = io.StringIO()
    job_id, code = sub.submit(
        "http://127.0.0.1:8265",
        "refresh",
        tmp_path / "configs" / "a.yaml",
        args=["--registry", "/reg"],
        env={"K": "V"},
        follow=follow,
        out=out,
        root=tmp_path,
    )
    assert job_id == "raysubmit_123"
    assert out.getvalue().startswith("raysubmit_123\n")
    assert code == (1 if follow else 0)
    assert client.submitted["entrypoint"] == "python jobs/refresh.py configs/a.yaml --registry /reg"
    assert client.submitted["runtime_env"]["env_vars"] == {"K": "V"}
    assert client.submitted["runtime_env"]["working_dir"] == str(tmp_path)
