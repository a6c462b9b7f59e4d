from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import DatasetConfig
from pipeline.data import DataError, Sample, list_samples, load_sample

C = 4


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_pair(images, labels, stem, rng, size=(6, 8)):
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    lab = rng.integers(0, C, size).astype(np.uint8)
    save_png(images / f"{stem}.png", img)
    save_png(labels / f"{stem}.png", lab)
    return img, lab


def folder_cfg(images, labels, **kw):
    return DatasetConfig(name="ds", role="test", domain="day", images=str(images),
                         labels=str(labels), **kw)


@pytest.fixture
def folder(tmp_path, rng):
    images, labels = tmp_path / "img", tmp_path / "lab"
    pairs = {s: make_pair(images, labels, s, rng) for s in ("a1", "a2", "b1")}
    return images, labels, pairs


def test_folder_matches_labels_by_stem(folder):
    images, labels, pairs = folder
    save_png(images / "nolabel.png", np.zeros((6, 8, 3), np.uint8))
    (images / "notes.txt").write_text("not an image")
    samples = list_samples(folder_cfg(images, labels))
    assert [s.image_id for s in samples] == ["a1", "a2", "b1", "nolabel"]
    assert samples[0] == Sample("a1", str(images / "a1.png"), str(labels / "a1.png"))
    assert samples[-1].label_uri is None
    for s in samples[:3]:
        image, lab = load_sample(s, folder_cfg(images, labels), C)
        np.testing.assert_array_equal(image, pairs[s.image_id][0])
        np.testing.assert_array_equal(lab, pairs[s.image_id][1])
        assert lab.dtype == np.uint8


def test_folder_recursive_glob_and_other_label_suffix(tmp_path, rng):
    images, labels = tmp_path / "img", tmp_path / "lab"
    save_png(images / "seq1" / "f0.png", np.zeros((4, 4, 3), np.uint8))
    save_png(labels / "seq1" / "f0.bmp", np.zeros((4, 4), np.uint8))
    save_png(images / "top.png", np.zeros((4, 4, 3), np.uint8))
    flat = list_samples(folder_cfg(images, labels))
    assert [s.image_id for s in flat] == ["top"]
    deep = list_samples(folder_cfg(images, labels, glob="**/*.png"))
    assert [(s.image_id, s.label_uri) for s in deep] == [
        ("seq1/f0", str(labels / "seq1" / "f0.bmp")), ("top", None),
    ]


def test_include_prefixes(folder):
    images, labels, _ = folder
    samples = list_samples(folder_cfg(images, labels, include=["b", "a2"]))
    assert [s.image_id for s in samples] == ["a2", "b1"]


def make_many(tmp_path, n, start=0):
    images, labels = tmp_path / "img", tmp_path / "lab"
    for i in range(start, start + n):
        save_png(images / f"f{i:03d}.png", np.zeros((2, 2, 3), np.uint8))
        save_png(labels / f"f{i:03d}.png", np.zeros((2, 2), np.uint8))
    return images, labels


def test_limit_is_seeded_nested_and_stable_under_new_files(tmp_path):
    images, labels = make_many(tmp_path, 30)

    def ids(**kw):
        return [s.image_id for s in list_samples(folder_cfg(images, labels, **kw))]

    five = ids(limit=5)
    assert len(five) == 5
    assert five == sorted(five)
    assert five == ids(limit=5)
    assert five != ids(limit=5, sample_seed=1)
    assert set(five) <= set(ids(limit=10))
    assert ids(limit=100) == ids()
    make_many(tmp_path, 10, start=30)
    # The old images among a sample of the grown listing are a subset of the old sample.
    grown = ids(limit=15)
    old = {i for i in grown if int(i[1:]) < 30}
    assert old <= set(ids(limit=15, include=[f"f{i:03d}" for i in range(30)]))


def test_folder_errors(tmp_path, folder):
    images, labels, _ = folder
    with pytest.raises(DataError, match=r"`images` of dataset 'ds' to be a folder"):
        list_samples(folder_cfg(tmp_path / "nope", labels))
    with pytest.raises(DataError, match=r"`labels` of dataset 'ds' to be a folder"):
        list_samples(folder_cfg(images, tmp_path / "nope"))
    with pytest.raises(DataError, match=r"dataset 'ds' to list at least one image"):
        list_samples(folder_cfg(images, labels, glob="*.jpg"))
    with pytest.raises(DataError, match="at least one image"):
        list_samples(folder_cfg(images, labels, include=["zzz"]))
    save_png(labels / "a1.bmp", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError, match="one label file per stem"):
        list_samples(folder_cfg(images, labels))


def test_duplicate_image_ids(tmp_path, folder):
    images, labels, _ = folder
    save_png(images / "a1.bmp", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"unique image ids in dataset 'ds', but got \['a1'\]"):
        list_samples(folder_cfg(images, labels, glob="*"))


# Official Cityscapes labelId -> trainId table (cityscapesScripts helpers/labels.py), by name.
CITYSCAPES = {
    "road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
    "pole": (17, 5), "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8),
    "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12),
    "car": (26, 13), "truck": (27, 14), "bus": (28, 15), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18),
}


