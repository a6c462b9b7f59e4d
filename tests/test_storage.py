"""Run folders at an object-store URI: shards on S3, the driver's mirror, and the URI checks.

S3 is a real moto server on loopback (tests/s3_helpers.py); clients reach it over HTTP.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.shards import (
    describe_shard,
    file_sha256,
    iter_dataset,
    read_manifest,
    read_shard,
    readable_copy,
    write_manifest,
    write_shard,
)
from pipeline.storage import Mirror, check_uri, location
from tests.s3_helpers import BUCKET, as_client, s3_server
from tests.test_shards import assert_records_equal, make_manifest, make_records, write_dataset


@pytest.fixture(scope="module")
def s3():
    """The moto server's client variables, set in this process for the module's tests."""
    with s3_server() as env, as_client(env):
        yield env


@pytest.fixture
def uri(s3) -> str:
    """A fresh folder in the bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"


def _fs():
    import fsspec

    return fsspec.filesystem("s3")


# --- URIs in the config ---------------------------------------------------------------------


@pytest.mark.parametrize(("value", "message"), [
    ("s3://AKIA:hunter2@bucket/runs", r"without credentials in it, but got 's3://AKIA:\*\*\*@"),
    ("s3://bucket/runs?endpoint=x", "without '\\?' or '#'"),
    ("s3://bucket", "a folder inside a bucket"),
    ("s3://bucket/", "a folder inside a bucket"),
    ("nosuchfs://bucket/runs", "filesystem fsspec knows .* scheme 'nosuchfs'"),
])
def test_check_uri_refuses(value, message):
    with pytest.raises(ValueError, match=message) as err:
        check_uri(value)
    assert "hunter2" not in str(err.value)


def test_config_with_a_uri_output_names_the_key(tmp_path):
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("output: s3://k:secret@bucket/x\nmodel: {kind: python, path: m:f, "
                    "num_classes: 2}\ndatasets: []\n")
    with pytest.raises(ConfigError, match="output") as err:
        load_config(path)
    assert "secret" not in str(err.value)
    path.write_text("output: /tmp/x\nstore: s3://bucket/x\nmodel: {kind: python, path: m:f, "
                    "num_classes: 2}\ndatasets: []\n")
    with pytest.raises(ConfigError, match="no `store` key"):
        load_config(path)


def test_the_hash_and_resolved_config_keep_the_uri(tmp_path):
    from pipeline.config import config_dict, config_hash, parse_config

    cfg = parse_config({"output": "s3://bucket/x", "datasets": [],
                        "model": {"kind": "python", "path": "m:f", "num_classes": 2}})
    local = cfg.model_copy(update={"output": str(tmp_path), "store": cfg.output})
    assert config_dict(local)["output"] == "s3://bucket/x"
    assert config_hash(local) == config_hash(cfg)


def test_stages_refuse_a_uri_output_that_is_not_mirrored(tmp_path, uri, cache, monkeypatch):
    from pipeline import extract
    from pipeline.config import parse_config
    from pipeline.stages import run_stages

    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"output": uri, "datasets": [],
                        "model": {"kind": "python", "path": "tests.extract_helpers:tiny_net",
                                  "num_classes": 4}})
    with pytest.raises(ValueError, match="Expected `output` to be a local folder here, but got "
                                         "the URI 's3://.*storage.mirrored"):
        run_stages(cfg, ["report"])
    with pytest.raises(ValueError, match="the URI"):
        extract.run(cfg)
    assert list(tmp_path.iterdir()) == []  # no folder named like the URI
    calls = []
    with storage.mirrored(cfg) as run:
        assert run.store == uri
        assert Path(run.output).is_relative_to(cache)
        run_stages(run, ["report"], call=lambda c, stage: calls.append((c.output, stage)))
    assert calls == [(run.output, "report")]
    assert _fs().exists(f"{uri}/config.resolved.yaml")  # pushed on the way out


# --- shards at the URI ----------------------------------------------------------------------


def test_shards_and_manifest_round_trip_on_s3(uri):
    folder = location(uri) / "shards" / "ds"
    records = write_dataset(folder)
    keys = sorted(p.rsplit("/", 1)[-1] for p in _fs().find(f"{uri}/shards/ds"))
    assert keys == ["manifest.json", "part-00000.parquet", "part-00001.parquet"]
    manifest = read_manifest(uri + "/shards/ds")
    assert manifest.n_images == 5
    assert_records_equal(list(iter_dataset(folder)), records)
    assert_records_equal(read_shard(folder / "part-00000.parquet"), records[:3])
    assert describe_shard(folder / "part-00001.parquet") == manifest.shards[1]
    # No temp file is left beside the shards: each is one object, written in one request.
    assert not [p for p in _fs().find(uri) if p.endswith(".tmp")]


def test_a_modified_shard_on_s3_is_refused(uri):
    folder = location(uri)
    write_dataset(folder)
    (folder / "part-00001.parquet").write_bytes(b"PAR1 not a shard")
    with pytest.raises(ValueError, match=r"part-00001.parquet to have sha256 .*truncated"):
        list(iter_dataset(folder))
    with pytest.raises(ValueError, match="part-00001.parquet to be a readable Parquet shard"):
        describe_shard(folder / "part-00001.parquet")


def test_a_shard_at_the_uri_is_fetched_once_to_a_temporary_copy(uri, tmp_path):
    records = make_records(2)
    info = write_shard(uri + "/part-1.parquet", records)
    with readable_copy(location(uri) / "part-1.parquet") as (local, digest):
        assert local.is_file()
        assert digest == info.sha256 == file_sha256(local)
        assert_records_equal(read_shard(local), records)
    assert not local.exists()  # the copy goes with the context
    here = tmp_path / "part-1.parquet"
    write_shard(here, records)
    with readable_copy(here) as (same, digest):  # a local shard is read where it lies
        assert same == here
        assert digest == info.sha256


