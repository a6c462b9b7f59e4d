"""ESPNet (encoder ESPNet-C plus the light decoder), built to load the authors' released weights.

Module and parameter names follow the released checkpoints (sacmehta/ESPNet,
``pretrained/decoder/espnet_p_<p>_q_<q>_<dataset>.pth``), so those plain state dicts load with
``strict=True``.

The released CamVid model expects the 360x480 frame in BGR order normalised as
``((bgr - mean) / std) / 255`` with mean and std in 0..255 units, given in B, G, R order.
The pipeline applies ``x * scale`` and then ``(x - mean) / std`` per channel, after the channel
reorder, so ``scale: 1.0`` and ``std`` multiplied by 255 reproduce it exactly (up to float32
rounding); the 12th output (void) is dropped by ``num_classes: 11``:

.. code-block:: yaml

    model:
      kind: espnet
      path: espnet_p_2_q_8_camvid.pth
      sha256: 7d354a257170322086dcd4c1e89a482454cf2c9d30b085e70883878dd59301af
      num_classes: 11
      input_size: [360, 480]
      channel_order: bgr
      scale: 1.0
      mean: [110.331055, 108.40889, 105.03321]           # B, G, R
      std: [18392.05095, 18536.145075, 17825.605425]    # 255 x (72.12569, 72.690765, 69.904335)

References:
    Mehta, Rastegari, Caspi, Shapiro, Hajishirzi. "ESPNet: Efficient Spatial Pyramid of Dilated
    Convolutions for Semantic Segmentation", ECCV 2018, arXiv 1803.06815.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

_BN_EPS = 1e-3


def _conv(n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        n_in, n_out, k, stride=stride, padding=(k - 1) // 2 * dilation, dilation=dilation,
        bias=False,
    )


class _C(nn.Module):
    """A bias-free "same" convolution (the checkpoint nests it as ``<name>.conv``)."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = _conv(n_in, n_out, k, stride, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _BR(nn.Module):
    """BatchNorm + per-channel PReLU."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n, eps=_BN_EPS)
        self.act = nn.PReLU(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(x))


class _CBR(nn.Module):
    """Convolution + BatchNorm + per-channel PReLU."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = _conv(n_in, n_out, k, stride)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class _ESPBranches(nn.Module):
    """Reduce, split into five dilated 3x3 branches, fuse hierarchically (the ESP module core)."""

    def __init__(self, n_in: int, n_out: int, *, downsample: bool) -> None:
        super().__init__()
        n = n_out // 5
        n1 = n_out - 4 * n
        self.c1 = _C(n_in, n, 3, stride=2) if downsample else _C(n_in, n, 1)
        self.d1 = _C(n, n1, 3, dilation=1)
        self.d2 = _C(n, n, 3, dilation=2)
        self.d4 = _C(n, n, 3, dilation=4)
        self.d8 = _C(n, n, 3, dilation=8)
        self.d16 = _C(n, n, 3, dilation=16)

    def _fuse(self, x: Tensor) -> Tensor:
        r = self.c1(x)
        # Hierarchical feature fusion: summing the dilated branches before concatenation is
        # what removes the gridding artefacts of large dilations (paper, Sec. 3.1).
        a1 = self.d2(r)
        a2 = a1 + self.d4(r)
        a3 = a2 + self.d8(r)
        a4 = a3 + self.d16(r)
        return torch.cat([self.d1(r), a1, a2, a3, a4], dim=1)


class _DownESP(_ESPBranches):
    """Strided ESP module: no residual, its own BatchNorm and PReLU."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out, downsample=True)
        self.bn = nn.BatchNorm2d(n_out, eps=_BN_EPS)
        self.act = nn.PReLU(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self._fuse(x)))


class _ResESP(_ESPBranches):
    """Stride-1 ESP module with an optional residual add before the final BR."""

    def __init__(self, n_in: int, n_out: int, *, residual: bool = True) -> None:
        super().__init__(n_in, n_out, downsample=False)
        self.bn = _BR(n_out)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        y = self._fuse(x)
        return self.bn(x + y if self.residual else y)


def _avg_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=2, padding=1)


class _Encoder(nn.Module):
    """ESPNet-C: three levels at 1/2, 1/4 and 1/8 resolution and a 1x1 classifier."""

    def __init__(self, classes: int, p: int, q: int) -> None:
        super().__init__()
        self.level1 = _CBR(3, 16, 3, stride=2)
        self.sample1 = _avg_pool()
        self.sample2 = nn.Sequential(_avg_pool(), _avg_pool())
        self.b1 = _BR(16 + 3)
        self.level2_0 = _DownESP(16 + 3, 64)
        self.level2 = nn.ModuleList([_ResESP(64, 64) for _ in range(p)])
        self.b2 = _BR(128 + 3)
        self.level3_0 = _DownESP(128 + 3, 128)
        self.level3 = nn.ModuleList([_ResESP(128, 128) for _ in range(q)])
        self.b3 = _BR(256)
        self.classifier = _C(256, classes, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return the 1/2-resolution features (19 ch), 1/4 features (131 ch), 1/8 scores."""
        out0 = self.b1(torch.cat([self.level1(x), self.sample1(x)], dim=1))
        out1_0 = self.level2_0(out0)
        out1 = out1_0
        for block in self.level2:
            out1 = block(out1)
        out1 = self.b2(torch.cat([out1, out1_0, self.sample2(x)], dim=1))
        out2_0 = self.level3_0(out1)
        out2 = out2_0
        for block in self.level3:
            out2 = block(out2)
        out2 = self.b3(torch.cat([out2_0, out2], dim=1))
        return out0, out1, self.classifier(out2)


