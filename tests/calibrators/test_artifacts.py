"""Artifacts (safetensors + JSON card) and TorchScript export."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import pipeline
from pipeline.calibrators import (
    build_calibrator,
    export_torchscript,
    export_with_model,
    list_calibrators,
    load,
    save,
)

C = 5
NAMES = list("abcde")


def _maps(seed, n=3, h=6, w=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, h, w, generator=g) * 4
    labels = torch.multinomial(
        torch.softmax(logits / 2, 1).permute(0, 2, 3, 1).reshape(-1, C), 1, generator=g
    ).reshape(n, h, w)
    return logits, labels, torch.rand(n, 3, h, w, generator=g)


def _fit(name):
    logits, labels, images = _maps(0)
    return build_calibrator(name, C).fit(logits, labels, images=images, heldout=_maps(1))


def _apply(calibrator, logits, images):
    return calibrator(logits, images) if type(calibrator).spatial else calibrator(logits)


def _save(calibrator, directory, **overrides):
    kwargs = {"class_names": NAMES, "ignore_index": 255, "metrics": {"heldout_nll": 0.5},
              "data_fingerprint": "abc123", **overrides}
    return save(calibrator, directory, **kwargs)


@pytest.fixture(scope="module", params=list_calibrators())
def fitted(request):
    return _fit(request.param)


@pytest.fixture(scope="module")
def temperature():
    return _fit("temperature")


def _edit_card(directory, **changes):
    path = directory / "calibrator.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


# -- save / load ---------------------------------------------------------------------------


def test_round_trip_gives_identical_outputs_and_a_complete_card(fitted, tmp_path):
    directory = _save(fitted, tmp_path / "art")
    assert sorted(p.name for p in directory.iterdir()) == ["calibrator.json", "model.safetensors"]
    card = json.loads((directory / "calibrator.json").read_text())
    assert card["name"] == fitted.name
    assert card["num_classes"] == C
    assert card["class_names"] == NAMES
    assert card["ignore_index"] == 255
    assert card["options"] == fitted.options
    assert card["summary"] == fitted.summary()
    assert card["metrics"] == {"heldout_nll": 0.5}
    assert card["data_fingerprint"] == "abc123"
    assert card["version"] == pipeline.__version__
    weights = (directory / "model.safetensors").read_bytes()
    assert card["sha256"] == hashlib.sha256(weights).hexdigest()

    loaded = load(directory)
    assert type(loaded) is type(fitted)
    assert not loaded.training
    logits, _, images = _maps(2)
    assert torch.equal(_apply(loaded, logits, images), _apply(fitted, logits, images))


def test_load_never_unpickles(temperature, tmp_path, monkeypatch):
    directory = _save(temperature, tmp_path / "art")

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert load(directory).temperature == pytest.approx(temperature.temperature)


def test_save_replaces_an_existing_artifact_and_leaves_no_temp_folders(tmp_path):
    first, second = _fit("temperature"), _fit("vector")
    _save(first, tmp_path / "art")
    _save(second, tmp_path / "art")
    assert load(tmp_path / "art").name == "vector"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_failed_save_keeps_the_previous_artifact(temperature, tmp_path, monkeypatch):
    directory = _save(temperature, tmp_path / "art")
    before = (directory / "calibrator.json").read_text()
    calls = []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        _save(_fit("vector"), directory)
    monkeypatch.undo()
    assert (directory / "calibrator.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"class_names": ["a"]}, ValueError, "`class_names` to hold 5 names",
                     id="class-names"),
        pytest.param({"metrics": {"nll": float("nan")}}, ValueError, "json-able artifact card",
                     id="metrics-nan"),
        pytest.param({"metrics": {"x": object()}}, ValueError, "json-able artifact card",
                     id="metrics-object"),
    ],
)
def test_save_rejects_bad_arguments(temperature, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        _save(temperature, tmp_path / "art", **kwargs)
    assert not (tmp_path / "art").exists()


def test_save_refuses_an_unfitted_calibrator(tmp_path):
    with pytest.raises(RuntimeError, match="never fitted"):
        _save(build_calibrator("temperature", C), tmp_path / "art")


def _wrong_shapes_card(directory):
    # A consistent card (hash, names) for 4 classes over weights of a 5-class model.
    _edit_card(directory, num_classes=4, class_names=NAMES[:4])


def _tampered_weights(directory):
    path = directory / "model.safetensors"
    tensors = safetensors.torch.load(path.read_bytes())
    tensors["bias"] = tensors["bias"] + 1
    path.write_bytes(safetensors.torch.save(tensors))


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        pytest.param(lambda d: _edit_card(d, sha256="0" * 64), ValueError,
                     "Expected `sha256` in .*calibrator.json to match", id="sha256"),
        pytest.param(_tampered_weights, ValueError, "`sha256` .* to match", id="weights-edited"),
        pytest.param(lambda d: _edit_card(d, name="nope"), ValueError,
                     r"Unknown calibrator 'nope' in `name` of .*calibrator.json", id="name"),
        pytest.param(lambda d: _edit_card(d, name="temperature"), ValueError,
                     r"Unknown option\(s\).*calibrator.json|Expected tensors",
                     id="name-of-another-calibrator"),
        pytest.param(_wrong_shapes_card, ValueError,
                     r"tensor `(weight|bias|scale)` of shape \(4", id="class-count"),
        pytest.param(lambda d: _edit_card(d, class_names=["a"]), ValueError,
                     "`class_names` in .* to list 5 names", id="class-names"),
        pytest.param(lambda d: _edit_card(d, num_classes="5"), ValueError,
                     "`num_classes` in .* to be an int", id="num-classes-type"),
        pytest.param(lambda d: _edit_card(d, options={"max_iter": -1}), ValueError,
                     "Invalid `options`.*`max_iter`", id="options"),
        pytest.param(lambda d: _edit_card(d, format="other/2"), ValueError,
                     "Expected `format` in .* to be 'segcal.calibrator/1'", id="format"),
        pytest.param(lambda d: (d / "calibrator.json").write_text("{not json"), ValueError,
                     "calibrator.json to hold JSON", id="not-json"),
        pytest.param(lambda d: (d / "model.safetensors").unlink(), FileNotFoundError,
                     "Expected weights at", id="no-weights"),
        pytest.param(lambda d: (d / "calibrator.json").unlink(), FileNotFoundError,
                     "Expected an artifact card at", id="no-card"),
    ],
)
def test_load_refuses_a_bad_artifact(tmp_path, corrupt, error, match):
    directory = _save(_fit("vector"), tmp_path / "art")
    corrupt(directory)
    with pytest.raises(error, match=match):
        load(directory)


def test_load_refuses_a_card_missing_a_key(temperature, tmp_path):
    directory = _save(temperature, tmp_path / "art")
    card = json.loads((directory / "calibrator.json").read_text())
    del card["sha256"]
    (directory / "calibrator.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="Expected key `sha256` in"):
        load(directory)


def test_load_refuses_unfitted_weights(tmp_path, temperature):
    directory = _save(temperature, tmp_path / "art")
    path = directory / "model.safetensors"
    tensors = safetensors.torch.load(path.read_bytes())
    tensors["fitted"] = torch.zeros((), dtype=torch.bool)
    path.write_bytes(safetensors.torch.save(tensors))
    _edit_card(directory, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match="`fitted` is false"):
        load(directory)


# -- TorchScript export ----------------------------------------------------------------------


def test_exported_calibrator_matches_in_process(fitted, tmp_path):
    path = export_torchscript(fitted, tmp_path / "calibrator.pt")
    scripted = torch.jit.load(str(path))
    for seed, size in ((3, (6, 6)), (4, (5, 9))):  # another map size than the fit's
        logits, _, images = _maps(seed, h=size[0], w=size[1])
        expected = _apply(fitted, logits, images)
        got = scripted(logits, images) if fitted.spatial else scripted(logits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if not fitted.spatial:
        points = logits.permute(0, 2, 3, 1).reshape(-1, C)
        torch.testing.assert_close(scripted(points), fitted(points), rtol=1e-5, atol=1e-5)


def test_exported_calibrator_still_checks_its_input(temperature, tmp_path):
    scripted = torch.jit.load(str(export_torchscript(temperature, tmp_path / "c.pt")))
    with pytest.raises(torch.jit.Error, match="to have 5 classes"):
        scripted(torch.zeros(2, 3))


class _TinySegmenter(nn.Module):
    """Half-resolution logits with two extra channels beyond the classes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, C + 2, kernel_size=3, stride=2, padding=1)

    def forward(self, image):
        return self.conv(image) * 4


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name", ["temperature", "dirichlet", "meta_cal"])
def test_exported_model_with_calibrator_matches_in_process(name, how, tmp_path):
    torch.manual_seed(0)
    model, calibrator = _TinySegmenter().eval(), _fit(name)
    images = torch.rand(2, 3, 12, 10)
    example = images if how == "trace" else None
    path = export_with_model(model, calibrator, tmp_path / "full.pt", num_classes=C,
                             example_input=example)
    exported = torch.jit.load(str(path))
    with torch.no_grad():
        logits = F.interpolate(model(images)[:, :C], size=(12, 10), mode="bilinear",
                               align_corners=False)
        expected = torch.softmax(calibrator(logits), dim=1)
        torch.testing.assert_close(exported(images), expected, rtol=1e-5, atol=1e-6)


def test_export_refuses_misuse(tmp_path, temperature):
    with pytest.raises(RuntimeError, match="never fitted"):
        export_torchscript(build_calibrator("temperature", C), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"`num_classes` to equal the calibrator's 5, but got 4"):
        export_with_model(_TinySegmenter(), temperature, tmp_path / "m.pt", num_classes=4)
    with pytest.raises(TypeError, match="`calibrator` to be a pipeline.calibrators.Calibrator"):
        export_torchscript(nn.Identity(), tmp_path / "c.pt")
    assert not any(tmp_path.iterdir())
