"""Submit a segcal stage to a Ray cluster as a Ray job (wraps ``JobSubmissionClient``).

The project folder is uploaded as the job's ``working_dir`` (without run outputs, virtual
environments, caches and ``.git``), and the entrypoint is ``python jobs/<stage>.py CONFIG ...``.
The address is the dashboard's HTTP address, e.g. ``http://127.0.0.1:8265`` after
``ray dashboard cluster.yaml`` forwards it over SSH.

Token authentication: when the cluster runs with ``RAY_AUTH_MODE=token``, set
``RAY_AUTH_MODE=token`` on the submitting machine too, and the token as ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or the default ``~/.ray/auth_token`` (``ray get-auth-token`` prints it);
Ray's client then sends it as an ``Authorization: Bearer`` header on every request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import urlparse

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
JOBS = ("run", "extract", "fit", "evaluate", "report", "refresh")
# gitignore-style patterns, relative to the project root; Ray refuses packages over 500 MiB.
EXCLUDES = [
    "/runs/",
    ".venv/",
    "venv/",
    ".git/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".cache/",
    "*.egg-info/",
    "/build/",
    "/dist/",
    "*.pth",
    "*.pt",
]
CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0


class SubmitError(RuntimeError):
    """The cluster cannot be reached, refuses the credentials, or rejects the job."""


def entrypoint(stage: str, config: str, args: Sequence[str] = ()) -> str:
    """The shell command the job runs on the cluster.

    Example:
        >>> entrypoint("refresh", "configs/a b.yaml", ["--registry", "/reg"])
        "python jobs/refresh.py 'configs/a b.yaml' --registry /reg"
    """
    if stage not in JOBS:
        raise ValueError(f"Expected `stage` to be one of {list(JOBS)}, but got {stage!r}")
    return shlex.join(["python", f"jobs/{stage}.py", config, *args])


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


def runtime_env(env: Mapping[str, str] | None = None, root: Path = PROJECT_ROOT) -> dict:
    """The job's runtime environment: the project folder and extra environment variables."""
    renv: dict = {"working_dir": str(root), "excludes": list(EXCLUDES)}
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


def submit(
    address: str,
    stage: str,
    config: str | Path,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
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
        env: environment variables for the job.
        follow: stream the job's logs to ``out`` until it ends.
        out: where the job id (and followed logs) go.
        root: the project folder uploaded as ``working_dir``.

    Returns:
        The submission id, and the exit status: 0 when submitted (not following) or when the
        job succeeded; the job's driver exit code when it failed with one; 1 for a failed or
        stopped job without one.

    Raises:
        ValueError: a malformed address or unknown stage.
        SubmitError: the cluster cannot be reached or rejects the submission.
    """
    command = entrypoint(stage, config_argument(config, root), args)
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env(env, root))
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
    logger.error("Job %s %s: %s", job_id, status.value, info.message)
    return info.driver_exit_code or 1
