import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.paths import atomic_write_json, atomic_write_text, scratch_dir


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert os.listdir(target.parent) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_scratch_dir_removes_only_folders_of_dead_processes_on_this_host(tmp_path):
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f".evaluate-{host}-{_dead_pid()}-abc"
    live = tmp_path / f".evaluate-{host}-{os.getpid()}-def"
    other_host = tmp_path / f".evaluate-elsewhere-{_dead_pid()}-ghi"
    other_stage = tmp_path / f".report-{host}-{_dead_pid()}-jkl"
    for folder in (dead, live, other_host, other_stage):
        folder.mkdir()
        (folder / "per_image.parquet").write_bytes(b"partial")
    new = scratch_dir(tmp_path, "evaluate")
    assert not dead.exists()
    assert live.exists()
    assert other_host.exists()
    assert other_stage.exists()
    assert new.is_dir()
    assert list(new.iterdir()) == []
    assert new.name.startswith(f".evaluate-{host}-{os.getpid()}-")
