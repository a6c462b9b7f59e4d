"""Stage 2's plan: everything that can fail before data is read or a Train worker starts.

`plan_jobs` turns ``cfg.calibrators`` into `FitJob` records (the spec, its place in the
config, the calibration datasets it fits on and its layout), building each calibrator once so
that unknown names and bad options fail here with the config key named. `spec_options`
separates the fit-stage options (`pipeline.config.FIT_OPTIONS`: ``use_corrupted``,
``augment_corruptions``) from the calibrator's own, and `read_manifests` checks the
calibration shards' manifests against the config. Used by `pipeline.fit`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.calibrators import CALIBRATORS, build_calibrator
from pipeline.config import CalibratorSpec, DatasetConfig, JobConfig
from pipeline.paths import ORACLE, RunPaths
from pipeline.shards import Manifest, read_manifest

__all__ = ["FitJob", "plan_jobs", "read_manifests", "spec_options"]



@dataclass(frozen=True)
class FitJob:
    """One calibrator to fit: its spec, its place in the config and the datasets it uses."""

    index: int
    spec: CalibratorSpec
    datasets: tuple[str, ...]
    spatial: bool

    @property
    def label(self) -> str:
        return self.spec.key


def _fit_options(
    spec: CalibratorSpec, index: int
) -> tuple[dict[str, Any], bool, list[tuple[str, int]] | None]:
    options = dict(spec.options)
    where = f"calibrators.{index}.options"
    use_corrupted = options.pop("use_corrupted", False)
    if not isinstance(use_corrupted, bool):
        raise TypeError(f"Expected `{where}.use_corrupted` to be a bool, but got {use_corrupted!r}")
    augment = options.pop("augment_corruptions", None)
    if augment is None:
        return options, use_corrupted, None
    wanted = []
    if not isinstance(augment, list) or not augment:
        raise ValueError(
            f"Expected `{where}.augment_corruptions` to be a non-empty list of "
            f"{{kind, severity}}, but got {augment!r}"
        )
    for item in augment:
        if not isinstance(item, dict) or set(item) != {"kind", "severity"}:
            raise ValueError(
                f"Expected each of `{where}.augment_corruptions` to be {{kind, severity}}, but "
                f"got {item!r}"
            )
        wanted.append((item["kind"], item["severity"]))
    return options, True, wanted


def spec_options(
    cfg: JobConfig, spec: CalibratorSpec, index: int
) -> tuple[dict[str, Any], bool, list[tuple[str, int]] | None]:
    """The calibrator's options, ``use_corrupted`` and the wanted corruptions of a spec.

    ``fit.epochs`` becomes the default of calibrators that take an ``epochs`` option.
    """
    options, use_corrupted, wanted = _fit_options(spec, index)
    cls = CALIBRATORS.get(spec.name)
    if cls is not None and "epochs" in inspect.signature(cls.__init__).parameters:
        options = {"epochs": cfg.fit.epochs, **options}
    return options, use_corrupted, wanted


def plan_jobs(cfg: JobConfig) -> list[FitJob]:
    calibration = cfg.datasets_with_role("calibration")
    if not calibration:
        raise ValueError(
            "Expected at least one dataset with role 'calibration' in `datasets`, but got "
            f"none (datasets: {[d.name for d in cfg.datasets]})"
        )
    clean = tuple(d.name for d in calibration if d.corruption is None)
    if not clean:
        raise ValueError(
            "Expected at least one calibration dataset without `corruption`, but every one of "
            f"{[d.name for d in calibration]} is corrupted"
        )
    if not cfg.calibrators:
        raise ValueError("Expected at least one entry in `calibrators`, but got none")
    corrupted = [d for d in calibration if d.corruption is not None]
    jobs = []
    for i, spec in enumerate(cfg.calibrators):
        if spec.key == ORACLE:
            raise ValueError(
                f"Expected `calibrators.{i}` to use a label other than {ORACLE!r} (the folder of "
                f"the per-test-set oracle temperatures), but got {spec.key!r}"
            )
        options, use_corrupted, wanted = spec_options(cfg, spec, i)
        try:  # build once: unknown names and options fail here, before any data is read
            calibrator = build_calibrator(spec.name, cfg.model.num_classes, **options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"Invalid calibrator `calibrators.{i}` ({spec.key!r}): {err}") from err
        extra = _pick_corrupted(corrupted, use_corrupted, wanted, i) if use_corrupted else ()
        jobs.append(FitJob(i, spec, clean + extra, type(calibrator).spatial))
    return jobs


def _pick_corrupted(
    corrupted: Sequence[DatasetConfig], use: bool, wanted: list[tuple[str, int]] | None, i: int
) -> tuple[str, ...]:
    if not corrupted:
        raise ValueError(
            f"Expected calibration datasets with a `corruption` for `calibrators.{i}` "
            "(use_corrupted / augment_corruptions), but got none: add calibration datasets "
            "with `corruption: {kind, severity}` to the config"
        )
    if wanted is None:
        return tuple(d.name for d in corrupted)
    have = {(d.corruption.kind, d.corruption.severity) for d in corrupted if d.corruption}
    missing = [w for w in wanted if w not in have]
    if missing:
        raise ValueError(
            f"Expected a calibration dataset for each corruption in "
            f"`calibrators.{i}.options.augment_corruptions`, but none has {missing} "
            f"(available: {sorted(have)})"
        )
    return tuple(
        d.name for d in corrupted
        if d.corruption and (d.corruption.kind, d.corruption.severity) in wanted
    )


def read_manifests(cfg: JobConfig, paths: RunPaths, names: Iterable[str]) -> dict[str, Manifest]:
    manifests = {}
    for name in sorted(set(names)):
        directory = paths.dataset_dir(name)
        manifest = read_manifest(directory)
        if manifest.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"Expected `num_classes` in {directory / 'manifest.json'} to equal "
                f"model.num_classes={cfg.model.num_classes} from the config, but got "
                f"{manifest.num_classes}"
            )
        if manifest.n_images == 0:
            raise ValueError(
                f"Expected calibration dataset {name!r} ({directory}) to hold images, but its "
                "manifest lists none"
            )
        manifests[name] = manifest
    return manifests
