"""Fit, evaluate and report under faults (issue 18): the driver SIGKILLed while a stage writes
its outputs, then the same command rerun; an evaluation actor SIGKILLed mid-evaluation.

One uninterrupted run of every stage on tiny synthetic data (in this process, on the session's
local Ray) makes the reference output folder, and a registry promotes it. Each driver test
restores that folder, starts ``segcal fit|evaluate|report`` as its own process (joined to the
same Ray through ``RAY_ADDRESS``, so no test pays for a Ray start of its own) and kills it at a
fixed point of its writes: a wrapper around ``os.replace`` SIGKILLs the driver's process group
at the rename named by the test, the one that would leave the most mixed state behind. The
checks, after the kill and after the rerun:

- every file the killed stage did not reach is byte-identical to the reference (earlier results
  intact), the one being renamed is the old one or absent (never partial), and the killed
  stage's stamp is gone, so ``segcal run`` would not skip it;
- the rerun exits 0 and its outputs equal the reference (tolerances below), with no hidden
  scratch left anywhere in the output folder;
- the registry's ``current`` and every byte of the promoted run are unchanged.

Tolerances. Fit, evaluation and report run the same code on the same inputs with the same
thread counts as the reference, so files are compared exactly, except: calibrator weights and
card floats (``rtol=1e-5, atol=1e-7``: a refit may sum in another order) and the evaluation
tables (``rtol=1e-9, atol=1e-12``: rows reach the driver in any order, so sums over images are
added in another order). ``timings.json`` holds wall-clock times and is only checked to parse.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.numpy
import yaml

from pipeline import registry
from pipeline.config import load_config
from pipeline.evaluate import SUMMARY, TABLES
from pipeline.stages import STAGES, is_current, run_stages
from tests.extract_helpers import NUM_CLASSES, write_pairs

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[1]
SEGCAL = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]
ALLOWED_HIDDEN = {".segcal.lock", ".stages"}  # the output lock and the stage stamps
WEIGHT_TOL = {"rtol": 1e-5, "atol": 1e-7}
TABLE_TOL = {"rtol": 1e-9, "atol": 1e-12}

# The driver, with os.replace wrapped: at the first rename of a path matching SRC onto a path
# matching DST, the whole process group is SIGKILLed (the driver and anything it started).
KILLED_AT_RENAME = """
import fnmatch, os, signal, sys
src_pattern, dst_pattern = sys.argv[1], sys.argv[2]
real = os.replace
def dying(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(str(src), src_pattern) and fnmatch.fnmatch(str(dst), dst_pattern):
        os.killpg(os.getpgid(0), signal.SIGKILL)
    return real(src, dst, *args, **kwargs)
os.replace = dying
from pipeline.cli import main
sys.exit(main(sys.argv[3:]))
"""


# --- the reference run -------------------------------------------------------------------------


def _write_config(base: Path) -> Path:
    write_pairs(base / "cal", 8, (16, 24), seed=1)
    write_pairs(base / "test", 6, (16, 24), seed=2)
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output": str(base / "out"),
        "model": {"kind": "python", "path": "tests.extract_helpers:tiny_net",
                  "num_classes": NUM_CLASSES},
        "datasets": [
            {"name": "cal", "role": "calibration", "domain": "day",
             "images": str(base / "cal" / "img"), "labels": str(base / "cal" / "lab")},
            {"name": "test", "role": "test", "domain": "day",
             "images": str(base / "test" / "img"), "labels": str(base / "test" / "lab")},
        ],
        "calibrators": [{"name": "temperature"}, {"name": "selective"}],
        "extract": {"batch_size": 4, "rows_per_shard": 2},
        "fit": {"mode": "local", "epochs": 2, "pixels_per_image": 256},
        "evaluate": {"bootstrap": 100, "num_actors": 1, "use_gpu": False},
    }))
    return path


def _env(base: Path, address: str) -> dict:
    env = {**os.environ, "HOME": str(base / "home"), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "RAY_ADDRESS": address}
    env.pop("SEGCAL_RAY_BIND", None)
    return env


def _segcal(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGCAL, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory):
    """An uninterrupted run of every stage (copied to ``snapshot``) and a registry promoting it."""
    base = tmp_path_factory.mktemp("stage_faults")
    (base / "home").mkdir()
    config = _write_config(base)
    env = _env(base, ray_local.get_runtime_context().gcs_address)
    # In this process, on the session's Ray: what `segcal run --no-check` does, less a start-up.
    assert run_stages(load_config(config), STAGES) == dict.fromkeys(STAGES, True)
    out = base / "out"
    snapshot = base / "snapshot"
    shutil.copytree(out, snapshot, symlinks=True)
    root = base / "registry"
    with registry.lock(root):
        run_id = registry.add_run(root, out, {})
        registry.promote(root, run_id, {"action": "promote", "decision": "promoted",
                                        "reason": "reference"})
    return {"base": base, "config": config, "out": out, "snapshot": snapshot, "env": env,
            "registry": root, "registry_digest": _tree_digest(root), "current": run_id}


@pytest.fixture
def restored(reference):
    """The reference output folder, restored to the snapshot for this test."""
    shutil.rmtree(reference["out"])
    shutil.copytree(reference["snapshot"], reference["out"], symlinks=True)
    return reference


# --- comparisons -------------------------------------------------------------------------------


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def _hidden(out: Path) -> list[str]:
    """Hidden entries anywhere under ``out`` other than the lock file and the stamps."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*")
                  if p.relative_to(out).parts[0] not in ALLOWED_HIDDEN)


