"""Artifacts (safetensors + JSON card) and TorchScript export."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
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
                             example_input=example, method=how)
    exported = torch.jit.load(str(path))
    with torch.no_grad():
        logits = F.interpolate(model(images)[:, :C], size=(12, 10), mode="bilinear",
                               align_corners=False)
        expected = torch.softmax(calibrator(logits), dim=1)
    got = exported(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not got.requires_grad  # runs without autograd
    assert any(p.requires_grad for p in calibrator.parameters())  # the caller's is untouched


def test_exported_calibrator_runs_without_autograd(fitted, tmp_path):
    scripted = torch.jit.load(str(export_torchscript(fitted, tmp_path / "c.pt")))
    logits, _, images = _maps(6)
    out = scripted(logits, images) if fitted.spatial else scripted(logits)
    assert not out.requires_grad
    assert not any(p.requires_grad for p in scripted.parameters())


def test_export_refuses_misuse(tmp_path, temperature):
    with pytest.raises(RuntimeError, match="never fitted"):
        export_torchscript(build_calibrator("temperature", C), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"`num_classes` to equal the calibrator's 5, but got 4"):
        export_with_model(_TinySegmenter(), temperature, tmp_path / "m.pt", num_classes=4)
    with pytest.raises(TypeError, match="`calibrator` to be a pipeline.calibrators.Calibrator"):
        export_torchscript(nn.Identity(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="`method` to be one of"):
        export_with_model(_TinySegmenter(), temperature, tmp_path / "m.pt", num_classes=C,
                          method="onnx")
    with pytest.raises(ValueError, match="`example_input` to trace the model, but got None"):
        export_with_model(_TinySegmenter(), temperature, tmp_path / "m.pt", num_classes=C,
                          method="trace")
    assert not any(tmp_path.iterdir())


# -- byte-stable artifacts: timings apart (issue 19 item 7) ----------------------------------


def test_timings_go_to_their_own_file_and_the_rest_is_byte_stable(temperature, tmp_path):
    from pipeline import registry
    from pipeline.calibrators.artifacts import read_timings

    paths = []
    for i, seconds in enumerate((1.25, 7.5)):
        metrics = {"heldout": {"nll": 0.5}, "mode": "ray", "seconds": seconds,
                   "ray": {"train_loss": 0.4, "load_seconds": seconds / 2,
                           "train_seconds": seconds / 3}}
        paths.append(_save(temperature, tmp_path / f"run{i}" / "artifacts" / "ts",
                           metrics=metrics, timings={"queue_seconds": seconds}))
    first, second = paths
    for name in ("calibrator.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    card = json.loads((first / "calibrator.json").read_text())
    assert card["metrics"] == {"heldout": {"nll": 0.5}, "mode": "ray",
                               "ray": {"train_loss": 0.4}}
    assert "seconds" not in (first / "calibrator.json").read_text()
    assert read_timings(first) == {"seconds": 1.25, "queue_seconds": 1.25,
                                   "ray": {"load_seconds": 0.625, "train_seconds": 1.25 / 3}}
    assert read_timings(second)["seconds"] == 7.5
    # The registry sees the two runs' artifacts as identical.
    digests = {registry.artifact_digest(tmp_path / f"run{i}") for i in range(2)}
    assert len(digests) == 1
    assert load(first).temperature == pytest.approx(temperature.temperature)


def test_artifact_without_timings_has_no_timings_file(temperature, tmp_path):
    from pipeline.calibrators.artifacts import read_timings

    directory = _save(temperature, tmp_path / "art")
    assert not (directory / "timings.json").exists()
    assert read_timings(directory) == {}


# -- loading untrusted artifacts (issue 19 item 11) ------------------------------------------


def _write_artifact(directory, card, weights, *, fix_sha=True):
    if fix_sha and isinstance(card, dict):
        card = {**card, "sha256": hashlib.sha256(weights).hexdigest()}
    text = card if isinstance(card, (bytes, str)) else json.dumps(card)
    (directory / "calibrator.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (directory / "model.safetensors").write_bytes(weights)


def _base(tmp_path, name="vector"):
    directory = _save(_fit(name), tmp_path / f"base_{name}")
    card = json.loads((directory / "calibrator.json").read_text())
    return directory, card, (directory / "model.safetensors").read_bytes()


def _with_header(weights, edit):
    n = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + weights[8 + n :]


def test_loaded_calibrator_runs_without_autograd(fitted, tmp_path):
    loaded = load(_save(fitted, tmp_path / "art"))
    assert not any(p.requires_grad for p in loaded.parameters())
    logits, _, images = _maps(5)
    assert not _apply(loaded, logits, images).requires_grad


def test_huge_num_classes_is_refused_before_any_allocation(tmp_path, monkeypatch):
    directory, card, weights = _base(tmp_path, "matrix")
    built = []
    import pipeline.calibrators as registry_module

    real = registry_module.build_calibrator

    def spy(name, num_classes, **options):
        built.append((num_classes, torch.empty(0).device.type))
        return real(name, num_classes, **options)

    monkeypatch.setattr(registry_module, "build_calibrator", spy)
    for n in (100_000, 10**12):
        _write_artifact(directory, {**card, "num_classes": n, "class_names": None}, weights)
        with pytest.raises(ValueError, match=r"`num_classes` .* to be in \[1, 4096\]"):
            load(directory)
    assert built == []
    # Within the bound but unlike the weights: refused from the safetensors header, after a
    # shape-only build on the meta device (never a real 4096 x 4096 matrix).
    _write_artifact(directory, {**card, "num_classes": 4096, "class_names": None}, weights)
    with pytest.raises(ValueError, match=r"tensor `(weight|bias)` of shape \(4096"):
        load(directory)
    assert built == [(4096, "meta")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, value):
    directory, card, weights = _base(tmp_path, "vector")
    tensors = safetensors.torch.load(weights)
    tensors["scale"][1] = value
    _write_artifact(directory, card, safetensors.torch.save(tensors))
    with pytest.raises(ValueError, match="Expected finite values in tensor `scale`"):
        load(directory)
    bad = _fit("vector")
    with torch.no_grad():
        bad.scale[0] = value
    with pytest.raises(ValueError, match="Expected finite values in the fitted tensor `scale`"):
        _save(bad, tmp_path / "bad")


def test_meta_cal_never_gate_threshold_may_be_infinite(tmp_path):
    logits, labels, _ = _maps(0)
    cal = build_calibrator("meta_cal", C, quantile=1.0, quantile_grid=None).fit(logits, labels)
    assert float(cal.threshold) == float("inf")
    loaded = load(_save(cal, tmp_path / "art"))
    assert float(loaded.threshold) == float("inf")


def test_deeply_nested_json_raises_value_error(tmp_path):
    directory, card, weights = _base(tmp_path)
    for depth in (100, 100_000):
        _write_artifact(directory, "[" * depth + "]" * depth, weights)
        with pytest.raises(ValueError, match="nested at most 64 levels"):
            load(directory)
    deep = '{"a": ' * 50_000 + "1" + "}" * 50_000
    text = json.dumps({**card, "options": {}}).replace('"options": {}', f'"options": {deep}')
    _write_artifact(directory, text, weights)
    with pytest.raises(ValueError, match="nested at most"):
        load(directory)
    # Brackets inside strings do not count.
    _write_artifact(directory, {**card, "data_fingerprint": "[" * 1000}, weights)
    assert load(directory).name == "vector"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        pytest.param(lambda w: w[:5], "safetensors file, but it has 5 bytes", id="tiny"),
        pytest.param(lambda w: w[:-4], "data offsets inside the file", id="truncated"),
        pytest.param(lambda w: w[: len(w) // 2], "header .* to fit", id="truncated-header"),
        pytest.param(lambda w: (2**63).to_bytes(8, "little") + w[8:], "header .* to fit",
                     id="header-length"),
        pytest.param(lambda w: _with_header(w, lambda h: h["scale"].update(shape=[10**12])),
                     "declare a dtype, a shape", id="huge-shape"),
        pytest.param(lambda w: _with_header(w, lambda h: h["scale"].update(dtype="X9")),
                     "declare a dtype", id="dtype"),
        pytest.param(lambda w: b"\x02" + b"\0" * 7 + b"[]", "safetensors header .* object",
                     id="header-not-object"),
        pytest.param(lambda w: w[:8] + b"\xff" * (len(w) - 8), "hold JSON", id="garbage"),
    ],
)
def test_malformed_safetensors_raise_value_error(tmp_path, edit, match):
    directory, card, weights = _base(tmp_path)
    _write_artifact(directory, card, edit(weights))
    with pytest.raises(ValueError, match=match):
        load(directory)


_CARD_VALUES = {
    "num_classes": [0, -1, 4097, 10**5, 2**64, 1.5, True, "5", None, [5], {"a": 1}],
    "name": ["matrix", "lts", "selective_spatial", "", None, 5, ["vector"], {"a": 1}],
    "options": [None, [], "x", 5, {"hidden": 10**9}, {"hidden": 10**5}, {"hidden": -1},
                {"max_iter": 1e308}, {"max_iter": 10**40}, {"t_min": "a"}, {"quantile": 2},
                {"nope": 1}, {"": None}],
    "class_names": [None, [], ["a"], list(range(C)), "abcde", {"a": 1}, [None] * C],
    "sha256": [None, 5, "zz", ["a"]],
    "format": [None, "segcal.calibrator/2", 1],
    "metrics": [None, {"x": [[[[1]]]]}, "x"],
}


def _mutate_card(rng, card):
    card = dict(card)
    for _ in range(int(rng.integers(1, 3))):
        key = list(_CARD_VALUES)[int(rng.integers(len(_CARD_VALUES)))]
        choices = _CARD_VALUES[key]
        card[key] = choices[int(rng.integers(len(choices)))]
    if rng.random() < 0.2:
        del card[list(card)[int(rng.integers(len(card)))]]
    return card


def _mutate_bytes(rng, data):
    data = bytearray(data)
    kind = int(rng.integers(4))
    if kind == 0 and data:  # flip bytes
        for _ in range(int(rng.integers(1, 8))):
            data[int(rng.integers(len(data)))] = int(rng.integers(256))
    elif kind == 1:  # truncate
        del data[int(rng.integers(len(data) + 1)) :]
    elif kind == 2:  # insert garbage
        at = int(rng.integers(len(data) + 1))
        data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    else:  # structural characters
        at = int(rng.integers(len(data) + 1))
        data[at:at] = bytes(rng.choice(list(b'[]{}",:\\0e-'), int(rng.integers(1, 200))))
    return bytes(data)


def _mutate_tensors(rng, weights):
    tensors = safetensors.torch.load(weights)
    key = sorted(tensors)[int(rng.integers(len(tensors)))]
    t = tensors[key]
    if t.is_floating_point() and t.numel():
        t.view(-1)[int(rng.integers(t.numel()))] = float(
            rng.choice([np.nan, np.inf, -np.inf, 1e30, -0.0])
        )
    elif rng.random() < 0.5:
        tensors[key] = torch.zeros(int(rng.integers(0, 9)))
    else:
        tensors.pop(key)
    return safetensors.torch.save(tensors)


@pytest.mark.parametrize("name", ["vector", "matrix", "meta_cal", "lts", "selective"])
def test_fuzzed_artifacts_raise_only_value_error(tmp_path, name):
    # Random mutations of a valid card and weights: load either succeeds or raises ValueError,
    # never RecursionError, SafetensorError, TypeError, MemoryError, OverflowError, ...
    directory, card, weights = _base(tmp_path, name)
    card_text = (directory / "calibrator.json").read_bytes()
    rng = np.random.default_rng(list(map(ord, name)))
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(120):
        target = int(rng.integers(5))
        new_card, new_weights, fix = card, weights, True
        if target == 0:
            new_card = _mutate_card(rng, card)
        elif target == 1:
            new_card, fix = _mutate_bytes(rng, card_text), False
        elif target == 2:
            new_weights = _mutate_bytes(rng, weights)
        elif target == 3:
            new_weights = _mutate_tensors(rng, weights)
        else:
            new_card, new_weights = _mutate_card(rng, card), _mutate_bytes(rng, weights)
        _write_artifact(directory, new_card, new_weights, fix_sha=fix and rng.random() < 0.9)
        try:
            loaded = load(directory)
        except ValueError:
            outcomes["refused"] += 1
        else:
            outcomes["loaded"] += 1
            assert all(bool(torch.isfinite(p).all()) for p in loaded.parameters())
    assert outcomes["refused"] > 60


def test_artifact_folder_and_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        directory = _save(_fit("temperature"), tmp_path / "ts")
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in directory.iterdir()} == {0o644}
