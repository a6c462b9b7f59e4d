"""Checks on the driver before any Ray work: the datasets, one image through the model, the recipe.

``segcal run|extract|refresh`` run :func:`preflight` before Ray starts, and ``segcal check
CONFIG`` runs it alone. It catches in about a second what would otherwise fail (or, worse,
succeed with meaningless numbers) after Ray's start-up:

- every dataset is listed: images listed and selected, how many have a label; for the folder
  format, images without a label are reported with the folder searched, the matching rule and
  up to three near-miss label files (an error unless ``extract.on_error: skip`` and some
  images do have labels);
- the model is loaded and one image of each dataset runs through it: its output must have
  exactly ``num_classes`` channels, or ``num_classes + len(drop_channels)`` with
  ``model.drop_channels`` (an error otherwise, naming both counts and the fix);
- the first few labelled images of each dataset are decoded and checked as extraction would
  (label values against ``num_classes`` and ``ignore_index``, sizes); a ``monitor`` set has no
  labels and none are looked for: its first images are decoded and run through the model
  (the degenerate-prediction check applies, the accuracy checks cannot);
- the normalised input ``(x * scale - mean) / std`` should have a plausible mean and std
  (:data:`MEAN_LIMIT`, :data:`STD_RANGE`); when it does not, a warning names the likely fix
  (mean/std in 0-255 units with ``scale: 1/255``, or 0-1 units with ``scale: 1``);
- the predictions should not be one class on more than :data:`DEGENERATE_SHARE` of the pixels,
  and a quick pixel accuracy and mIoU on those images should beat chance (the majority class,
  and :data:`CHANCE_MIOU_FACTOR` / C), with a warning otherwise.

Errors raise :class:`PreflightError` with one line naming the cause, the file and the fix;
warnings are returned (and the CLI prints them). An unusual input scale is only a note when the
predictions look right: some models are trained on unusual recipes (the demo's ESPNet sees
inputs with std 0.004).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.config import DatasetConfig, JobConfig, ModelConfig

if TYPE_CHECKING:  # imported where used: the CLI imports this module for every command
    import numpy as np
    import torch

    from pipeline.data import Sample
    from pipeline.models import SegmentationModel

logger = logging.getLogger(__name__)

# Plausible normalised inputs: |mean| below this and std inside this range.
MEAN_LIMIT = 5.0
STD_RANGE = (0.05, 20.0)
# One predicted class on more than this share of the pixels is a degenerate model.
DEGENERATE_SHARE = 0.99
# Near chance: pixel accuracy gaining less than this share of the headroom above always
# predicting the labels' majority class, or mIoU below CHANCE_MIOU_FACTOR / num_classes.
CHANCE_MARGIN = 0.1
CHANCE_MIOU_FACTOR = 1.5
# Labelled images per dataset decoded and scored (1 for a corrupted dataset).
IMAGES_PER_DATASET = 2
# Image size fed to the model when no dataset lists an image.
_SYNTHETIC_SIZE = (64, 64)

_INV255 = 1.0 / 255.0
_IMAGENET_01 = "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]"
_IMAGENET_255 = "mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375]"


class PreflightError(Exception):
    """A mistake that would make the run fail or meaningless: one line, cause, file and fix."""


@dataclass
class DatasetCheck:
    """What the preflight found for one dataset."""

    name: str
    listed: int = 0
    selected: int = 0
    labelled: int = 0
    scored: int = 0
    pixel_accuracy: float | None = None
    miou: float | None = None


@dataclass
class PreflightReport:
    """Everything :func:`preflight` found: one line per fact, the warnings, per-dataset checks."""

    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    datasets: list[DatasetCheck] = field(default_factory=list)
    channels: int | None = None
    input_mean: float | None = None
    input_std: float | None = None


def _fail(text: str) -> PreflightError:
    return PreflightError(" ".join(text.split()))  # always one line


def recipe_advice(m: ModelConfig, mean: float, std: float) -> str | None:
    """The likely fix when a normalised input's ``mean``/``std`` are implausible, else None.

    Example:
        >>> cfg = ModelConfig(kind="python", path="a:b", num_classes=3,
        ...                   mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
        >>> recipe_advice(cfg, -2.0, 0.004).split(":")[0]
        'mean/std look like 0-255 units while scale 0.00392157 maps pixels to 0..1'
        >>> recipe_advice(cfg, 0.1, 1.0) is None
        True
    """
    if not (math.isfinite(mean) and math.isfinite(std)):
        return None  # e.g. a one-pixel image; non-finite logits are the model's own check
    if abs(mean) < MEAN_LIMIT and STD_RANGE[0] < std < STD_RANGE[1]:
        return None
    big_stats = max(m.std) > 1.5 or max(abs(v) for v in m.mean) > 1.5
    if std <= STD_RANGE[0] and big_stats and m.scale < 0.1:
        return (
            f"mean/std look like 0-255 units while scale {m.scale:.6g} maps pixels to 0..1: "
            f"divide `model.mean` and `model.std` by 255 (ImageNet in 0-1 units: {_IMAGENET_01}) "
            "or set `model.scale: 1.0`"
        )
    if std >= STD_RANGE[1] and not big_stats and m.scale > 0.1:
        return (
            f"scale {m.scale:.6g} keeps pixels in 0..255 while mean/std look like 0-1 units: set "
            f"`model.scale: {_INV255!r}` (1/255), or give mean/std in 0-255 units (ImageNet: "
            f"{_IMAGENET_255})"
        )
    if std <= STD_RANGE[0]:
        return (
            "the input barely varies: check that `model.scale` and `model.std` are in the same "
            "units (x * scale is what mean and std apply to)"
        )
    if std >= STD_RANGE[1]:
        return (
            "the input varies too much: check `model.scale` (1/255 maps uint8 pixels to 0..1) "
            "and that `model.std` is in the units of x * scale"
        )
    return (
        "the input is far from zero: check that `model.mean` is in the units of x * scale "
        "(0-1 units with scale 1/255, 0-255 units with scale 1)"
    )


def _list_dataset(cfg: JobConfig, ds: DatasetConfig, report: PreflightReport) -> list[Sample]:
    """List a dataset as extraction will; returns its selected samples that have a label (a
    ``monitor`` set's selected samples: it has no labels)."""
    from pipeline.data import DataError, list_all_samples, select_samples
    from pipeline.data.readers import missing_labels_message

    check = DatasetCheck(ds.name)
    report.datasets.append(check)
    try:
        listed = list_all_samples(ds)
        selected = select_samples(ds, listed)
    except DataError as err:
        where = cfg.source or "the config"
        raise _fail(f"dataset {ds.name!r}: {err}; fix the dataset's paths in {where}") from err
    labelled = [s for s in selected if s.label_uri is not None]
    check.listed, check.selected, check.labelled = len(listed), len(selected), len(labelled)
    if ds.role == "monitor":
        report.lines.append(
            f"dataset {ds.name} ({ds.role}, {ds.format}): {len(listed)} images listed, "
            f"{len(selected)} selected, unlabelled (labels are not read for a monitor set)"
        )
        return selected
    report.lines.append(
        f"dataset {ds.name} ({ds.role}, {ds.format}): {len(listed)} images listed, "
        f"{len(selected)} selected, {len(labelled)} with a label"
    )
    missing = missing_labels_message(ds, selected)
    if missing is not None:
        if cfg.extract.on_error == "fail" or not labelled:
            raise _fail(missing)
        report.warnings.append(f"{missing} (extract.on_error is 'skip': they will be skipped)")
    return labelled


def _load_model(m: ModelConfig) -> SegmentationModel:
    from pipeline.models import load_model

    try:
        return load_model(m)
    except ImportError as err:
        raise _fail(f"Cannot load model {m.path} (kind {m.kind}): {err}") from err
    except FileNotFoundError as err:
        raise _fail(
            f"Cannot load model {m.path} (kind {m.kind}): {err}; fix `model.path`"
        ) from err
    except Exception as err:  # a factory or a file of the user's: any error is theirs
        raise _fail(
            f"Cannot load model {m.path} (kind {m.kind}): {type(err).__name__}: {err}"
        ) from err


def _check_channels(
    model: SegmentationModel, m: ModelConfig, batch: torch.Tensor, where: str
) -> int:
    """Run the bare network once; the output's channel count must match exactly."""
    import torch

    try:
        with torch.no_grad():
            out = model._select(model.net(model.preprocess(batch)))
    except Exception as err:
        raise _fail(
            f"Model {m.path} failed on {where}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _fail(
            f"Expected model {m.path} to output logits shaped (N, C, h, w), but got {got} on "
            f"{where}; fix: return the logits tensor, or pick it from a dict/tuple output "
            "with `model.output_index`"
        )
    channels = int(out.shape[1])
    drop = list(m.drop_channels or [])
    expected = m.num_classes + len(drop)
    if channels == expected:
        return channels
    if drop:
        raise _fail(
            f"Expected model {m.path} to output num_classes + len(drop_channels) = "
            f"{m.num_classes} + {len(drop)} = {expected} channels, but got {channels}; fix "
            f"`model.num_classes` or `model.drop_channels` in the config"
        )
    if channels > m.num_classes:
        extra = list(range(m.num_classes, channels))
        raise _fail(
            f"Expected model {m.path} to output model.num_classes = {m.num_classes} channels, "
            f"but got {channels}; fix: set `model.num_classes: {channels}` (and `class_names`) "
            f"if every channel is a class, or, if channels {extra} are e.g. a void class the "
            f"labels never use, drop them with `model.drop_channels: {extra}`"
        )
    raise _fail(
        f"Expected model {m.path} to output model.num_classes = {m.num_classes} channels, but "
        f"got {channels}; fix: set `model.num_classes: {channels}` (and `class_names`), or "
        f"check that `model.path` is the model you mean"
    )


def _scores(pred: np.ndarray, labels: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    import numpy as np

    valid = (labels != ignore) & (labels < num_classes)
    index = labels[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def _quick_metrics(confusion: np.ndarray) -> tuple[float, float, float] | None:
    """Pixel accuracy, mIoU over the classes in the labels, and the majority class's share."""
    import numpy as np

    total = confusion.sum()
    if total == 0:
        return None
    diag = np.diag(confusion).astype(np.float64)
    rows, cols = confusion.sum(1), confusion.sum(0)
    present = rows > 0
    iou = diag[present] / (rows[present] + cols[present] - diag[present])
    return float(diag.sum() / total), float(iou.mean()), float(rows.max() / total)


def preflight(
    cfg: JobConfig,
    *,
    images_per_dataset: int = IMAGES_PER_DATASET,
    echo: Callable[[str], None] | None = None,
) -> PreflightReport:
    """Check the datasets, the model and its input recipe on the driver, before any Ray work.

    Args:
        cfg: the run config.
        images_per_dataset: labelled images of each dataset run through the model and scored
            (1 for a dataset with a ``corruption``; at least 1).
        echo: called with each line as it is found (default: nothing; lines are in the
            report).

    Returns:
        The report: one line per dataset and for the model, and the warnings.

    Raises:
        PreflightError: a mistake that would fail the run (a missing folder, images without
            labels, a model that does not load or outputs the wrong channel count, bad label
            values); the one-line message names the cause, the file and the fix.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F  # noqa: N812

    from pipeline.data import DataError, load_image, load_sample

    report = PreflightReport()
    say = echo or (lambda line: None)

    def line(text: str) -> None:
        report.lines.append(text)
        say(text)

    picks = []
    for ds in cfg.datasets:
        n_lines = len(report.lines)
        labelled = _list_dataset(cfg, ds, report)
        for text in report.lines[n_lines:]:
            say(text)
        n = 1 if ds.corruption is not None else max(1, images_per_dataset)
        picks.append((ds, labelled[:n]))

    m = cfg.model
    model = _load_model(m)
    first = next(((ds, s[0]) for ds, s in picks if s), None)
    if first is None:
        where = f"a synthetic {_SYNTHETIC_SIZE[0]}x{_SYNTHETIC_SIZE[1]} image"
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, 256, (1, *_SYNTHETIC_SIZE, 3), generator=gen, dtype=torch.uint8)
    else:
        where = first[1].uri
        try:
            batch = torch.from_numpy(load_image(where))[None]
        except DataError as err:
            raise _fail(f"dataset {first[0].name!r}: {err}") from err
    report.channels = _check_channels(model, m, batch, where)
    names = m.names()
    drop = f", channels {m.drop_channels} dropped" if m.drop_channels else ""
    line(f"model {m.path} ({m.kind}): {report.channels} output channels{drop}, "
         f"{m.num_classes} classes")

    with torch.no_grad():
        x = model.preprocess(batch)
    # The std within each channel (the spread across channels is the mean's business).
    report.input_mean = float(x.mean())
    report.input_std = float(x.std(dim=(0, 2, 3)).mean())
    per_channel = [round(float(v), 3) for v in x.mean(dim=(0, 2, 3))]
    line(f"normalised input of {where}: mean {report.input_mean:.3g} (per channel "
         f"{per_channel}), std {report.input_std:.3g} (mean of the channels' std)")
    advice = recipe_advice(m, report.input_mean, report.input_std)

    cache: dict[tuple, torch.Tensor] = {}
    suspicious = False  # degenerate or near-chance predictions on an uncorrupted dataset
    for (ds, samples), check in zip(picks, report.datasets, strict=True):
        confusion = np.zeros((m.num_classes, m.num_classes), np.int64)
        pred_counts = np.zeros(m.num_classes, np.int64)
        for sample in samples:
            try:
                image, labels = load_sample(sample, ds, m.num_classes)
            except DataError as err:
                raise _fail(
                    f"dataset {ds.name!r}: {err}; fix the labels or the dataset's "
                    "`label_map`/`ignore_index`, or `model.num_classes`"
                ) from err
            key = (sample.uri, None if ds.corruption is None else ds.corruption.model_dump_json())
            if key not in cache:
                try:
                    cache[key] = model(torch.from_numpy(image)[None])
                except Exception as err:
                    raise _fail(
                        f"Model {m.path} failed on {sample.uri}: {type(err).__name__}: {err}"
                    ) from err
            logits = cache[key]
            pred = logits.argmax(1, keepdim=True).float()
            pred = F.interpolate(pred, size=labels.shape, mode="nearest")[0, 0]
            pred = pred.to(torch.int64).numpy()
            pred_counts += np.bincount(pred.ravel(), minlength=m.num_classes)
            confusion += _scores(pred, labels, m.num_classes, ds.ignore_index)
        check.scored = len(samples)
        if not samples:
            continue
        top = int(pred_counts.argmax())
        share = float(pred_counts[top] / max(1, pred_counts.sum()))
        metrics = _quick_metrics(confusion)
        label_top = int(confusion.sum(1).argmax()) if metrics else -1
        if share > DEGENERATE_SHARE and not (
            metrics and metrics[2] > DEGENERATE_SHARE and label_top == top
        ):
            report.warnings.append(
                f"dataset {ds.name!r}: the model predicts class {top} ({names[top]}) on "
                f"{share:.1%} of the pixels of {len(samples)} image(s) (e.g. {samples[0].uri}): "
                "a degenerate model; check the input recipe (scale, mean, std, channel_order), "
                "the weights and `model.output_index`"
            )
            suspicious = suspicious or ds.corruption is None
        if ds.role == "monitor":
            line(f"dataset {ds.name}: {len(samples)} unlabelled image(s) decoded and run "
                 "through the model")
            continue
        if metrics is None:
            line(f"dataset {ds.name}: no labelled pixel in the first {len(samples)} image(s)")
            continue
        acc, miou, majority = metrics
        check.pixel_accuracy, check.miou = acc, miou
        line(f"dataset {ds.name}: quick check on {len(samples)} image(s): pixel accuracy "
             f"{acc:.3f}, mIoU {miou:.3f} (majority class {majority:.3f}, chance mIoU "
             f"~{1 / m.num_classes:.3f})")
        chance_miou = CHANCE_MIOU_FACTOR / m.num_classes
        if ds.corruption is None and (
            acc < majority + CHANCE_MARGIN * (1 - majority) or miou < chance_miou
        ):
            report.warnings.append(
                f"dataset {ds.name!r}: predictions near chance on the first {len(samples)} "
                f"labelled image(s) (pixel accuracy {acc:.3f} against {majority:.3f} for always "
                f"the majority class; mIoU {miou:.3f} against {chance_miou:.3f}): check the "
                "input recipe (scale, mean, std, channel_order), that the label values mean the "
                "model's classes (`label_map`) and the weights"
            )
            suspicious = True

    if advice is not None:
        stats = (
            f"the normalised input (x * scale - mean) / std has mean {report.input_mean:.3g} "
            f"and std {report.input_std:.3g} (plausible: |mean| < {MEAN_LIMIT:g}, "
            f"{STD_RANGE[0]:g} < std < {STD_RANGE[1]:g})"
        )
        scored = any(c.pixel_accuracy is not None for c in report.datasets)
        if scored and not suspicious:
            line(f"note: {stats}, but the predictions look right, so this is likely the "
                 "model's own recipe")
        else:
            report.warnings.append(f"{stats}: {advice}")
    for text in report.warnings:
        logger.debug("preflight warning: %s", text)
    return report
