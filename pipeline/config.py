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
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.paths import RESOLVED_CONFIG, atomic_write_text


class ConfigError(ValueError):
    """A config file or override that does not validate."""


# Numbers and booleans are strict: `true` or "0.5" is not a number and 1 is not a boolean (a
# YAML typo such as `n_bins: 1e9`, which YAML reads as a string, is refused rather than coerced).
# A float field still takes an int (`scale: 1`).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]

# Names that become file or folder names (dataset names, calibrator labels): a letter, digit or
# underscore first, so never `.`, `..`, a hidden name or an option-like `-x`.
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$"
_NAME = re.compile(NAME_PATTERN)
_NAME_RULE = (
    "a file name (letters, digits, '_', '.', '-', not starting with '.' or '-'; "
    "so never '.' or '..')"
)
# Label values are stored as uint16: `ignore_index` must be one of them.
MAX_LABEL = 65535
# Equal-width reliability bins; more than this is a typo (and `1e9` bins would hang evaluate).
MAX_BINS = 1000
MAX_BOOTSTRAP = 100_000
# A parsed YAML document may share subtrees through aliases; expanded, it may hold at most this
# many nodes, nested at most this deep (a 1 KB alias bomb expands to ~10^9 nodes).
MAX_NODES = 100_000
MAX_DEPTH = 64
# Calibrator options the fit stage reads itself (pipeline.fit.FIT_OPTIONS); not constructor
# options, so they are set aside when the calibrator is built to check its options.
FIT_OPTIONS = ("use_corrupted", "augment_corruptions")


def check_name(key: str, value: Any) -> str:
    """Check that ``value`` is safe as a single file or folder name (see :data:`NAME_PATTERN`).

    Args:
        key: the dotted config key, for the error message.
        value: the name.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: ``value`` is not such a name (e.g. ``.``, ``..``, ``a/b``, ``.hidden``).

    Example:
        >>> check_name("datasets.0.name", "camvid-val")
        'camvid-val'
        >>> check_name("datasets.0.name", "..")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Expected `datasets.0.name` to be a file name (letters, digits, ...'..'
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"Expected `{key}` to be {_NAME_RULE}, but got {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _exact_int(value: Any) -> Any:
    """Refuse a bool or float where a Literal of ints is expected (``True == 1`` in Python)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected an integer, but got {value!r}")
    return value


class ModelConfig(_Strict):
    """The segmentation model and its input recipe."""

    kind: Literal["torchscript", "torchvision", "hf", "python", "espnet"]
    path: str
    num_classes: Int = Field(ge=2)
    class_names: list[str] | None = None
    input_size: tuple[Int, Int] | None = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    scale: Float = 1.0 / 255.0
    mean: tuple[Float, Float, Float] = (0.0, 0.0, 0.0)
    std: tuple[Float, Float, Float] = (1.0, 1.0, 1.0)
    arch: str | None = None
    sha256: str | None = None
    scales: list[Float] = Field(default_factory=lambda: [1.0], min_length=1)
    flip: Bool = False
    output_index: str | Int | None = None
    # Output channels to drop before the logits (e.g. a void channel: `drop_channels: [11]`);
    # the model must then output exactly num_classes + len(drop_channels) channels.
    drop_channels: list[Annotated[int, Strict(), Field(ge=0)]] | None = None

    @model_validator(mode="after")
    def _check_names(self) -> ModelConfig:
        if self.drop_channels is not None and len(set(self.drop_channels)) != len(
            self.drop_channels
        ):
            raise ValueError(
                f"Expected `drop_channels` to be distinct channel indices, but got "
                f"{self.drop_channels}"
            )
        outputs = self.num_classes + len(self.drop_channels or ())
        if any(c >= outputs for c in self.drop_channels or ()):
            raise ValueError(
                f"Expected `drop_channels` to index the model's num_classes + "
                f"len(drop_channels) = {outputs} output channels, but got {self.drop_channels}"
            )
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
    severity: Int = Field(ge=1, le=5)
    seed: Int = 0


