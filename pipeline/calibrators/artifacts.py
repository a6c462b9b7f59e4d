"""Calibrator artifacts: safetensors weights plus a JSON card, and TorchScript export.

An artifact folder holds exactly two files::

    model.safetensors   the calibrator's state_dict (safetensors, no pickle)
    calibrator.json     the card: registry name, options, classes, ignore index, fitted values,
                        metrics, sha256 of model.safetensors, data fingerprint, package version

`load` rebuilds the module from these two files alone: it never unpickles (no ``torch.load``)
and refuses a card whose hash, registry name or class count does not match the weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import pipeline
from pipeline.calibrators.base import Calibrator
from pipeline.paths import atomic_write_bytes

__all__ = [
    "CARD", "WEIGHTS", "export_torchscript", "export_with_model", "load", "read_card", "save",
]

WEIGHTS = "model.safetensors"
CARD = "calibrator.json"
FORMAT = "segcal.calibrator/1"
_REQUIRED = ("format", "name", "options", "num_classes", "class_names", "ignore_index", "sha256")


def _require_fitted(calibrator: Calibrator, action: str) -> None:
    if not isinstance(calibrator, Calibrator):
        raise TypeError(
            f"Expected `calibrator` to be a pipeline.calibrators.Calibrator, but got "
            f"{type(calibrator).__name__}"
        )
    if not bool(calibrator.fitted):
        raise RuntimeError(f"Expected a fitted calibrator to {action}, but it was never fitted")


def save(
    calibrator: Calibrator,
    directory: str | Path,
    *,
    class_names: list[str] | None,
    ignore_index: int | None,
    metrics: dict[str, Any] | None = None,
    data_fingerprint: str | None = None,
) -> Path:
    """Write a fitted calibrator to ``directory`` (model.safetensors + calibrator.json).

    The folder is built under a temporary name beside ``directory`` and renamed into place,
    so a killed run never leaves a half-written artifact; an existing artifact there is
    replaced.

    Args:
        calibrator: A fitted calibrator.
        directory: The artifact folder.
        class_names: The C class names, or None when the model has none.
        ignore_index: The label value that was ignored in the fit, or None.
        metrics: Json-able training / held-out metrics for the card.
        data_fingerprint: Fingerprint of the calibration data (e.g. its manifest hash).

    Returns:
        The artifact folder.

    Raises:
        RuntimeError: When the calibrator is not fitted.
        ValueError: When ``class_names`` has the wrong length or the card is not json-able.
    """
    _require_fitted(calibrator, "save it")
    if class_names is not None and len(class_names) != calibrator.num_classes:
        raise ValueError(
            f"Expected `class_names` to hold {calibrator.num_classes} names, but got "
            f"{len(class_names)}"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in calibrator.state_dict().items()}
    weights = safetensors.torch.save(tensors)
    card = {
        "format": FORMAT,
        "name": calibrator.name,
        "options": calibrator.options,
        "num_classes": calibrator.num_classes,
        "class_names": None if class_names is None else list(class_names),
        "ignore_index": ignore_index,
        "summary": calibrator.summary(),
        "metrics": metrics or {},
        "sha256": hashlib.sha256(weights).hexdigest(),
        "data_fingerprint": data_fingerprint,
        "version": pipeline.__version__,
    }
    try:
        text = json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected a json-able artifact card, but got {card!r}: {err}") from err

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        for name, data in ((WEIGHTS, weights), (CARD, text.encode("utf-8"))):
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if directory.exists():
            # Directories cannot be replaced in one rename: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old",
                                        dir=directory.parent))
            os.replace(directory, old / "artifact")
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_card(directory: str | Path) -> dict[str, Any]:
    """Read and check the keys of an artifact's calibrator.json.

    Args:
        directory: The artifact folder.

    Returns:
        The card as a dict.

    Raises:
        FileNotFoundError: When the card is missing.
        ValueError: When it is not JSON, not a segcal card, or lacks a required key.
    """
    path = Path(directory) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"Expected an artifact card at {path}, but it does not exist")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Expected {path} to hold JSON, but got: {err}") from err
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"Expected `format` in {path} to be {FORMAT!r}, but got {got!r}")
    for key in _REQUIRED:
        if key not in card:
            raise ValueError(f"Expected key `{key}` in {path}, but it is missing")
    return card


def load(directory: str | Path) -> Calibrator:
    """Rebuild a fitted calibrator from an artifact folder, without unpickling.

    Args:
        directory: A folder written by `save`.

    Returns:
        The fitted calibrator in eval mode, on the CPU.

    Raises:
        FileNotFoundError: When a file is missing.
        ValueError: When the card is malformed, names an unknown calibrator, its sha256 does
            not match model.safetensors, or the class count does not match the card or the
            weights.
    """
    # Imported here: the registry imports this module.
    from pipeline.calibrators import CALIBRATORS, build_calibrator, list_calibrators

    directory = Path(directory)
    card = read_card(directory)
    card_path, weights_path = directory / CARD, directory / WEIGHTS
    name, num_classes = card["name"], card["num_classes"]
    if name not in CALIBRATORS:
        raise ValueError(
            f"Unknown calibrator {name!r} in `name` of {card_path}: expected one of "
            f"{list_calibrators()}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise ValueError(f"Expected `num_classes` in {card_path} to be an int, but got "
                         f"{num_classes!r}")
    names = card["class_names"]
    if names is not None and (not isinstance(names, list) or len(names) != num_classes):
        raise ValueError(
            f"Expected `class_names` in {card_path} to list {num_classes} names, but got {names!r}"
        )
    if not weights_path.is_file():
        raise FileNotFoundError(f"Expected weights at {weights_path}, but it does not exist")
    weights = weights_path.read_bytes()  # hash and parse the same bytes
    digest = hashlib.sha256(weights).hexdigest()
    if digest != card["sha256"]:
        raise ValueError(
            f"Expected `sha256` in {card_path} to match {weights_path}, but got "
            f"{card['sha256']!r} for a file hashing to {digest!r}"
        )
    try:
        calibrator = build_calibrator(name, num_classes, **card["options"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"Invalid `options` or `num_classes` in {card_path}: {err}") from err
    tensors = safetensors.torch.load(weights)
    expected = calibrator.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(
            f"Expected tensors {sorted(expected)} in {weights_path}, but got {sorted(tensors)}"
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"Expected tensor `{key}` of shape {tuple(expected[key].shape)} in {weights_path} "
                f"for `num_classes`={num_classes} in {card_path}, but got {tuple(tensor.shape)}"
            )
    calibrator.load_state_dict(tensors)
    if not bool(calibrator.fitted):
        raise ValueError(f"Expected a fitted calibrator in {weights_path}, but `fitted` is false")
    return calibrator.eval()


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


def export_torchscript(calibrator: Calibrator, path: str | Path) -> Path:
    """Write a TorchScript file of the calibrator alone: ``(logits, image=None) -> logits``.

    The module is compiled with ``torch.jit.script``, so any batch and map size works;
    load it with ``torch.jit.load(path)`` (no segcal needed).

    Args:
        calibrator: A fitted calibrator.
        path: The output file (written atomically).

    Returns:
        ``path``.

    Raises:
        RuntimeError: When the calibrator is not fitted.
    """
    _require_fitted(calibrator, "export it")
    return _save_script(_script(calibrator.eval()), path)


class _ModelWithCalibrator(nn.Module):
    """Image in, calibrated probabilities out: model, channel crop, resize, calibrator, softmax."""

    def __init__(self, model: nn.Module, calibrator: Calibrator, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.calibrator = calibrator
        self.num_classes = num_classes
        self.pass_image = type(calibrator).spatial

    def forward(self, image: Tensor) -> Tensor:
        logits = self.model(image)[:, : self.num_classes]
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
) -> Path:
    """Write one TorchScript file of model + calibrator: image in, calibrated probabilities out.

    The exported module maps an (N, 3, H, W) float image to (N, C, H, W) probabilities: it runs
    ``model`` (which must return an (N, C', h, w) tensor with C' >= C; extra channels beyond
    ``num_classes`` are dropped), resizes the logits bilinearly to (H, W) when they differ,
    applies the calibrator (spatial calibrators also get the image, which must then lie in
    [0, 1]) and a softmax.

    Args:
        model: The segmentation model, a ``torch.jit.ScriptModule`` or an ``nn.Module``.
        calibrator: A fitted calibrator with ``num_classes`` classes.
        path: The output file (written atomically).
        num_classes: The class count C the calibrator expects.
        example_input: An example (N, 3, H, W) image; when given, an ``nn.Module`` model is
            traced with it (``torch.jit.trace``) instead of scripted.

    Returns:
        ``path``.

    Raises:
        RuntimeError: When the calibrator is not fitted.
        ValueError: When ``num_classes`` differs from the calibrator's.
    """
    _require_fitted(calibrator, "export it")
    if num_classes != calibrator.num_classes:
        raise ValueError(
            f"Expected `num_classes` to equal the calibrator's {calibrator.num_classes}, but "
            f"got {num_classes}"
        )
    model = model.eval()
    if not isinstance(model, torch.jit.ScriptModule):
        if example_input is not None:
            with torch.no_grad():
                model = torch.jit.trace(model, example_input)
        else:
            model = _script(model)
    return _save_script(_script(_ModelWithCalibrator(model, calibrator.eval(), num_classes)), path)
