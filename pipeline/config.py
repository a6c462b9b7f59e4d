"""Run configuration: read a YAML file into a validated, frozen :class:`JobConfig`.

The models themselves (one per config section, strict and ``extra="forbid"``) live in
:mod:`pipeline.config_schema`; this module is the public entry point and re-exports them
(``from pipeline.config import JobConfig, DatasetConfig, ...``). It adds what a file needs
beyond the models: ``${VAR}`` expansion, relative paths resolved against the config's folder,
``key=value`` overrides, a bound on YAML aliases, a parse-time build of every calibrator,
error messages that name the file and the dotted key, and the config's hash and resolved copy
(``OUTPUT/config.resolved.yaml``).

What :func:`load_config` / :func:`parse_config` refuse, each with the dotted key named:

- numbers and booleans of the wrong type (strict: ``true`` or ``"0.5"`` is not a number, ``1``
  is not a boolean; an int is a valid float), NaN and infinity, and values out of bounds
  (``evaluate.n_bins`` in 1..1000, ``ignore_index`` in 0..65535, ...);
- names that become folder names (``datasets.N.name``, ``calibrators.N.label`` and ``.name``)
  unless they match :data:`NAME_PATTERN` (so never ``.`` or ``..``);
- ``${VAR}`` with VAR unset or empty (``${VAR:-default}`` gives a default);
- an ``output`` folder that is, lies in or contains a dataset's ``images``/``labels`` folder;
- unknown calibrator names and options (each calibrator is built once);
- YAML that expands (aliases) to more than :data:`MAX_NODES` values or nests deeper than
  :data:`MAX_DEPTH`.

``calibrators`` entries may be plain registry names: ``[temperature, selective]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config_schema import (
    _NAME_RULE,
    MAX_BINS,
    MAX_BOOTSTRAP,
    MAX_LABEL,
    NAME_PATTERN,
    Bool,
    CalibratorSpec,
    CorruptionConfig,
    DatasetConfig,
    EvalConfig,
    ExtractConfig,
    FitConfig,
    Float,
    Int,
    JobConfig,
    ModelConfig,
    RefreshConfig,
    check_name,
)
from pipeline.paths import RESOLVED_CONFIG, atomic_write_text

__all__ = [
    "FIT_OPTIONS",
    "MAX_BINS",
    "MAX_BOOTSTRAP",
    "MAX_DEPTH",
    "MAX_LABEL",
    "MAX_NODES",
    "NAME_PATTERN",
    "RESOLVED",
    "Bool",
    "CalibratorSpec",
    "ConfigError",
    "CorruptionConfig",
    "DatasetConfig",
    "EvalConfig",
    "ExtractConfig",
    "FitConfig",
    "Float",
    "Int",
    "JobConfig",
    "ModelConfig",
    "RefreshConfig",
    "check_name",
    "config_dict",
    "config_hash",
    "load_config",
    "parse_config",
    "write_resolved_config",
]


class ConfigError(ValueError):
    """A config file or override that does not validate."""


# A parsed YAML document may share subtrees through aliases; expanded, it may hold at most this
# many nodes, nested at most this deep (a 1 KB alias bomb expands to ~10^9 nodes).
MAX_NODES = 100_000
MAX_DEPTH = 64
# Calibrator options the fit stage reads itself (pipeline.fit.FIT_OPTIONS); not constructor
# options, so they are set aside when the calibrator is built to check its options.
FIT_OPTIONS = ("use_corrupted", "augment_corruptions")

# Fields that hold filesystem paths, resolved against the config file's folder.
_PATH_KEYS = {("output",), ("model", "path"), ("refresh", "registry")}
_DATASET_PATH_KEYS = ("images", "labels", "manifest")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, key: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string of ``value``.

    ``${VAR}`` with VAR unset (or empty) is an error: silently expanding it to "" turns
    ``${ROOT}/runs`` into ``/runs``. ``${VAR:-default}`` gives ``default`` instead (``${VAR:-}``
    when an empty value is wanted).
    """
    if isinstance(value, str):

        def one(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            found = os.environ.get(name)
            if found:
                return found
            if default is None:
                state = "empty" if found is not None else "not set"
                raise ConfigError(
                    f"{key or '<root>'}: environment variable ${{{name}}} is {state} and has no "
                    f"default (set it, or write ${{{name}:-DEFAULT}})"
                )
            return default

        return _ENV.sub(one, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(value)]
    return value


def _check_size(raw: Any) -> None:
    """Refuse a document that expands to more than MAX_NODES nodes or nests deeper than MAX_DEPTH.

    YAML aliases share one object among many places, so a 1 KB file can stand for 10^9 nodes
    (and a recursive alias for infinitely many); everything after this (the JSON round trip,
    validation, error messages) walks the expanded tree. The walk stops at the first node over
    the bound, so it costs at most MAX_NODES steps.
    """
    stack: list[tuple[Any, int]] = [(raw, 0)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(
                f"Expected at most {MAX_NODES} values (YAML aliases expanded), but got more: "
                "is it an alias bomb or a recursive alias?"
            )
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"Expected values nested at most {MAX_DEPTH} deep, but got deeper (a recursive "
                "YAML alias?)"
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            count += len(node)  # the keys
        elif isinstance(node, list | tuple):
            stack.extend((v, depth + 1) for v in node)


def _resolve(path: str, base: Path) -> str:
    if "://" in path or (":" in path and not Path(path).suffix and "/" not in path):
        return path  # a URL, or a python "module:factory" path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_one(node: dict[str, Any], k: str, where: str, base: Path) -> None:
    if not node[k].strip():
        # "" would resolve to the config's own folder.
        raise ConfigError(f"{where}: Expected a path, but got an empty string")
    node[k] = _resolve(node[k], base)


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    for keys in _PATH_KEYS:
        node = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            if keys == ("model", "path") and node.get("kind") == "python":
                continue
            _resolve_one(node, keys[-1], ".".join(keys), base)
    for i, ds in enumerate(raw.get("datasets") or []):
        if isinstance(ds, dict):
            for k in _DATASET_PATH_KEYS:
                if isinstance(ds.get(k), str):
                    _resolve_one(ds, k, f"datasets.{i}.{k}", base)
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"Expected an override of the form `key=value`, but got {override!r}")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(
            f"Override `{dotted}`: the value {text!r} is not valid YAML ({problem}); quote it, "
            f"e.g. --set '{dotted}=\"{text}\"'"
        ) from None
    parts = dotted.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Override `{dotted}`: no list item `{where}`")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"Override `{dotted}`: `{where}` is not a mapping or list")


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "string_pattern_mismatch" and e["ctx"]["pattern"] == NAME_PATTERN:
            msg = f"Expected {_NAME_RULE}"
        elif e["type"] == "value_error":
            msg = str(e.get("ctx", {}).get("error") or msg)
        if not e["loc"]:  # a whole-config check: its message names the keys and values
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {key}: {msg} (got {_short(e.get('input'))})")
    return "\n".join(lines)


# Up to this many classes the parse-time check builds calibrators for real (a C x C matrix of
# at most 4 MB, built in microseconds); above, on torch's meta device, which allocates nothing
# but costs a few seconds of one-time setup for some ops (torch.eye).
_REAL_BUILD_CLASSES = 1024


def _check_calibrators(cfg: JobConfig) -> list[str]:
    """Build every calibrator once so that bad names and options fail at parse time.

    Returns:
        One ``key: message`` line per bad entry.
    """
    import torch

    from pipeline.calibrators import CALIBRATORS, build_calibrator

    problems = []
    for i, spec in enumerate(cfg.calibrators):
        if spec.name not in CALIBRATORS:
            problems.append(
                f"calibrators.{i}.name: Unknown calibrator {spec.name!r}: expected one of "
                f"{sorted(CALIBRATORS)}"
            )
            continue
        options = {k: v for k, v in spec.options.items() if k not in FIT_OPTIONS}
        use_corrupted = spec.options.get("use_corrupted", False)
        if not isinstance(use_corrupted, bool):
            problems.append(
                f"calibrators.{i}.options.use_corrupted: Expected a bool, but got "
                f"{use_corrupted!r}"
            )
        try:
            if cfg.model.num_classes <= _REAL_BUILD_CLASSES:
                build_calibrator(spec.name, cfg.model.num_classes, **options)
            else:
                try:
                    with torch.device("meta"):
                        build_calibrator(spec.name, cfg.model.num_classes, **options)
                except (NotImplementedError, RuntimeError):
                    # A constructor that reads a tensor's value cannot run on the meta
                    # device; build it for real (what fit does first anyway).
                    build_calibrator(spec.name, cfg.model.num_classes, **options)
        except (TypeError, ValueError) as err:
            problems.append(f"calibrators.{i}.options: {err} ({spec.key!r})")
    return problems


def parse_config(
    raw: dict[str, Any], *, base: Path | None = None, source: str = "<dict>"
) -> JobConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`JobConfig`.

    Besides the model's own checks, this expands ``${VAR}`` (an unset variable without a
    default is an error), resolves relative paths, bounds the expanded size of the document
    (YAML alias bombs) and builds every calibrator once so that unknown names and bad options
    fail here rather than after extraction.

    Args:
        raw: the mapping; it is not modified.
        base: folder that relative paths are resolved against (default: the working directory).
        source: name used in error messages (usually the file path).

    Raises:
        ConfigError: naming the dotted key of every invalid or unknown field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected {source} to hold a mapping, but got {type(raw).__name__}")
    try:
        _check_size(raw)
        raw = json.loads(json.dumps(raw))
        raw = _resolve_paths(_expand_env(raw), base or Path.cwd())
    except ConfigError as err:
        raise ConfigError(f"Invalid config {source}:\n  {err}") from None
    except (TypeError, ValueError) as err:  # e.g. a non-JSON value such as a date or a set
        raise ConfigError(f"Invalid config {source}: {err}") from None
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    problems = _check_calibrators(cfg)
    if problems:
        raise ConfigError("\n  ".join([f"Invalid config {source}:", *problems]))
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML run config, apply ``key=value`` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: ``a.b=value`` strings (value parsed as YAML; list items by index,
            e.g. ``datasets.0.limit=5``).

    Returns:
        The validated, frozen config, with ``source`` set to the file.

    Raises:
        ConfigError: unreadable file, bad YAML (or an override value that is not YAML),
            unknown keys or wrong types.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"Cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"Config {path} is nested too deeply to read") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected {path} to hold a mapping, but got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    cfg = parse_config(raw, base=path.resolve().parent, source=str(path))
    return cfg.model_copy(update={"source": path.resolve()})


