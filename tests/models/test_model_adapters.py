"""Model adapters: input recipe, output selection, test-time augmentation, checks, fingerprints."""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import load_model, model_fingerprint
from pipeline.models.download import _sha256_cached

NUM_CLASSES = 4
# The ESPNet CamVid recipe as the YAML gives it, and the authors' own constants (0..255, BGR).
ESPNET_MEAN = (110.331055, 108.40889, 105.03321)
ESPNET_STD = (72.12569, 72.690765, 69.904335)
ESPNET_YAML = dict(
    channel_order="bgr", scale=1.0, mean=ESPNET_MEAN,
    std=(18392.05095, 18536.145075, 17825.605425),
)


@pytest.fixture(autouse=True)
def toy_nets(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return importlib.import_module("toy_nets")


def make_cfg(**kw):
    base = dict(kind="python", path="toy_nets:pointwise", num_classes=NUM_CLASSES)
    return ModelConfig(**{**base, **kw})


def make_images(n=2, h=16, w=24, seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8))


def hand_recipe(images, *, channel_order="rgb", scale=1 / 255, mean=(0, 0, 0), std=(1, 1, 1)):
    """The documented recipe in float64 numpy: reorder, x * scale, (x - mean) / std."""
    x = images.numpy().astype(np.float64)
    if channel_order == "bgr":
        x = x[..., ::-1]
    x = (x * scale - np.array(mean)) / np.array(std)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()


# --- input recipe -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)), id="imagenet-rgb"
        ),
        pytest.param(dict(channel_order="bgr", scale=1.0, mean=(1.0, 50.0, 200.0)), id="bgr"),
        pytest.param(ESPNET_YAML, id="espnet-yaml"),
    ],
)
def test_recipe_matches_hand_computation(recipe):
    images = make_images()
    model = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, **recipe))
    torch.testing.assert_close(model(images), hand_recipe(images, **recipe), rtol=1e-5, atol=1e-5)


def test_espnet_yaml_recipe_equals_authors_formula():
    # The authors compute ((bgr - mean) / std) / 255 with constants in 0..255 units.
    images = make_images()
    bgr = images.numpy().astype(np.float64)[..., ::-1]
    expected = ((bgr - np.array(ESPNET_MEAN)) / np.array(ESPNET_STD)) / 255
    expected = torch.from_numpy(expected.transpose(0, 3, 1, 2).copy()).float()
    model = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, **ESPNET_YAML))
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)


def test_upscaling_matches_pil_bilinear():
    # For upscaling PIL's bilinear filter and align_corners=False agree, edges included.
    images = make_images(n=1, h=8, w=12)
    model = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, scale=1.0,
                                input_size=(16, 24)))
    expected = np.stack([
        np.asarray(Image.fromarray(images[0, ..., c].numpy().astype(np.float32), mode="F")
                   .resize((24, 16), Image.BILINEAR))
        for c in range(3)
    ])
    torch.testing.assert_close(model(images)[0], torch.from_numpy(expected), rtol=0, atol=1e-3)


def test_halving_averages_2x2_blocks():
    images = make_images(n=1, h=16, w=24)
    model = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, scale=1.0,
                                input_size=(8, 12)))
    blocks = images[0].double().reshape(8, 2, 12, 2, 3).mean(dim=(1, 3)).permute(2, 0, 1)
    torch.testing.assert_close(model(images)[0], blocks.float())


def test_resize_commutes_with_normalisation():
    # The authors normalise and then resize; the pipeline resizes first. Both are affine per
    # pixel with weights summing to 1, so the order must not matter.
    images = make_images()
    recipe = dict(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    resized = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, input_size=(10, 30),
                                  **recipe))(images)
    plain = load_model(make_cfg(path="torch.nn:Identity", num_classes=3, **recipe))(images)
    expected = F.interpolate(plain, size=(10, 30), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resized, expected, rtol=1e-5, atol=1e-5)


# --- adapters ---------------------------------------------------------------------------------


