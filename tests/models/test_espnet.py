"""ESPNet: the architecture matches the released checkpoint and reproduces its CamVid score."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ModelConfig
from pipeline.models import ESPNet, SegmentationModel, load_model
from pipeline.models.espnet import espnet_from_state_dict

CAMVID_CLASSES = 11
CAMVID_VOID = 11
ESPNET_SHA256 = "7d354a257170322086dcd4c1e89a482454cf2c9d30b085e70883878dd59301af"


def espnet_cfg(path, **kw):
    """The documented YAML recipe (pipeline.models.espnet): BGR, ((bgr - mean) / std) / 255."""
    base = dict(
        kind="espnet", path=str(path), num_classes=CAMVID_CLASSES, input_size=(360, 480),
        channel_order="bgr", scale=1.0, mean=(110.331055, 108.40889, 105.03321),
        std=(18392.05095, 18536.145075, 17825.605425),
    )
    return ModelConfig(**{**base, **kw})


def read_keys_file(path):
    keys = {}
    for line in path.read_text().splitlines():
        name, shape = line.split(" ", 1)
        keys[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    return keys


def test_state_dict_matches_the_released_key_list(espnet_weights):
    keys_file = espnet_weights.parent / "state_dict_keys.txt"
    if not keys_file.is_file():
        pytest.skip(f"{keys_file} not found")
    ours = {
        k: tuple(v.shape) for k, v in ESPNet(classes=12, p=2, q=8).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert ours == read_keys_file(keys_file)


def test_released_weights_load_strictly_and_drop_void(espnet_weights, camvid_root):
    image = sorted((camvid_root / "test").glob("*.png"))[0]
    images = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy())[None]
    # A third of the resolution keeps this test quick; the full-size run is the mIoU test.
    small = dict(input_size=(120, 160), sha256=ESPNET_SHA256)
    model12 = load_model(espnet_cfg(espnet_weights, num_classes=12, **small))
    model11 = SegmentationModel(model12.net, espnet_cfg(espnet_weights, **small), fingerprint="")
    logits11, logits12 = model11(images), model12(images)
    assert logits11.shape == (1, 11, 120, 160)
    assert logits12.shape == (1, 12, 120, 160)
    torch.testing.assert_close(logits11, logits12[:, :11])
    assert model12.output_stride_hint == 1


@pytest.mark.parametrize(("classes", "p", "q"), [(12, 2, 8), (20, 2, 3), (5, 1, 1)],
                         ids=["camvid", "cityscapes-q3", "tiny"])
def test_shape_is_read_off_the_state_dict(classes, p, q):
    torch.manual_seed(0)
    net = ESPNet(classes=classes, p=p, q=q).eval()
    loaded = espnet_from_state_dict(net.state_dict())
    assert (len(loaded.encoder.level2), len(loaded.encoder.level3)) == (p, q)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        out = loaded(x)
        torch.testing.assert_close(out, net(x))
    assert out.shape == (1, classes, 48, 64)  # full input resolution


def test_input_size_must_divide_by_8():
    with pytest.raises(ValueError, match=r"divisible by 8, but got \(100, 64\)"):
        ESPNet(classes=5, p=1, q=1)(torch.zeros(1, 3, 100, 64))


def test_foreign_state_dicts_raise():
    with pytest.raises(ValueError, match="`x.pth` to be an ESPNet .* `classifier.weight`"):
        espnet_from_state_dict({"fc.weight": torch.zeros(2, 2)}, source="x.pth")
    state = ESPNet(classes=12).state_dict()
    state["level3_C.conv.weight"] = torch.zeros(12, 130, 1, 1)
    with pytest.raises(ValueError, match="`x.pth` to load into ESPNet strictly"):
        espnet_from_state_dict(state, source="x.pth")


@pytest.mark.data
@pytest.mark.slow
def test_camvid_test_miou(espnet_weights, camvid_root):
    # All 233 CamVid test frames, void ignored, argmax over the 11 class channels. The released
    # weights score 57.26% mIoU / 87.65% pixel accuracy with this recipe (shared README).
    start = time.perf_counter()
    model = load_model(espnet_cfg(espnet_weights))
    files = sorted((camvid_root / "test").glob("*.png"))
    assert len(files) == 233
    confusion = torch.zeros(CAMVID_CLASSES, CAMVID_CLASSES, dtype=torch.int64)
    for i in range(0, len(files), 8):
        batch = files[i : i + 8]
        images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in batch])
        labels = np.stack([np.asarray(Image.open(camvid_root / "testannot" / f.name))
                           for f in batch])
        labels = torch.from_numpy(labels).long()
        pred = model(torch.from_numpy(images)).argmax(1)
        valid = labels != CAMVID_VOID
        confusion += torch.bincount(
            labels[valid] * CAMVID_CLASSES + pred[valid], minlength=CAMVID_CLASSES**2
        ).reshape(CAMVID_CLASSES, CAMVID_CLASSES)
    tp = confusion.diag().double()
    iou = tp / (confusion.sum(0) + confusion.sum(1) - tp)
    miou, acc = iou.mean().item(), (tp.sum() / confusion.sum()).item()
    print(f"ESPNet CamVid test: mIoU {miou:.4f}, pixel accuracy {acc:.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    assert miou >= 0.55
    assert acc >= 0.85


def test_scripts_with_torchscript_and_keeps_its_size_check():
    # `segcal export --with-model` compiles the network (issue 18 item 4).
    torch.manual_seed(0)
    net = ESPNet(classes=5, p=1, q=1).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.jit.Error, match=r"divisible by 8, but got \(100, 64\)"):
        scripted(torch.zeros(1, 3, 100, 64))
