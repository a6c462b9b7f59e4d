"""Submit a segcal stage to a Ray cluster as a Ray job (wraps ``JobSubmissionClient``).

The job's ``working_dir`` is a staging folder holding an allow-list of the project, chosen by
:mod:`pipeline.submit_package` (:func:`~pipeline.submit_package.package_files`): the
``pipeline`` package, ``jobs/``, ``pyproject.toml``, the config and the files it names, when
they lie inside the project. Nothing else is uploaded: no dotfile or dot-folder (``.env``,
``.ray/auth_token``, ``.aws/credentials``, ``.git``, ``.venv``), nothing under ``secrets/`` or
that looks like a key or credential, no data, runs or outputs. This module does the rest: it
connects to the cluster, runs a probe job that checks segcal's dependencies import there and
finds the interpreter Ray itself runs on (:func:`probe_cluster`; the submission stops before
the job when they do not import), submits ``PYTHON jobs/<stage>.py CONFIG ...``
(:func:`entrypoint`) and, with ``follow``, streams the job's logs and returns its exit status
(:func:`follow_job`). The address is the dashboard's HTTP address, e.g.
``http://127.0.0.1:8265`` after ``ray dashboard cluster.yaml`` forwards it over SSH.

Secrets: ``env`` values are stored in the job's info, which anyone who can reach the dashboard
(or run ``ray job list``) reads. Set a secret in the cluster's own environment instead (where
``ray start`` runs: the job inherits it) and name it with ``require_env``: the job then checks
that it is set, and its value never leaves the cluster.

Token authentication: when the cluster runs with ``RAY_AUTH_MODE=token``, set
``RAY_AUTH_MODE=token`` on the submitting machine too, and the token as ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or the default ``~/.ray/auth_token`` (``ray get-auth-token`` prints it);
Ray's client then sends it as an ``Authorization: Bearer`` header on every request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

from pipeline.submit_package import PROJECT_ROOT, named_paths, staged_package

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from pipeline.config import JobConfig

logger = logging.getLogger(__name__)

DRIFT_ALARM = 4  # `segcal refresh`'s exit code when it decided but a drift alarm fired (cli.DRIFT)

JOBS = ("run", "extract", "fit", "evaluate", "report", "refresh")

# --- what the cluster must have ---
# Import name of each of segcal's dependencies (pyproject.toml's [project] dependencies).
DEPENDENCIES = {
    "torch": "torch",
    "ray": "ray",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "numpy": "numpy",
    "numba": "numba",
    "safetensors": "safetensors",
    "pydantic": "pydantic",
    "pyyaml": "yaml",
    "matplotlib": "matplotlib",
    "pillow": "PIL",
    "fsspec": "fsspec",
    "universal_pathlib": "upath",
}
PROBE_MARK = "SEGCAL_PROBE"
PROBE_TIMEOUT_S = 120.0
PROBE_POLL_S = 0.5
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SubmitError(RuntimeError):
    """The cluster cannot be reached, refuses the credentials, or rejects the job."""


def entrypoint(
    stage: str,
    config: str,
    args: Sequence[str] = (),
    *,
    python: str = "python",
    require_env: Sequence[str] = (),
) -> str:
    """The shell command the job runs on the cluster.

    Args:
        stage: one of :data:`JOBS`.
        config: the config as the job names it (see :func:`config_argument`).
        args: extra arguments for the job script.
        python: the interpreter that runs the job script.
        require_env: environment variables the job must find in the cluster's own environment;
            the command stops with exit code 2 and the variable named when one is unset.

    Raises:
        ValueError: an unknown stage, or a ``require_env`` entry that is not a variable name.

    Example:
        >>> entrypoint("refresh", "configs/a b.yaml", ["--registry", "/reg"])
        "python jobs/refresh.py 'configs/a b.yaml' --registry /reg"
    """
    if stage not in JOBS:
        raise ValueError(f"Expected `stage` to be one of {list(JOBS)}, but got {stage!r}")
    checks = []
    for name in require_env:
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(
                f"Expected `require_env` entries to be variable names, but got {name!r}"
            )
        message = shlex.quote(f"segcal: {name} is not set in the cluster's environment")
        checks.append(f'[ -n "${{{name}:-}}" ] || {{ echo {message} >&2; exit 2; }}; ')
    return "".join(checks) + shlex.join([python, f"jobs/{stage}.py", config, *args])


def config_argument(config: str | Path, root: Path = PROJECT_ROOT) -> str:
    """How the job names the config: relative to ``working_dir`` when inside the project.

    A config outside the project is passed as an absolute path, which must then exist on the
    cluster's head node too (shared storage), since only the project folder is uploaded.
    """
    path = Path(config).resolve()
    if path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    logger.warning(
        "Config %s is outside the project folder %s and is not uploaded; it must exist at the "
        "same path on the cluster",
        path,
        root,
    )
    return str(path)


def runtime_env(
    env: Mapping[str, str] | None = None, working_dir: str | Path | None = None
) -> dict:
    """The job's runtime environment: the staged project folder and extra environment variables."""
    renv: dict[str, Any] = {}
    if working_dir is not None:
        renv["working_dir"] = str(working_dir)
    if env:
        renv["env_vars"] = dict(env)
    return renv


