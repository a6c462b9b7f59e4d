"""Calibrator artifacts: safetensors weights plus a JSON card, and TorchScript export.

An artifact folder holds::

    model.safetensors   the calibrator's state_dict (safetensors, no pickle)
    calibrator.json     the card: registry name, options, classes, ignore index, fitted values,
                        metrics, sha256 of model.safetensors, data fingerprint, package version
    timings.json        (when the fit reported any) wall-clock timings: how the fit ran

The first two files depend only on the fitted state and the options, so refitting the same data
with the same options writes the same bytes (the registry recognises identical calibrators by
them); timings, which change at every run, live apart in ``timings.json`` (see `read_timings`).

`load` rebuilds the module from the first two files alone: it never unpickles (no
``torch.load``) and refuses a card whose hash, registry name or class count does not match the
weights. It treats both files as untrusted: sizes, JSON nesting depth, ``num_classes``
(at most `MAX_CLASSES`) and every tensor's declared shape are checked before anything of that
size is allocated, non-finite weights are refused, and every defect raises ValueError.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import pipeline
from pipeline.calibrators.base import Calibrator
from pipeline.paths import CARD, TIMINGS, atomic_write_bytes, make_temp_dir

__all__ = [
    "CARD", "MAX_CLASSES", "TIMINGS", "WEIGHTS", "InputRecipe", "export_torchscript",
    "export_with_model", "load", "read_card", "read_timings", "save", "split_timings",
]

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FORMAT = "segcal.calibrator/1"
_REQUIRED = ("format", "name", "options", "num_classes", "class_names", "ignore_index", "sha256")

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


def _require_fitted(calibrator: Calibrator, action: str) -> None:
    if not isinstance(calibrator, Calibrator):
        raise TypeError(
            f"Expected `calibrator` to be a pipeline.calibrators.Calibrator, but got "
            f"{type(calibrator).__name__}"
        )
    if not bool(calibrator.fitted):
        raise RuntimeError(f"Expected a fitted calibrator to {action}, but it was never fitted")


def _is_timing(key: str) -> bool:
    return key == "seconds" or key.endswith("_seconds")


def split_timings(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split metrics into what the fit produced and how long it took.

    A key named ``seconds`` or ending in ``_seconds``, at any depth, is a wall-clock timing.

    Args:
        metrics: Metrics as a fit reports them, e.g. ``{"heldout": {...}, "seconds": 1.2,
            "ray": {"train_loss": 0.4, "train_seconds": 0.9}}``.

    Returns:
        ``(metrics without timings, timings)``; both keep the nesting, empty dicts are dropped.

    Example:
        >>> split_timings({"nll": 0.5, "seconds": 1.5, "ray": {"loss": 1, "load_seconds": 2}})
        ({'nll': 0.5, 'ray': {'loss': 1}}, {'seconds': 1.5, 'ray': {'load_seconds': 2}})
    """
    kept: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(key, str) and _is_timing(key):
            timings[key] = value
        elif isinstance(value, dict):
            inner, inner_timings = split_timings(value)
            if inner or not inner_timings:
                kept[key] = inner
            if inner_timings:
                timings[key] = inner_timings
        else:
            kept[key] = value
    return kept, timings


def _infinite_ok(calibrator_or_cls: Any) -> tuple[str, ...]:
    name = getattr(calibrator_or_cls, "name", None)
    return (*getattr(calibrator_or_cls, "infinite_ok", ()), *_INFINITE_OK.get(name, ()))


def _non_finite(key: str, tensor: Tensor, infinite_ok: tuple[str, ...]) -> int:
    """How many values of ``tensor`` are not allowed: NaN, -inf, and +inf unless allowed."""
    if not tensor.is_floating_point():
        return 0
    if key in infinite_ok:
        return int((torch.isnan(tensor) | (tensor == -math.inf)).sum())
    return int((~torch.isfinite(tensor)).sum())


