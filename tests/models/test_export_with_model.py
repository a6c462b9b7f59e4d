"""``segcal export --with-model`` for every adapter kind: the file, run with plain
``torch.jit.load``, gives the pipeline's calibrated probabilities (issue 18 item 4).

The pipeline's probabilities are ``softmax(calibrator(logits, image))`` with the logits of
:class:`pipeline.models.SegmentationModel` on the uint8 image, resized bilinearly to the image
size, and the image as RGB in [0, 1]; the exported file takes ``uint8 / 255`` in (N, 3, H, W).
Tolerance: 1e-4 absolute on probabilities (TorchScript and eager kernels may sum in other
orders; float32 rounding of the recipe is ~1e-6 relative).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from PIL import Image
from torch import nn

from pipeline import calibrators, cli
from pipeline.calibrators.export import InputRecipe, export_with_model
from pipeline.config import ModelConfig
from pipeline.models import ESPNet, load_model

ATOL = 1e-4
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
CAMVID_RECIPE = dict(
    channel_order="bgr", scale=1.0, mean=[110.331055, 108.40889, 105.03321],
    std=[18392.05095, 18536.145075, 17825.605425],
)


# --- stand-ins for the kinds whose packages are not installed here -----------------------------


class DictNet(nn.Module):
    """torchvision's segmentation models: {"out": logits, "aux": logits} (scriptable)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.conv(x)
        return {"aux": out * 0.5, "out": out}


class TupleNet(DictNet):
    """A network returning (aux, logits): needs ``output_index: 1``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv(x)
        return out * 0.5, out


class ModelOutput(collections.OrderedDict):
    """transformers' output class: an OrderedDict holding ``logits``."""


class UnscriptableNet(DictNet):
    """transformers-like: quarter-resolution logits in a ModelOutput; cannot be scripted."""

    def forward(self, pixel_values, **kwargs):
        out = F.avg_pool2d(self.conv(pixel_values), 4)
        return ModelOutput(logits=out, hidden_states=None)


def dict_net(num_classes: int = 4) -> nn.Module:
    return DictNet(num_classes)


def tuple_net(num_classes: int = 4) -> nn.Module:
    return TupleNet(num_classes)


def unscriptable_net(num_classes: int = 4) -> nn.Module:
    return UnscriptableNet(num_classes)


