"""Checks at the calibrators' boundary: constructor options and input tensors.

Option checks (`check_int`, `check_float`, `check_bool`, `check_choice`) validate constructor
arguments; tensor checks (`check_logits`, `check_images`, `check_labels`) validate data before a
fit or a call. Both raise TypeError for a wrong type and ValueError for a bad value, in
torchmetrics' wording (``Expected `name` to be ..., but got ...``). `check_logits` and
`check_images` also run inside the scripted ``forward``, hence their TorchScript-friendly
formatting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_images",
    "check_int",
    "check_labels",
    "check_logits",
]


# --------------------------------------------------------------------------------------------
# Option checks (constructor arguments): ValueError / TypeError in torchmetrics' wording.


def check_int(name: str, value: Any, *, ge: int | None = None) -> None:
    """Check that option ``name`` is an int (not a bool), at least ``ge`` when given.

    Raises:
        TypeError: When ``value`` is not an int.
        ValueError: When ``value < ge``.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, but got {value!r}")
    if ge is not None and value < ge:
        raise ValueError(f"Expected `{name}` to be an int >= {ge}, but got {value!r}")


def check_float(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> None:
    """Check that option ``name`` is a finite real number within the given bounds.

    Raises:
        TypeError: When ``value`` is not an int or float.
        ValueError: When ``value`` is not finite or outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a float, but got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite float, but got {value!r}")
    for bound, op, ok in (
        (gt, ">", lambda b: value > b),
        (ge, ">=", lambda b: value >= b),
        (lt, "<", lambda b: value < b),
        (le, "<=", lambda b: value <= b),
    ):
        if bound is not None and not ok(bound):
            raise ValueError(f"Expected `{name}` to be a float {op} {bound}, but got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Check that option ``name`` is a bool.

    Raises:
        TypeError: When ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected `{name}` to be a bool, but got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Check that option ``name`` is one of ``choices``.

    Raises:
        ValueError: When ``value`` is not in ``choices``.
    """
    if value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, but got {value!r}")


# --------------------------------------------------------------------------------------------
# Tensor checks (data). `check_logits` and `check_images` run inside the scripted `forward`,
# hence the TorchScript-friendly formatting.


def _fmt_shape(shape: list[int]) -> str:
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def check_logits(logits: Tensor, num_classes: int, name: str = "logits") -> None:
    """Check a logit tensor: float, (N, C, H, W) or (P, C), C == ``num_classes``, finite, non-empty.

    Args:
        logits: The tensor to check.
        num_classes: The expected class count C.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``logits`` is not a floating-point tensor.
        ValueError: When the shape, class count, size or values are wrong.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(logits)}")
    if not logits.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a float tensor, but got dtype {logits.dtype}")
    if logits.dim() != 2 and logits.dim() != 4:
        raise ValueError(
            f"Expected `{name}` of shape (N, C, H, W) or (P, C), but got {_fmt_shape(logits.shape)}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"Expected `{name}` to have {num_classes} classes in dim 1, but got shape "
            f"{_fmt_shape(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, but got {_fmt_shape(logits.shape)}")
    # One pass: a sum of values with a NaN or inf among them is NaN or inf (IEEE addition
    # propagates both, in any order), so a finite sum means finite values. A non-finite sum
    # may also be an overflow of finite values; only then are the extremes looked at (they
    # propagate NaN and hold any inf), which decide exactly as before.
    if not bool(torch.isfinite(logits.sum())) and not (
        bool(torch.isfinite(logits.amax())) and bool(torch.isfinite(logits.amin()))
    ):
        raise ValueError(f"Expected `{name}` to be finite, but got NaN or inf values")


def check_images(images: Tensor, logits: Tensor, name: str = "images") -> None:
    """Check images against their logits: float (N, 3, H, W) in [0, 1], same N, H, W.

    Args:
        images: The tensor to check.
        logits: The (N, C, H, W) logits the images belong to.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``images`` is not a floating-point tensor.
        ValueError: When the shape does not match or values leave [0, 1].
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(images)}")
    if not images.is_floating_point():
        raise TypeError(f"Expected `{name}` to be a float tensor, but got dtype {images.dtype}")
    if logits.dim() != 4:
        raise ValueError(
            f"Expected logits of shape (N, C, H, W) when `{name}` are given, but got "
            f"{_fmt_shape(logits.shape)}"
        )
    if (
        images.dim() != 4
        or images.shape[1] != 3
        or images.shape[0] != logits.shape[0]
        or images.shape[2:] != logits.shape[2:]
    ):
        expected = [logits.shape[0], 3, logits.shape[2], logits.shape[3]]
        raise ValueError(
            f"Expected `{name}` of shape {_fmt_shape(expected)}, but got {_fmt_shape(images.shape)}"
        )
    if not bool(((images >= 0) & (images <= 1)).all()):
        raise ValueError(f"Expected `{name}` to hold values in [0, 1], but got values outside")


def check_labels(
    labels: Any, logits: Tensor, ignore_index: int | None, name: str = "labels"
) -> None:
    """Check labels against their logits: integer, shape of ``logits`` without dim 1, in range.

    Args:
        labels: (N, H, W) or (P,) integer tensor.
        logits: The (N, C, H, W) or (P, C) logits, already checked.
        ignore_index: Label value that marks pixels to skip, or None.
        name: The argument name used in error messages.

    Raises:
        TypeError: When ``labels`` is not an integer tensor.
        ValueError: When the shape does not match or a label is outside [0, C) and not ignored.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {labels.dtype}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"Expected `{name}` of shape {expected}, but got {tuple(labels.shape)}"
        )
    num_classes = logits.shape[1]
    values = labels.long()  # shards hold uint8/uint16, which lack comparison kernels
    bad = (values < 0) | (values >= num_classes)
    if ignore_index is not None:
        bad &= values != ignore_index
    if bool(bad.any()):
        value = int(values[bad][0])
        raise ValueError(
            f"Expected `{name}` in [0, {num_classes}) or equal to `ignore_index`={ignore_index}, "
            f"but got {value}"
        )
