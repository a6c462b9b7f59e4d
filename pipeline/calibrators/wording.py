"""Fitted values in words, for the report: the number formats every calibrator's `describe` uses.

Example:
    >>> number(1.3124), number(2e7), spread([1.0, 3.0]), value(["a", "b"])
    ('1.31', '2e+07', 'mean 2.00, range 1.00 to 3.00', 'a, b')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["generic", "number", "spread", "value"]


def number(x: Any) -> str:
    """Three significant digits with trailing zeros kept (T = 1.30), ``1e+06`` and up as powers."""
    if x is None:
        return "none"
    if isinstance(x, (int, float)):
        x = float(x)
        if abs(x) >= 1e6:
            return f"{x:.0e}"
        return f"{x:#.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def spread(values: Sequence[float]) -> str:
    """The mean and range of a list of numbers."""
    arr = np.asarray(values, dtype=float)
    return f"mean {number(arr.mean())}, range {number(arr.min())} to {number(arr.max())}"


def value(x: Any) -> str:
    """One fitted value: a number, the spread of a list of numbers, or the text."""
    if isinstance(x, list):
        if x and all(isinstance(v, (int, float)) for v in x):
            return spread(x)
        return ", ".join(map(str, x))
    return number(x)


def generic(summary: Mapping[str, Any]) -> str:
    """Every fitted value as ``key = value``: the words of a calibrator without its own."""
    if not summary:
        return "no fitted values recorded"
    return ", ".join(f"{k} = {value(v)}" for k, v in summary.items())