def check_address(address: str) -> str:
    """Validate an ``http(s)://HOST:PORT`` dashboard address and return it without a trailing /.

    Raises:
        ValueError: not an http(s) URL with a host.
    """
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(
            f"Expected `address` to be the dashboard URL http(s)://HOST:PORT "
            f"(e.g. http://127.0.0.1:8265), but got {address!r}"
        )
    return address.rstrip("/")


@contextmanager
def _explicit_address() -> Iterator[None]:
    # JobSubmissionClient silently prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address
    # it is given; the address on our command line must win.
    saved = {
        k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str) -> JobSubmissionClient:
    """A client for the cluster at ``address``, checked to answer.

    Raises:
        ValueError: a malformed address.
        SubmitError: nothing answers at the address, or it refuses our credentials.
    """
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = check_address(address)
    hint = "is the cluster up, and is its dashboard forwarded (`ray dashboard cluster.yaml`)?"
    # Ray's client has no connect timeout; an address that drops packets would hang it.
    try:
        requests.get(f"{address}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        raise SubmitError(f"Cannot reach the Ray job server at {address} ({err}): {hint}") from None
    try:
        with _explicit_address():
            return JobSubmissionClient(address)
    except AuthenticationError as err:
        raise SubmitError(
            f"The Ray cluster at {address} refused the credentials: {err}\nSet RAY_AUTH_MODE=token "
            f"and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token."
        ) from None
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"Cannot use the Ray job server at {address}: {err}") from None


# --- the cluster's Python -----------------------------------------------------------------------


def requirements(cfg: JobConfig | None) -> dict[str, str]:
    """Distribution -> import name of what the cluster must have to run ``cfg``.

    :data:`DEPENDENCIES`, and the filesystem of an ``output`` URI (``s3://``: s3fs).
    """
    from pipeline.storage import filesystem_requirement, is_uri

    needed = dict(DEPENDENCIES)
    if cfg is not None and is_uri(cfg.output):
        needed.update(filesystem_requirement(cfg.output))
    return needed


def _probe_snippet(needed: Mapping[str, str] = DEPENDENCIES) -> str:
    modules = sorted(set(needed.values()))
    return (
        "import importlib.util as u, json, sys; "
        f"m = [n for n in {modules!r} if u.find_spec(n) is None]; "
        f"print({PROBE_MARK!r}, json.dumps({{'via': sys.argv[1], 'python': sys.executable, "
        "'version': sys.version.split()[0], 'missing': m}))"
    )


def probe_entrypoint(needed: Mapping[str, str] = DEPENDENCIES) -> str:
    """A shell command that reports, for ``python`` on the PATH and for the interpreter Ray's
    workers run on, which of :data:`DEPENDENCIES` it cannot import (one JSON line each).

    Ray's worker interpreter is read from the raylet's ``--python_worker_command`` (the job
    runs as a child of a Ray worker, itself a child of the raylet; Linux ``/proc``).
    """
    snippet = shlex.quote(_probe_snippet(needed))
    return (
        f"python -c {snippet} path 2>/dev/null; "
        "raylet=$(awk '/^PPid:/{print $2}' /proc/$PPID/status 2>/dev/null); "
        "worker=$(tr '\\0' '\\n' < /proc/$raylet/cmdline 2>/dev/null "
        "| sed -n 's/^--python_worker_command=//p' | head -n 1); "
        f'set -- $worker; [ -z "$1" ] || "$1" -c {snippet} ray; true'
    )