def config_dict(cfg: JobConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (what ``config.resolved.yaml`` holds).

    A run whose ``output`` is a URI works in a local mirror (:mod:`pipeline.storage`); its
    config still says the URI, so the hash and the resolved file do not depend on the machine.
    """
    data = cfg.model_dump(mode="json")
    if cfg.store is not None:
        data["output"] = cfg.store
    return data


def config_hash(cfg: JobConfig, *, sections: Sequence[str] | None = None) -> str:
    """A short sha256 of the canonical JSON of the config (or only some top-level sections).

    Example:
        >>> raw = {"output": "/tmp/r", "model": {"kind": "espnet", "path": "/w.pth",
        ...        "num_classes": 11}, "datasets": []}
        >>> config_hash(parse_config(raw)) == config_hash(parse_config(raw))
        True
    """
    data = config_dict(cfg)
    if sections is not None:
        data = {k: data[k] for k in sections}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


RESOLVED = RESOLVED_CONFIG


def write_resolved_config(cfg: JobConfig, output: str | Path | None = None) -> Path:
    """Write ``OUTPUT/config.resolved.yaml``: the config as validated, with its hash.

    Every path is absolute and every ``${VAR}`` expanded, so the file alone reruns the run
    (``segcal run OUTPUT/config.resolved.yaml``) and says exactly what produced the outputs
    beside it. Written atomically.

    Args:
        cfg: the validated config.
        output: the folder to write into (default: ``cfg.output``).

    Returns:
        The path written.
    """
    header = f"# segcal resolved config; config_hash {config_hash(cfg)}"
    if cfg.source is not None:
        header += f"; from {cfg.source}"
    text = f"{header}\n" + yaml.safe_dump(config_dict(cfg), sort_keys=False)
    return atomic_write_text(Path(output or cfg.output) / RESOLVED, text)