def _up(classes: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)


class ESPNet(nn.Module):
    """ESPNet: the ESPNet-C encoder with the light decoder; logits at full input resolution.

    Args:
        classes: output channels (the released CamVid model has 12: 11 classes, then void).
        p: residual ESP modules at 1/4 resolution.
        q: residual ESP modules at 1/8 resolution.

    Example:
        >>> net = ESPNet(classes=12).eval()
        >>> net(torch.zeros(1, 3, 64, 96)).shape
        torch.Size([1, 12, 64, 96])
    """

    def __init__(self, classes: int = 12, p: int = 2, q: int = 8) -> None:
        super().__init__()
        self.encoder = _Encoder(classes, p, q)
        self.level3_C = _C(128 + 3, classes, 1)
        self.br = nn.BatchNorm2d(classes, eps=_BN_EPS)
        self.up_l3 = nn.Sequential(_up(classes))
        self.combine_l2_l3 = nn.Sequential(
            _BR(2 * classes), _ResESP(2 * classes, classes, residual=False)
        )
        self.up_l2 = nn.Sequential(_up(classes), _BR(classes))
        self.conv = _CBR(19 + classes, classes, 3)
        self.classifier = _up(classes)

    def forward(self, x: Tensor) -> Tensor:
        """Segment a normalised image batch.

        Args:
            x: (N, 3, H, W) float, H and W divisible by 8.

        Returns:
            (N, classes, H, W) float logits.

        Raises:
            ValueError: H or W is not divisible by 8 (the decoder could not realign the levels).
        """
        height, width = x.shape[-2], x.shape[-1]
        if height % 8 or width % 8:
            # Plain ints in the message: TorchScript cannot format tuple(x.shape[-2:]).
            raise ValueError(
                f"Expected ESPNet input height and width divisible by 8, but got "
                f"({height}, {width}) (set `model.input_size`)"
            )
        out0, out1, scores = self.encoder(x)
        u3 = self.up_l3(self.br(scores))
        c2 = self.level3_C(out1)
        u2 = self.up_l2(self.combine_l2_l3(torch.cat([c2, u3], dim=1)))
        return self.classifier(self.conv(torch.cat([u2, out0], dim=1)))


def espnet_from_state_dict(state: Mapping[str, Tensor], *, source: str = "<state dict>") -> ESPNet:
    """Build an :class:`ESPNet` shaped like a released checkpoint and load it strictly.

    The class count comes from the final transposed conv, p and q from the number of residual
    blocks per level, so every released decoder checkpoint (CamVid, Cityscapes) loads.

    Args:
        state: a plain state dict as saved by the authors.
        source: name of the file it came from, for error messages.

    Returns:
        The network in eval mode.

    Raises:
        ValueError: the state dict is not an ESPNet decoder checkpoint or does not load strictly.
    """
    if "classifier.weight" not in state:
        raise ValueError(
            f"Expected `{source}` to be an ESPNet (encoder + decoder) state dict with a "
            f"`classifier.weight` tensor, but got keys {sorted(state)[:5]}..."
        )

    def blocks(level: str) -> int:
        pattern = re.compile(rf"^encoder\.{level}\.(\d+)\.")
        return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)

    classes = state["classifier.weight"].shape[1]  # ConvTranspose2d weights are (in, out, k, k)
    net = ESPNet(classes=classes, p=blocks("level2"), q=blocks("level3"))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"Expected `{source}` to load into ESPNet strictly: {err}") from None
    return net.eval()
