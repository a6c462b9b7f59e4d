"""Named calibrator recipes: a registry name plus the options the README recommends.

A preset is written where a calibrator name goes (``calibrators: [selective_plus]``, or
``{name: selective_plus, options: {...}}`` to override some of its options). The config
expands it when it is read, so artifacts record the underlying calibrator and its full
options, and the artifact folder is named after the preset unless a ``label`` is given.

Kept free of torch: the config imports it.

Example:
    >>> expand({"name": "selective_plus", "options": {"batch_size": 4096}})["options"]["gate"]
    'soft'
"""

from __future__ import annotations

from typing import Any

# name -> (registry name, options, what it is)
PRESETS: dict[str, tuple[str, dict[str, Any], str]] = {
    "selective_plus": (
        "selective",
        {"t_mis": "fit", "t_cor": 1.0, "gate": "soft", "features": "rich",
         "base": "temperature", "batch_size": 16384},
        "selective scaling on top of temperature scaling: pixels the selector trusts keep TS "
        "(T_cor = 1), flagged ones get a fitted T_mis, blended by the selector's probability "
        "(soft gate) on rich features; the demo's best calibrator (benchmarks/"
        "selective_ablation.py)",
    ),
    "selective_published": (
        "selective",
        {"t_mis": 1e10, "t_cor": 1.0, "gate": "hard", "features": "logprobs"},
        "selective scaling as published (Wang, Gong, Wang, CVPR 2023): flagged pixels get a "
        "huge temperature, the others none",
    ),
}


def list_presets() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def expand(spec: dict[str, Any]) -> dict[str, Any]:
    """A calibrator entry with a preset name, as its registry name and options.

    Options given in the entry override the preset's; the label defaults to the preset's name.
    Entries naming no preset come back unchanged.
    """
    name = spec.get("name")
    if not isinstance(name, str) or name not in PRESETS:
        return spec
    base, options, _ = PRESETS[name]
    given = spec.get("options") or {}
    if not isinstance(given, dict):
        return spec  # the config reports the bad type
    return {**spec, "name": base, "label": spec.get("label") or name,
            "options": {**options, **given}}
