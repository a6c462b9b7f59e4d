"""Shared test constants, seeded synthetic inputs, the real-data fixtures and one local Ray."""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Ray writes an auth token to $HOME on first start unless told otherwise; keep tests hermetic.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Local test runtimes bind to loopback only (Ray otherwise advertises the machine's address).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import torch

# Two real cores, many small tensors: intra-op threads only add contention.
torch.set_num_threads(1)

NUM_CLASSES = 5
H = W = 8
N_IMAGES = 4
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_logits(
    n: int = N_IMAGES, c: int = NUM_CLASSES, h: int = H, w: int = W, *, scale: float = 3.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded logits (n, c, h, w) and labels (n, h, w) drawn from softmax(logits / scale).

    The labels follow the softened distribution, so the raw logits are over-confident by a
    temperature of ``scale``.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g) * 2.0 * scale
    probs = torch.softmax(logits / scale, dim=1).permute(0, 2, 3, 1).reshape(-1, c)
    labels = torch.multinomial(probs, 1, generator=g).reshape(n, h, w)
    return logits, labels


def _existing(env: str, default: Path) -> Path | None:
    value = os.environ.get(env)
    path = Path(value) if value else default
    return path if path.exists() else None


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The CamVid folder (CAMVID_ROOT or ../shared/data/camvid); skips when absent."""
    root = _existing("CAMVID_ROOT", SHARED / "data" / "camvid")
    if root is None or not (root / "test").is_dir():
        pytest.skip("CamVid data not found: set CAMVID_ROOT")
    return root


@pytest.fixture(scope="session")
def espnet_weights() -> Path:
    """The ESPNet CamVid weights (SEGCAL_ESPNET_WEIGHTS or ../shared/models/espnet); skips."""
    path = _existing(
        "SEGCAL_ESPNET_WEIGHTS", SHARED / "models" / "espnet" / "espnet_p_2_q_8_camvid.pth"
    )
    if path is None or not path.is_file():
        pytest.skip("ESPNet weights not found: set SEGCAL_ESPNET_WEIGHTS")
    return path


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray runtime for the whole session (tests marked ``ray``).

    Four logical CPUs on a 2-core machine: Ray Data and Ray Train hang when an actor pool or
    the Train workers hold every CPU, so the scheduler needs headroom beyond the real cores.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    temp = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        _temp_dir=str(temp),
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def static_server(tmp_path, monkeypatch):
    """Serve ``tmp_path / "www"`` on loopback; yields (base URL, requested paths, folder)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")  # an http_proxy in CI must not see these
    www = tmp_path / "www"
    www.mkdir()
    requests = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests, www
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
