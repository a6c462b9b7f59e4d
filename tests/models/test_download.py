"""Checked downloads: served from a local HTTP server on 127.0.0.1, never the internet."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import load_model, resolve, sha256_file

PAYLOAD = b"pretend these are weights" * 1000


def sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def server(static_server):
    """The static server with ``w.bin``; yields (base URL, list of requested paths, folder)."""
    base, requests, www = static_server
    (www / "w.bin").write_bytes(PAYLOAD)
    return base, requests, www


def files_under(folder):
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_download_once_then_reuse(server, tmp_path):
    base, requests, _ = server
    cache = tmp_path / "cache"
    path = resolve(f"{base}/w.bin", sha256=sha(PAYLOAD), cache_dir=cache)
    assert path.read_bytes() == PAYLOAD
    assert path.is_relative_to(cache)
    assert resolve(f"{base}/w.bin", sha256=sha(PAYLOAD), cache_dir=cache) == path
    assert resolve(f"{base}/w.bin", cache_dir=cache) == path
    assert requests == ["/w.bin"]
    assert files_under(cache) == ["w.bin"]


def test_mismatching_download_is_discarded(server, tmp_path):
    base, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=f"sha256 {'0' * 64}, but got {sha(PAYLOAD)}"):
        resolve(f"{base}/w.bin", sha256="0" * 64, cache_dir=cache)
    assert files_under(cache) == []


def test_new_expected_digest_fetches_again(server, tmp_path):
    base, requests, www = server
    cache = tmp_path / "cache"
    old = resolve(f"{base}/w.bin", cache_dir=cache)
    (www / "w.bin").write_bytes(b"new release")
    new = resolve(f"{base}/w.bin", sha256=sha(b"new release"), cache_dir=cache)
    assert new == old
    assert new.read_bytes() == b"new release"
    assert len(requests) == 2


def test_stale_cache_is_not_used_when_the_new_download_mismatches(server, tmp_path):
    base, _, _ = server
    cache = tmp_path / "cache"
    resolve(f"{base}/w.bin", cache_dir=cache)
    with pytest.raises(ValueError, match="the file was discarded"):
        resolve(f"{base}/w.bin", sha256=sha(b"something else"), cache_dir=cache)
    assert files_under(cache) == []


def test_failed_download_leaves_nothing(server, tmp_path):
    base, _, _ = server
    cache = tmp_path / "cache"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        resolve(f"{base}/missing.bin", cache_dir=cache)
    assert files_under(cache) == []


def test_cache_folder_comes_from_the_environment(server, tmp_path, monkeypatch):
    base, _, _ = server
    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "env-cache"))
    assert resolve(f"{base}/w.bin").is_relative_to(tmp_path / "env-cache")


def test_model_weights_from_a_url(server, tmp_path, monkeypatch):
    base, requests, www = server
    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "cache"))
    net = torch.nn.Conv2d(3, 2, 1)
    torch.jit.save(torch.jit.script(net), str(www / "net.pt"))
    digest = sha((www / "net.pt").read_bytes())
    cfg = ModelConfig(kind="torchscript", path=f"{base}/net.pt", sha256=digest, num_classes=2)
    model = load_model(cfg)
    assert model(torch.zeros(1, 4, 4, 3, dtype=torch.uint8)).shape == (1, 2, 4, 4)
    assert requests == ["/net.pt"]
    local = ModelConfig(kind="torchscript", path=str(www / "net.pt"), num_classes=2)
    assert model.fingerprint == load_model(local).fingerprint  # same bytes, same logits


def test_local_paths(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(PAYLOAD)
    assert resolve(f) == f
    assert resolve(str(f), sha256=sha(PAYLOAD).upper()) == f
    assert resolve(tmp_path) == tmp_path


@pytest.mark.parametrize(
    ("make", "sha256", "error", "match"),
    [
        pytest.param(lambda d: d / "w.bin", "0" * 64, ValueError, "w.bin` to have sha256 0000",
                     id="local-mismatch"),
        pytest.param(lambda d: d, "0" * 64, ValueError, "to be given for a file", id="folder"),
        pytest.param(lambda d: d / "nope.bin", None, FileNotFoundError, "existing file or folder",
                     id="missing"),
        pytest.param(lambda d: "s3://bucket/w.bin", None, ValueError, "http\\(s\\) URL",
                     id="scheme"),
    ],
)
def test_local_path_errors(tmp_path, make, sha256, error, match):
    (tmp_path / "w.bin").write_bytes(PAYLOAD)
    with pytest.raises(error, match=match):
        resolve(make(tmp_path), sha256=sha256)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD  # a user's own file is never deleted


def test_sha256_file_matches_hashlib(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(PAYLOAD)
    assert sha256_file(f) == sha(PAYLOAD)
