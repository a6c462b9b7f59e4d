"""Post-hoc calibrators: one registry, one interface (see `Calibrator`), pickle-free artifacts.

Example:
    >>> import torch
    >>> ts = build_calibrator("temperature", num_classes=3)
    >>> _ = ts.fit(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([0, 2]))
    >>> ts(torch.zeros(1, 3, 2, 2)).shape
    torch.Size([1, 3, 2, 2])
"""

from __future__ import annotations

import inspect
from typing import Any

from pipeline.calibrators import selective
from pipeline.calibrators.artifacts import (
    export_torchscript,
    export_with_model,
    load,
    read_card,
    save,
)
from pipeline.calibrators.base import Calibrator, FitData, optimise
from pipeline.calibrators.ets import EnsembleTemperatureScaling
from pipeline.calibrators.lts import ImageBasedTemperatureScaling, LocalTemperatureScaling
from pipeline.calibrators.matrix import DirichletScaling, MatrixScaling
from pipeline.calibrators.meta_cal import MetaCalScaling
from pipeline.calibrators.temperature import TemperatureScaling, fit_temperature
from pipeline.calibrators.vector import VectorScaling

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "FitData",
    "build_calibrator",
    "export_torchscript",
    "export_with_model",
    "fit_temperature",
    "list_calibrators",
    "load",
    "optimise",
    "read_card",
    "save",
]

CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.name: cls
    for cls in (
        TemperatureScaling,
        VectorScaling,
        MatrixScaling,
        DirichletScaling,
        EnsembleTemperatureScaling,
        MetaCalScaling,
        LocalTemperatureScaling,
        ImageBasedTemperatureScaling,
    )
}
CALIBRATORS.update(selective.REGISTRY)  # "selective" and its variants


def list_calibrators() -> list[str]:
    """The registry names, sorted."""
    return sorted(CALIBRATORS)


def build_calibrator(name: str, num_classes: int, **options: Any) -> Calibrator:
    """Build an unfitted calibrator by registry name.

    Args:
        name: A name from `list_calibrators`.
        num_classes: The class count C.
        **options: The calibrator's constructor options.

    Returns:
        The new calibrator.

    Raises:
        ValueError: On an unknown name or option, or a bad option value.
        TypeError: On an option of the wrong type.
    """
    if name not in CALIBRATORS:
        raise ValueError(f"Unknown calibrator {name!r}: expected one of {list_calibrators()}")
    cls = CALIBRATORS[name]
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [p for p in parameters if p not in ("self", "num_classes")]
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for calibrator {name!r}: expected some of "
                f"{sorted(accepted)}"
            )
    return cls(num_classes, **options)
