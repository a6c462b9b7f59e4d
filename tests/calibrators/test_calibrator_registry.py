"""The calibrator registry and the interface every registered calibrator shares."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pipeline.calibrators import CALIBRATORS, Calibrator, build_calibrator, list_calibrators

C = 5
OURS = ["dirichlet", "ets", "matrix", "meta_cal", "temperature", "vector"]


def _maps(seed, n=4, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, h, w, generator=g) * 4
    labels = torch.multinomial(
        torch.softmax(logits / 2, 1).permute(0, 2, 3, 1).reshape(-1, C), 1, generator=g
    ).reshape(n, h, w)
    images = torch.rand(n, 3, h, w, generator=g)
    return logits, labels, images


@pytest.fixture(scope="module", params=list_calibrators())
def fitted(request):
    logits, labels, images = _maps(0)
    calibrator = build_calibrator(request.param, C)
    return calibrator.fit(logits, labels, images=images, heldout=_maps(1), seed=0)


def _apply(calibrator, logits, images):
    return calibrator(logits, images) if type(calibrator).spatial else calibrator(logits)


def test_names_are_sorted_and_match_the_classes():
    names = list_calibrators()
    assert names == sorted(CALIBRATORS)
    assert set(OURS) <= set(names)
    for name in names:
        assert issubclass(CALIBRATORS[name], Calibrator)
        assert CALIBRATORS[name].name == name


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"Unknown calibrator 'nope': expected one of \[.*'temp"):
        build_calibrator("nope", C)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['lr'\] for calibrator 'vector'"):
        build_calibrator("vector", C, lr=0.1)


@pytest.mark.parametrize("name", list_calibrators())
def test_options_rebuild_the_same_calibrator(name):
    calibrator = build_calibrator(name, C)
    json.dumps(calibrator.options, allow_nan=False)
    assert build_calibrator(name, C, **calibrator.options).options == calibrator.options


@pytest.mark.parametrize("name", list_calibrators())
def test_forward_before_fit_raises(name):
    logits, _, images = _maps(2)
    with pytest.raises(RuntimeError, match="before `fit`"):
        _apply(build_calibrator(name, C), logits, images)


def test_fitted_calibrator_keeps_shapes_and_layouts(fitted):
    logits, _, images = _maps(3)
    out = _apply(fitted, logits, images)
    assert out.shape == logits.shape
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    if not fitted.spatial:
        points = logits.permute(0, 2, 3, 1).reshape(-1, C)
        torch.testing.assert_close(fitted(points), out.permute(0, 2, 3, 1).reshape(-1, C))


def test_summary_is_json_and_mis_score_only_for_selectors(fitted):
    json.dumps(fitted.summary(), allow_nan=False)
    if fitted.name in OURS:
        logits, _, _ = _maps(3)
        assert fitted.mis_score(logits) is None


def test_pickle_round_trip(fitted):
    logits, _, images = _maps(4)
    clone = pickle.loads(pickle.dumps(fitted))
    assert torch.equal(_apply(clone, logits, images), _apply(fitted, logits, images))


def test_state_dict_round_trip(fitted):
    logits, _, images = _maps(5)
    fresh = build_calibrator(fitted.name, C, **fitted.options)
    fresh.load_state_dict(fitted.state_dict())
    fresh.eval()
    assert torch.equal(_apply(fresh, logits, images), _apply(fitted, logits, images))
    assert fresh.summary() == fitted.summary()


def test_register_refuses_a_taken_name_a_missing_name_and_a_non_calibrator():
    from pipeline.calibrators import register
    from pipeline.calibrators.temperature import TemperatureScaling

    class Impostor(TemperatureScaling):
        name = "temperature"

    class Nameless(Calibrator):
        pass

    with pytest.raises(ValueError, match=r"'temperature' is taken by TemperatureScaling"):
        register(Impostor)
    with pytest.raises(ValueError, match=r"Expected Nameless to set a registry `name`"):
        register(Nameless)
    with pytest.raises(TypeError, match="Expected a Calibrator subclass"):
        register(dict)
    assert register(TemperatureScaling) is TemperatureScaling  # the same class again: a no-op
    assert CALIBRATORS["temperature"] is TemperatureScaling


def test_the_selective_family_shares_one_options_definition():
    from pipeline.calibrators.selective import SHARED_OPTIONS

    for name in ("selective", "selective_spatial"):
        options = build_calibrator(name, C).options
        assert {k: options[k] for k in SHARED_OPTIONS} == SHARED_OPTIONS
        with pytest.raises(ValueError, match=rf"Unknown option\(s\) \['hiden'\] for .*{name!r}"):
            build_calibrator(name, C, hiden=3)
    # A class's own defaults stay its own.
    assert build_calibrator("selective", C).options["epochs"] == 10
    assert build_calibrator("selective_spatial", C).options["epochs"] == 30
