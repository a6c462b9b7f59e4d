"""The calibrator registry: `register` adds a class under its name, `build_calibrator` builds one.

Calibrator modules import `register` from here (downward: this module imports only `base`) and
decorate their classes; `pipeline.calibrators` imports every calibrator module, so the registry
is complete once the package is imported. A calibrator that builds another one (selective
scaling's ``base``) calls `build_calibrator` at fit time, after every module has registered.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from pipeline.calibrators.base import Calibrator
from pipeline.calibrators.wording import generic

__all__ = [
    "CALIBRATORS", "adapts_to_target", "build_calibrator", "describe", "list_calibrators",
    "option_names", "parameter_count", "register",
]

CALIBRATORS: dict[str, type[Calibrator]] = {}
"""Registry name -> calibrator class."""

_C = TypeVar("_C", bound=type[Calibrator])


def register(cls: _C) -> _C:
    """Class decorator: add ``cls`` to `CALIBRATORS` under ``cls.name``.

    Raises:
        TypeError: ``cls`` is not a `Calibrator` subclass.
        ValueError: ``cls.name`` is unset or already taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
        raise TypeError(f"Expected a Calibrator subclass to register, but got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"Expected {cls.__name__} to set a registry `name`, but got {name!r}")
    other = CALIBRATORS.get(name)
    if other is not None and other is not cls:
        raise ValueError(
            f"Expected a new calibrator name, but {name!r} is taken by {other.__qualname__}"
        )
    CALIBRATORS[name] = cls
    return cls


def list_calibrators() -> list[str]:
    """The registry names, sorted."""
    return sorted(CALIBRATORS)


def option_names(cls: type[Calibrator]) -> list[str] | None:
    """The constructor options ``cls`` accepts, sorted; None when it takes any keyword.

    A class may declare options its ``__init__`` passes on through ``**options`` in
    ``shared_options`` (a mapping of name -> default), as the selective family does.
    """
    parameters = inspect.signature(cls.__init__).parameters
    own = [
        name for name, p in parameters.items()
        if name not in ("self", "num_classes")
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    shared = getattr(cls, "shared_options", None)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        if shared is None:
            return None
        own += list(shared)
    return sorted(own)


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
    accepted = option_names(cls)
    if accepted is not None:
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for calibrator {name!r}: expected some of "
                f"{accepted}"
            )
    return cls(num_classes, **options)


def describe(
    name: str,
    summary: Mapping[str, Any],
    options: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> str:
    """A fitted calibrator's values in plain words: its class's `Calibrator.describe`, else each
    value as ``key = value`` (an unknown name, or a summary without what the words need).

    Example:
        >>> import pipeline.calibrators
        >>> describe("temperature", {"temperature": 1.3124})
        'one temperature, T = 1.31'
        >>> describe("new", {"t": [1.0, 3.0], "inputs": ["a", "b"]})
        't = mean 2.00, range 1.00 to 3.00, inputs = a, b'
    """
    cls = CALIBRATORS.get(name)
    words = None if cls is None else cls.describe(summary, options or {}, num_classes)
    return generic(summary) if words is None else words


def adapts_to_target(name: str) -> bool:
    """Whether the calibrator registered as ``name`` adapts to each target image (False for an
    unknown name).

    Example:
        >>> import pipeline.calibrators
        >>> adapts_to_target("adaptive_ts_gated"), adapts_to_target("temperature")
        (True, False)
    """
    cls = CALIBRATORS.get(name)
    return cls is not None and cls.adapts_to_target


def parameter_count(name: str, num_classes: int, options: Mapping[str, Any] | None = None) -> int:
    """The fitted parameters of calibrator ``name`` built with ``options`` (its size, for
    telling the simplest of several apart).

    Example:
        >>> import pipeline.calibrators
        >>> parameter_count("temperature", 19), parameter_count("vector", 19)
        (1, 38)
    """
    calibrator = build_calibrator(name, num_classes, **dict(options or {}))
    return sum(p.numel() for p in calibrator.parameters())