def _visible_files(folder: Path) -> set[str]:
    names = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return {str(n) for n in names if not any(part.startswith(".") for part in n.parts)}


def _assert_close_json(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert set(got) == set(want), where
        for key in want:
            _assert_close_json(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list), where
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close_json(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, float), (where, got)
        assert math.isclose(got, want, rel_tol=WEIGHT_TOL["rtol"], abs_tol=WEIGHT_TOL["atol"]), (
            where, got, want)
    else:
        assert got == want, (where, got, want)


def _assert_artifact_equal(got: Path, want: Path) -> None:
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    a, b = (safetensors.numpy.load_file(d / "model.safetensors") for d in (got, want))
    assert a.keys() == b.keys()
    for key in b:
        np.testing.assert_allclose(a[key], b[key], **WEIGHT_TOL, err_msg=f"{got.name}/{key}")
    cards = [json.loads((d / "calibrator.json").read_text()) for d in (got, want)]
    for card in cards:  # the weights' hash is compared through the weights themselves
        card.pop("sha256")
    _assert_close_json(cards[0], cards[1], f"{got.name}/calibrator.json")
    if (want / "timings.json").is_file():
        assert isinstance(json.loads((got / "timings.json").read_text()), dict)


def _assert_tables_equal(got: Path, want: Path) -> None:
    for name in (t for t in TABLES if t.endswith(".csv")):
        pd.testing.assert_frame_equal(pd.read_csv(got / name), pd.read_csv(want / name),
                                      check_exact=False, **TABLE_TOL, obj=name)
    keys = ["dataset", "image_id", "calibrator"]
    a, b = (pd.read_parquet(d / "per_image.parquet").sort_values(keys, ignore_index=True)
            for d in (got, want))
    assert not a.duplicated(keys).any()  # every image x calibrator once
    assert list(a.columns) == list(b.columns)
    assert a[keys].equals(b[keys])
    for column in a.columns:
        if pd.api.types.is_numeric_dtype(b[column]):
            np.testing.assert_allclose(a[column], b[column], **TABLE_TOL, err_msg=column)
            continue
        for x, y in zip(a[column], b[column], strict=True):
            if isinstance(y, str | None):
                assert x == y, (column, x, y)
            else:  # list-valued statistics (bins, confusion cells)
                np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float),
                                           **TABLE_TOL, err_msg=column)


def _assert_unchanged(out: Path, snapshot: Path, *, except_: set[str] = frozenset()) -> None:
    """Every visible reference file outside ``except_`` (path prefixes) is byte-identical."""
    want, got = _tree_digest(snapshot), _tree_digest(out)
    for name, digest in want.items():
        if name.startswith(".") or any(name.startswith(p) for p in except_):
            continue
        if name.endswith("timings.json"):
            continue
        assert got.get(name) == digest, f"{name} changed or vanished"


def _assert_registry_intact(ref: dict) -> None:
    assert registry.current(ref["registry"]) == ref["current"]
    assert _tree_digest(ref["registry"]) == ref["registry_digest"]


