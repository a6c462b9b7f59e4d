"""Tiny seeded networks for the adapter tests, loaded as ``model.path: "toy_nets:<factory>"``."""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_out: int, k: int = 1, seed: int = 0) -> nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, c_out, k, padding=k // 2)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g))
    return conv


class _Map(nn.Module):
    """A conv followed by a fixed function of its output (dict/tuple outputs, NaN injection)."""

    def __init__(self, conv: nn.Module, how: str) -> None:
        super().__init__()
        self.conv = conv
        self.how = how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "dict":
            return {"aux": torch.zeros_like(y), "out": y}
        if self.how == "logits":
            return {"logits": y}
        if self.how == "tuple":
            return y, torch.zeros_like(y)
        if self.how == "nan":
            y = y.clone()
            y[:, 0, 0, 0] = float("nan")
            return y
        if self.how == "flat":
            return y.flatten(2)
        return float(y.sum())


def pointwise(num_classes):
    return _conv(num_classes)


def spatial(num_classes):
    """A 3x3 conv: not mirror-equivariant."""
    return _conv(num_classes, k=3)


def symmetric(num_classes):
    """A 3x3 conv with left-right symmetric kernels: f(flip(x)) == flip(f(x))."""
    conv = _conv(num_classes, k=3)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv


def stride4(num_classes):
    """Output at 1/4 of the input resolution, like SegFormer."""
    return nn.Sequential(nn.AvgPool2d(4), _conv(num_classes, k=3))


def plus_void(num_classes):
    return _conv(num_classes + 1)


def too_few(num_classes):
    return _conv(num_classes - 1)


def dict_output(num_classes):
    return _Map(_conv(num_classes), "dict")


def logits_output(num_classes):
    return _Map(_conv(num_classes), "logits")


def tuple_output(num_classes):
    return _Map(_conv(num_classes), "tuple")


def nan_output(num_classes):
    return _Map(_conv(num_classes), "nan")


def flat_output(num_classes):
    return _Map(_conv(num_classes), "flat")


def scalar_output(num_classes):
    return _Map(_conv(num_classes), "scalar")


def fixed():
    """Takes no ``num_classes``: always two outputs."""
    return _conv(2)


def not_a_module(num_classes):
    return "a string"