class DatasetConfig(_Strict):
    """One dataset: where it lives, its role and its domain.

    ``role`` says what the run does with it:

    - ``calibration``: labelled; the calibrators are fitted on it (a held-out part is
      evaluated as ``<name>-heldout``).
    - ``test``: labelled; every calibrator is evaluated on it (``summary.csv``) and its
      label-free estimates are checked against the truth (``label_free.csv``).
    - ``monitor``: unlabelled new data (the nightly reality): extraction stores the logits and
      the image only, and evaluation gives it per-image label-free features and
      ``label_free.csv`` rows (drift score, estimated accuracy and calibration), but no
      ``summary.csv`` rows. ``labels`` may be left out (folder format: ``images`` alone;
      manifest: no ``label`` column; Cityscapes: no ``gtFine``); when given it is ignored and
      never read: to measure a labelled set's estimates against its labels, make it a
      ``test`` set.

    ``name`` becomes a folder name (the dataset's shards), so it must match :data:`NAME_PATTERN`.
    """

    name: str = Field(pattern=NAME_PATTERN)
    role: Literal["calibration", "test", "monitor"]
    domain: str
    reference: str | None = None
    format: Literal["folder", "cityscapes", "manifest"] = "folder"
    images: str | None = None
    labels: str | None = None
    manifest: str | None = None
    glob: str = "*.png"
    # Folder format: the label's file name, from the image's stem, in the label folder's copy
    # of the image's subfolder, e.g. "{stem}_L.png" (a name without a suffix matches any image
    # suffix). None: the image's own relative path and stem, any image suffix.
    label_pattern: str | None = None
    include: list[str] | None = None
    split: str = "val"
    limit: Int | None = Field(default=None, ge=1)
    sample_seed: Int = 0
    ignore_index: Int = Field(default=255, ge=0, le=MAX_LABEL)
    label_map: dict[int, Int] | None = None
    corruption: CorruptionConfig | None = None

    @model_validator(mode="after")
    def _check_source(self) -> DatasetConfig:
        if self.format == "manifest" and not self.manifest:
            raise ValueError("Expected `manifest` to be set for format 'manifest', but got None")
        if self.format == "folder" and not self.images:
            raise ValueError("Expected `images` to be set for format 'folder', but got None")
        if self.format == "folder" and not self.labels and self.role != "monitor":
            raise ValueError(
                f"Expected `labels` to be set for format 'folder' and role {self.role!r} "
                "(only role 'monitor' goes without labels), but got None"
            )
        if self.format == "cityscapes" and not self.images:
            raise ValueError("Expected `images` (the Cityscapes root) for format 'cityscapes'")
        if self.label_pattern is not None:
            _check_label_pattern(self.label_pattern)
            if self.format != "folder":
                raise ValueError(
                    f"Expected `label_pattern` only with format 'folder', but got format "
                    f"{self.format!r}"
                )
        return self


