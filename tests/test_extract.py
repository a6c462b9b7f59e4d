from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import extract, extract_io
from pipeline.config import CorruptionConfig, parse_config
from pipeline.data import DataError, list_samples
from pipeline.extract import LogitPredictor, content_hash
from pipeline.extract_io import decode_row
from pipeline.models import load_model, model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import (
    ImageRecord,
    Manifest,
    iter_dataset,
    read_manifest,
    read_shard,
    upsample_logits,
    write_manifest,
    write_shard,
)
from tests.extract_helpers import NUM_CLASSES

H, W = 12, 16


def add_images(root, stems, *, seed=0, bright=()):
    rng = np.random.default_rng(seed)
    for stem in stems:
        img = rng.integers(0, 200, (H, W, 3), dtype=np.uint8)
        if stem in bright:
            img[:] = 250
        lab = rng.integers(0, NUM_CLASSES, (H, W)).astype(np.uint8)
        lab[0, :3] = 255
        (root / "img").mkdir(parents=True, exist_ok=True)
        (root / "lab").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "img" / f"{stem}.png")
        Image.fromarray(lab).save(root / "lab" / f"{stem}.png")


def make_cfg(root, factory="tiny_net", **extract_opts):
    return parse_config({
        "output": str(root / "out"),
        "model": {"kind": "python", "path": f"tests.extract_helpers:{factory}",
                  "num_classes": NUM_CLASSES},
        "datasets": [{"name": "toy", "role": "calibration", "domain": "day",
                      "images": str(root / "img"), "labels": str(root / "lab")}],
        "extract": {"batch_size": 2, "rows_per_shard": 3, "num_actors": 1, **extract_opts},
    })


def decoded_batch(cfg):
    ds = cfg.datasets[0]
    rows = [decode_row({"image_id": s.image_id, "uri": s.uri, "label_uri": s.label_uri or ""},
                       ds, NUM_CLASSES) for s in list_samples(ds)]
    return {k: [r[k] for r in rows] for k in rows[0]}


def direct_logits(cfg, image):
    return load_model(cfg.model)(torch.from_numpy(np.array(image))[None])[0]


# Logits computed in two different orders (a batch of 3 against one image, a batched resize
# against a single one) may round to neighbouring float16 values on some CPUs: one float16 step
# is 2**-10 relative (~9.8e-4), plus an absolute floor for values near zero.
F16_STEP = {"rtol": 1e-3, "atol": 1e-5}


