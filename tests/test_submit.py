"""Job submission: entrypoint, uploaded files, address checks, auth headers and log following.

No Ray cluster here (tests/test_e2e_cluster.py submits to a real one): a loopback HTTP server plays
the job server's version endpoint, and a fake client plays a job's life.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import submit as sub
from pipeline import submit_package as pkg

# --- pure pieces -------------------------------------------------------------------------------


def test_entrypoint_quotes_arguments():
    cmd = sub.entrypoint("refresh", "configs/my run.yaml", ["--registry", "/mnt/reg x"])
    assert cmd == "python jobs/refresh.py 'configs/my run.yaml' --registry '/mnt/reg x'"
    with pytest.raises(ValueError, match=r"Expected `stage` to be one of \['run'"):
        sub.entrypoint("train", "c.yaml")


def test_entrypoint_interpreter_and_required_env(tmp_path):
    cmd = sub.entrypoint("run", "c.yaml", python="/opt/my env/bin/python", require_env=["TOK"])
    assert cmd.endswith("'/opt/my env/bin/python' jobs/run.py c.yaml")
    assert "'segcal: TOK is not set in the cluster'\"'\"'s environment'" in cmd
    with pytest.raises(ValueError, match="Expected `require_env` entries to be variable names"):
        sub.entrypoint("run", "c.yaml", require_env=["X; rm -rf /"])
    # The guard runs in the job's shell: unset -> exit 2 naming the variable, set -> the job.
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "run.py").write_text("import os; print('ran', os.environ['TOK'])")
    cmd = sub.entrypoint("run", "c.yaml", python=sys.executable, require_env=["TOK"])
    env = {k: v for k, v in os.environ.items() if k != "TOK"}
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "TOK is not set in the cluster's environment" in proc.stderr
    env["TOK"] = "s3cret"
    proc = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (0, "ran s3cret\n")


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


def _tree(root: Path, files: dict[str, bytes | str]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)


CODE = {
    "pipeline/__init__.py": "",
    "pipeline/cli.py": "x",
    "pipeline/models/espnet.py": "x",
    "jobs/run.py": "x",
    "pyproject.toml": "[project]",
    "configs/a.yaml": "output: /mnt/out",
    "models/tiny.pt": "weights",  # named by the config
    "tests/helpers.py": "x",  # a python model module named by the config
    "tests/test_x.py": "x",
}
SECRETS = {
    ".env": "AWS_SECRET_ACCESS_KEY=x",
    ".ray/auth_token": "t",
    ".aws/credentials": "[default]",
    "secrets/id_rsa": "-----BEGIN",
    "pipeline/.env.local": "K=V",
    "pipeline/server.pem": "k",
    "pipeline/secrets/token.txt": "t",
    "jobs/id_ed25519": "k",
    "data/big.bin": b"\0" * (3 * 1024 * 1024),
    "outputs/summary.csv": "a",
    "runs/demo/summary.csv": "a",
    "pipeline/__pycache__/cli.cpython-311.pyc": "x",
    "pipeline/metrics/__pycache__/f.bin_of-235.py311.nbi": "x",
    "pipeline/stray.parquet": b"\0" * (3 * 1024 * 1024),
    ".venv/bin/python": "x",
    ".git/HEAD": "x",
    "segcal.egg-info/PKG-INFO": "x",
    "weights.pth": "x",
    "notes.txt": "x",
}


def _named(root: Path) -> dict[str, Path]:
    return {
        "model.path": root / "models" / "tiny.pt",
        "model.module": root / "tests" / "helpers.py",
        "datasets.0.images": root / "data",  # a folder: not uploaded
        "datasets.0.manifest": root / ".aws" / "credentials",  # refused even when named
        "datasets.1.images": root / "nvidia" / "mit-b0",  # absent here: skipped silently
    }


def test_package_is_an_allow_list(tmp_path, caplog):
    # Ray's own packer zips the staged folder exactly as a submission does; its zip is the
    # oracle for what reaches the cluster.
    from ray._private.runtime_env.packaging import create_package

    root = tmp_path / "project"
    _tree(root, {**CODE, **SECRETS})
    config = root / "configs" / ".." / "configs" / "a.yaml"
    with pkg.staged_package(config, _named(root), root) as staged:
        renv = sub.runtime_env({"A": "1"}, staged)
        assert renv == {"working_dir": str(staged), "env_vars": {"A": "1"}}
        create_package(str(staged), tmp_path / "pkg.zip", include_gitignore=True)
    assert not staged.exists()  # the staging folder is removed after the submission
    names = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert names == {
        "pipeline/__init__.py",
        "pipeline/cli.py",
        "pipeline/models/espnet.py",
        "jobs/run.py",
        "pyproject.toml",
        "configs/a.yaml",
        "models/tiny.pt",
        "tests/helpers.py",
    }
    assert "Not uploading .aws/credentials (datasets.0.manifest)" in caplog.text
    assert "Not uploading data (datasets.0.images): not a file" in caplog.text
    assert "Not uploading pipeline/stray.parquet (package)" in caplog.text
    assert "mit-b0" not in caplog.text


def test_package_refuses_links_out_of_the_project(tmp_path):
    root = tmp_path / "project"
    _tree(root, CODE)
    (tmp_path / "home" / ".aws").mkdir(parents=True)
    (tmp_path / "home" / ".aws" / "credentials").write_text("[default]")
    (root / ".env").write_text("K=V")
    (root / "pipeline" / "creds.py").symlink_to(tmp_path / "home" / ".aws" / "credentials")
    (root / "pipeline" / "env.py").symlink_to(root / ".env")  # inside, but to a refused file
    (root / "pipeline" / "home").symlink_to(tmp_path / "home", target_is_directory=True)
    (root / "pipeline" / "same.py").symlink_to(root / "pipeline" / "cli.py")  # harmless
    files = {str(p) for p in pkg.package_files(None, {}, root)}
    assert "pipeline/same.py" in files
    assert not {
        f for f in files if f.startswith(("pipeline/creds", "pipeline/env", "pipeline/home"))
    }


@pytest.mark.parametrize(
    ("rel", "refused"),
    [
        ("pipeline/cli.py", False),
        ("configs/run.yaml", False),
        (".env", True),
        ("configs/.env.prod", True),
        (".ray/auth_token", True),
        ("home/.aws/credentials", True),
        ("secrets/db.yaml", True),
        ("Secrets/db.yaml", True),
        ("deploy/gcp-credentials.json", True),
        ("deploy/tls.key", True),
        ("keys/id_rsa.pub", True),
    ],
)
def test_refused(rel, refused):
    assert (pkg.refused(rel) is not None) == refused


def test_named_paths_of_a_config(tmp_path):
    from pipeline.config import JobConfig

    root = tmp_path / "project"
    _tree(root, {"tests/__init__.py": "", "tests/helpers.py": "x", "pkg/m/__init__.py": ""})
    cfg = JobConfig.model_validate(
        {
            "output": str(tmp_path / "out"),
            "model": {"kind": "python", "path": "tests.helpers:tiny_net", "num_classes": 4},
            "datasets": [
                {
                    "name": "cal",
                    "role": "calibration",
                    "domain": "day",
                    "images": str(root / "data" / "img"),
                    "labels": str(root / "data" / "lab"),
                }
            ],
            "calibrators": [{"name": "temperature", "label": "ts"}],
        }
    )
    named = pkg.named_paths(cfg, root)
    assert named == {
        "model.path[0]": root / "tests" / "__init__.py",
        "model.path[1]": root / "tests" / "helpers.py",
        "datasets.0.images": root / "data" / "img",
        "datasets.0.labels": root / "data" / "lab",
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
    """Plays the probe job (its logs: ``probe_logs``) and one job: log chunks, then a status."""

    def __init__(
        self,
        status="SUCCEEDED",
        exit_code=None,
        chunks=("a\n", "b\n"),
        drop=False,
        probe_logs="",
        probe_status="SUCCEEDED",
    ):
        from ray.job_submission import JobStatus

        self.final = JobStatus(status)
        self.statuses = [JobStatus.RUNNING, self.final]
        self.exit_code = exit_code
        self.chunks = chunks
        self.drop = drop
        self.probe_logs = probe_logs
        self.probe_status = JobStatus(probe_status)
        self.submitted: dict = {}
        self.probes: list[dict] = []
        self.uploaded: set[str] = set()
        self.deleted: list[str] = []
        self.stopped: list[str] = []

    def submit_job(self, **kwargs):
        if sub.PROBE_MARK in kwargs["entrypoint"]:
            self.probes.append(kwargs)
            return "raysubmit_probe"
        self.submitted = kwargs
        # What Ray would zip and upload, read while the staging folder exists.
        wd = Path(kwargs["runtime_env"]["working_dir"])
        self.uploaded = {p.relative_to(wd).as_posix() for p in wd.rglob("*") if p.is_file()}
        return "raysubmit_123"

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.drop:
            raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_status(self, job_id):
        if job_id == "raysubmit_probe":
            return self.probe_status
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.final

    def get_job_logs(self, job_id):
        return self.probe_logs

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(message="it broke", driver_exit_code=self.exit_code)

    def delete_job(self, job_id):
        self.deleted.append(job_id)

    def stop_job(self, job_id):
        self.stopped.append(job_id)


def _report(via, python, missing=()):
    body = {"via": via, "python": python, "version": "3.11.7", "missing": list(missing)}
    return f"{sub.PROBE_MARK} {json.dumps(body)}"


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


def test_follow_reports_a_drift_alarm_as_such_not_as_a_failure(monkeypatch, caplog):
    from pipeline import cli

    monkeypatch.setattr(sub, "POLL_S", 0.0)
    out = io.StringIO()
    code = sub.follow_job(FakeClient("FAILED", cli.DRIFT), "raysubmit_123", out=out)
    assert code == cli.DRIFT == sub.DRIFT_ALARM
    assert "finished with a drift alarm (exit code 4)" in caplog.text
    assert "FAILED" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


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
    _tree(tmp_path, {**CODE, **SECRETS})
    out = io.StringIO()
    job_id, code = sub.submit(
        "http://127.0.0.1:8265",
        "refresh",
        tmp_path / "configs" / "a.yaml",
        args=["--registry", "/reg"],
        env={"K": "V"},
        require_env=["TOKEN"],
        check=False,
        follow=follow,
        out=out,
        root=tmp_path,
    )
    assert job_id == "raysubmit_123"
    assert out.getvalue().startswith("raysubmit_123\n")
    assert code == (1 if follow else 0)
    assert client.probes == []
    command = client.submitted["entrypoint"]
    assert command.endswith("python jobs/refresh.py configs/a.yaml --registry /reg")
    assert '"${TOKEN:-}"' in command
    assert client.submitted["runtime_env"]["env_vars"] == {"K": "V"}
    assert client.uploaded == {
        "pipeline/__init__.py",
        "pipeline/cli.py",
        "pipeline/models/espnet.py",
        "jobs/run.py",
        "pyproject.toml",
        "configs/a.yaml",
    }
    assert not Path(client.submitted["runtime_env"]["working_dir"]).exists()


def test_submit_runs_the_job_on_the_probed_interpreter(monkeypatch, tmp_path):
    logs = "Running entrypoint...\n" + _report("path", "/usr/bin/python3", ["pandas"]) + "\n"
    logs += _report("ray", "/opt/venv/bin/python") + "\n"
    client = FakeClient(probe_logs=logs)
    monkeypatch.setattr(sub, "connect", lambda address: client)
    _tree(tmp_path, CODE)
    sub.submit(
        "http://h:8265", "run", tmp_path / "configs" / "a.yaml", env={"K": "V"}, root=tmp_path
    )
    assert client.probes[0]["runtime_env"] == {"env_vars": {"K": "V"}}  # no upload for it
    assert client.submitted["entrypoint"] == "/opt/venv/bin/python jobs/run.py configs/a.yaml"
    assert client.deleted == ["raysubmit_probe"]


def test_submit_stops_before_the_job_when_the_cluster_lacks_dependencies(monkeypatch, tmp_path):
    logs = _report("path", "/usr/bin/python3") + "\n"
    logs += _report("ray", "/opt/venv/bin/python", ["pandas", "yaml"]) + "\n"
    client = FakeClient(probe_logs=logs)
    monkeypatch.setattr(sub, "connect", lambda address: client)
    _tree(tmp_path, CODE)
    with pytest.raises(sub.SubmitError) as err:
        sub.submit("http://h:8265", "run", tmp_path / "configs" / "a.yaml", root=tmp_path)
    message = str(err.value)
    assert "cannot import pandas, yaml" in message
    assert "/opt/venv/bin/python -m pip install pandas pyyaml" in message
    assert "Nothing was submitted" in message
    assert client.submitted == {}


def test_probe_asks_for_the_filesystem_of_an_output_uri(monkeypatch, tmp_path):
    pytest.importorskip("s3fs")
    from pipeline.config import parse_config

    cfg = parse_config({"output": "s3://bucket/runs/x", "datasets": [],
                        "model": {"kind": "python", "path": "m:f", "num_classes": 2}})
    assert sub.requirements(cfg) == {**sub.DEPENDENCIES, "s3fs": "s3fs"}
    assert sub.requirements(None) == sub.DEPENDENCIES
    logs = _report("ray", "/opt/venv/bin/python", ["s3fs"]) + "\n"
    client = FakeClient(probe_logs=logs)
    monkeypatch.setattr(sub, "connect", lambda address: client)
    _tree(tmp_path, CODE)
    with pytest.raises(sub.SubmitError) as err:
        sub.submit("http://h:8265", "run", tmp_path / "configs" / "a.yaml", cfg=cfg,
                   root=tmp_path)
    assert "'s3fs'" in client.probes[0]["entrypoint"]
    assert "cannot import s3fs" in str(err.value)
    assert "/opt/venv/bin/python -m pip install s3fs" in str(err.value)
    assert client.submitted == {}


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(
            [("path", "/usr/bin/python3", []), ("ray", "/v/bin/python", [])],
            "/v/bin/python",
            id="ray-interpreter-preferred",
        ),
        pytest.param([("path", "/usr/bin/python3", [])], "python", id="no-proc-path-ok"),
        pytest.param([("ray", "/v/bin/python", [])], "/v/bin/python", id="no-python-on-path"),
        pytest.param(
            [("path", "/usr/bin/python3", ["torch"])],
            "cannot import torch",
            id="no-proc-path-lacks",
        ),
        pytest.param(
            [("path", "/usr/bin/python3", []), ("ray", "/v/bin/python", ["numba"])],
            "has them, but Ray's tasks do not run on it",
            id="ray-lacks-path-has",
        ),
        pytest.param([], "found no Python", id="nothing"),
    ],
)
def test_choose_python(lines, expected):
    logs = "\n".join(["noise", *(_report(*line) for line in lines), f"{sub.PROBE_MARK} {{bad"])
    reports = sub.parse_probe(logs)
    assert len(reports) == len(lines)
    if expected == "python" or expected.startswith("/"):
        assert sub.choose_python(reports, logs) == expected
    else:
        with pytest.raises(sub.SubmitError, match=expected):
            sub.choose_python(reports, logs)


def test_probe_that_does_not_finish(monkeypatch):
    client = FakeClient(probe_status="PENDING")
    monkeypatch.setattr(sub, "PROBE_POLL_S", 0.0)
    with pytest.raises(sub.SubmitError, match=r"did not finish in 0\.01s(.|\n)*--skip-check"):
        sub.probe_cluster(client, timeout_s=0.01)
    assert client.stopped == ["raysubmit_probe"]


def test_dependencies_cover_pyproject():
    import tomllib

    root = Path(sub.__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert names == set(sub.DEPENDENCIES)


def test_probe_entrypoint_finds_rays_interpreter(tmp_path):
    # The probe's shell reads the interpreter from its grandparent's command line, as it does
    # under Ray (job shell -> JobSupervisor worker -> raylet --python_worker_command=...).
    # Stand-ins: a "raylet" process whose argv carries the flag starts a "supervisor", which
    # runs the probe with `python` on the PATH lacking every module.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(
        "#!/bin/sh\nexec " + shlex.quote(sys.executable) + ' -S -I "$@"\n'
    )
    (fake_bin / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    supervisor = "import subprocess, sys; subprocess.run(['/bin/sh', '-c', sys.argv[1]])"
    raylet = (
        "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]])"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            raylet,
            supervisor,
            sub.probe_entrypoint(),
            f"--python_worker_command={sys.executable} -u worker.py",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    reports = {r["via"]: r for r in sub.parse_probe(proc.stdout)}
    assert set(reports) == {"path", "ray"}, proc.stdout + proc.stderr
    assert reports["ray"]["python"] == sys.executable
    assert reports["ray"]["missing"] == []
    assert "pandas" in reports["path"]["missing"]  # -S -I: no site-packages
    assert sub.choose_python(list(reports.values())) == sys.executable
