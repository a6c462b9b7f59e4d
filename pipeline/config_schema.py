"""The run configuration's schema: strict, frozen pydantic models, one per config section.

:class:`JobConfig` is a whole run: the model (:class:`ModelConfig`), the datasets
(:class:`DatasetConfig`, optionally :class:`CorruptionConfig`), the calibrators
(:class:`CalibratorSpec`) and the options of each stage (:class:`ExtractConfig`,
:class:`FitConfig`, :class:`EvalConfig`, :class:`RefreshConfig`). Every model forbids unknown
keys, NaN and infinity; numbers and booleans are strict (:data:`Int`, :data:`Float`,
:data:`Bool`), and names that become folder names must match :data:`NAME_PATTERN`:

    >>> from pipeline.config import JobConfig
    >>> JobConfig.model_validate({"output": "runs/x", "model": {"kind": "espnet", "path": "w.pth",
    ...     "num_classes": 11}, "datasets": [], "bogus": 1})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for JobConfig
    bogus
      Extra inputs are not permitted [type=extra_forbidden, input_value=1, input_type=int]
    ...

The models check one mapping; reading a YAML file (``${VAR}``, relative paths, overrides, alias
bombs, calibrator options) is :mod:`pipeline.config`'s, which re-exports every name here:
import them from there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from pipeline.storage import check_uri, is_uri

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
    # Model actors sharing each GPU (each asks for 1/k of it): for a small model that leaves
    # the GPU idle between one actor's batches. Scheduling only: stored rows are the same.
    actors_per_gpu: Int = Field(default=1, ge=1, le=8)
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
    # Set by the CLI when `output` is a URI: then `output` is the driver's local mirror and
    # this the URI, where shards live (see pipeline.storage). Never read from a config file.
    store: str | None = Field(default=None, exclude=True)

    @field_validator("store")
    @classmethod
    def _store_is_not_a_key(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("Expected no `store` key: segcal sets it itself when `output` is a "
                             "URI; write the URI as `output`")
        return value

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
        if is_uri(self.output):
            check_uri(self.output, key="output")
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