def make_cityscapes(root, split="val"):
    label_ids = np.arange(34, dtype=np.uint8).reshape(2, 17)
    for city, frame in (("bonn", "bonn_000000_000019"), ("ulm", "ulm_000001_000019")):
        save_png(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png",
                 np.full((2, 17, 3), 9, np.uint8))
        save_png(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", label_ids)
        save_png(root / "gtFine" / split / city / f"{frame}_gtFine_color.png",
                 np.zeros((2, 17, 3), np.uint8))
    return label_ids


@pytest.mark.parametrize("ignore_index", [255, 19], ids=["ignore255", "ignore19"])
def test_cityscapes_layout_and_train_id_remap(tmp_path, ignore_index):
    label_ids = make_cityscapes(tmp_path)
    cfg = DatasetConfig(name="cs", role="test", domain="city", format="cityscapes",
                        images=str(tmp_path), ignore_index=ignore_index)
    samples = list_samples(cfg)
    assert [s.image_id for s in samples] == ["bonn_000000_000019", "ulm_000001_000019"]
    assert samples[1].label_uri.endswith("gtFine/val/ulm/ulm_000001_000019_gtFine_labelIds.png")
    _, train = load_sample(samples[0], cfg, 19)
    expected = np.full(34, ignore_index)
    for label_id, train_id in CITYSCAPES.values():
        expected[label_id] = train_id
    np.testing.assert_array_equal(train, expected[label_ids])


def test_cityscapes_errors(tmp_path):
    make_cityscapes(tmp_path)
    cfg = DatasetConfig(name="cs", role="test", domain="city", format="cityscapes",
                        images=str(tmp_path), split="train")
    with pytest.raises(DataError, match=r"Cityscapes root with leftImg8bit/train/"):
        list_samples(cfg)
    bad = tmp_path / "gtFine" / "val" / "ulm" / "ulm_000001_000019_gtFine_labelIds.png"
    save_png(bad, np.full((2, 17), 40, np.uint8))
    cfg = cfg.model_copy(update={"split": "val"})
    sample = list_samples(cfg)[1]
    with pytest.raises(DataError, match=r"labelIds 0..33 in .*ulm_000001_000019.*got 40"):
        load_sample(sample, cfg, 19)


def write_manifest_table(rows, path, fmt):
    table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
    with fsspec.open(str(path), "wb") as f:
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, f)
        else:
            pq.write_table(table, f)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_local_relative_and_absolute_uris(tmp_path, rng, fmt, folder):
    images, labels, pairs = folder
    rows = [
        {"image": "img/a1.png", "label": "lab/a1.png"},
        {"image": str(images / "b1.png"), "label": str(labels / "b1.png")},
        {"image": "img/a2.png", "label": ""},
    ]
    write_manifest_table(rows, tmp_path / f"list.{fmt}", fmt)
    cfg = DatasetConfig(name="m", role="test", domain="day", format="manifest",
                        manifest=str(tmp_path / f"list.{fmt}"))
    samples = list_samples(cfg)
    assert [s.image_id for s in samples] == ["a1", "a2", "b1"]
    assert samples[0].uri == str(images / "a1.png")
    assert samples[1].label_uri is None
    image, lab = load_sample(samples[2], cfg, C)
    np.testing.assert_array_equal(image, pairs["b1"][0])
    np.testing.assert_array_equal(lab, pairs["b1"][1])


def test_manifest_on_an_fsspec_filesystem_with_image_ids(rng):
    fs = fsspec.filesystem("memory")
    img = rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    lab = np.array([[0, 1, 2, 3, 255]] * 3, np.uint8)
    for name, arr in (("x.png", img), ("x_gt.png", lab)):
        with fs.open(f"/seg/{name}", "wb") as f:
            Image.fromarray(arr).save(f, format="PNG")
    write_manifest_table([{"image_id": "frame-7", "image": "x.png", "label": "x_gt.png"}],
                         "memory://seg/list.csv", "csv")
    cfg = DatasetConfig(name="m", role="test", domain="day", format="manifest",
                        manifest="memory://seg/list.csv")
    (sample,) = list_samples(cfg)
    assert sample == Sample("frame-7", "memory://seg/x.png", "memory://seg/x_gt.png")
    image, labels = load_sample(sample, cfg, C)
    np.testing.assert_array_equal(image, img)
    np.testing.assert_array_equal(labels, lab)


def test_manifest_errors(tmp_path):
    def cfg(path):
        return DatasetConfig(name="m", role="test", domain="d", format="manifest",
                             manifest=str(path))

    with pytest.raises(DataError, match=r"end in .csv or .parquet, but got .*list.json"):
        list_samples(cfg(tmp_path / "list.json"))
    with pytest.raises(DataError, match=r"manifest .*missing.csv to be a readable table"):
        list_samples(cfg(tmp_path / "missing.csv"))
    write_manifest_table([{"image": "a.png", "mask": "b.png"}], tmp_path / "cols.csv", "csv")
    with pytest.raises(DataError, match=r"columns \['image', 'label'\], but \['label'\]"):
        list_samples(cfg(tmp_path / "cols.csv"))
    write_manifest_table([{"image": "", "label": "b.png"}], tmp_path / "empty.parquet",
                         "parquet")
    with pytest.raises(DataError, match=r"row 0 of manifest .*empty.parquet to name an image"):
        list_samples(cfg(tmp_path / "empty.parquet"))