def test_run_paths_put_shards_at_the_store(tmp_path):
    from pipeline.paths import RunPaths

    paths = RunPaths(tmp_path, "0123456789abcdef", store="s3://bucket/run")
    assert str(paths.dataset_dir("val")) == "s3://bucket/run/shards/0123456789ab/val"
    assert paths.artifact_dir("ts") == tmp_path / "artifacts" / "ts"
    with pytest.raises(ValueError, match="dataset name to be one folder name"):
        paths.dataset_dir("../x")


# --- the driver's mirror --------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_mirror_round_trip(uri, cache):
    fs = _fs()
    first = Mirror(uri)
    assert first.local.is_relative_to(cache)
    local = first.pull()
    assert list(local.iterdir()) == [local / ".segcal-mirror.json"]  # nothing there yet
    (local / "artifacts" / "ts").mkdir(parents=True)
    (local / "artifacts" / "ts" / "calibrator.json").write_text("{}")
    (local / "summary.csv").write_text("a\n1\n")
    (local / ".stages").mkdir()
    (local / ".stages" / "fit.json").write_text("{}")
    (local / ".output.lock").write_text("")  # never leaves the machine
    (local / ".evaluate-host-1-abcd").mkdir()  # a scratch folder neither
    (local / "shards").mkdir()  # shards are written at the URI, never from the mirror
    (local / "shards" / "stray.parquet").write_text("x")
    assert first.push() == 3
    remote = sorted(p[len(uri) - 5:] for p in fs.find(uri))  # minus "s3://"
    assert remote == ["/.stages/fit.json", "/artifacts/ts/calibrator.json", "/summary.csv"]
    assert first.push() == 0  # nothing changed since

    # Another machine (another cache) sees the same run; its own edits come back here.
    os.environ["SEGCAL_CACHE"] = str(cache.parent / "other")
    second = Mirror(uri)
    other = second.pull()
    assert (other / "summary.csv").read_text() == "a\n1\n"
    (other / "summary.csv").write_text("a\n2\n")
    (other / "artifacts" / "ts" / "calibrator.json").unlink()  # a command deleted it
    assert second.push() == 1
    assert not fs.exists(f"{uri}/artifacts/ts/calibrator.json")

    os.environ["SEGCAL_CACHE"] = str(cache)
    again = Mirror(uri).pull()
    assert (again / "summary.csv").read_text() == "a\n2\n"
    assert not (again / "artifacts" / "ts" / "calibrator.json").exists()

    # Deleted here and, meanwhile, there too: the push still goes through.
    third = Mirror(uri)
    third.pull()
    (third.local / "summary.csv").unlink()
    fs.rm_file(f"{uri}/summary.csv")
    assert third.push() == 0
    assert not fs.exists(f"{uri}/summary.csv")


def test_a_missing_bucket_is_named_before_any_work(s3, cache):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' of `output` s3://"):
        Mirror("s3://no-such-bucket/runs/x").pull()
    assert not cache.exists()  # nothing made on the way


def test_mirror_keeps_a_file_that_never_reached_the_uri(uri, cache):
    mirror = Mirror(uri)
    local = mirror.pull()
    (local / "report.html").write_text("<html>")  # written, then the push was cut short
    Mirror(uri).pull()
    assert (local / "report.html").read_text() == "<html>"
    later = Mirror(uri)  # the next command
    later.pull()
    assert later.push() == 1
    assert _fs().cat_file(f"{uri}/report.html") == b"<html>"


def test_mirror_skips_folder_markers(uri, cache):
    import boto3

    client = boto3.client("s3")  # endpoint and credentials from the environment, as s3fs
    prefix = uri.split("/", 3)[3]
    for key in (f"{prefix}/", f"{prefix}/ray_train/", f"{prefix}/plots/"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"")  # as pyarrow marks folders
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/plots/a.png", Body=b"png")
    local = Mirror(uri).pull()
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) \
        == [".segcal-mirror.json", "plots/a.png"]


def test_mirror_pushes_the_records_of_finished_work_last(uri, cache, monkeypatch):
    mirror = Mirror(uri)
    local = mirror.pull()
    for rel in ("summary.csv", ".stages/evaluate.json", "per_image.parquet", "best.csv",
                "artifacts/ts/model.safetensors"):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    sent: list[str] = []
    fs = _fs()  # fsspec caches it: the instance the mirror uses
    put = fs.put_file

    def record(lpath, rpath, *args, **kwargs):
        sent.append(rpath.split(uri[5:] + "/", 1)[1])
        return put(lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(fs, "put_file", record)
    mirror.push()
    assert sent[-2:] == [".stages/evaluate.json", "summary.csv"]
    assert sorted(sent[:-2]) == ["artifacts/ts/model.safetensors", "best.csv",
                                 "per_image.parquet"]


def test_write_bytes_is_atomic_locally_and_one_object_remotely(tmp_path, uri):
    storage.write_bytes(tmp_path / "a" / "f.bin", b"123")
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"123"
    storage.write_bytes(location(uri) / "a" / "f.bin", b"456")
    assert _fs().cat_file(f"{uri}/a/f.bin") == b"456"
    storage.remove_tree(location(uri) / "a")
    assert not _fs().exists(f"{uri}/a/f.bin")


def test_shard_written_at_the_uri_matches_the_local_one(tmp_path, uri):
    records = make_records(2)
    here = write_shard(tmp_path / "part-1.parquet", records)
    there = write_shard(uri + "/part-1.parquet", records)
    assert here == there  # same bytes, same sha256
    write_manifest(uri, make_manifest([there]))
    assert read_manifest(uri).shards == [here]
