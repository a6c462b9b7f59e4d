"""Calibrator artifacts: safetensors weights plus a JSON card (save, load, the file format).

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
size is allocated, non-finite weights are refused, and every defect raises ValueError (the
bounded readers and checks are in `pipeline.calibrators.artifact_checks`). TorchScript export
is in `pipeline.calibrators.export`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch

import pipeline
from pipeline.calibrators.artifact_checks import (
    MAX_CARD_BYTES,
    MAX_CLASSES,
    MAX_WEIGHTS_BYTES,
    allowed_infinite,
    expected_state,
    non_finite,
    parse_json,
    read_header,
    require_fitted,
)
from pipeline.calibrators.base import Calibrator
from pipeline.paths import CARD, TIMINGS, make_temp_dir

__all__ = [
    "CARD", "MAX_CLASSES", "TIMINGS", "WEIGHTS", "load", "read_card", "read_timings", "save",
    "split_timings",
]

WEIGHTS = "model.safetensors"
FORMAT = "segcal.calibrator/1"
_REQUIRED = ("format", "name", "options", "num_classes", "class_names", "ignore_index", "sha256")


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
    require_fitted(calibrator, "save it")
    if class_names is not None and len(class_names) != calibrator.num_classes:
        raise ValueError(
            f"Expected `class_names` to hold {calibrator.num_classes} names, but got "
            f"{len(class_names)}"
        )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in calibrator.state_dict().items()}
    allowed = allowed_infinite(calibrator)
    for key, tensor in tensors.items():
        bad = non_finite(key, tensor, allowed)
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
    timings = parse_json(path.read_bytes(), path)
    if not isinstance(timings, dict):
        raise ValueError(f"Expected {path} to hold a JSON object, but got {type(timings).__name__}")
    return timings


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
    card = parse_json(path.read_bytes(), path)
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"Expected `format` in {path} to be {FORMAT!r}, but got {got!r}")
    for key in _REQUIRED:
        if key not in card:
            raise ValueError(f"Expected key `{key}` in {path}, but it is missing")
    return card



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
    expected = expected_state(build_calibrator, name, num_classes, options, card_path)
    total = sum(nbytes for _, nbytes in expected.values())
    size = weights_path.stat().st_size
    if total > MAX_WEIGHTS_BYTES or size > MAX_WEIGHTS_BYTES:
        raise ValueError(
            f"Expected at most {MAX_WEIGHTS_BYTES} bytes of weights, but {card_path} describes "
            f"{total} and {weights_path} holds {size}"
        )
    header = read_header(weights_path, size)
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
    allowed = allowed_infinite(calibrator)
    for key, tensor in tensors.items():
        bad = non_finite(key, tensor, allowed)
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
