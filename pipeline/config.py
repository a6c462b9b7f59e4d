"""Run configuration: typed pydantic models read from YAML, strict by default.

A run config names the model, the datasets, the calibrators and the options of each stage.
Unknown keys and wrong types are errors that name the file and the dotted key:

    >>> from pipeline.config import JobConfig
    >>> JobConfig.model_validate({"output": "runs/x", "model": {"kind": "espnet", "path": "w.pth",
    ...     "num_classes": 11}, "datasets": [], "bogus": 1})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for JobConfig
    bogus
      Extra inputs are not permitted [type=extra_forbidden, input_value=1, input_type=int]
    ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that does not validate."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """The segmentation model and its input recipe."""

    kind: Literal["torchscript", "torchvision", "hf", "python", "espnet"]
    path: str
    num_classes: int = Field(ge=2)
    class_names: list[str] | None = None
    input_size: tuple[int, int] | None = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    arch: str | None = None
    sha256: str | None = None
    scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    flip: bool = False
    output_index: str | int | None = None

    @model_validator(mode="after")
    def _check_names(self) -> ModelConfig:
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"Expected `class_names` to have num_classes={self.num_classes} entries, "
                f"but got {len(self.class_names)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Expected `std` to be positive, but got {self.std}")
        return self

    def names(self) -> list[str]:
        """Class names, or ``class_0 ... class_{C-1}`` when the config gives none."""
        return list(self.class_names or [f"class_{i}" for i in range(self.num_classes)])


class CorruptionConfig(_Strict):
    """A seeded synthetic corruption applied to a dataset's images (graded domain shift)."""

    kind: Literal["dark", "fog", "blur", "noise", "jpeg"]
    severity: int = Field(ge=1, le=5)
    seed: int = 0


