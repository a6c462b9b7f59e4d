"""The oracle temperature: a bound on what one temperature could do on each labelled test set.

Every labelled test set (role ``test``) gets a `TemperatureScaling` fitted in-process on that
set's own labelled pixels, sampled by the fit stage's rule (``fit.pixels_per_image``,
``fit.seed``), and written to ``OUTPUT/artifacts/oracle_ts/<set>/`` by `save_oracles`.
Evaluation applies it to that set only (calibrator ``oracle_ts`` in ``summary.csv``): a bound,
never a candidate for best or for promotion. Test sets whose shards are missing are skipped
with a warning; oracle folders of sets no longer configured are removed. Called by
`pipeline.fit.run` after every calibrator is fitted.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.calibrators import Calibrator, build_calibrator, save
from pipeline.config import JobConfig
from pipeline.paths import ORACLE, RunPaths
from pipeline.sampling import check_classes, concat_fit_data, fit_samples, record_key
from pipeline.shards import data_fingerprint, iter_dataset, read_manifest

__all__ = ["Oracle", "fit_oracles", "save_oracles"]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Oracle:
    """One test set's oracle temperature, ready to save."""

    dataset: str
    calibrator: Calibrator
    ignore_index: int
    fingerprint: str
    pixels: int


def fit_oracles(cfg: JobConfig, paths: RunPaths) -> list[Oracle]:
    """Fit the oracle temperature of every labelled test set on its own sampled pixels.

    Pixels are drawn by the fit stage's rule (`pipeline.sampling.fit_samples`: up to
    ``fit.pixels_per_image`` valid pixels per image, seeded by ``fit.seed`` and the image id)
    from every image of the set, and `TemperatureScaling` is fitted on them in this process.
    Sets without shards are skipped with a warning.

    Args:
        cfg: The run config (datasets of role ``test``, ``fit``).
        paths: The run's folders.

    Returns:
        One `Oracle` per test set with shards, in config order.

    Raises:
        ValueError: A test set whose shards hold another class count or no valid pixel.
    """
    oracles = []
    for ds in cfg.datasets_with_role("test"):
        directory = paths.dataset_dir(ds.name)
        try:
            manifest = read_manifest(directory)
        except FileNotFoundError:
            logger.warning("test set %r has no shards in %s: no oracle temperature for it",
                           ds.name, directory)
            continue
        if manifest.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"Expected `num_classes` in {directory / 'manifest.json'} to equal "
                f"model.num_classes={cfg.model.num_classes} from the config, but got "
                f"{manifest.num_classes}"
            )
        parts = []
        for record in iter_dataset(directory):
            check_classes(record, cfg.model.num_classes)
            points, _ = fit_samples(record, cfg.fit, manifest.ignore_index, manifest.ignore_index,
                                    held=False, pixels=True, maps=False)
            if points is not None:
                parts.append((record_key(record), points))
        data = concat_fit_data([p for _, p in sorted(parts, key=lambda p: p[0])])
        if data is None:
            raise ValueError(
                f"Expected test set {ds.name!r} ({directory}) to hold pixels not equal to "
                f"`ignore_index`={manifest.ignore_index} for its oracle temperature, but all "
                f"{manifest.n_images} images are fully ignored"
            )
        calibrator = build_calibrator("temperature", cfg.model.num_classes)
        calibrator.fit(data.logits, data.labels, seed=cfg.fit.seed)
        logger.info("%s: oracle temperature %.4f on %d pixels of %s", ORACLE,
                    calibrator.summary()["temperature"], len(data.labels), ds.name)
        oracles.append(Oracle(ds.name, calibrator, manifest.ignore_index,
                              data_fingerprint([manifest]), len(data.labels)))
    return oracles


def save_oracles(cfg: JobConfig, paths: RunPaths, oracles: Sequence[Oracle]) -> None:
    root = paths.artifacts / ORACLE
    root.mkdir(parents=True, exist_ok=True)
    for oracle in oracles:
        save(oracle.calibrator, paths.oracle_dir(oracle.dataset), class_names=cfg.model.names(),
             ignore_index=oracle.ignore_index,
             metrics={"bound": True, "dataset": oracle.dataset, "fit_pixels": oracle.pixels},
             data_fingerprint=oracle.fingerprint)
    keep = {o.dataset for o in oracles}
    for stale in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if stale.name not in keep:
            shutil.rmtree(stale)