def save(
    calibrator: Calibrator,
    directory: str | Path,
    *,
    class_names: list[str] | None,
    ignore_index: int | None,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
    timings: dict[str, Any] | None = None,
) -> Path:
    """Write a fitted calibrator to ``directory`` (model.safetensors + calibrator.json).

    The folder is built under a temporary name beside ``directory`` and renamed into place,
    so a killed run never leaves a half-written artifact; an existing artifact there is
    replaced. Wall-clock timings (``timings``, and the keys of ``metrics`` that `split_timings`
    finds) go to ``timings.json``, so the other two files depend only on the fitted state,
    the options and the metrics' values.

    Args:
        calibrator: A fitted calibrator.
        directory: The artifact folder.
        class_names: The C class names, or None when the model has none.
        ignore_index: The label value that was ignored in the fit, or None.
        metrics: Json-able training / held-out metrics for the card.
        data_fingerprint: Fingerprint of the calibration data (e.g. its manifest hash).
        timings: Json-able wall-clock timings of the fit, for ``timings.json``.

    Returns:
        The artifact folder.

    Raises:
        RuntimeError: When the calibrator is not fitted.
        ValueError: When ``class_names`` has the wrong length, the card or the timings are not
            json-able, or a fitted tensor holds NaN or inf (`load` would refuse it).
    """
    _require_fitted(calibrator, "save it")
    if class_names is not None and len(class_names) != calibrator.num_classes:
        raise ValueError(
            f"Expected `class_names` to hold {calibrator.num_classes} names, but got "
            f"{len(class_names)}"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in calibrator.state_dict().items()}
    allowed = _infinite_ok(calibrator)
    for key, tensor in tensors.items():
        bad = _non_finite(key, tensor, allowed)
        if bad:
            raise ValueError(
                f"Expected finite values in the fitted tensor `{key}` of {calibrator.name!r}, "
                f"but got {bad} NaN/inf values"
            )
    weights = safetensors.torch.save(tensors)
    metrics, metric_timings = split_timings(dict(metrics or {}))
    timings = {**metric_timings, **(timings or {})}
    card = {
        "format": FORMAT,
        "name": calibrator.name,
        "options": calibrator.options,
        "num_classes": calibrator.num_classes,
        "class_names": None if class_names is None else list(class_names),
        "ignore_index": ignore_index,
        "summary": calibrator.summary(),
        "metrics": metrics,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "data_fingerprint": data_fingerprint,
        "version": pipeline.__version__,
    }
    try:
        text = json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected a json-able artifact card, but got {card!r}: {err}") from err
    files = [(WEIGHTS, weights), (CARD, text.encode("utf-8"))]
    if timings:
        try:
            timing_text = json.dumps(timings, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Expected json-able timings, but got {timings!r}: {err}") from err
        files.append((TIMINGS, (timing_text + "\n").encode("utf-8")))

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # make_temp_dir, not mkdtemp (0700): the folder renamed into place keeps the umask's mode.
    tmp = make_temp_dir(directory.parent, prefix=f".{directory.name}.", suffix=".tmp")
    try:
        for name, data in files:
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            # Directories cannot be replaced in one rename: move the old one aside first.
            old = make_temp_dir(directory.parent, prefix=f".{directory.name}.", suffix=".old")
            os.replace(directory, old / "artifact")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_timings(directory: str | Path) -> dict[str, Any]:
    """The wall-clock timings `save` set apart for an artifact (empty when it has none).

    Example keys, as `pipeline.fit` reports them: ``seconds`` (the whole fit) and, for a Ray
    Train fit, ``ray.load_seconds`` / ``ray.train_seconds`` (one worker's shard read / training).

    Raises:
        ValueError: ``timings.json`` exists but is not a JSON object.
    """
    path = Path(directory) / TIMINGS
    if not path.is_file():
        return {}
    timings = _parse_json(path.read_bytes(), path)
    if not isinstance(timings, dict):
        raise ValueError(f"Expected {path} to hold a JSON object, but got {type(timings).__name__}")
    return timings


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(data: bytes, where: Path | str) -> Any:
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


def read_card(directory: str | Path) -> dict[str, Any]:
    """Read and check the keys of an artifact's calibrator.json.

    Args:
        directory: The artifact folder.

    Returns:
        The card as a dict.

    Raises:
        FileNotFoundError: When the card is missing.
        ValueError: When it is larger than `MAX_CARD_BYTES`, not JSON (or nested deeper than
            `MAX_JSON_DEPTH`), not a segcal card, or lacks a required key.
    """
    path = Path(directory) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"Expected an artifact card at {path}, but it does not exist")
    size = path.stat().st_size
    if size > MAX_CARD_BYTES:
        raise ValueError(f"Expected {path} to be at most {MAX_CARD_BYTES} bytes, but got {size}")
    card = _parse_json(path.read_bytes(), path)
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"Expected `format` in {path} to be {FORMAT!r}, but got {got!r}")
    for key in _REQUIRED:
        if key not in card:
            raise ValueError(f"Expected key `{key}` in {path}, but it is missing")
    return card


