"""TorchScript export of fitted calibrators, alone or behind their segmentation model.

`export_torchscript` writes the calibrator alone, ``(logits, image=None) -> logits``;
`export_with_model` writes one file from image to calibrated probabilities: the input recipe
(`InputRecipe`), the network (scripted when it can be, else traced), the logits picked from a
dict or tuple output, resized, calibrated and soft-maxed. Both load with ``torch.jit.load``
alone (no segcal needed) and are written atomically.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.artifact_checks import require_fitted
from pipeline.calibrators.base import Calibrator
from pipeline.paths import atomic_write_bytes

__all__ = ["InputRecipe", "export_torchscript", "export_with_model"]

# The name it had before export moved out of artifacts, so that log filters keep matching.
logger = logging.getLogger("pipeline.calibrators.artifacts")


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
    require_fitted(calibrator, "export it")
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
    require_fitted(calibrator, "export it")
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
