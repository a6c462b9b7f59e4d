"""Network builders, one per ``model.kind``: config in, bare ``nn.Module`` (eval, CPU) out.

Each builder only loads the network; the input recipe, output selection and test-time
augmentation live in :class:`pipeline.models.wrapper.SegmentationModel`.

Kinds and what ``model.path`` means for each:

- ``torchscript``: a TorchScript file (``torch.jit.save``).
- ``torchvision``: a plain state dict for ``torchvision.models.segmentation.<arch>`` built with
  ``num_classes`` outputs (an ``aux_classifier`` in the state dict switches ``aux_loss`` on).
- ``hf``: a local ``transformers`` model folder for ``AutoModelForSemanticSegmentation``.
- ``python``: ``"package.module:factory"``; ``factory(num_classes=...)`` (or ``factory()`` if it
  takes no such argument) returns the network, loading its own weights.
- ``espnet``: the ESPNet authors' released state dict (see :mod:`pipeline.models.espnet`).

Files and URLs go through :func:`pipeline.models.download.resolve` (cached download, sha256).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.download import resolve
from pipeline.models.espnet import espnet_from_state_dict


def weights_path(cfg: ModelConfig) -> Path:
    """The local file or folder behind ``cfg.path`` (downloaded and sha256-checked if a URL)."""
    return resolve(cfg.path, sha256=cfg.sha256)


def _split_factory(spec: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":")
    if not (sep and module and attr):
        raise ValueError(
            f"Expected `model.path` to be 'package.module:factory' for kind 'python', "
            f"but got {spec!r}"
        )
    return module, attr


def python_source(spec: str) -> Path | None:
    """The source file of the module named by a ``"module:factory"`` path (None if not a file).

    Raises:
        ValueError: ``spec`` is not of the form ``module:factory`` or the module is not found.
    """
    module, _ = _split_factory(spec)
    try:
        found = importlib.util.find_spec(module)
    except ImportError:  # a missing parent package of a dotted module name
        found = None
    if found is None:
        raise ValueError(f"Expected `model.path` {spec!r} to name an importable module")
    origin = found.origin
    return Path(origin) if origin and Path(origin).is_file() else None


def _load_python(cfg: ModelConfig) -> nn.Module:
    module, attr = _split_factory(cfg.path)
    try:
        found = importlib.import_module(module)
        factory: Callable[..., Any] = reduce(getattr, attr.split("."), found)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"Expected `model.path` {cfg.path!r} to name a factory: {err}") from err
    params = inspect.signature(factory).parameters.values()
    takes_classes = any(
        p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
    )
    net = factory(num_classes=cfg.num_classes) if takes_classes else factory()
    if not isinstance(net, nn.Module):
        raise TypeError(
            f"Expected the factory {cfg.path!r} to return an nn.Module, "
            f"but got {type(net).__name__}"
        )
    return net


def _load_torchscript(cfg: ModelConfig) -> nn.Module:
    path = weights_path(cfg)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as err:
        raise ValueError(f"Expected `{cfg.path}` to be a TorchScript file: {err}") from err


def _load_torchvision(cfg: ModelConfig) -> nn.Module:
    try:
        from torchvision.models import segmentation
    except (ImportError, RuntimeError) as err:
        # A torchvision built for another torch fails at import with a RuntimeError about
        # missing operators, so both cases get the same advice.
        raise ImportError(
            "model kind 'torchvision' needs torchvision built for the installed torch "
            f"{torch.__version__}: pip install 'segcal[torchvision]' (the release matching the "
            "pinned torch), or torchvision from wherever this torch came from (see "
            f"https://pytorch.org/get-started/previous-versions/); import failed with: {err}"
        ) from err
    available = sorted(
        n for n in dir(segmentation)
        if not n.startswith("_") and n.islower() and inspect.isfunction(getattr(segmentation, n))
    )
    if cfg.arch not in available:
        raise ValueError(
            f"Expected `model.arch` to be a torchvision segmentation model, one of {available}, "
            f"but got {cfg.arch!r}"
        )
    path = weights_path(cfg)
    state = torch.load(path, map_location="cpu", weights_only=True)
    aux = any(k.startswith("aux_classifier.") for k in state)
    net = getattr(segmentation, cfg.arch)(
        weights=None, weights_backbone=None, num_classes=cfg.num_classes, aux_loss=aux
    )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"Expected `{cfg.path}` to be a state dict for {cfg.arch}: {err}") from err
    return net


def _load_hf(cfg: ModelConfig) -> nn.Module:
    try:
        from transformers import AutoModelForSemanticSegmentation
    except ImportError as err:
        raise ImportError(
            "model kind 'hf' needs the `transformers` package, which is not installed: "
            "pip install 'segcal[hf]'"
        ) from err
    path = weights_path(cfg)
    if not path.is_dir():
        raise ValueError(
            f"Expected `model.path` to be a transformers model folder for kind 'hf', "
            f"but got the file {cfg.path}"
        )
    return AutoModelForSemanticSegmentation.from_pretrained(str(path), local_files_only=True)


def _load_espnet(cfg: ModelConfig) -> nn.Module:
    state = torch.load(weights_path(cfg), map_location="cpu", weights_only=True)
    # channels_last runs ESPNet's many thin convolutions about 3x faster on CPU (oneDNN).
    return espnet_from_state_dict(state, source=cfg.path).to(memory_format=torch.channels_last)


ADAPTERS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "torchscript": _load_torchscript,
    "torchvision": _load_torchvision,
    "hf": _load_hf,
    "python": _load_python,
    "espnet": _load_espnet,
}
# Output resolution relative to the input, where the kind fixes it (others vary by model).
OUTPUT_STRIDE: dict[str, int] = {"torchvision": 1, "espnet": 1}


def build_network(cfg: ModelConfig) -> nn.Module:
    """Load the bare network that ``cfg.kind`` and ``cfg.path`` name, in eval mode on the CPU.

    Args:
        cfg: the model config.

    Returns:
        The network; its output is a tensor, or a dict/tuple holding the logits.

    Raises:
        ValueError: unknown kind, a bad path or a file that does not hold such a model.
        ImportError: the kind needs an optional package (torchvision, transformers).
    """
    if cfg.kind not in ADAPTERS:
        raise ValueError(
            f"Expected `model.kind` to be one of {sorted(ADAPTERS)}, but got {cfg.kind!r}"
        )
    return ADAPTERS[cfg.kind](cfg).eval()
