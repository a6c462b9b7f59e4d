import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from pipeline.paths import (
    RunPaths,
    atomic_write_json,
    atomic_write_text,
    child,
    make_temp_dir,
    scratch_dir,
)


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


# --------------------------------------------------------------------------------------------
# Names joined to paths stay inside their parent (issue 19 item 1)


@pytest.mark.parametrize("name", [".", "..", "", "a/b", "../x", "/abs", "a\0b"])
def test_dataset_and_artifact_dirs_refuse_names_that_leave_their_parent(tmp_path, name):
    paths = RunPaths(tmp_path / "run", "0123456789abcdef")
    with pytest.raises(ValueError, match="dataset name to be one folder name inside"):
        paths.dataset_dir(name)
    with pytest.raises(ValueError, match="calibrator label to be one folder name inside"):
        paths.artifact_dir(name)


def test_a_symlink_out_of_the_parent_is_refused(tmp_path):
    paths = RunPaths(tmp_path / "run", "0123456789abcdef")
    paths.artifacts.mkdir(parents=True)
    (paths.artifacts / "ts").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="'ts'"):
        paths.artifact_dir("ts")


def test_plain_names_are_joined(tmp_path):
    paths = RunPaths(tmp_path / "run", "0123456789abcdef")
    assert paths.dataset_dir("camvid-val.v2") == tmp_path / "run/shards/0123456789ab/camvid-val.v2"
    assert paths.artifact_dir("..ts") == tmp_path / "run/artifacts/..ts"
    assert child(tmp_path, "a") == tmp_path / "a"


# --------------------------------------------------------------------------------------------
# Permissions follow the umask (issue 17 item 10)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"),
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_atomic_writes_and_scratch_dirs_follow_the_umask(tmp_path, umask, mask, file_mode,
                                                        dir_mode):
    umask(mask)
    target = tmp_path / "sub" / "summary.csv"
    atomic_write_text(target, "a,b\n")
    assert _mode(target) == file_mode
    assert _mode(target.parent) == dir_mode
    assert _mode(scratch_dir(tmp_path, "evaluate")) == dir_mode
    made = make_temp_dir(tmp_path, prefix=".ts.", suffix=".tmp")
    assert _mode(made) == dir_mode
    assert made.name.startswith(".ts.")
    assert made.name.endswith(".tmp")


def test_rewrite_takes_the_umask_not_the_old_mode(tmp_path, umask):
    target = tmp_path / "report.html"
    target.write_text("old")
    target.chmod(0o600)  # e.g. written by an older segcal with tempfile.mkstemp
    atomic_write_json(target, {"new": True})
    assert _mode(target) == 0o644
    assert json.loads(target.read_text()) == {"new": True}


def test_output_lock_refuses_a_second_writer_and_is_released(tmp_path):
    from pipeline.paths import OutputLockedError, output_lock

    with output_lock(tmp_path / "run") as lock:
        assert f"pid {os.getpid()}" in lock.read_text()
        second = output_lock(tmp_path / "run")
        with pytest.raises(OutputLockedError, match=r"run to be free, but pid \d+ on .* "
                                                    r"is writing it \(lock file .*\.segcal\.lock"):
            second.__enter__()
    with output_lock(tmp_path / "run"):  # released on exit
        pass
