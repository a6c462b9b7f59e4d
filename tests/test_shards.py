from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from pipeline.shards import (
    ImageRecord,
    Manifest,
    decode_table,
    describe_shard,
    encode_records,
    iter_dataset,
    read_manifest,
    read_shard,
    upsample_logits,
    write_manifest,
    write_shard,
)

C, H, W = 3, 8, 12


def make_records(n=3, *, label_dtype=np.uint8, stride=1, image=True, seed=0, prefix="img"):
    rng = np.random.default_rng(seed)
    h, w = H // stride, W // stride
    top = 300 if label_dtype == np.uint16 else 255
    return [
        ImageRecord(
            dataset="ds", domain="day", role="test", image_id=f"{prefix}{i}", uri=f"/x/{i}.png",
            height=H, width=W, model_fingerprint="f" * 64,
            labels=rng.integers(0, top, (H, W)).astype(label_dtype),
            logits=rng.normal(size=(C, h, w)).astype(np.float16),
            image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if image else None,
        )
        for i in range(n)
    ]


def assert_records_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for f in dataclasses.fields(ImageRecord):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
                assert u is not None, f.name
                assert v is not None, f.name
                assert (u.dtype, u.shape) == (v.dtype, v.shape), f.name
                np.testing.assert_array_equal(u, v, err_msg=f.name)
            else:
                assert u == v, f.name