def parse_probe(logs: str) -> list[dict[str, Any]]:
    """The reports :func:`probe_entrypoint` printed, in order; other lines are ignored."""
    reports = []
    for line in logs.splitlines():
        if line.startswith(PROBE_MARK + " "):
            try:
                reports.append(json.loads(line[len(PROBE_MARK) + 1 :]))
            except json.JSONDecodeError:
                continue
    return reports


def _install_hint(python: str, missing: Sequence[str],
                  needed: Mapping[str, str] = DEPENDENCIES) -> str:
    dists = {module: dist for dist, module in needed.items()}
    names = " ".join(dists.get(m, m) for m in missing)
    return (
        f"install segcal's dependencies there on every node, e.g. `{python} -m pip install "
        f"{names}` (or the project itself, `{python} -m pip install /path/to/segcal`, as "
        "cluster.yaml's setup commands do)"
    )


def choose_python(
    reports: Sequence[Mapping[str, Any]], logs: str = "",
    needed: Mapping[str, str] = DEPENDENCIES,
) -> str:
    """The interpreter the job should run on, from :func:`probe_entrypoint`'s reports.

    Ray's worker interpreter when it was found: the job's tasks run on it, and the driver must
    match it. Otherwise ``python`` on the PATH.

    Raises:
        SubmitError: that interpreter lacks some of segcal's dependencies (named, with the
            command that installs them), or the probe found no Python at all.
    """
    ray_python = next((r for r in reports if r.get("via") == "ray"), None)
    path_python = next((r for r in reports if r.get("via") == "path"), None)
    if ray_python is not None:
        python, missing = str(ray_python["python"]), list(ray_python.get("missing") or [])
        if missing:
            also = ""
            if path_python is not None and not path_python.get("missing"):
                also = (
                    f" (`python` on the PATH, {path_python['python']}, has them, but Ray's "
                    "tasks do not run on it)"
                )
            raise SubmitError(
                f"The cluster cannot run segcal: Ray's workers run on {python} (Python "
                f"{ray_python.get('version')}), which cannot import {', '.join(missing)}{also}. "
                f"Fix: {_install_hint(python, missing, needed)}; or start Ray from an "
                "environment that has them. Nothing was submitted."
            )
        return python
    if path_python is not None:
        missing = list(path_python.get("missing") or [])
        if missing:
            python = str(path_python["python"])
            raise SubmitError(
                f"The cluster cannot run segcal: its `python` ({python}, Python "
                f"{path_python.get('version')}) cannot import {', '.join(missing)}. "
                f"Fix: {_install_hint(python, missing, needed)}, or put the environment that "
                "has them first on the PATH of `ray start`. Nothing was submitted."
            )
        return "python"
    tail = "\n".join(logs.strip().splitlines()[-20:])
    raise SubmitError(
        "The probe job found no Python on the cluster that it could run (neither `python` on "
        f"the PATH nor Ray's worker interpreter). Its output:\n{tail}\nNothing was submitted; "
        "--skip-check submits without this check."
    )


def probe_cluster(
    client: JobSubmissionClient,
    env: Mapping[str, str] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
    needed: Mapping[str, str] = DEPENDENCIES,
) -> str:
    """Run the probe job (no upload: it needs no files) and return the interpreter to use.

    Raises:
        SubmitError: see :func:`choose_python`; also when the probe job is rejected or does
            not end within ``timeout_s``.
    """
    try:
        probe_id = client.submit_job(
            entrypoint=probe_entrypoint(needed),
            runtime_env=runtime_env(env),
            metadata={"segcal": "dependency probe"},
        )
    except RuntimeError as err:
        raise SubmitError(f"The Ray cluster rejected the dependency probe job: {err}") from None
    deadline = time.monotonic() + timeout_s
    while not client.get_job_status(probe_id).is_terminal():
        if time.monotonic() > deadline:
            with _quietly():
                client.stop_job(probe_id)
            raise SubmitError(
                f"The dependency probe job {probe_id} did not finish in {timeout_s:g}s: is the "
                "cluster busy or its head unhealthy? Nothing was submitted; --skip-check "
                "submits without this check."
            )
        time.sleep(PROBE_POLL_S)
    logs = client.get_job_logs(probe_id)
    with _quietly():
        client.delete_job(probe_id)  # keep the job list to real jobs
    python = choose_python(parse_probe(logs), logs, needed)
    if python != "python":
        logger.info("The job runs on Ray's interpreter at the cluster: %s", python)
    return python