def _read_header(weights_path: Path, size: int) -> dict[str, Any]:
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
        header = _parse_json(f.read(n), f"the safetensors header of {weights_path}")
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


def _expected_state(build: Any, name: str, num_classes: int, options: dict[str, Any],
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


def load(directory: str | Path) -> Calibrator:
    """Rebuild a fitted calibrator from an artifact folder, without unpickling.

    Both files are treated as untrusted. Before anything of a declared size is allocated,
    ``num_classes`` is checked against `MAX_CLASSES`, the files against `MAX_CARD_BYTES` /
    `MAX_WEIGHTS_BYTES`, and every tensor's shape in the safetensors header (read alone)
    against the state the card's name, options and class count describe; then the sha256,
    the tensors and their values (NaN and inf are refused, except +inf where a calibrator
    uses it as a sentinel) are checked.

    Args:
        directory: A folder written by `save`.

    Returns:
        The fitted calibrator in eval mode, on the CPU, with ``requires_grad`` off (it runs
        without autograd; call ``requires_grad_(True)`` to train it further).

    Raises:
        FileNotFoundError: When a file is missing.
        ValueError: Any defect of the card or the weights: malformed or too deeply nested
            JSON, an unknown calibrator, bad options, a class count out of bounds or unlike
            the weights', a sha256 that does not match model.safetensors, a malformed or
            truncated safetensors file, tensors of other names or shapes, non-finite values.
    """
    # Imported here: the registry imports this module.
    from pipeline.calibrators import CALIBRATORS, build_calibrator, list_calibrators

    directory = Path(directory)
    card = read_card(directory)
    card_path, weights_path = directory / CARD, directory / WEIGHTS
    name, num_classes = card["name"], card["num_classes"]
    if not isinstance(name, str) or name not in CALIBRATORS:
        raise ValueError(
            f"Unknown calibrator {name!r} in `name` of {card_path}: expected one of "
            f"{list_calibrators()}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"Expected `num_classes` in {card_path} to be an int, but got "
                         f"{num_classes!r}")
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(
            f"Expected `num_classes` in {card_path} to be in [1, {MAX_CLASSES}], but got "
            f"{num_classes}"
        )
    names = card["class_names"]
    if names is not None and (
        not isinstance(names, list) or len(names) != num_classes
        or not all(isinstance(n, str) for n in names)
    ):
        shown = names if not isinstance(names, list) or len(names) <= 20 else f"{len(names)} items"
        raise ValueError(
            f"Expected `class_names` in {card_path} to list {num_classes} names, but got {shown!r}"
        )
    options = card["options"]
    if not isinstance(options, dict):
        raise ValueError(
            f"Expected `options` in {card_path} to be an object, but got {type(options).__name__}"
        )
    if not isinstance(card["sha256"], str):
        raise ValueError(f"Expected `sha256` in {card_path} to be a hex string, but got "
                         f"{card['sha256']!r}")
    if not weights_path.is_file():
        raise FileNotFoundError(f"Expected weights at {weights_path}, but it does not exist")
    expected = _expected_state(build_calibrator, name, num_classes, options, card_path)
    total = sum(nbytes for _, nbytes in expected.values())
    size = weights_path.stat().st_size
    if total > MAX_WEIGHTS_BYTES or size > MAX_WEIGHTS_BYTES:
        raise ValueError(
            f"Expected at most {MAX_WEIGHTS_BYTES} bytes of weights, but {card_path} describes "
            f"{total} and {weights_path} holds {size}"
        )
    header = _read_header(weights_path, size)
    if set(header) != set(expected):
        raise ValueError(
            f"Expected tensors {sorted(expected)} in {weights_path}, but got {sorted(header)}"
        )
    for key, entry in header.items():
        if tuple(entry["shape"]) != expected[key][0]:
            raise ValueError(
                f"Expected tensor `{key}` of shape {expected[key][0]} in {weights_path} "
                f"for `num_classes`={num_classes} in {card_path}, but got {tuple(entry['shape'])}"
            )
    weights = weights_path.read_bytes()  # hash and parse the same bytes
    digest = hashlib.sha256(weights).hexdigest()
    if digest != card["sha256"]:
        raise ValueError(
            f"Expected `sha256` in {card_path} to match {weights_path}, but got "
            f"{card['sha256']!r} for a file hashing to {digest!r}"
        )
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as err:  # safetensors' own SafetensorError, or a torch dtype error
        raise ValueError(f"Expected {weights_path} to be a safetensors file: {err}") from None
    try:
        calibrator = build_calibrator(name, num_classes, **options)
    except Exception as err:
        raise ValueError(f"Invalid `options` or `num_classes` in {card_path}: {err}") from None
    allowed = _infinite_ok(calibrator)
    for key, tensor in tensors.items():
        bad = _non_finite(key, tensor, allowed)
        if bad:
            raise ValueError(
                f"Expected finite values in tensor `{key}` of {weights_path}, but got {bad} "
                f"NaN/inf values"
            )
    try:
        calibrator.load_state_dict(tensors)
    except RuntimeError as err:
        raise ValueError(f"Expected the tensors of {weights_path} to load: {err}") from None
    if not bool(calibrator.fitted):
        raise ValueError(f"Expected a fitted calibrator in {weights_path}, but `fitted` is false")
    return calibrator.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------
# TorchScript export.


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still the format a
        # service can load with nothing but libtorch / torch.jit.load.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        return torch.jit.script(module)


def _save_script(module: torch.jit.ScriptModule, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _frozen(calibrator: Calibrator) -> Calibrator:
    # A copy without autograd: the caller's calibrator keeps its requires_grad flags.
    return copy.deepcopy(calibrator).requires_grad_(False).eval()


def export_torchscript(calibrator: Calibrator, path: str | Path) -> Path:
    """Write a TorchScript file of the calibrator alone: ``(logits, image=None) -> logits``.

    The module is compiled with ``torch.jit.script``, so any batch and map size works;
    load it with ``torch.jit.load(path)`` (no segcal needed). Its parameters do not require
    gradients, so its outputs carry no autograd history.

    Args:
        calibrator: A fitted calibrator.
        path: The output file (written atomically).

    Returns:
        ``path``.

    Raises:
        RuntimeError: When the calibrator is not fitted.
    """
    _require_fitted(calibrator, "export it")
    return _save_script(_script(_frozen(calibrator)), path)


class InputRecipe(nn.Module):
    """The pipeline's input recipe as a TorchScript module: RGB in [0, 1] -> network input.

    Mirrors :meth:`pipeline.models.SegmentationModel.preprocess` for an image given as
    ``uint8 / 255``: the image is taken to 0..255, resized to ``input_size`` (bilinear,
    align_corners=False; None keeps its size), reordered to BGR when asked, and normalised as
    ``(x * scale - mean) / std``, ``mean`` and ``std`` given in the network's channel order.

    Args:
        input_size: (height, width) the network expects, or None.
        channel_order: ``"rgb"`` or ``"bgr"``.
        scale: Factor applied to the 0..255 values.
        mean: Per-channel mean, after scaling.
        std: Per-channel standard deviation, after scaling.

    Raises:
        ValueError: A bad channel order, size or std.
    """

    def __init__(
        self,
        input_size: tuple[int, int] | None = None,
        channel_order: str = "rgb",
        scale: float = 1.0 / 255.0,
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"Expected `channel_order` to be 'rgb' or 'bgr', but got "
                             f"{channel_order!r}")
        if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
            raise ValueError(f"Expected `input_size` to be (height, width), but got {input_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"Expected 3 means and 3 positive stds, but got {mean} and {std}")
        self.resize = input_size is not None
        # Never empty: TorchScript infers an attribute's type from its value.
        self.size = [0, 0] if input_size is None else [int(v) for v in input_size]
        self.bgr = channel_order == "bgr"
        self.scale = float(scale)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 3, h, w) network input."""
        x = image.float() * 255.0
        if self.resize and (x.shape[-2] != self.size[0] or x.shape[-1] != self.size[1]):
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        if self.bgr:
            x = x.flip(1)
        return (x * self.scale - self.mean) / self.std


# Keys tried, in order, when a network returns a mapping (as pipeline.models does): torchvision
# returns {"out", "aux"}, transformers a ModelOutput holding "logits".
_OUTPUT_KEYS = ("out", "logits")


class _PickKey(nn.Module):
    """A scripted network returning Dict[str, Tensor] -> the first of ``keys`` it holds."""

    def __init__(self, net: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.net = net
        self.keys = keys

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        for key in self.keys:
            if key in out:
                return out[key]
        raise ValueError("Expected the model output to hold one of the keys " + str(self.keys))


class _PickIndex(nn.Module):
    """A scripted network returning a tuple or list -> its element ``index``."""

    index: torch.jit.Final[int]

    def __init__(self, net: nn.Module, index: int) -> None:
        super().__init__()
        self.net = net
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)[self.index]


class _Traceable(nn.Module):
    """Any network with the logits picked in Python, for ``torch.jit.trace``."""

    def __init__(self, net: nn.Module, output_index: str | int | None) -> None:
        super().__init__()
        self.net = net
        self.output_index = output_index

    def forward(self, x: Tensor) -> Tensor:
        return _pick(self.net(x), self.output_index)


def _pick(out: Any, output_index: str | int | None) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        keys = [output_index] if output_index is not None else list(_OUTPUT_KEYS)
        for key in keys:
            if key in out:
                return out[key]
        raise ValueError(
            f"Expected the model output to hold one of the keys {keys} (set `output_index`), "
            f"but got keys {list(out.keys())}"
        )
    if isinstance(out, (tuple, list)):
        index = 0 if output_index is None else output_index
        if not isinstance(index, int) or not -len(out) <= index < len(out):
            raise ValueError(
                f"Expected `output_index` to index the {len(out)} outputs of the model, but "
                f"got {index!r}"
            )
        return out[index]
    raise ValueError(
        f"Expected the model to return a tensor, dict or tuple, but got {type(out).__name__}"
    )


def _select_scripted(
    net: torch.jit.ScriptModule, output_index: str | int | None
) -> nn.Module | None:
    """A scriptable module returning the logits of a scripted ``net``, None if its type is odd."""
    try:
        kind = net.forward.schema.returns[0].type.kind()
    except (AttributeError, IndexError, RuntimeError):
        return None
    if kind == "TensorType":
        return net
    if kind == "DictType" and not isinstance(output_index, int):
        return _PickKey(net, [output_index] if output_index is not None else list(_OUTPUT_KEYS))
    if kind in ("TupleType", "ListType") and not isinstance(output_index, str):
        return _PickIndex(net, 0 if output_index is None else output_index)
    return None


def _network(
    model: nn.Module, output_index: str | int | None, example: Tensor | None, method: str
) -> nn.Module:
    """The model as a TorchScript module from network input to logits (N, C', h, w)."""
    errors = []
    if method in ("auto", "script"):
        try:
            scripted = model if isinstance(model, torch.jit.ScriptModule) else _script(model)
            picked = _select_scripted(scripted, output_index)
            if picked is not None:
                return _script(picked) if picked is not scripted else scripted
            errors.append("its output is not a tensor, a dict of tensors or a tuple of tensors")
        except Exception as err:  # TorchScript raises several error types while compiling
            errors.append(f"{type(err).__name__}: {str(err).strip().splitlines()[0]}")
        if method == "script" or example is None:
            raise ValueError(
                f"Expected a TorchScript-compilable model, but scripting failed ({errors[0]}); "
                f"pass `example_input` to trace it instead"
            )
        logger.warning(
            "The model could not be scripted (%s); tracing it on an input of shape %s, which "
            "fixes the shapes it was traced with", errors[0], tuple(example.shape),
        )
    if example is None:
        raise ValueError("Expected `example_input` to trace the model, but got None")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return torch.jit.trace(_Traceable(model, output_index), example, check_trace=False)


class _ModelWithCalibrator(nn.Module):
    """Image in, calibrated probabilities out: recipe, model, crop, resize, calibrator, softmax."""

    def __init__(
        self, model: nn.Module, calibrator: Calibrator, num_classes: int, preprocess: nn.Module
    ) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model
        self.calibrator = calibrator
        self.num_classes = num_classes
        self.pass_image = type(calibrator).spatial

    def forward(self, image: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.model(self.preprocess(image))[:, : self.num_classes].float()
            if logits.shape[-2:] != image.shape[-2:]:
                logits = F.interpolate(
                    logits, size=[image.shape[-2], image.shape[-1]], mode="bilinear",
                    align_corners=False,
                )
            if self.pass_image:
                return torch.softmax(self.calibrator(logits, image), dim=1)
            return torch.softmax(self.calibrator(logits, None), dim=1)


def export_with_model(
    model: nn.Module,
    calibrator: Calibrator,
    path: str | Path,
    *,
    num_classes: int,
    example_input: Tensor | None = None,
    preprocess: nn.Module | None = None,
    output_index: str | int | None = None,
    method: str = "auto",
) -> Path:
    """Write one TorchScript file of model + calibrator: image in, calibrated probabilities out.

    The exported module maps an (N, 3, H, W) float image to (N, C, H, W) probabilities without
    autograd: it applies ``preprocess`` (e.g. :class:`InputRecipe`; none: the image is the
    network input), runs ``model``, picks the logits from a dict/tuple output (``output_index``,
    else the keys ``out``/``logits`` or element 0, as the pipeline does), keeps the first
    ``num_classes`` channels, resizes them bilinearly to (H, W) when they differ, applies the
    calibrator (spatial calibrators also get the image, which must then be RGB in [0, 1], as
    in the pipeline) and a softmax.

    The model is compiled with ``torch.jit.script`` when it can be (any input size then works);
    otherwise (``method="auto"``) or when ``method="trace"`` it is traced on ``example_input``,
    which fixes the sizes it was traced with.

    Args:
        model: The segmentation network, a ``torch.jit.ScriptModule`` or an ``nn.Module``.
        calibrator: A fitted calibrator with ``num_classes`` classes.
        path: The output file (written atomically).
        num_classes: The class count C the calibrator expects.
        example_input: An example (N, 3, H, W) image (the exported module's input), used to
            trace the model when it cannot be scripted.
        preprocess: A scriptable module from the exported input to the network input.
        output_index: Key or index of the logits when the network returns a dict or tuple.
        method: ``"auto"`` (script, else trace), ``"script"`` or ``"trace"``.

    Returns:
        ``path``.

    Raises:
        RuntimeError: When the calibrator is not fitted.
        ValueError: When ``num_classes`` differs from the calibrator's, ``method`` is unknown,
            or the model can be neither scripted nor traced (no ``example_input``).
    """
    _require_fitted(calibrator, "export it")
    if num_classes != calibrator.num_classes:
        raise ValueError(
            f"Expected `num_classes` to equal the calibrator's {calibrator.num_classes}, but "
            f"got {num_classes}"
        )
    if method not in ("auto", "script", "trace"):
        raise ValueError(
            f"Expected `method` to be one of ['auto', 'script', 'trace'], but got {method!r}"
        )
    preprocess = (preprocess if preprocess is not None else nn.Identity()).eval()
    example = None
    if example_input is not None:
        with torch.no_grad():
            example = preprocess(example_input)
    net = _network(model.eval(), output_index, example, method)
    wrapped = _ModelWithCalibrator(net, _frozen(calibrator), num_classes, preprocess)
    return _save_script(_script(wrapped), path)
