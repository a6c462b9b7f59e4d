from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import CorruptionConfig, DatasetConfig
from pipeline.data import (
    DataError,
    Sample,
    corrupt,
    label_dtype,
    load_image,
    load_label,
    load_sample,
    prepare_labels,
)

C = 4


def cfg(**kw):
    return DatasetConfig(name="ds", role="test", domain="day", images="i", labels="l", **kw)


@pytest.fixture
def pair(tmp_path, rng):
    img = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    lab = rng.integers(0, C, (6, 8)).astype(np.uint8)
    lab[0, 0] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(lab).save(tmp_path / "a_gt.png")
    return Sample("a", str(tmp_path / "a.png"), str(tmp_path / "a_gt.png")), img, lab


def test_load_sample_returns_image_and_labels(pair):
    sample, img, lab = pair
    image, labels = load_sample(sample, cfg(), C)
    np.testing.assert_array_equal(image, img)
    np.testing.assert_array_equal(labels, lab)
    assert image.dtype == np.uint8
    assert labels.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_load_image_converts_to_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(tmp_path / "x.png")
    out = load_image(str(tmp_path / "x.png"))
    assert out.shape == (5, 7, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(tmp_path / "x.png").convert("RGB")))


def test_sixteen_bit_labels_stay_uint16(tmp_path):
    values = np.array([[0, 299, 300], [1000, 5, 7]], np.uint16)
    Image.fromarray(values).save(tmp_path / "l.png")
    raw = load_label(str(tmp_path / "l.png"))
    np.testing.assert_array_equal(raw, values)
    out = prepare_labels(raw, cfg(ignore_index=1000), 301)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, values)


def test_label_map_is_applied_before_the_range_check():
    raw = np.array([[0, 1, 11], [12, 3, 2]])
    out = prepare_labels(raw, cfg(ignore_index=255, label_map={11: 255, 12: 0}), C)
    np.testing.assert_array_equal(out, [[0, 1, 255], [0, 3, 2]])


@pytest.mark.parametrize(
    ("num_classes", "ignore_index", "dtype"),
    [(11, 11, np.uint8), (150, 255, np.uint8), (19, 256, np.uint16), (300, 255, np.uint16)],
)
def test_label_dtype(num_classes, ignore_index, dtype):
    assert label_dtype(num_classes, ignore_index) == dtype


def test_label_dtype_errors():
    with pytest.raises(ValueError, match="lie in 0..65535, but got ignore_index -1"):
        label_dtype(5, -1)
    with pytest.raises(ValueError, match="ignore_index 70000"):
        label_dtype(5, 70000)


def test_corruption_is_applied_per_image(pair):
    sample, img, _ = pair
    c = cfg(corruption=CorruptionConfig(kind="noise", severity=2, seed=3))
    image, _ = load_sample(sample, c, C)
    np.testing.assert_array_equal(image, corrupt(img, "noise", 2, seed=3, key="a"))
    np.testing.assert_array_equal(image, load_sample(sample, c, C)[0])


def test_error_without_label(pair):
    sample, _, _ = pair
    with pytest.raises(DataError, match=r"label file for image .*a.png, but found none"):
        load_sample(Sample("a", sample.uri, None), cfg(), C)


def test_error_missing_file(pair, tmp_path):
    sample, _, _ = pair
    with pytest.raises(DataError, match=r"image .*gone.png to exist, but it is missing"):
        load_sample(Sample("g", str(tmp_path / "gone.png"), sample.label_uri), cfg(), C)


def test_error_corrupt_image(pair, tmp_path):
    sample, _, _ = pair
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"image .*junk.png to be a readable image"):
        load_sample(Sample("j", str(tmp_path / "junk.png"), sample.label_uri), cfg(), C)


def test_error_truncated_label(pair, tmp_path):
    sample, _, _ = pair
    data = (tmp_path / "a_gt.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"label .*cut.png to be a readable image"):
        load_sample(Sample("a", sample.uri, str(tmp_path / "cut.png")), cfg(), C)


def test_error_multichannel_label(pair, tmp_path):
    sample, img, _ = pair
    Image.fromarray(img).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match=r"label .*rgb.png to be a single-channel .*mode RGB"):
        load_sample(Sample("a", sample.uri, str(tmp_path / "rgb.png")), cfg(), C)


def test_error_size_mismatch(pair, tmp_path):
    sample, _, _ = pair
    Image.fromarray(np.zeros((6, 9), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match=r"wide.png to match image .*a.png in size \(6, 8\)"):
        load_sample(Sample("a", sample.uri, str(tmp_path / "wide.png")), cfg(), C)


def test_error_label_value_outside_classes(pair, tmp_path):
    sample, _, lab = pair
    bad = lab.copy()
    bad[1, 1], bad[2, 2] = C, 200
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad.png to lie in 0..3 or equal ignore_index 255, "
                                        r"but got \[4, 200\]"):
        load_sample(Sample("a", sample.uri, str(tmp_path / "bad.png")), cfg(), C)
    with pytest.raises(DataError, match=r"ignore_index 11, but got \[255\]"):
        prepare_labels(lab.astype(np.int64), cfg(ignore_index=11), 11, uri="x.png")
    with pytest.raises(DataError, match=r"non-negative label values in x.png, but got -1"):
        prepare_labels(np.array([[0, -1]]), cfg(), C, uri="x.png")


def test_load_image_decodes_each_pixel_format(tmp_path, rng):
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    wide = np.array([[0, 257, 771, 32767, 65535]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"

    np.testing.assert_array_equal(load_image(str(tmp_path / "rgb.png")), rgb)
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey.png")),
                                  np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(str(tmp_path / "rgba.png")), rgb)
    palette = Image.open(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(str(tmp_path / "p.png")),
                                  np.asarray(palette.convert("RGB")))
    # 16 bits over the full range: round(v * 255 / 65535), not clipped to white.
    np.testing.assert_array_equal(load_image(str(tmp_path / "grey16.png"))[..., 0],
                                  [[0, 1, 3, 127, 255]])


def test_load_image_refuses_32_bit_images(tmp_path):
    Image.fromarray(np.zeros((3, 4), np.int32)).save(tmp_path / "deep.tif")
    with pytest.raises(DataError, match=r"deep\.tif to have 8 or 16 bits per channel, but got "
                                        r"32-bit integer"):
        load_image(str(tmp_path / "deep.tif"))


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "big.png")
    # Pillow refuses images over twice MAX_IMAGE_PIXELS; a low limit stands in for 20000^2.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(DataError, match=r"big\.png to be at most 500 pixels"):
        load_image(str(tmp_path / "big.png"))