# --- helpers -------------------------------------------------------------------------------------


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A CamVid test frame (resized) when present, else a smooth synthetic one: (1, H, W, 3)."""
    frames = sorted((SHARED / "data" / "camvid" / "test").glob("*.png"))
    if frames:
        rgb = Image.open(frames[seed % len(frames)]).convert("RGB").resize((w, h), Image.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy())[None]
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 255, w).expand(h, w)
    rgb = torch.stack([base, base.flip(1), torch.rand(h, w, generator=g) * 255], -1)
    return rgb.round().to(torch.uint8)[None]


def _fit(name: str, num_classes: int) -> calibrators.Calibrator:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, num_classes, 16, 16, generator=g) * 4
    labels = torch.randint(0, num_classes, (2, 16, 16), generator=g)
    images = torch.rand(2, 3, 16, 16, generator=g)
    options = {"epochs": 1} if name == "lts" else {}
    return calibrators.build_calibrator(name, num_classes, **options).fit(
        logits, labels, images=images
    )


def _pipeline_probs(cfg: ModelConfig, calibrator, images: torch.Tensor) -> torch.Tensor:
    logits = load_model(cfg)(images)
    size = images.shape[1:3]
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    image = images.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out = calibrator(logits, image) if calibrator.spatial else calibrator(logits)
    return torch.softmax(out, dim=1)


def _espnet_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "espnet.pth"
    torch.save(ESPNet(classes=12, p=1, q=1).state_dict(), path)
    return path


def _torchscript_file(tmp_path: Path) -> Path:
    from tests.extract_helpers import tiny_net

    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(tiny_net(4)), str(path))
    return path


MODEL_KINDS = {
    "espnet": lambda tmp: dict(kind="espnet", path=str(_espnet_file(tmp)), num_classes=11,
                               input_size=[48, 64], **CAMVID_RECIPE),
    "torchscript": lambda tmp: dict(kind="torchscript", path=str(_torchscript_file(tmp)),
                                    num_classes=4),
    "python": lambda tmp: dict(kind="python", path="tests.extract_helpers:tiny_net",
                               num_classes=4, input_size=[24, 32]),
    "torchvision-like": lambda tmp: dict(
        kind="python", path="tests.models.test_export_with_model:dict_net", num_classes=3
    ),
    "tuple-output": lambda tmp: dict(
        kind="python", path="tests.models.test_export_with_model:tuple_net", num_classes=4,
        output_index=1,
    ),
    "hf-like-traced": lambda tmp: dict(
        kind="python", path="tests.models.test_export_with_model:unscriptable_net",
        num_classes=4, input_size=[32, 48], mean=[0.4, 0.4, 0.4], std=[0.2, 0.3, 0.25],
    ),
}


@pytest.mark.parametrize("calibrator", ["temperature", "lts"])
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_cli_export_with_model_matches_the_pipeline(tmp_path, kind, calibrator, capsys):
    model = MODEL_KINDS[kind](tmp_path)
    num_classes = model["num_classes"]
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "model": model, "datasets": [],
        "calibrators": [{"name": calibrator, "label": "cal"}],
    }))
    fitted = _fit(calibrator, num_classes)
    calibrators.save(fitted, tmp_path / "out" / "artifacts" / "cal", class_names=None,
                     ignore_index=None)
    code = cli.main(["export", str(config), "--with-model", "--out", str(tmp_path / "x")])
    out, err = capsys.readouterr()
    assert code == cli.OK, err
    path = Path(out.strip())
    assert path == tmp_path / "x" / "cal_with_model.pt"

    exported = torch.jit.load(str(path))  # plain TorchScript: no segcal code involved
    cfg = ModelConfig(**model)
    size = tuple(model.get("input_size") or (24, 32))
    images = _image(*size)
    probs = exported(images.permute(0, 3, 1, 2).float() / 255)
    assert not probs.requires_grad
    assert probs.shape == (1, num_classes, *size)
    expected = _pipeline_probs(cfg, calibrators.load(tmp_path / "out" / "artifacts" / "cal"),
                               images)
    torch.testing.assert_close(probs, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_espnet_exports_and_keeps_its_input_check(tmp_path, how):
    torch.manual_seed(0)
    net = ESPNet(classes=6, p=1, q=1).eval()
    cal = _fit("temperature", 6)
    image = torch.rand(1, 3, 32, 40)
    path = export_with_model(net, cal, tmp_path / "m.pt", num_classes=6, example_input=image,
                             method=how)
    exported = torch.jit.load(str(path))
    with torch.no_grad():
        expected = torch.softmax(cal(net(image)), dim=1)
    torch.testing.assert_close(exported(image), expected, rtol=0, atol=ATOL)
    if how == "script":  # the scripted model keeps its own error for a bad size
        with pytest.raises(torch.jit.Error, match=r"divisible by 8, but got \(36, 40\)"):
            exported(torch.rand(1, 3, 36, 40))


def test_unscriptable_model_without_example_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass `example_input` to trace it"):
        export_with_model(UnscriptableNet(), _fit("temperature", 4), tmp_path / "m.pt",
                          num_classes=4)
    assert not (tmp_path / "m.pt").exists()


def test_input_recipe_matches_segmentation_model_preprocess():
    from pipeline.models import SegmentationModel

    cfg = ModelConfig(kind="python", path="torch.nn:Identity", num_classes=3,
                      input_size=(20, 30), **CAMVID_RECIPE)
    images = _image(40, 50)
    expected = SegmentationModel(nn.Identity(), cfg, fingerprint="").preprocess(images)
    recipe = torch.jit.script(InputRecipe(cfg.input_size, cfg.channel_order, cfg.scale,
                                          cfg.mean, cfg.std))
    got = recipe(images.permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(got, expected.contiguous(), rtol=1e-5, atol=1e-6)


@pytest.mark.data
def test_released_espnet_with_calibrator_matches_the_pipeline(espnet_weights, tmp_path, capsys):
    # The demo's own model (skips without ../shared/models/espnet): CamVid recipe at a third of
    # the resolution, a calibrator fitted on random maps, exported through the CLI.
    model = dict(kind="espnet", path=str(espnet_weights), num_classes=11, input_size=[120, 160],
                 **CAMVID_RECIPE)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "output": str(tmp_path / "out"), "model": model, "datasets": [],
        "calibrators": [{"name": "lts", "label": "lts"}, {"name": "temperature", "label": "ts"}],
    }))
    for name, label in (("lts", "lts"), ("temperature", "ts")):
        calibrators.save(_fit(name, 11), tmp_path / "out" / "artifacts" / label,
                         class_names=None, ignore_index=None)
    assert cli.main(["export", str(config), "--with-model", "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    images = torch.cat([_image(120, 160, seed) for seed in range(2)])
    cfg = ModelConfig(**model)
    for label in ("lts", "ts"):
        exported = torch.jit.load(str(tmp_path / "x" / f"{label}_with_model.pt"))
        probs = exported(images.permute(0, 3, 1, 2).float() / 255)
        expected = _pipeline_probs(cfg, calibrators.load(tmp_path / "out" / "artifacts" / label),
                                   images)
        torch.testing.assert_close(probs, expected, rtol=0, atol=ATOL)
        assert not probs.requires_grad