@pytest.mark.parametrize(
    ("opts", "size"),
    [
        pytest.param({}, (H // 2, W // 2), id="native"),
        pytest.param({"store_stride": 2}, (H // 4, W // 4), id="stride2"),
        pytest.param({"label_resolution": True}, (H, W), id="label-resolution"),
    ],
)
def test_predictor_and_writer_store_logits_at_the_configured_resolution(tmp_path, opts, size):
    add_images(tmp_path, ["a", "b", "c"])
    cfg = make_cfg(tmp_path, **opts)
    batch = decoded_batch(cfg)
    out = LogitPredictor(cfg.model, cfg.extract)(batch)
    assert list(out["error"]) == ["", "", ""]
    assert out["logits"].shape == (3, NUM_CLASSES, *size)
    assert out["logits"].dtype == np.float16
    for i, image in enumerate(batch["image"]):
        logits = direct_logits(cfg, image)
        if opts.get("store_stride") == 2:
            logits = F.avg_pool2d(logits, 2)
        if opts.get("label_resolution"):
            logits = F.interpolate(logits[None], (H, W), mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(out["logits"][i], logits.half().numpy(), **F16_STEP)
        np.testing.assert_array_equal(out["labels"][i], batch["labels"][i])

    # The writer resizes the images to the logits' resolution and writes one shard.
    meta = extract_io.write_shards(out, directory=str(tmp_path / "shards"), dataset="toy",
                                domain="day", role="calibration", fingerprint="f" * 64,
                                store_image=True)["meta"]
    (shard,) = [json.loads(m)["shard"] for m in meta]
    assert shard["file"] == extract_io.shard_name(["a", "b", "c"])
    records = {r.image_id: r for r in read_shard(tmp_path / "shards" / shard["file"])}
    for i, image in enumerate(batch["image"]):
        r = records[batch["image_id"][i]]
        np.testing.assert_array_equal(r.logits, out["logits"][i])
        resized = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        np.testing.assert_array_equal(r.image, resized)


def test_predictor_without_images(tmp_path):
    add_images(tmp_path, ["a"])
    cfg = make_cfg(tmp_path, store_image=False)
    out = LogitPredictor(cfg.model, cfg.extract)(decoded_batch(cfg))
    assert "image" not in out


def test_predictor_flags_only_images_with_nan_logits(tmp_path):
    add_images(tmp_path, ["a", "b", "c"], bright=("b",))
    cfg = make_cfg(tmp_path, factory="nan_on_bright")
    out = LogitPredictor(cfg.model, cfg.extract)(decoded_batch(cfg))
    assert out["error"][0] == ""
    assert out["error"][2] == ""
    assert out["error"][1].startswith("Expected usable model output for image")
    assert "b.png" in out["error"][1]
    assert "NaN/inf" in out["error"][1]
    assert out["logits"][1].size == 0
    assert out["logits"][0].shape == (NUM_CLASSES, H // 2, W // 2)


def test_predictor_flags_a_class_count_mismatch(tmp_path):
    add_images(tmp_path, ["a", "b"])
    cfg = make_cfg(tmp_path, factory="too_few_classes")
    out = LogitPredictor(cfg.model, cfg.extract)(decoded_batch(cfg))
    for error in out["error"]:
        assert f"at least num_classes={NUM_CLASSES} channels, but got 3" in error


def test_predictor_reports_any_model_failure_per_image(tmp_path):
    add_images(tmp_path, ["a", "b", "c"], bright=("b",))
    cfg = make_cfg(tmp_path, factory="raise_on_bright")
    out = LogitPredictor(cfg.model, cfg.extract)(decoded_batch(cfg))
    assert out["error"][0] == out["error"][2] == ""
    assert "b.png" in out["error"][1]
    assert "RuntimeError: cannot segment a bright image" in out["error"][1]


def test_predictor_autocast_stays_close_to_fp32(tmp_path):
    add_images(tmp_path, ["a", "b"])
    batch = decoded_batch(make_cfg(tmp_path))
    ref = LogitPredictor(make_cfg(tmp_path).model, make_cfg(tmp_path).extract)(batch)
    cfg = make_cfg(tmp_path, precision="bf16")
    low = LogitPredictor(cfg.model, cfg.extract)(batch)
    assert list(low["error"]) == ["", ""]
    # bf16 keeps 8 significant bits: the tiny net's logits (|x| < 2) move by < 2**-6.
    np.testing.assert_allclose(low["logits"].astype(np.float32),
                               ref["logits"].astype(np.float32), atol=2**-5)
    assert not np.array_equal(low["logits"], ref["logits"])


def test_writer_records_failed_rows_and_writes_one_shard_per_shape(tmp_path):
    labels = [np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), np.zeros((6, 4), np.uint8),
              np.zeros((0, 0), np.uint8)]
    logits = [np.ones((NUM_CLASSES, 2, 2), np.float16), np.ones((NUM_CLASSES, 2, 2), np.float16),
              np.ones((NUM_CLASSES, 3, 2), np.float16), np.zeros((NUM_CLASSES, 0, 0), np.float16)]
    batch = {"image_id": np.array(["a", "b", "c", "d"]), "uri": np.array(list("abcd")),
             "error": np.array(["", "", "", "bad file d"], dtype=object),
             "labels": extract_io._column(labels), "logits": extract_io._column(logits)}
    meta = [json.loads(m) for m in extract_io.write_shards(
        batch, directory=str(tmp_path), dataset="toy", domain="day", role="test",
        fingerprint="f" * 64, store_image=False)["meta"]]
    assert {"skipped": {"uri": "d", "reason": "bad file d"}} in meta
    shards = sorted(m["shard"]["image_ids"] for m in meta if "shard" in m)
    assert shards == [["a", "b"], ["c"]]
    for m in meta:
        if "shard" in m:
            assert [r.image_id for r in read_shard(tmp_path / m["shard"]["file"])] == \
                m["shard"]["image_ids"]


def test_predictor_passes_decode_errors_through(tmp_path):
    add_images(tmp_path, ["a", "b"])
    (tmp_path / "lab" / "b.png").unlink()
    cfg = make_cfg(tmp_path)
    out = LogitPredictor(cfg.model, cfg.extract)(decoded_batch(cfg))
    assert out["error"][0] == ""
    assert "Expected a label file for image" in out["error"][1]


def test_content_hash_tracks_row_changing_options(tmp_path):
    cfg = make_cfg(tmp_path)
    ds, ex = cfg.datasets[0], cfg.extract
    base = content_hash(ds, ex)
    assert content_hash(ds.model_copy(update={"limit": 3, "images": "/else"}), ex) == base
    changed = [
        content_hash(ds.model_copy(update={"label_map": {1: 2}}), ex),
        content_hash(ds.model_copy(update={"corruption": CorruptionConfig(kind="dark",
                                                                           severity=2)}), ex),
        content_hash(ds.model_copy(update={"domain": "dusk"}), ex),
        content_hash(ds, ex.model_copy(update={"store_stride": 2})),
    ]
    assert base not in changed
    assert len(set(changed)) == len(changed)


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        pytest.param({"CPU": 2.0}, {"size": 2, "num_gpus": 0, "num_cpus": 0.5, "threads": 1,
                                    "task_cpus": 0.5}, id="2cpu"),
        pytest.param({"CPU": 4.0}, {"size": 4, "num_gpus": 0, "num_cpus": 0.75, "threads": 1,
                                    "task_cpus": 0.5}, id="4cpu"),
        pytest.param({"CPU": 1.0}, {"size": 1, "num_gpus": 0, "num_cpus": 0.5, "threads": 1,
                                    "task_cpus": 0.5}, id="1cpu"),
        pytest.param({"CPU": 16.0, "GPU": 2.0}, {"size": 2, "num_gpus": 1, "num_cpus": 1.0,
                                                 "threads": 1, "task_cpus": 1.0}, id="gpu"),
    ],
)
def test_pool_resources_leave_a_cpu_for_decode_and_write_tasks(monkeypatch, free, expected):
    monkeypatch.setattr(extract.ray, "available_resources", lambda: free)
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: free)
    pool = extract._pool_resources(None, blocks=10)
    assert pool == expected
    # The actors and one decode or write task fit at once (ray-project/ray#44687).
    assert pool["size"] * pool["num_cpus"] + pool["task_cpus"] <= free["CPU"]


def test_pool_resources_clamp_requests_with_a_warning(monkeypatch):
    monkeypatch.setattr(extract.ray, "available_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.warns(UserWarning, match=r"`extract.num_actors`=6 exceeds .* using 4"):
        assert extract._pool_resources(6, blocks=10)["size"] == 4


def test_pool_resources_follow_a_custom_resource(monkeypatch):
    free = {"CPU": 8.0, "extract_node": 3.0}
    monkeypatch.setattr(extract.ray, "available_resources", lambda: free)
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: free)
    assert extract._pool_resources(None, 10, {"extract_node": 1.0})["size"] == 3
    assert extract._pool_resources(None, 10, {"extract_node": 1.5})["size"] == 2
    with pytest.raises(ValueError, match=r"2 of resource 'other' free .* but it has 0"):
        extract._pool_resources(None, 10, {"other": 2.0})


def test_pool_resources_share_a_gpu_between_actors(monkeypatch):
    free = {"CPU": 16.0, "GPU": 2.0}
    monkeypatch.setattr(extract.ray, "available_resources", lambda: free)
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: free)
    one = extract._pool_resources(None, blocks=20)
    assert (one["size"], one["num_gpus"]) == (2, 1)
    three = extract._pool_resources(None, blocks=20, per_gpu=3)
    assert (three["size"], three["num_gpus"]) == (6, pytest.approx(1 / 3))
    # Six actors and one decode or write task still fit in the CPUs.
    assert three["size"] * three["num_cpus"] + three["task_cpus"] <= free["CPU"]
    assert extract._pool_resources(None, blocks=4, per_gpu=3)["size"] == 4  # never above blocks
    assert extract._pool_resources(4, blocks=20, per_gpu=3)["size"] == 4  # num_actors wins


def test_block_rows_amortise_tasks_and_cap_bytes():
    assert extract.block_rows(8, 2, 4, 1000) == 4  # never below one model batch
    assert extract.block_rows(1200, 2, 4, 700_000) % 4 == 0
    assert extract.block_rows(100_000, 16, 16, 6 << 20) == 16  # 64 MiB / 6 MiB -> 10 -> 16
    assert extract.block_rows(3200, 16, 16, 700_000) == 64  # four blocks per CPU


def test_pool_resources_never_exceed_the_block_count(monkeypatch):
    monkeypatch.setattr(extract.ray, "available_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(extract.ray, "cluster_resources", lambda: {"CPU": 8.0})
    pool = extract._pool_resources(None, blocks=1)
    assert pool["size"] == 1
    assert pool["threads"] == 8


def test_run_rejects_stride_with_label_resolution(tmp_path):
    cfg = make_cfg(tmp_path, store_stride=2, label_resolution=True)
    with pytest.raises(ValueError, match="`extract.store_stride` to be 1 with"):
        extract.run(cfg)


def shard_files(directory):
    return sorted(p.name for p in directory.glob("part-*.parquet"))


@pytest.mark.ray
def test_extract_end_to_end_incremental_and_failure_safe(ray_local, tmp_path, monkeypatch):
    add_images(tmp_path, ["f0", "f1", "f2", "f3"])
    cfg = make_cfg(tmp_path)
    fp = model_fingerprint(cfg.model)
    directory = RunPaths(tmp_path / "out", fp).dataset_dir("toy")

    assert extract.run(cfg) == {"toy": directory}
    manifest = read_manifest(directory)
    assert manifest.n_images == 4
    assert manifest.model_fingerprint == fp
    assert manifest.skipped == []
    assert manifest.num_classes == NUM_CLASSES
    assert sorted(s.file for s in manifest.shards) == shard_files(directory)
    records = {r.image_id: r for r in iter_dataset(directory)}
    assert sorted(records) == ["f0", "f1", "f2", "f3"]
    for image_id, r in records.items():
        image = np.asarray(Image.open(tmp_path / "img" / f"{image_id}.png"))
        labels = np.asarray(Image.open(tmp_path / "lab" / f"{image_id}.png"))
        np.testing.assert_array_equal(r.logits, direct_logits(cfg, image).half().numpy())
        np.testing.assert_array_equal(r.labels, labels)
        assert (r.dataset, r.domain, r.role, r.height, r.width) == ("toy", "day",
                                                                    "calibration", H, W)

    # A rerun finds everything stored, writes no shard and never starts Ray.
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")}
    with monkeypatch.context() as m:
        m.setattr(extract, "init_ray", lambda: pytest.fail("Ray started with nothing to do"))
        extract.run(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")} == before
    assert read_manifest(directory).n_images == 4

    # New images, one of them corrupt. Under on_error=fail the run stops on it; the manifest
    # keeps naming only shards that exist, and the shards the failed run did write (one row
    # each) are adopted by the next run instead of being extracted again.
    add_images(tmp_path, ["g0", "g1", "g2", "g3"], seed=1)
    (tmp_path / "img" / "g2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"Dataset 'toy': Expected image .*g2.png to be a "
                                        r"readable image"):
        extract.run(make_cfg(tmp_path, rows_per_shard=1))
    manifest = read_manifest(directory)
    assert manifest.n_images == 4
    assert len(list(iter_dataset(directory))) == 4
    orphans = set(shard_files(directory)) - {s.file for s in manifest.shards}

    # on_error=skip: only the new images are extracted, the old shards stay untouched and
    # the corrupt file is recorded with its reason.
    extract.run(make_cfg(tmp_path, on_error="skip", rows_per_shard=1))
    manifest = read_manifest(directory)
    assert orphans <= {s.file for s in manifest.shards}
    new = [s for s in manifest.shards if s.file not in before]
    assert sorted(i for s in new for i in s.image_ids) == ["g0", "g1", "g3"]
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("part-*.parquet")
            if p.name in before} == before
    assert manifest.n_images == 7
    assert [s["uri"] for s in manifest.skipped] == [str(tmp_path / "img" / "g2.png")]
    assert "format is not recognised" in manifest.skipped[0]["reason"]
    assert {r.image_id for r in iter_dataset(directory)} == manifest.image_ids()

    # Changing what the rows hold under the same output is refused, not mixed in.
    with pytest.raises(ValueError, match="same label/corruption/storage options"):
        extract.run(make_cfg(tmp_path, store_stride=2))


@pytest.mark.ray
@pytest.mark.data
def test_extract_real_camvid_with_espnet(ray_local, tmp_path, camvid_root, espnet_weights):
    bgr_mean = (110.331055, 108.40889, 105.03321)
    cfg = parse_config({
        "output": str(tmp_path / "out"),
        # The authors' recipe ((bgr - mean) / std) / 255 as (x / 255 - mean / 255) / std.
        "model": {"kind": "espnet", "path": str(espnet_weights), "num_classes": 11,
                  "input_size": [360, 480], "channel_order": "bgr", "scale": 1 / 255,
                  "mean": [m / 255 for m in bgr_mean], "std": [72.12569, 72.690765, 69.904335]},
        "datasets": [{"name": "camvid", "role": "test", "domain": "day",
                      "images": str(camvid_root / "test"),
                      "labels": str(camvid_root / "testannot"), "ignore_index": 11,
                      "limit": 2}],
        "extract": {"batch_size": 2, "store_stride": 2},
    })
    (directory,) = extract.run(cfg).values()
    records = list(iter_dataset(directory))
    assert len(records) == 2
    for r in records:
        assert r.logits.shape == (11, 180, 240)
        assert r.image.shape == (180, 240, 3)
        assert (r.height, r.width) == (360, 480)
        pred = upsample_logits(r.logits, (360, 480)).argmax(0).numpy()
        valid = r.labels != 11
        # The released weights reach 87.7% pixel accuracy over the test set.
        assert (pred[valid] == r.labels[valid]).mean() > 0.7


def toy_records(ids, fp="f" * 64):
    return [ImageRecord("toy", "day", "calibration", i, f"/{i}.png", 2, 2, fp,
                        np.zeros((2, 2), np.uint8), np.zeros((NUM_CLASSES, 1, 1), np.float16))
            for i in ids]


def test_existing_shards_keeps_manifest_shards_and_adopts_orphans(tmp_path):
    cfg = make_cfg(tmp_path)
    ds, content, fp = cfg.datasets[0], content_hash(cfg.datasets[0], cfg.extract), "f" * 64
    d = tmp_path / "toy"
    kept = write_shard(d / "part-00000.parquet", toy_records(["a", "b"]))
    gone = write_shard(d / "part-00001.parquet", toy_records(["c"]))
    write_manifest(d, Manifest("toy", "calibration", "day", None, NUM_CLASSES, list("abcd"), 255,
                               fp, "h", [kept, gone], content_hash=content))
    (d / "part-00001.parquet").unlink()
    orphan = write_shard(d / "part-00002.parquet", toy_records(["d"]))
    duplicate = write_shard(d / "part-00003.parquet", toy_records(["a"]))
    (d / "part-00004.parquet").write_bytes(b"half a shard")
    (d / ".part-00005.parquet.x1.tmp").write_bytes(b"killed mid-write")
    with (
        pytest.warns(UserWarning, match="part-00001.parquet named in the manifest is missing"),
        pytest.warns(UserWarning, match="Removing unreadable orphan shard"),
    ):
        shards = extract._existing_shards(d, ds, fp, content)
    assert shards == [kept, orphan]
    assert sorted(p.name for p in d.iterdir()) == [
        "manifest.json", "part-00000.parquet", "part-00002.parquet"]
    assert duplicate.file not in {s.file for s in shards}

    with pytest.raises(ValueError, match=r"manifest.json to be for model 0+, but got f+"):
        extract._existing_shards(d, ds, "0" * 64, content)
    with pytest.raises(ValueError, match=r"same label/corruption/storage options \(content "
                                         r"hash other\)"):
        extract._existing_shards(d, ds, fp, "other")


def _touch_later(path, seconds=10):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.mark.ray
def test_rerun_follows_sources_changed_or_removed_and_fails_safe_on_a_broken_one(ray_local,
                                                                                   tmp_path):
    add_images(tmp_path, ["f0", "f1", "f2", "f3"])
    cfg = make_cfg(tmp_path)
    directory = RunPaths(tmp_path / "out", model_fingerprint(cfg.model)).dataset_dir("toy")
    extract.run(cfg)
    assert read_manifest(directory).changes == {"added": 4, "changed": 0, "removed": 0}

    # A corrected label file (same name) and a deleted image: the label's row is re-extracted,
    # the deleted image's row dropped; shards holding neither stay as they were.
    before = {s.file: set(s.image_ids) for s in read_manifest(directory).shards}
    lab = np.asarray(Image.open(tmp_path / "lab" / "f1.png")).copy()
    lab[:] = 2
    Image.fromarray(lab).save(tmp_path / "lab" / "f1.png")
    _touch_later(tmp_path / "lab" / "f1.png")
    (tmp_path / "img" / "f3.png").unlink()
    (tmp_path / "lab" / "f3.png").unlink()
    extract.run(cfg)
    manifest = read_manifest(directory)
    assert manifest.changes == {"added": 0, "changed": 1, "removed": 1}
    records = {r.image_id: r for r in iter_dataset(directory)}
    assert sorted(records) == ["f0", "f1", "f2"]
    assert (records["f1"].labels[1:] == 2).all()
    untouched = [f for f, ids in before.items() if ids.isdisjoint({"f1", "f3"})]
    assert set(untouched) <= {s.file for s in manifest.shards}
    assert sorted(p.name for p in directory.glob("part-*.parquet")) == \
        sorted(s.file for s in manifest.shards)

    # An image overwritten with a truncated file: the run fails naming it, and the manifest,
    # its shards and the old logits stay as they were.
    good = read_manifest(directory)
    (tmp_path / "img" / "f0.png").write_bytes((tmp_path / "img" / "f2.png").read_bytes()[:60])
    with pytest.raises(DataError, match=r"f0\.png"):
        extract.run(cfg)
    assert read_manifest(directory).shards == good.shards
    assert sorted(r.image_id for r in iter_dataset(directory)) == ["f0", "f1", "f2"]


@pytest.mark.ray
def test_hash_mode_sees_a_rewrite_that_keeps_size_and_mtime(ray_local, tmp_path):
    add_images(tmp_path, ["a", "b"])
    cfg = make_cfg(tmp_path, verify_sources="hash")
    directory = RunPaths(tmp_path / "out", model_fingerprint(cfg.model)).dataset_dir("toy")
    extract.run(cfg)
    path = tmp_path / "lab" / "a.png"
    st = path.stat()
    lab = np.asarray(Image.open(path)).copy()
    lab[1:] = (lab[1:] + 1) % NUM_CLASSES
    Image.fromarray(lab).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    extract.run(cfg)
    assert read_manifest(directory).changes["changed"] == 1
    (record,) = [r for r in iter_dataset(directory) if r.image_id == "a"]
    np.testing.assert_array_equal(record.labels, lab)


@pytest.mark.ray
def test_skip_covers_model_failures_up_to_the_cap(ray_local, tmp_path):
    add_images(tmp_path, ["a", "b", "c", "d"], bright=("b",))
    directory = RunPaths(tmp_path / "out", model_fingerprint(
        make_cfg(tmp_path, factory="raise_on_bright").model)).dataset_dir("toy")
    # One image of four fails in the model: over a 20% cap the stage fails, nothing recorded.
    with pytest.raises(DataError, match=r"at most 20% of its 4 images .* 1 were skipped"):
        extract.run(make_cfg(tmp_path, factory="raise_on_bright", on_error="skip",
                             max_skipped_fraction=0.2))
    assert not (directory / "manifest.json").exists()
    extract.run(make_cfg(tmp_path, factory="raise_on_bright", on_error="skip"))
    manifest = read_manifest(directory)
    assert manifest.image_ids() == {"a", "c", "d"}
    (skip,) = manifest.skipped
    assert skip["uri"].endswith("b.png")
    assert "RuntimeError: cannot segment a bright image" in skip["reason"]


@pytest.mark.ray
def test_a_lower_limit_selects_fewer_images_and_keeps_the_cache(ray_local, tmp_path):
    add_images(tmp_path, [f"f{i}" for i in range(6)])
    cfg = make_cfg(tmp_path)
    directory = RunPaths(tmp_path / "out", model_fingerprint(cfg.model)).dataset_dir("toy")
    extract.run(cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(
        update={"limit": 4})]}))
    four = read_manifest(directory).image_ids()
    assert len(four) == 4
    narrow = cfg.datasets[0].model_copy(update={"limit": 2})
    extract.run(cfg.model_copy(update={"datasets": [narrow]}))
    manifest = read_manifest(directory)
    two = {s.image_id for s in list_samples(narrow)}
    assert manifest.image_ids() == two < four
    assert manifest.stored_ids() == four  # nothing re-extracted or deleted
    assert {r.image_id for r in iter_dataset(directory)} == two
