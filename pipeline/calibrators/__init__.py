"""Post-hoc calibrators: one registry, one interface (see `Calibrator`), pickle-free artifacts.

Layout: `base` (the `Calibrator` interface, `FitData`), `checks` (option and input checks),
`reduce` (the reduce hook: `Reduce`, `DistributedReduce`), `registry` (`register`,
`build_calibrator`), `training` (`optimise`, `batch_plan`, and the training loop and samplers
that the network calibrators share), one module per family, `artifacts` (save, load, the
file format), `artifact_checks` (the bounded, fuzz-safe reading and checks `load` relies on)
and `export` (TorchScript export). Each calibrator module registers its classes with
``@register``; importing this package imports them all, so `CALIBRATORS` is complete.

Example:
    >>> import torch
    >>> ts = build_calibrator("temperature", num_classes=3)
    >>> _ = ts.fit(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([0, 2]))
    >>> ts(torch.zeros(1, 3, 2, 2)).shape
    torch.Size([1, 3, 2, 2])
"""

from __future__ import annotations

# Every calibrator module, for its registrations (the names are re-exported below).
from pipeline.calibrators import (  # noqa: F401
    adaptive,
    ets,
    lts,
    matrix,
    meta_cal,
    selective,
    selective_spatial,
    temperature,
    vector,
)
from pipeline.calibrators.artifacts import load, read_card, save
from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.export import export_torchscript, export_with_model
from pipeline.calibrators.registry import (
    CALIBRATORS,
    adapts_to_target,
    build_calibrator,
    describe,
    list_calibrators,
    parameter_count,
    register,
)
from pipeline.calibrators.temperature import fit_temperature
from pipeline.calibrators.training import optimise

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "FitData",
    "adapts_to_target",
    "build_calibrator",
    "describe",
    "export_torchscript",
    "export_with_model",
    "fit_temperature",
    "list_calibrators",
    "load",
    "optimise",
    "parameter_count",
    "read_card",
    "register",
    "save",
]