@contextmanager
def _quietly() -> Iterator[None]:
    try:
        yield
    except Exception as err:  # housekeeping only: the outcome does not depend on it
        logger.debug("ignored: %s", err)


# --- submitting ---------------------------------------------------------------------------------


def submit(
    address: str,
    stage: str,
    config: str | Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    require_env: Sequence[str] = (),
    cfg: JobConfig | None = None,
    check: bool = True,
    follow: bool = False,
    out: TextIO = sys.stdout,
    root: Path = PROJECT_ROOT,
) -> tuple[str, int]:
    """Submit ``jobs/<stage>.py CONFIG ARGS`` to the cluster at ``address``.

    Args:
        address: the dashboard URL, e.g. ``http://127.0.0.1:8265``.
        stage: one of :data:`JOBS`.
        config: the run config (see :func:`config_argument` for configs outside the project).
        args: extra arguments for the job script (``--set k=v``, ``--registry DIR``, ...).
        env: environment variables for the job. Their values are stored in the job's info,
            readable by anyone with access to the dashboard: no secrets here.
        require_env: variables the job must find in the cluster's own environment (secrets
            passed by reference: their values never leave the cluster).
        cfg: the parsed config; the files it names inside ``root`` are uploaded with it
            (see :func:`pipeline.submit_package.package_files`).
        check: first run a probe job that checks the cluster can import segcal's
            dependencies, and run the job on the interpreter Ray's workers use
            (:func:`probe_cluster`).
        follow: stream the job's logs to ``out`` until it ends.
        out: where the job id (and followed logs) go.
        root: the project folder.

    Returns:
        The submission id, and the exit status: 0 when submitted (not following) or when the
        job succeeded; the job's driver exit code when it failed with one; 1 for a failed or
        stopped job without one.

    Raises:
        ValueError: a malformed address, unknown stage or bad ``require_env`` name.
        SubmitError: the cluster cannot be reached, lacks segcal's dependencies, or rejects
            the submission.
    """
    config_arg = config_argument(config, root)
    entrypoint(stage, config_arg, args, require_env=require_env)  # bad input: fail first
    client = connect(address)
    python = probe_cluster(client, env, needed=requirements(cfg)) if check else "python"
    command = entrypoint(stage, config_arg, args, python=python, require_env=require_env)
    named = named_paths(cfg, root) if cfg is not None else {}
    with staged_package(config, named, root) as working_dir:
        try:
            job_id = client.submit_job(
                entrypoint=command, runtime_env=runtime_env(env, working_dir)
            )
        except RuntimeError as err:
            raise SubmitError(f"The Ray cluster at {address} rejected the job: {err}") from None
    print(job_id, file=out, flush=True)
    if not follow:
        return job_id, 0
    return job_id, follow_job(client, job_id, out=out)


def follow_job(client: JobSubmissionClient, job_id: str, *, out: TextIO = sys.stdout) -> int:
    """Stream a job's logs to ``out`` until it ends; return its exit status (see :func:`submit`)."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as err:
        # The log stream can drop (e.g. the head restarts); the status below still tells.
        logger.warning("Log stream of job %s ended early: %s", job_id, err)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(POLL_S)
    if status == JobStatus.SUCCEEDED:
        return 0
    info = client.get_job_info(job_id)
    if info.driver_exit_code == DRIFT_ALARM:
        # Ray calls any non-zero exit a failure; a refresh that decided and then raised the drift
        # alarm did not fail.
        logger.warning("Job %s finished with a drift alarm (exit code %d): the refresh decided "
                       "as usual; see its output above", job_id, DRIFT_ALARM)
        return DRIFT_ALARM
    logger.error("Job %s %s: %s", job_id, status.value, info.message)
    return info.driver_exit_code or 1