def test_torchscript_round_trip(tmp_path, toy_nets):
    net = toy_nets.spatial(NUM_CLASSES).eval()
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    recipe = dict(channel_order="bgr", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    model = load_model(make_cfg(kind="torchscript", path=str(path), **recipe))
    images = make_images()
    with torch.no_grad():
        expected = net(hand_recipe(images, **recipe))
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)
    assert model.num_classes == NUM_CLASSES
    assert not model.training


def test_torchscript_rejects_other_files(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="to be a TorchScript file"):
        load_model(make_cfg(kind="torchscript", path=str(path)))


def test_python_factory_gets_num_classes(toy_nets):
    images = make_images()
    model = load_model(make_cfg(path="toy_nets:pointwise"))
    with torch.no_grad():
        expected = toy_nets.pointwise(NUM_CLASSES)(hand_recipe(images))
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


def test_python_factory_without_num_classes():
    model = load_model(make_cfg(path="toy_nets:fixed", num_classes=2))
    assert model(make_images()).shape == (2, 2, 16, 24)


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        pytest.param("toy_nets.pointwise", ValueError, "'package.module:factory'", id="no-colon"),
        pytest.param("no_such_module_xyz:f", ValueError, "No module named 'no_such_module_xyz'",
                     id="no-module"),
        pytest.param("toy_nets:missing", ValueError, "to name a factory", id="no-factory"),
        pytest.param("toy_nets:not_a_module", TypeError, "return an nn.Module", id="not-module"),
    ],
)
def test_python_factory_errors(path, error, match):
    with pytest.raises(error, match=match):
        load_model(make_cfg(path=path))


@pytest.mark.parametrize("path", ["no_such_module_xyz:f", "no_such_pkg_xyz.sub:f"],
                         ids=["module", "package"])
def test_fingerprint_of_a_missing_python_module_raises(path):
    with pytest.raises(ValueError, match="to name an importable module"):
        model_fingerprint(make_cfg(path=path))


def _fake_modules(monkeypatch, modules):
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


class _FakeSegModel(nn.Module):
    """Shaped like torchvision's segmentation models: {"out": ..., "aux": ...} in eval mode."""

    def __init__(self, num_classes, aux_loss):
        super().__init__()
        self.classifier = nn.Conv2d(3, num_classes, 1)
        self.aux_classifier = nn.Conv2d(3, num_classes, 1) if aux_loss else None

    def forward(self, x):
        out = {"out": self.classifier(x)}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(x)
        return out


def _fake_torchvision(monkeypatch, calls):
    def toy_fcn(*, weights, weights_backbone, num_classes, aux_loss):
        calls.append(dict(weights=weights, weights_backbone=weights_backbone, aux_loss=aux_loss))
        return _FakeSegModel(num_classes, aux_loss)

    _fake_modules(monkeypatch, {
        "torchvision": {},
        "torchvision.models": {},
        "torchvision.models.segmentation": {"toy_fcn": toy_fcn},
    })
    sys.modules["torchvision.models"].segmentation = sys.modules["torchvision.models.segmentation"]


@pytest.mark.parametrize("aux", [False, True], ids=["no-aux", "aux"])
def test_torchvision_wiring_with_a_stand_in_module(tmp_path, monkeypatch, aux):
    # torchvision is not installable next to this torch; a stand-in with the same factory
    # signature and output dict checks the adapter's side of the contract.
    calls = []
    _fake_torchvision(monkeypatch, calls)
    trained = _FakeSegModel(NUM_CLASSES, aux)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    model = load_model(make_cfg(kind="torchvision", arch="toy_fcn", path=str(tmp_path / "w.pth")))
    assert calls == [dict(weights=None, weights_backbone=None, aux_loss=aux)]
    images = make_images()
    with torch.no_grad():
        expected = trained(hand_recipe(images))["out"]
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)


def test_torchvision_errors_with_a_stand_in_module(tmp_path, monkeypatch):
    _fake_torchvision(monkeypatch, [])
    torch.save(_FakeSegModel(NUM_CLASSES + 1, False).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"one of \['toy_fcn'\], but got 'fcn_nope'"):
        load_model(make_cfg(kind="torchvision", arch="fcn_nope", path=str(tmp_path / "w.pth")))
    with pytest.raises(ValueError, match="to be a state dict for toy_fcn"):
        load_model(make_cfg(kind="torchvision", arch="toy_fcn", path=str(tmp_path / "w.pth")))