def _check_label_pattern(pattern: str) -> None:
    """Refuse a ``label_pattern`` other than one file name holding ``{stem}`` and no other field."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as err:
        raise ValueError(
            f"Expected `label_pattern` to be a file name holding {{stem}}, e.g. "
            f"'{{stem}}_L.png', but got {pattern!r} ({err})"
        ) from None
    if fields != ["stem"] or "/" in pattern or "\\" in pattern or pattern.startswith("."):
        raise ValueError(
            f"Expected `label_pattern` to be a file name holding {{stem}} once and no other "
            f"field or folder, e.g. '{{stem}}_L.png', but got {pattern!r}"
        )


class ExtractConfig(_Strict):
    """Stage 1 options."""

    # Images per model call: None means 16 per GPU actor, 4 on CPU.
    batch_size: Int | None = Field(default=None, ge=1)
    num_actors: Int | None = Field(default=None, ge=1)
    rows_per_shard: Int = Field(default=64, ge=1)
    store_stride: Literal[1, 2, 4] = 1
    label_resolution: Bool = False
    on_error: Literal["fail", "skip"] = "fail"
    store_image: Bool = True
    # Autocast dtype of the model's forward pass on the device; logits are stored as float16.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Custom Ray resources each model actor asks for, e.g. {"gpu_node": 1}: pins the actors to
    # the nodes that declare them (`ray start --resources='{"gpu_node": 4}'`).
    actor_resources: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    # How a rerun notices source files changed in place: size + mtime, or a sha256 of both
    # files (reads every file on every run). Switching kinds re-extracts every image once.
    verify_sources: Literal["stat", "hash"] = "stat"
    # With on_error: skip, the stage still fails when more than this share of the images it
    # extracts in one run had to be skipped (a broken mount, a wrong model), keeping the
    # previous manifest.
    max_skipped_fraction: Float = Field(default=0.5, ge=0.0, le=1.0)

    _check_stride = field_validator("store_stride", mode="before")(_exact_int)


class CalibratorSpec(_Strict):
    """One calibrator to fit: a registry name, an artifact label and its options.

    In a config, a plain registry name stands for ``{name: NAME}``:
    ``calibrators: [temperature, {name: selective, options: {gate: soft}}]``. The artifact
    folder is named after :attr:`key`, so ``label`` (and ``name``) must match
    :data:`NAME_PATTERN`. A preset name (:mod:`pipeline.presets`) expands to its registry
    name and options, labelled with the preset's name.
    """

    name: str = Field(pattern=NAME_PATTERN)
    label: str | None = Field(default=None, pattern=NAME_PATTERN)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _plain_name(cls, data: Any) -> Any:
        from pipeline.presets import expand

        data = {"name": data} if isinstance(data, str) else data
        return expand(data) if isinstance(data, dict) else data

    @property
    def key(self) -> str:
        """The artifact folder name: the label, else the registry name."""
        return self.label or self.name


class FitConfig(_Strict):
    """Stage 2 options."""

    # local: in this process; ray: Ray Train workers; auto: Ray Train only where
    # benchmarks/fit.py measured it faster (`pipeline.fit.resolve_mode`), else local.
    mode: Literal["local", "ray", "auto"] = "local"
    num_workers: Int = Field(default=1, ge=1)
    use_gpu: Bool = False
    pixels_per_image: Int = Field(default=4096, ge=1)
    heldout_fraction: Float = Field(default=0.3, ge=0.0, lt=1.0)
    epochs: Int = Field(default=10, ge=1)
    seed: Int = 0
    oversample_mispredicted: Bool = False
    map_stride: Int = Field(default=1, ge=1)


class EvalConfig(_Strict):
    """Stage 3 options."""

    n_bins: Int = Field(default=15, ge=1, le=MAX_BINS)
    boundary_width: Int = Field(default=2, ge=1)
    bootstrap: Int = Field(default=1000, ge=0, le=MAX_BOOTSTRAP)
    seed: Int = 0
    include_heldout: Bool = True
    num_actors: Int | None = Field(default=None, ge=1)
    # Score on a GPU per evaluation actor: auto takes one when the cluster has GPUs.
    use_gpu: Literal["auto"] | Bool = "auto"


class RefreshConfig(_Strict):
    """Nightly refresh options (champion/challenger promotion)."""

    registry: str | None = None
    tolerance: Float = Field(default=0.002, ge=0.0)


class JobConfig(_Strict):
    """A whole run: model, datasets, calibrators and per-stage options.

    The output folder may not be an input folder (a dataset's ``images`` or ``labels``), lie
    inside one or contain one: a run would write into its data and, with a recursive ``glob``,
    read its own plots back as images.
    """

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

    @model_validator(mode="after")
    def _check_output_apart_from_inputs(self) -> JobConfig:
        if not self.output.strip():
            raise ValueError("Expected `output` to be a folder, but got an empty string")
        if _is_url(self.output):
            return self
        output = Path(self.output).expanduser().resolve()
        for i, ds in enumerate(self.datasets):
            for key in ("images", "labels"):
                value = getattr(ds, key)
                if not value or _is_url(value):
                    continue
                folder = Path(value).expanduser().resolve()
                if output.is_relative_to(folder):
                    raise ValueError(
                        f"Expected `output` ({output}) outside the input folder "
                        f"`datasets.{i}.{key}` ({folder}), but it is inside it: choose an "
                        "output folder apart from the data"
                    )
                if folder.is_relative_to(output):
                    raise ValueError(
                        f"Expected the input folder `datasets.{i}.{key}` ({folder}) outside "
                        f"`output` ({output}), but it is inside it: choose an output folder "
                        "apart from the data"
                    )
        return self

    def datasets_with_role(self, role: str) -> list[DatasetConfig]:
        """The datasets whose role is ``role``, in config order."""
        return [d for d in self.datasets if d.role == role]


def _is_url(path: str) -> bool:
    return "://" in path


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