@pytest.mark.parametrize(
    ("label_dtype", "stride", "image"),
    [
        pytest.param(np.uint8, 1, True, id="uint8-full-image"),
        pytest.param(np.uint16, 1, False, id="uint16-noimage"),
        pytest.param(np.uint8, 2, True, id="stride2"),
        pytest.param(np.uint16, 4, True, id="uint16-stride4"),
    ],
)
def test_shard_round_trip(tmp_path, label_dtype, stride, image):
    records = make_records(label_dtype=label_dtype, stride=stride, image=image)
    info = write_shard(tmp_path / "part-00000.parquet", records)
    assert info.rows == 3
    assert info.image_ids == ["img0", "img1", "img2"]
    assert info.file == "part-00000.parquet"
    assert_records_equal(read_shard(tmp_path / info.file), records)
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_tensor_columns_are_binary_values_with_their_shape(tmp_path):
    records = make_records(stride=2)
    write_shard(tmp_path / "s.parquet", records)
    table = pq.read_table(tmp_path / "s.parquet")
    field = table.schema.field("logits")
    assert field.type == pa.binary(2 * C * (H // 2) * (W // 2))
    spec = json.loads(field.metadata[b"segcal.tensor"])
    assert spec == {"shape": [C, H // 2, W // 2], "dtype": "<f2", "layout": "planes"}
    # Byte planes: the image's first bytes, then its second bytes.
    raw = np.frombuffer(table.column("logits")[1].as_py(), np.uint8)
    planes = raw.reshape(2, -1).T.copy().view(np.float16).reshape(C, H // 2, W // 2)
    np.testing.assert_array_equal(planes, records[1].logits)
    labels = np.frombuffer(table.column("labels")[2].as_py(), np.uint8).reshape(H, W)
    np.testing.assert_array_equal(labels, records[2].labels)


def _legacy_table(records):
    """A shard table as written before byte planes: Arrow fixed-shape tensor columns."""
    table = encode_records(records)
    for name in ("labels", "logits", "image"):
        values = np.stack([getattr(r, name) for r in records])
        if name == "logits":
            values = values.astype(np.float16)
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name,
                                 pa.FixedShapeTensorArray.from_numpy_ndarray(values))
    return table


def test_shards_with_fixed_shape_tensor_columns_still_read(tmp_path):
    records = make_records(stride=2)
    pq.write_table(_legacy_table(records), tmp_path / "old.parquet")
    assert isinstance(pq.read_schema(tmp_path / "old.parquet").field("logits").type,
                      pa.FixedShapeTensorType)
    assert_records_equal(read_shard(tmp_path / "old.parquet"), records)


def test_encode_casts_logits_to_float16():
    rec = make_records(1)[0]
    rec.logits = rec.logits.astype(np.float32)
    (out,) = decode_table(encode_records([rec]))
    assert out.logits.dtype == np.float16
    np.testing.assert_array_equal(out.logits, rec.logits.astype(np.float16))


def test_encode_errors():
    recs = make_records(2)
    with pytest.raises(ValueError, match="at least one record"):
        encode_records([])
    bad_shape = make_records(2)
    bad_shape[1].logits = bad_shape[1].logits[:, :4]
    with pytest.raises(ValueError, match="`logits` in a shard to have one shape"):
        encode_records(bad_shape)
    mixed = make_records(2)
    mixed[1].image = None
    with pytest.raises(ValueError, match="every record or none to carry an `image`"):
        encode_records(mixed)
    recs[1].labels = recs[1].labels.astype(np.int32)
    with pytest.raises(ValueError, match="Expected `labels` of image 'img1' to be uint8"):
        encode_records(recs)
    flat = make_records(1)
    flat[0].logits = flat[0].logits[0]
    with pytest.raises(ValueError, match=r"`logits` \(C, h, w\) for image 'img0'"):
        encode_records(flat)


def test_decode_errors():
    table = encode_records(make_records(1))
    with pytest.raises(ValueError, match=r"\['logits'\] are missing"):
        decode_table(table.drop_columns(["logits"]))
    plain = table.set_column(
        table.schema.get_field_index("logits"), "logits",
        pa.array([[1.0]], pa.list_(pa.float32())),
    )
    with pytest.raises(TypeError, match="`logits` to be a tensor column"):
        decode_table(plain)


def test_read_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_shard(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"junk.parquet to be a readable Parquet shard"):
        read_shard(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other.parquet: Expected shard columns"):
        read_shard(tmp_path / "other.parquet")


@pytest.mark.parametrize("size", [(8, 12), (16, 24), (32, 48)], ids=["same", "x2", "x4"])
def test_upsample_logits_matches_torch_bilinear(size):
    logits = np.random.default_rng(0).normal(size=(C, 8, 12)).astype(np.float16)
    out = upsample_logits(logits, size)
    assert out.dtype == torch.float32
    assert out.shape == (C, *size)
    expected = F.interpolate(
        torch.from_numpy(logits).float()[None], size=size, mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(out, expected)


def test_upsample_logits_preserves_constant_maps_and_rejects_bad_shape():
    const = np.full((2, 3, 4), 1.5, np.float32)
    torch.testing.assert_close(upsample_logits(const, (9, 13)), torch.full((2, 9, 13), 1.5))
    with pytest.raises(ValueError, match=r"\(C, h, w\), but got \(3, 4\)"):
        upsample_logits(np.zeros((3, 4)), (6, 8))


def make_manifest(shards, **kw):
    fields = dict(
        dataset="ds", role="test", domain="day", reference=None, num_classes=C,
        class_names=["a", "b", "c"], ignore_index=255, model_fingerprint="f" * 64,
        config_hash="0" * 16, shards=shards, skipped=[{"uri": "/x/bad.png", "reason": "corrupt"}],
        created="2024-01-01T00:00:00+00:00", content_hash="1" * 16,
    )
    fields.update(kw)
    return Manifest(**fields)


def write_dataset(tmp_path):
    a = make_records(3, prefix="a")
    b = make_records(2, prefix="b", stride=2, seed=1)
    shards = [write_shard(tmp_path / "part-00000.parquet", a),
              write_shard(tmp_path / "part-00001.parquet", b)]
    write_manifest(tmp_path, make_manifest(shards))
    return a + b


def test_manifest_round_trip_and_iter_dataset(tmp_path):
    records = write_dataset(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest.n_images == 5
    assert manifest.image_ids() == {r.image_id for r in records}
    assert manifest.skipped == [{"uri": "/x/bad.png", "reason": "corrupt"}]
    assert_records_equal(list(iter_dataset(tmp_path)), records)


def test_iter_dataset_detects_truncation_and_missing_shards(tmp_path):
    write_dataset(tmp_path)
    shard = tmp_path / "part-00001.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"part-00001.parquet to have sha256 .*truncated"):
        list(iter_dataset(tmp_path))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"part-00001.parquet to exist"):
        list(iter_dataset(tmp_path))


def test_iter_dataset_detects_row_count_mismatch(tmp_path):
    write_dataset(tmp_path)
    manifest = read_manifest(tmp_path)
    manifest.shards[0].rows = 4
    write_manifest(tmp_path, manifest)
    with pytest.raises(ValueError, match=r"part-00000.parquet to hold 4 rows, but got 3"):
        list(iter_dataset(tmp_path))
    assert len(list(iter_dataset(tmp_path, verify=False))) == 5


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json, but it is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="valid shard manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"dataset": "ds"}')
    with pytest.raises(ValueError, match="valid shard manifest"):
        read_manifest(tmp_path)


def test_describe_shard(tmp_path):
    info = write_shard(tmp_path / "part-00003.parquet", make_records(2))
    assert describe_shard(tmp_path / "part-00003.parquet") == info
    (tmp_path / "bad.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="bad.parquet to be a readable Parquet shard"):
        describe_shard(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="missing"):
        describe_shard(tmp_path / "gone.parquet")


def test_manifest_records_an_unlabelled_set_and_old_manifests_read_as_labelled(tmp_path):
    shards = [write_shard(tmp_path / "part-00000.parquet", make_records(1))]
    write_manifest(tmp_path, make_manifest(shards, role="monitor", labelled=False))
    assert read_manifest(tmp_path).labelled is False
    raw = json.loads((tmp_path / "manifest.json").read_text())
    del raw["labelled"]  # written before the field existed
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(tmp_path).labelled is True


@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_byte_planes_join_back_to_the_same_bytes(itemsize):
    from pipeline.shards import _join_planes

    raw = np.random.default_rng(itemsize).integers(0, 256, 3 * itemsize * 37, dtype=np.uint8)
    planes = raw.reshape(3, itemsize, 37)
    expected = np.ascontiguousarray(planes.transpose(0, 2, 1)).reshape(3, -1)
    joined = _join_planes(planes)
    assert joined.dtype == np.uint8
    assert joined.flags.writeable
    assert joined.flags.c_contiguous
    np.testing.assert_array_equal(joined, expected)


def test_logits_float32_gives_numpys_bits_for_every_float16():
    from pipeline.shards import logits_float32

    every = np.arange(2**16, dtype=np.uint16).view(np.float16)  # NaNs and infs included
    finite = every[np.isfinite(every)]
    read_only = finite.copy()
    read_only.flags.writeable = False
    for logits in (every, finite, read_only, finite[::3], finite.astype(np.float32)):
        x = logits_float32(logits)
        assert x.dtype == torch.float32
        assert x.is_contiguous()
        assert not np.shares_memory(x.numpy(), logits)
        np.testing.assert_array_equal(x.numpy().view(np.uint32),
                                      np.array(logits, np.float32).view(np.uint32))
