"""Local (LTS) and image-based (IBTS) temperature scaling on maps with known temperatures."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from pipeline.calibrators.base import FitData
from pipeline.calibrators.lts import ImageBasedTemperatureScaling, LocalTemperatureScaling
from pipeline.calibrators.temperature import fit_temperature

C, S = 4, 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors here are tiny: on 2 shared cores, intra-op threads cost more than they give.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _calibrated(n, g):
    """Calibrated logits (n, C, S, S) and labels drawn from their softmax."""
    logits = torch.randn(n, C, S, S, generator=g) * 2
    probs = logits.softmax(1).movedim(1, -1).reshape(-1, C)
    return logits, torch.multinomial(probs, 1, generator=g).reshape(n, S, S)


def local_maps(n, *, seed):
    """Over-confident by T = 4 inside a bright box of each image, calibrated (T = 1) outside."""
    g = torch.Generator().manual_seed(seed)
    logits, labels = _calibrated(n, g)
    t = torch.ones(n, 1, S, S)
    for i in range(n):
        r, c = torch.randint(0, S // 2, (2,), generator=g).tolist()
        t[i, :, r : r + S // 2, c : c + S // 2] = 4.0
    image = ((t - 1) / 3).expand(n, 3, S, S).clone()
    return logits * t, labels, image, t


def image_maps(n, *, seed):
    """Over-confident by T = 1 or 4 per image; a brighter image has the larger T."""
    g = torch.Generator().manual_seed(seed)
    logits, labels = _calibrated(n, g)
    t = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 4.0)[:, None, None, None]
    image = (0.25 * t - 0.1 + 0.1 * torch.rand(n, 3, S, S, generator=g)).clamp(0, 1)
    return logits * t, labels, image, t


def splits(make):
    return make(16, seed=0), make(8, seed=1), make(16, seed=2)


def nll(logits, labels):
    return float(F.cross_entropy(logits.detach(), labels))


@pytest.fixture(scope="module")
def local():
    return splits(local_maps)


@pytest.fixture(scope="module")
def per_image():
    return splits(image_maps)


def fit(cls, data, **options):
    (z, y, image, _), (hz, hy, himage, _) = data[0], data[1]
    options = {"lr": 1e-2} | options
    use_image = options.get("use_image", True)
    return cls(C, **options).fit(
        z, y, images=image if use_image else None,
        heldout=(hz, hy, himage) if use_image else (hz, hy),
    )


def ts_nll(data):
    (z, y, _, _), (tz, ty, _, _) = data[0], data[2]
    points = z.movedim(1, -1).reshape(-1, C)
    return nll(tz / fit_temperature(points, y.reshape(-1)), ty)


@pytest.fixture(scope="module")
def lts_fits(local):
    return {use: fit(LocalTemperatureScaling, local, use_image=use) for use in (True, False)}


@pytest.fixture(scope="module")
def ibts_fit(per_image):
    return fit(ImageBasedTemperatureScaling, per_image)


# --------------------------------------------------------------------------------------------
# Known answers.


@pytest.mark.parametrize("use_image", [True, False], ids=["with-image", "logits-only"])
def test_lts_beats_global_ts_on_spatially_varying_temperature(local, lts_fits, use_image):
    z, y, image, t = local[2]
    calibrated = lts_fits[use_image](z, image if use_image else None)
    # Measured: uncal .97, TS .88, LTS .78 (image) / .80-.83 (logits only), oracle .76.
    assert nll(calibrated, y) < ts_nll(local) - 0.04
    assert nll(calibrated, y) > nll(z / t, y) - 0.01  # cannot beat the true temperatures


def test_lts_temperature_map_follows_the_true_one(local, lts_fits):
    z, _, image, t = local[2]
    predicted = lts_fits[True].temperature(z, image)
    assert predicted.shape == (16, S, S)
    inside, outside = predicted[t[:, 0] == 4].mean(), predicted[t[:, 0] == 1].mean()
    assert inside > 2 * outside


def test_ibts_beats_global_ts_on_per_image_temperatures(per_image, ibts_fit):
    z, y, image, t = per_image[2]
    # Measured: uncal 1.08, TS .89, IBTS .79, oracle .76.
    assert nll(ibts_fit(z, image), y) < ts_nll(per_image) - 0.05
    predicted = ibts_fit.temperature(z, image)
    assert predicted.shape == (16,)
    hot, cold = predicted[t.flatten() == 4], predicted[t.flatten() == 1]
    assert hot.min() > cold.max()


@pytest.mark.parametrize("cls", [LocalTemperatureScaling, ImageBasedTemperatureScaling])
def test_starts_at_ts_and_never_ends_worse_on_heldout(cls):
    # One global temperature everywhere: the net has nothing to add beyond TS, and the
    # held-out model pick must keep a state at least as good as the TS start.
    def uniform(n, *, seed):
        g = torch.Generator().manual_seed(seed)
        logits, labels = _calibrated(n, g)
        return logits * 2.5, labels, torch.rand(n, 3, S, S, generator=g), None

    data = splits(uniform)
    (z, y, _, _), (hz, hy, himage, _) = data[0], data[1]
    t_ts = fit_temperature(z.movedim(1, -1).reshape(-1, C), y.reshape(-1))
    cal = fit(cls, data, epochs=3)
    assert cal.summary()["init_temperature"] == pytest.approx(t_ts, rel=1e-6)
    assert nll(cal(hz, himage), hy) <= nll(hz / t_ts, hy) + 1e-6


@pytest.mark.parametrize("cls", [LocalTemperatureScaling, ImageBasedTemperatureScaling])
def test_net_starts_at_its_initial_temperature_everywhere(cls):
    z, y, image, _ = local_maps(2, seed=0)
    t = cls(C).temperature(z, image)
    torch.testing.assert_close(t, torch.ones_like(t), rtol=0, atol=0)
    cal = cls(C, ts_init=False, epochs=1).fit(z, y, images=image)
    assert cal.summary()["init_temperature"] == 1.0


# --------------------------------------------------------------------------------------------
# Invariants.


@pytest.fixture(scope="module")
def quick():
    """One quickly fitted LTS and IBTS (with image) and one LTS on logits only."""
    z, y, image, _ = local_maps(6, seed=3)
    return {
        "lts": LocalTemperatureScaling(C, epochs=2).fit(z, y, images=image),
        "ibts": ImageBasedTemperatureScaling(C, epochs=2).fit(z, y, images=image),
        "lts-logits": LocalTemperatureScaling(C, epochs=2, use_image=False).fit(z, y),
    }


def _inputs(cal, scale=1.0):
    z, _, image, _ = local_maps(3, seed=9)
    return z * scale, image if cal.use_image else None


@pytest.mark.parametrize("name", ["lts", "ibts", "lts-logits"])
@pytest.mark.parametrize("scale", [1.0, 50.0], ids=["moderate", "extreme"])
def test_argmax_is_preserved(quick, name, scale):
    cal = quick[name]
    z, image = _inputs(cal, scale)
    out = cal(z, image)
    assert out.shape == z.shape
    assert torch.equal(out.argmax(1), z.argmax(1))


def test_loss_is_the_nll_of_valid_pixels(quick):
    cal = quick["lts"]
    z, y, image, _ = local_maps(2, seed=4)
    ignored = y.clone()
    ignored[:, :5] = 255
    calibrated = cal(z, image).movedim(1, -1)[ignored != 255]
    expected = F.cross_entropy(calibrated, y[ignored != 255])
    torch.testing.assert_close(cal.loss(z, ignored, image, ignore_index=255), expected)


def test_fit_skips_ignored_pixels_and_empty_maps():
    z, y, image, _ = local_maps(4, seed=5)
    y[0] = 255  # a map with no valid pixel
    y[1, :, :8] = 255
    valid = y != 255
    cal = LocalTemperatureScaling(C, epochs=2).fit(
        z, y, images=image, ignore_index=255, heldout=FitData(z, y, image, 255)
    )
    expected = fit_temperature(z.movedim(1, -1)[valid], y[valid])
    assert cal.summary()["init_temperature"] == pytest.approx(expected, rel=1e-6)
    assert torch.isfinite(cal(z, image)).all()


def test_result_does_not_depend_on_the_batch(quick):
    cal = quick["ibts"]
    z, image = _inputs(cal)
    torch.testing.assert_close(cal(z[1:2], image[1:2])[0], cal(z, image)[1])


@pytest.mark.parametrize("name", ["lts", "ibts", "lts-logits"])
def test_state_dict_pickle_and_torchscript_round_trip(quick, name):
    cal = quick[name]
    z, image = _inputs(cal)
    expected = cal(z, image)
    rebuilt = type(cal)(C, **cal.options)
    rebuilt.load_state_dict(cal.state_dict())
    torch.testing.assert_close(rebuilt.eval()(z, image), expected)
    assert rebuilt.summary() == cal.summary()
    torch.testing.assert_close(pickle.loads(pickle.dumps(cal))(z, image), expected)
    torch.testing.assert_close(torch.jit.script(cal)(z, image), expected)


def test_fit_is_seeded_and_reproducible():
    z, y, image, _ = local_maps(4, seed=6)
    a, b, c = (
        LocalTemperatureScaling(C, epochs=2).fit(z, y, images=image, seed=s).state_dict()
        for s in (1, 1, 2)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("name", ["lts", "ibts"])
def test_pixels_instead_of_maps_raise(quick, name):
    cal = quick[name]
    with pytest.raises(ValueError, match=rf"\(N, C, H, W\) for the spatial calibrator '{name}'"):
        cal(torch.zeros(10, C))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) for the spatial calibrator"):
        cal.temperature(torch.zeros(10, C))


def test_missing_image_raises(quick):
    z, _, _, _ = local_maps(2, seed=0)
    with pytest.raises(ValueError, match="Expected an `image`.*use_image=True"):
        quick["lts"](z)
    with pytest.raises(ValueError, match="Expected `images` .* use_image=True, but got None"):
        LocalTemperatureScaling(C, epochs=1).fit(z, z.argmax(1))
    with pytest.raises(ValueError, match="`heldout.images` .* use_image=True, but got None"):
        LocalTemperatureScaling(C, epochs=1).fit(
            z, z.argmax(1), images=torch.zeros(2, 3, S, S), heldout=(z, z.argmax(1))
        )


def test_perfect_predictions_start_above_the_smallest_temperature():
    # TS on perfectly predicted pixels wants T -> 0; the net cannot start at or below t_min.
    z, _, image, _ = local_maps(2, seed=0)
    cal = LocalTemperatureScaling(C, epochs=1).fit(z, z.argmax(1), images=image)
    assert cal.summary()["init_temperature"] == pytest.approx(0.1)


def test_use_before_fit_raises():
    with pytest.raises(RuntimeError, match="before `fit`"):
        LocalTemperatureScaling(C)(torch.zeros(1, C, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param(dict(use_image=1), TypeError, "`use_image` to be a bool", id="use_image"),
        pytest.param(dict(hidden=0), ValueError, "`hidden` to be an int >= 1", id="hidden"),
        pytest.param(dict(ts_init="yes"), TypeError, "`ts_init` to be a bool", id="ts_init"),
        pytest.param(dict(t_min=0.0), ValueError, "`t_min` to be a float > 0", id="t_min-low"),
        pytest.param(dict(t_min=1.0), ValueError, "`t_min` to be a float < 1", id="t_min-high"),
        pytest.param(dict(epochs=0), ValueError, "`epochs` to be an int >= 1", id="epochs"),
        pytest.param(dict(batch_size=0), ValueError, "`batch_size` to be an int >= 1",
                     id="batch_size"),
        pytest.param(dict(lr=-1.0), ValueError, "`lr` to be a float > 0", id="lr"),
        pytest.param(dict(patience=0), ValueError, "`patience` to be an int >= 1",
                     id="patience"),
    ],
)
@pytest.mark.parametrize("cls", [LocalTemperatureScaling, ImageBasedTemperatureScaling])
def test_bad_options_raise(cls, options, error, match):
    with pytest.raises(error, match=match):
        cls(C, **options)