def test_hf_wiring_with_a_stand_in_module(tmp_path, monkeypatch, toy_nets):
    calls = []

    class AutoModelForSemanticSegmentation:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls.append((path, kwargs))
            return toy_nets.logits_output(NUM_CLASSES)

    _fake_modules(monkeypatch, {"transformers": {
        "AutoModelForSemanticSegmentation": AutoModelForSemanticSegmentation,
    }})
    (tmp_path / "config.json").write_text("{}")
    model = load_model(make_cfg(kind="hf", path=str(tmp_path)))
    assert calls == [(str(tmp_path), {"local_files_only": True})]
    assert model(make_images()).shape == (2, NUM_CLASSES, 16, 24)
    with pytest.raises(ValueError, match="to be a transformers model folder"):
        load_model(make_cfg(kind="hf", path=str(tmp_path / "config.json")))


@pytest.mark.parametrize(
    ("kind", "module", "match"),
    [
        pytest.param("torchvision", "torchvision",
                     r"torchvision built for the installed torch.*segcal\[torchvision\]",
                     id="torchvision"),
        pytest.param("hf", "transformers", r"needs the `transformers` package.*segcal\[hf\]",
                     id="hf"),
    ],
)
def test_missing_optional_package_message(tmp_path, monkeypatch, kind, module, match):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=match):
        load_model(make_cfg(kind=kind, arch="fcn_resnet50", path=str(tmp_path)))


