"""Bounded, fuzz-safe reading and validation of calibrator artifacts.

`pipeline.calibrators.artifacts.load` treats both files of an artifact as untrusted; the pieces
it checks them with live here: the bounds (`MAX_CLASSES`, `MAX_CARD_BYTES`,
`MAX_WEIGHTS_BYTES`, `MAX_JSON_DEPTH`), a JSON parser that bounds the nesting depth before
decoding (`parse_json`), a reader of the safetensors header alone (`read_header`), the tensor
shapes a card describes, built on the meta device without allocating (`expected_state`), and
the non-finite value check that `save` and `load` share (`non_finite`). Every defect raises
ValueError. `require_fitted` is the fitted-calibrator check of `save` and the exports.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.calibrators.base import Calibrator

__all__ = [
    "MAX_CARD_BYTES",
    "MAX_CLASSES",
    "MAX_JSON_DEPTH",
    "MAX_WEIGHTS_BYTES",
    "allowed_infinite",
    "expected_state",
    "non_finite",
    "parse_json",
    "read_header",
    "require_fitted",
]

# Bounds `load` checks before allocating anything of the declared size.
MAX_CLASSES = 4096
MAX_CARD_BYTES = 16 * 2**20
MAX_WEIGHTS_BYTES = 512 * 2**20
MAX_JSON_DEPTH = 64
# Tensors that may hold +inf in a valid fit (a sentinel, e.g. meta_cal's "never gate"
# threshold); a calibrator class can also list them in an ``infinite_ok`` attribute.
_INFINITE_OK = {"meta_cal": ("threshold",)}
_SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def require_fitted(calibrator: Calibrator, action: str) -> None:
    """Refuse anything but a fitted `Calibrator` before ``action`` (e.g. "save it").

    Raises:
        TypeError: ``calibrator`` is not a `Calibrator`.
        RuntimeError: It was never fitted.
    """
    if not isinstance(calibrator, Calibrator):
        raise TypeError(
            f"Expected `calibrator` to be a pipeline.calibrators.Calibrator, but got "
            f"{type(calibrator).__name__}"
        )
    if not bool(calibrator.fitted):
        raise RuntimeError(f"Expected a fitted calibrator to {action}, but it was never fitted")


def allowed_infinite(calibrator_or_cls: Any) -> tuple[str, ...]:
    """The state_dict keys of a calibrator (or its class) that may hold +inf (a sentinel)."""
    name = getattr(calibrator_or_cls, "name", None)
    return (*getattr(calibrator_or_cls, "infinite_ok", ()), *_INFINITE_OK.get(name, ()))


def non_finite(key: str, tensor: Tensor, infinite_ok: tuple[str, ...]) -> int:
    """How many values of ``tensor`` are not allowed: NaN, -inf, and +inf unless allowed."""
    if not tensor.is_floating_point():
        return 0
    if key in infinite_ok:
        return int((torch.isnan(tensor) | (tensor == -math.inf)).sum())
    return int((~torch.isfinite(tensor)).sum())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes, where: Path | str) -> Any:
    """``json.loads`` with the nesting depth bounded first and only ValueError raised."""
    # Brackets outside strings; json's decoder recurses per level, so depth is checked first.
    bare = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    if bare.size:
        steps = np.isin(bare, (0x5B, 0x7B)).astype(np.int64) - np.isin(bare, (0x5D, 0x7D))
        depth = int(np.cumsum(steps).max())
        if depth > MAX_JSON_DEPTH:
            raise ValueError(
                f"Expected JSON nested at most {MAX_JSON_DEPTH} levels deep in {where}, but got "
                f"{depth}"
            )
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"Expected {where} to hold JSON, but got: {err}") from None


def read_header(weights_path: Path, size: int) -> dict[str, Any]:
    """The safetensors header (tensor name -> dtype, shape, offsets), checked; nothing else read.

    The format: an 8-byte little-endian header length n, n bytes of JSON, then the data.
    """
    if size < 8:
        raise ValueError(
            f"Expected {weights_path} to be a safetensors file, but it has {size} bytes"
        )
    with open(weights_path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, MAX_CARD_BYTES):
            raise ValueError(
                f"Expected the safetensors header of {weights_path} to fit in the file, but it "
                f"declares {n} bytes for a file of {size}"
            )
        header = parse_json(f.read(n), f"the safetensors header of {weights_path}")
    if not isinstance(header, dict):
        raise ValueError(f"Expected the safetensors header of {weights_path} to be a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, entry in header.items():
        ok = isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_DTYPES
        shape = entry.get("shape") if ok else None
        offsets = entry.get("data_offsets") if ok else None
        ok = (
            isinstance(shape, list) and len(shape) <= 8
            and all(type(d) is int and 0 <= d <= MAX_WEIGHTS_BYTES for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        )
        if ok:
            nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[entry["dtype"]]
            ok = offsets[1] - offsets[0] == nbytes
        if not ok:
            raise ValueError(
                f"Expected tensor `{key}` in {weights_path} to declare a dtype, a shape and "
                f"data offsets inside the file that match, but got {entry!r}"
            )
    return header


def expected_state(build: Any, name: str, num_classes: int, options: dict[str, Any],
                    card_path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """Name -> (shape, bytes) of the state the card describes, built without allocating."""
    try:
        with torch.device("meta"):
            state = build(name, num_classes, **options).state_dict()
    except (NotImplementedError, RuntimeError):
        # A constructor that needs real tensors: the bounded num_classes keeps this small.
        try:
            state = build(name, num_classes, **options).state_dict()
        except Exception as err:
            raise ValueError(f"Invalid `options` or `num_classes` in {card_path}: {err}") from None
    except Exception as err:  # TypeError, ValueError, OverflowError from option checks
        raise ValueError(f"Invalid `options` or `num_classes` in {card_path}: {err}") from None
    return {k: (tuple(v.shape), v.numel() * v.element_size()) for k, v in state.items()}
