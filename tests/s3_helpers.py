"""An S3-compatible server on loopback (moto in server mode) for the object-store tests.

Started as a subprocess on a free 127.0.0.1 port; clients find it through the standard
``AWS_ENDPOINT_URL`` variable (botocore, s3fs and pyarrow all read it), with dummy credentials.
Nothing is mocked inside the processes under test: they talk HTTP to a real server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from unittest import mock

import pytest

BUCKET = "segcal-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def as_client(env: dict[str, str]) -> Iterator[None]:
    """This process as a client of the server ``env`` describes (plus any other variables).

    The variables are set and s3fs's cached clients (built for an earlier server, or none)
    dropped; both are undone on exit.
    """
    import s3fs

    with mock.patch.dict(os.environ, env):
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """Run a moto S3 server holding an empty bucket :data:`BUCKET`; yields its client env.

    Skips the test when moto is not installed (it comes with the ``dev`` extra).
    """
    pytest.importorskip("moto.server", reason="moto[server] (dev extra) serves S3 on loopback")
    pytest.importorskip("s3fs", reason="s3fs (s3 extra) is fsspec's S3 filesystem")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = {"AWS_ACCESS_KEY_ID": "segcal-test", "AWS_SECRET_ACCESS_KEY": "segcal-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on port {port}")
                time.sleep(0.2)
        request = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        yield env
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