def test_the_torchvision_extra_pins_the_release_built_for_the_pinned_torch():
    """torchvision 0.(m + 15) is built for torch 2.m: bumping one pin without the other fails."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    torch_pin = [d for d in project["dependencies"] if d.startswith("torch==")]
    vision_pin = project["optional-dependencies"]["torchvision"]
    assert len(torch_pin) == 1, project["dependencies"]
    assert len(vision_pin) == 1, vision_pin
    torch_minor = int(torch_pin[0].removeprefix("torch==").split(".")[1])
    major, minor = vision_pin[0].removeprefix("torchvision==").split(".")[:2]
    assert (int(major), int(minor)) == (0, torch_minor + 15), (torch_pin, vision_pin)


# --- output selection and checks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "output_index"),
    [
        pytest.param("dict_output", None, id="dict-out"),
        pytest.param("logits_output", None, id="dict-logits"),
        pytest.param("tuple_output", None, id="tuple-first"),
        pytest.param("dict_output", "out", id="dict-key"),
        pytest.param("tuple_output", 0, id="tuple-index"),
    ],
)
def test_output_selection_picks_the_logits(factory, output_index, toy_nets):
    images = make_images()
    model = load_model(make_cfg(path=f"toy_nets:{factory}", output_index=output_index))
    with torch.no_grad():
        expected = toy_nets.pointwise(NUM_CLASSES)(hand_recipe(images))
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


def test_output_index_selects_another_output():
    # "aux" and tuple item 1 are all zeros in the toy nets.
    for factory, index in [("dict_output", "aux"), ("tuple_output", 1)]:
        logits = load_model(make_cfg(path=f"toy_nets:{factory}", output_index=index))(make_images())
        assert torch.count_nonzero(logits) == 0


def test_extra_channels_are_dropped(toy_nets):
    images = make_images()
    model = load_model(make_cfg(path="toy_nets:plus_void"))
    with torch.no_grad():
        raw = toy_nets.plus_void(NUM_CLASSES)(hand_recipe(images))
    assert raw.shape[1] == NUM_CLASSES + 1
    torch.testing.assert_close(model(images), raw[:, :NUM_CLASSES], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        pytest.param(dict(path="toy_nets:too_few"),
                     ValueError, r"model `toy_nets:too_few` to output at least num_classes=4 "
                     r"channels, but got 3", id="too-few-channels"),
        pytest.param(dict(path="toy_nets:nan_output"),
                     ValueError, r"finite logits from model `toy_nets:nan_output`, but got 2 NaN",
                     id="nan"),
        pytest.param(dict(path="toy_nets:flat_output"),
                     ValueError, r"to be shaped \(2, C, h, w\), but got \(2, 4, 384\)", id="3d"),
        pytest.param(dict(path="toy_nets:scalar_output"),
                     TypeError, "to return a tensor, dict or tuple", id="scalar"),
        pytest.param(dict(path="toy_nets:dict_output", output_index="missing"),
                     ValueError, r"one of the keys \['missing'\].*got keys \['aux', 'out'\]",
                     id="missing-key"),
        pytest.param(dict(path="toy_nets:tuple_output", output_index=2),
                     ValueError, "to index the 2 outputs", id="index-out-of-range"),
        pytest.param(dict(path="toy_nets:tuple_output", output_index="out"),
                     ValueError, "to index the 2 outputs", id="key-for-tuple"),
    ],
)
def test_bad_outputs_raise(kw, error, match):
    model = load_model(make_cfg(**kw))
    with pytest.raises(error, match=match):
        model(make_images())


@pytest.mark.parametrize(
    ("images", "error", "match"),
    [
        pytest.param(torch.zeros(1, 8, 8, 3), TypeError, "uint8 tensor, but got torch.float32",
                     id="float"),
        pytest.param(np.zeros((1, 8, 8, 3), np.uint8), TypeError, "but got ndarray", id="numpy"),
        pytest.param(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ValueError,
                     r"\(N, H, W, 3\), but got \(1, 3, 8, 8\)", id="nchw"),
        pytest.param(torch.zeros(8, 8, 3, dtype=torch.uint8), ValueError, "but got \\(8, 8, 3\\)",
                     id="no-batch"),
    ],
)
def test_bad_images_raise(images, error, match):
    with pytest.raises(error, match=match):
        load_model(make_cfg())(images)


# --- test-time augmentation -------------------------------------------------------------------


def test_flip_is_undone_on_a_mirror_equivariant_net():
    images = make_images()
    plain = load_model(make_cfg(path="toy_nets:symmetric"))(images)
    flipped = load_model(make_cfg(path="toy_nets:symmetric", flip=True))(images)
    torch.testing.assert_close(flipped, plain, rtol=1e-5, atol=1e-5)


def test_flip_averages_with_the_mirrored_prediction(toy_nets):
    images = make_images()
    net = toy_nets.spatial(NUM_CLASSES)
    x = hand_recipe(images)
    with torch.no_grad():
        expected = (net(x) + net(x.flip(-1)).flip(-1)) / 2
    flipped = load_model(make_cfg(path="toy_nets:spatial", flip=True))(images)
    torch.testing.assert_close(flipped, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(flipped, net(x).detach(), atol=1e-2)


@pytest.mark.parametrize("flip", [False, True], ids=["no-flip", "flip"])
def test_multi_scale_averages_at_the_scale_one_output_size(toy_nets, flip):
    images = make_images(h=32, w=48)
    net = toy_nets.stride4(NUM_CLASSES)
    x = hand_recipe(images)
    outs = []
    with torch.no_grad():
        for s in (0.5, 1.0, 1.5):
            xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            views = [net(xs)] + ([net(xs.flip(-1)).flip(-1)] if flip else [])
            outs += [F.interpolate(v, size=(8, 12), mode="bilinear", align_corners=False)
                     for v in views]
    expected = torch.stack(outs).mean(0)
    model = load_model(make_cfg(path="toy_nets:stride4", scales=[0.5, 1.0, 1.5], flip=flip))
    torch.testing.assert_close(model(images), expected, rtol=1e-4, atol=1e-4)


def test_multi_scale_keeps_a_constant_image_constant():
    images = torch.full((1, 16, 24, 3), 77, dtype=torch.uint8)
    single = load_model(make_cfg())(images)
    multi = load_model(make_cfg(scales=[0.75, 1.0, 2.0], flip=True))(images)
    torch.testing.assert_close(multi, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scales", [[0.5, 2.0], [1.0, -1.0]], ids=["no-one", "negative"])
def test_bad_scales_raise(scales):
    with pytest.raises(ValueError, match="`model.scales` to be positive and to contain 1.0"):
        load_model(make_cfg(scales=scales))


# --- device and fingerprint -------------------------------------------------------------------


def test_to_device_moves_the_recipe():
    model = load_model(make_cfg()).to("meta")
    assert model.device.type == "meta"
    assert model.preprocess(make_images()).device.type == "meta"


def _torchscript_file(path, toy_nets, seed=0):
    net = toy_nets._conv(NUM_CLASSES, seed=seed)
    torch.jit.save(torch.jit.script(net), str(path))


def test_fingerprint_is_stable_and_matches_the_model(tmp_path, toy_nets):
    _torchscript_file(tmp_path / "a.pt", toy_nets)
    cfg = make_cfg(kind="torchscript", path=str(tmp_path / "a.pt"))
    fp = model_fingerprint(cfg)
    assert len(fp) == 64
    assert int(fp, 16) >= 0
    assert model_fingerprint(cfg) == fp
    assert load_model(cfg).fingerprint == fp
    # Fields that do not change logits leave it alone.
    assert model_fingerprint(cfg.model_copy(update={"class_names": list("abcd")})) == fp


def test_fingerprint_changes_with_the_weights(tmp_path, toy_nets):
    _torchscript_file(tmp_path / "a.pt", toy_nets, seed=0)
    _torchscript_file(tmp_path / "b.pt", toy_nets, seed=1)
    a = model_fingerprint(make_cfg(kind="torchscript", path=str(tmp_path / "a.pt")))
    b = model_fingerprint(make_cfg(kind="torchscript", path=str(tmp_path / "b.pt")))
    assert a != b
    # Rewriting a file in place changes its (size, mtime) key, so the new bytes are hashed.
    os.replace(tmp_path / "b.pt", tmp_path / "a.pt")
    assert model_fingerprint(make_cfg(kind="torchscript", path=str(tmp_path / "a.pt"))) == b


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(dict(mean=(0.1, 0.0, 0.0)), id="mean"),
        pytest.param(dict(std=(1.0, 2.0, 1.0)), id="std"),
        pytest.param(dict(scale=1.0), id="scale"),
        pytest.param(dict(channel_order="bgr"), id="channel_order"),
        pytest.param(dict(input_size=(32, 32)), id="input_size"),
        pytest.param(dict(num_classes=3), id="num_classes"),
        pytest.param(dict(scales=[1.0, 1.5]), id="scales"),
        pytest.param(dict(flip=True), id="flip"),
        pytest.param(dict(output_index=0), id="output_index"),
        pytest.param(dict(path="toy_nets:spatial"), id="factory"),
    ],
)
def test_fingerprint_changes_with_logit_fields(change):
    assert model_fingerprint(make_cfg(**change)) != model_fingerprint(make_cfg())


def test_file_hash_is_cached(tmp_path, toy_nets):
    _torchscript_file(tmp_path / "a.pt", toy_nets)
    cfg = make_cfg(kind="torchscript", path=str(tmp_path / "a.pt"))
    model_fingerprint(cfg)
    misses = _sha256_cached.cache_info().misses
    model_fingerprint(cfg.model_copy(update={"flip": True}))
    assert _sha256_cached.cache_info().misses == misses


def test_folder_fingerprint_covers_every_visible_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"weights")
    cfg = make_cfg(kind="hf", path=str(tmp_path))
    fp = model_fingerprint(cfg)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x")
    assert model_fingerprint(cfg) == fp
    (tmp_path / "sub" / "model.safetensors").write_bytes(b"other weights")
    assert model_fingerprint(cfg) != fp


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logits_match_cpu():
    cfg = make_cfg(path="toy_nets:spatial", input_size=(20, 30), scales=[1.0, 0.5], flip=True)
    images = make_images()
    cpu = load_model(cfg)(images)
    gpu = load_model(cfg).to("cuda")(images)  # images stay on the CPU: forward moves them
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