def _kill_at(ref: dict, src: str, dst: str, *args: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT_RENAME, src, dst, *args, str(ref["config"])],
        env=ref["env"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {dst}: {err[-3000:]}"


# --- the driver killed in each stage -----------------------------------------------------------


def test_driver_killed_while_fit_swaps_an_artifact_then_rerun(restored):
    ref, out, snap = restored, restored["out"], restored["snapshot"]
    # The worst point of an artifact swap: the old folder moved aside, the new one not yet in.
    _kill_at(ref, "*/artifacts/.temperature.*.tmp", str(out / "artifacts" / "temperature"), "fit")
    _assert_unchanged(out, snap, except_={"artifacts/temperature/"})
    if (out / "artifacts" / "temperature").exists():  # absent or whole, never partial
        _assert_artifact_equal(out / "artifacts/temperature", snap / "artifacts/temperature")
    assert not is_current(load_config(ref["config"]), "fit")
    _assert_registry_intact(ref)

    done = _segcal(ref["env"], "fit", str(ref["config"]))
    assert done.returncode == 0, done.stderr[-3000:]
    cards = sorted(snap.glob("artifacts/**/calibrator.json"))  # the oracles' included
    assert len(cards) > 2
    for card in cards:
        folder = card.parent.relative_to(snap)
        _assert_artifact_equal(out / folder, snap / folder)
    _assert_unchanged(out, snap, except_={"artifacts/"})
    assert _visible_files(out) == _visible_files(snap)
    assert _hidden(out) == []
    assert is_current(load_config(ref["config"]), "fit")  # `segcal run` would not redo it
    _assert_registry_intact(ref)


def test_driver_killed_while_evaluate_moves_its_tables_then_rerun(restored):
    ref, out, snap = restored, restored["out"], restored["snapshot"]
    # Every table but summary.csv (the last, the marker of a finished evaluation) is in place.
    _kill_at(ref, f"*/.evaluate-*/{SUMMARY}", str(out / SUMMARY), "evaluate")
    _assert_unchanged(out, snap, except_=set(TABLES) - {SUMMARY})
    _assert_tables_equal(out, snap)  # each moved table whole
    assert [p.name for p in out.glob(".evaluate-*")]  # the killed run's scratch, left behind
    assert not is_current(load_config(ref["config"]), "evaluate")
    _assert_registry_intact(ref)

    done = _segcal(ref["env"], "evaluate", str(ref["config"]))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_tables_equal(out, snap)
    _assert_unchanged(out, snap, except_=set(TABLES))
    assert _visible_files(out) == _visible_files(snap)
    assert _hidden(out) == []  # the scratch of the killed run is removed by the rerun
    assert is_current(load_config(ref["config"]), "evaluate")
    _assert_registry_intact(ref)


def test_driver_killed_while_report_moves_its_files_then_rerun(restored):
    ref, out, snap = restored, restored["out"], restored["snapshot"]
    # The figures are in place; report.md and report.html are not.
    _kill_at(ref, "*/.report-*/report.md", str(out / "report.md"), "report")
    _assert_unchanged(out, snap)  # same tables, so the moved figures are the same bytes
    assert [p.name for p in out.glob(".report-*")]
    assert not is_current(load_config(ref["config"]), "report")
    _assert_registry_intact(ref)

    done = _segcal(ref["env"], "report", str(ref["config"]))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_unchanged(out, snap)  # the report is a deterministic function of the tables
    assert _visible_files(out) == _visible_files(snap)
    assert _hidden(out) == []
    assert is_current(load_config(ref["config"]), "report")
    _assert_registry_intact(ref)


# --- an evaluation actor killed mid-evaluation -------------------------------------------------


def _holders(path: Path) -> list[int]:
    """Processes other than this one with ``path`` open."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.append(pid)
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_an_evaluation_actor_killed_mid_evaluation_is_replaced_each_image_once(restored):
    """The last shard becomes a FIFO: the actor that opens it blocks there, mid-evaluation,
    and is SIGKILLed; the real shard then replaces the FIFO for the retried work."""
    from pipeline import evaluate
    from pipeline.models import model_fingerprint
    from pipeline.paths import RunPaths
    from pipeline.shards import read_manifest

    ref, out, snap = restored, restored["out"], restored["snapshot"]
    cfg = load_config(ref["config"])
    directory = RunPaths(out, model_fingerprint(cfg.model)).dataset_dir("test")
    shard = directory / read_manifest(directory).shards[-1].file
    real = shard.with_name(".real-shard")
    os.replace(shard, real)
    os.mkfifo(shard)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            evaluate.run(cfg)
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    writer = None
    try:
        deadline = time.monotonic() + 120
        while writer is None:
            assert thread.is_alive(), errors
            assert time.monotonic() < deadline, "no evaluation actor opened the shard"
            try:  # succeeds once a reader (the evaluation actor) has the FIFO open
                writer = os.open(shard, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
                time.sleep(0.02)
        # The writer's open succeeds while the reader is still inside open(), before its fd
        # shows in /proc: look again until it does.
        holders = _holders(shard)
        while not holders:
            assert time.monotonic() < deadline, "the FIFO's reader never showed in /proc"
            time.sleep(0.02)
            holders = _holders(shard)
        (victim,) = holders
        assert victim != os.getpid()
        os.kill(victim, signal.SIGKILL)
        while not _gone(victim):
            time.sleep(0.02)
    finally:
        os.replace(real, shard)  # the retried work reads the real shard
        if writer is not None:
            os.close(writer)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert not errors, errors
    _assert_tables_equal(out, snap)  # every image x calibrator exactly once, same summary
    rows = pd.read_parquet(out / "per_image.parquet")
    tested = rows[rows["dataset"] == "test"]
    assert sorted(set(tested["image_id"])) == [f"f{i:02d}" for i in range(6)]
    assert not rows.duplicated(["dataset", "image_id", "calibrator"]).any()
    assert _hidden(out) == []