class DatasetConfig(_Strict):
    """One labelled dataset: where it lives, its role and its domain."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    role: Literal["calibration", "test"]
    domain: str
    reference: str | None = None
    format: Literal["folder", "cityscapes", "manifest"] = "folder"
    images: str | None = None
    labels: str | None = None
    manifest: str | None = None
    glob: str = "*.png"
    include: list[str] | None = None
    split: str = "val"
    limit: int | None = Field(default=None, ge=1)
    sample_seed: int = 0
    ignore_index: int = 255
    label_map: dict[int, int] | None = None
    corruption: CorruptionConfig | None = None

    @model_validator(mode="after")
    def _check_source(self) -> DatasetConfig:
        if self.format == "manifest" and not self.manifest:
            raise ValueError("Expected `manifest` to be set for format 'manifest', but got None")
        if self.format == "folder" and not (self.images and self.labels):
            raise ValueError("Expected `images` and `labels` to be set for format 'folder'")
        if self.format == "cityscapes" and not self.images:
            raise ValueError("Expected `images` (the Cityscapes root) for format 'cityscapes'")
        return self


class ExtractConfig(_Strict):
    """Stage 1 options."""

    batch_size: int = Field(default=4, ge=1)
    num_actors: int | None = Field(default=None, ge=1)
    rows_per_shard: int = Field(default=64, ge=1)
    store_stride: Literal[1, 2, 4] = 1
    label_resolution: bool = False
    on_error: Literal["fail", "skip"] = "fail"
    store_image: bool = True


class CalibratorSpec(_Strict):
    """One calibrator to fit: a registry name, an artifact label and its options."""

    name: str
    label: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]+$")
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """The artifact folder name: the label, else the registry name."""
        return self.label or self.name


class FitConfig(_Strict):
    """Stage 2 options."""

    mode: Literal["local", "ray"] = "local"
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    pixels_per_image: int = Field(default=4096, ge=1)
    heldout_fraction: float = Field(default=0.3, ge=0.0, lt=1.0)
    epochs: int = Field(default=10, ge=1)
    seed: int = 0
    oversample_mispredicted: bool = False
    map_stride: int = Field(default=1, ge=1)


class EvalConfig(_Strict):
    """Stage 3 options."""

    n_bins: int = Field(default=15, ge=1)
    boundary_width: int = Field(default=2, ge=1)
    bootstrap: int = Field(default=1000, ge=0)
    seed: int = 0
    include_heldout: bool = True
    num_actors: int | None = Field(default=None, ge=1)


class RefreshConfig(_Strict):
    """Nightly refresh options (champion/challenger promotion)."""

    registry: str | None = None
    tolerance: float = Field(default=0.002, ge=0.0)


class JobConfig(_Strict):
    """A whole run: model, datasets, calibrators and per-stage options."""

    output: str
    model: ModelConfig
    datasets: list[DatasetConfig]
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    calibrators: list[CalibratorSpec] = Field(
        default_factory=lambda: [CalibratorSpec(name="temperature")]
    )
    fit: FitConfig = Field(default_factory=FitConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    refresh: RefreshConfig = Field(default_factory=RefreshConfig)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetConfig]) -> list[DatasetConfig]:
        names = [d.name for d in datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Expected unique dataset names, but got duplicates {dupes}")
        return datasets

    @field_validator("calibrators")
    @classmethod
    def _unique_labels(cls, specs: list[CalibratorSpec]) -> list[CalibratorSpec]:
        keys = [s.key for s in specs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"Expected unique calibrator labels, but got duplicates {dupes}")
        if "uncalibrated" in keys:
            raise ValueError("Expected no calibrator labelled 'uncalibrated' (a reserved name)")
        return specs

    def datasets_with_role(self, role: str) -> list[DatasetConfig]:
        """The datasets whose role is ``role``, in config order."""
        return [d for d in self.datasets if d.role == role]


# Fields that hold filesystem paths, resolved against the config file's folder.
_PATH_KEYS = {("output",), ("model", "path"), ("refresh", "registry")}
_DATASET_PATH_KEYS = ("images", "labels", "manifest")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _expand_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v) for v in value]
    return value


def _resolve(path: str, base: Path) -> str:
    if "://" in path or (":" in path and not Path(path).suffix and "/" not in path):
        return path  # a URL, or a python "module:factory" path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    for keys in _PATH_KEYS:
        node = raw
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            if keys == ("model", "path") and node.get("kind") == "python":
                continue
            node[keys[-1]] = _resolve(node[keys[-1]], base)
    for ds in raw.get("datasets") or []:
        if isinstance(ds, dict):
            for k in _DATASET_PATH_KEYS:
                if isinstance(ds.get(k), str):
                    ds[k] = _resolve(ds[k], base)
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"Expected an override of the form `key=value`, but got {override!r}")
    dotted, text = override.split("=", 1)
    value = yaml.safe_load(text) if text else None
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


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"Invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(
    raw: dict[str, Any], *, base: Path | None = None, source: str = "<dict>"
) -> JobConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`JobConfig`.

    Args:
        raw: the mapping; it is not modified.
        base: folder that relative paths are resolved against (default: the working directory).
        source: name used in error messages (usually the file path).

    Raises:
        ConfigError: naming the dotted key of every invalid or unknown field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected {source} to hold a mapping, but got {type(raw).__name__}")
    raw = _resolve_paths(_expand_env(json.loads(json.dumps(raw))), base or Path.cwd())
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML run config, apply ``key=value`` overrides and validate it.

    Args:
        path: the YAML file.
        overrides: ``a.b=value`` strings (value parsed as YAML; list items by index,
            e.g. ``datasets.0.limit=5``).

    Returns:
        The validated, frozen config, with ``source`` set to the file.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown keys or wrong types.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"Cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"Config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Expected {path} to hold a mapping, but got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    cfg = parse_config(raw, base=path.resolve().parent, source=str(path))
    return cfg.model_copy(update={"source": path.resolve()})


def config_dict(cfg: JobConfig) -> dict[str, Any]:
    """The config as plain JSON-able data (what ``config.resolved.yaml`` holds)."""
    return cfg.model_dump(mode="json")


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
