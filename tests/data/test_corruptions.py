from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import CORRUPTIONS, corrupt


@pytest.fixture(scope="module")
def image():
    """A textured test image: smooth gradient plus seeded noise, mid-range values."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    base = 60 + 80 * (xx / 63.0)[..., None] + 40 * (yy / 47.0)[..., None]
    return np.clip(base + rng.normal(0, 25, (48, 64, 3)), 0, 255).astype(np.uint8)


def mse(a, b):
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def gradient_energy(x):
    x = x.astype(np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_same_seed_and_key_give_same_output(image, kind):
    a = corrupt(image, kind, 3, seed=7, key="img1")
    b = corrupt(image.copy(), kind, 3, seed=7, key="img1")
    assert a.dtype == np.uint8
    assert a.shape == image.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["fog", "noise"])
def test_random_kinds_depend_on_seed_and_image_key(image, kind):
    ref = corrupt(image, kind, 3, seed=0, key="img1")
    assert not np.array_equal(ref, corrupt(image, kind, 3, seed=1, key="img1"))
    assert not np.array_equal(ref, corrupt(image, kind, 3, seed=0, key="img2"))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_distance_from_clean_grows_with_severity(image, kind):
    errors = [mse(corrupt(image, kind, s, key="k"), image) for s in range(1, 6)]
    assert errors[0] > 0
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors


@pytest.mark.parametrize(
    ("kind", "measure"),
    [
        pytest.param("dark", lambda x: x.astype(np.float64).mean(), id="dark-brightness"),
        pytest.param("blur", gradient_energy, id="blur-sharpness"),
        pytest.param("fog", lambda x: x.astype(np.float64).std(), id="fog-contrast"),
    ],
)
def test_kind_specific_measure_decreases_with_severity(image, kind, measure):
    values = [measure(corrupt(image, kind, s, key="k")) for s in range(1, 6)]
    assert measure(image) > values[0]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_corrupt_errors(image):
    with pytest.raises(ValueError, match=r"Expected `kind` to be one of .* but got 'rain'"):
        corrupt(image, "rain", 1)
    for severity in (0, 6):
        with pytest.raises(ValueError, match=f"`severity` to be in 1..5, but got {severity}"):
            corrupt(image, "dark", severity)
    with pytest.raises(ValueError, match=r"shape \(H, W, 3\) and dtype uint8"):
        corrupt(image[..., 0], "dark", 1)
    with pytest.raises(ValueError, match="dtype uint8"):
        corrupt(image.astype(np.float32), "dark", 1)
