"""The pipeline's stages as records, and the runner that skips the current ones.

Every command that runs stages (``segcal run``, ``segcal refresh``, ``segcal extract|fit|
evaluate|report``) goes through :func:`run_stages`. A `Stage` names what a stage reads (a
digest of its inputs), whether its outputs exist, and how it runs. The rule, kept deliberately
simple:

- extract always runs: it is incremental by itself (images already in a manifest with the same
  model fingerprint are skipped), so a rerun only extracts what is new.
- fit, evaluate and report leave a stamp ``OUTPUT/.stages/<stage>.json`` holding a digest of their
  inputs: the config hash plus, for fit, the calibration and test shards (names and sha256 from
  the manifests; the test sets' oracle temperatures are fitted on theirs); for evaluate, every
  dataset's shards and the artifacts' bytes; for report, the tables evaluate wrote. A stage is
  skipped when its stamp matches and its outputs exist. Any config change therefore reruns fit,
  evaluate and report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import registry
from pipeline.paths import (
    BEST,
    CARD,
    DOMAIN_SHIFT,
    LABEL_FREE,
    PER_IMAGE,
    REPORT_HTML,
    SUMMARY,
    atomic_write_json,
)

if TYPE_CHECKING:
    from pipeline.config import JobConfig

logger = logging.getLogger(__name__)

STAMPS = ".stages"
EVAL_TABLES = (PER_IMAGE, SUMMARY, DOMAIN_SHIFT, BEST, LABEL_FREE)
"""What evaluate writes and report reads."""


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
        name: Its name (a ``segcal`` subcommand).
        run: Runs it in this process (imports lazily: stages pull in Ray and torch).
        inputs: What it reads, as JSON-able data for the digest; None for a stage that always
            runs (extract).
        outputs_exist: Whether the files it writes are there.
    """

    name: str
    run: Callable[[JobConfig], Any]
    inputs: Callable[[JobConfig], Any] | None
    outputs_exist: Callable[[JobConfig], bool]


def _extract(cfg: JobConfig) -> Any:
    from pipeline import extract

    return extract.run(cfg)


def _fit(cfg: JobConfig) -> Any:
    from pipeline import fit

    return fit.run(cfg)


def _evaluate(cfg: JobConfig) -> Any:
    from pipeline import evaluate

    return evaluate.run(cfg)


def _report(cfg: JobConfig) -> Any:
    from pipeline import report
    from pipeline.storage import check_local

    check_local(cfg)
    return report.write(cfg)


def _run_paths(cfg: JobConfig):  # -> RunPaths
    from pipeline.models import model_fingerprint
    from pipeline.paths import RunPaths

    return RunPaths.for_run(cfg, model_fingerprint(cfg.model))


def _shards_digest(cfg: JobConfig, role: str | None) -> list[Any]:
    from pipeline.shards import MANIFEST_NAME, read_manifest

    datasets = [ds for ds in cfg.datasets if role is None or ds.role == role]
    paths = _run_paths(cfg) if datasets else None
    out: list[Any] = []
    for ds in datasets:
        folder = paths.dataset_dir(ds.name)
        if not (folder / MANIFEST_NAME).is_file():
            out.append([ds.name, None])
            continue
        manifest = read_manifest(folder)
        # Shard names and checksums, not the manifest bytes: a rerun that extracts nothing new
        # rewrites the manifest (new timestamp) without changing what fit or evaluate read.
        out.append(
            [ds.name, manifest.model_fingerprint, [[s.file, s.sha256] for s in manifest.shards],
             sorted(manifest.image_ids())]
        )
    return out


def _file_digest(paths: Sequence[Path]) -> list[Any]:
    return [
        [p.name, hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None] for p in paths
    ]


def _fit_inputs(cfg: JobConfig) -> Any:
    # The calibrators fit on the calibration shards, the oracle_ts bounds on the test sets'.
    return [_shards_digest(cfg, "calibration"), _shards_digest(cfg, "test")]


def _evaluate_inputs(cfg: JobConfig) -> Any:
    return [_shards_digest(cfg, None), registry.artifact_digest(Path(cfg.output))]


def _report_inputs(cfg: JobConfig) -> Any:
    return _file_digest([Path(cfg.output) / name for name in EVAL_TABLES])


def _artifacts_exist(cfg: JobConfig) -> bool:
    artifacts = Path(cfg.output) / "artifacts"
    return all((artifacts / s.key / CARD).is_file() for s in cfg.calibrators)


RECORDS: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("extract", _extract, None, lambda cfg: False),
        Stage("fit", _fit, _fit_inputs, _artifacts_exist),
        Stage("evaluate", _evaluate, _evaluate_inputs,
              lambda cfg: (Path(cfg.output) / SUMMARY).is_file()),
        Stage("report", _report, _report_inputs,
              lambda cfg: (Path(cfg.output) / REPORT_HTML).is_file()),
    )
}
"""The stages, in the order they run."""

STAGES = tuple(RECORDS)


def _record(stage: str) -> Stage:
    if stage not in RECORDS:
        raise ValueError(f"Expected `stage` to be one of {list(STAGES)}, but got {stage!r}")
    return RECORDS[stage]


def call_stage(cfg: JobConfig, stage: str) -> Any:
    """Run one stage of ``cfg`` in this process.

    Raises:
        ValueError: an unknown stage name.
    """
    return _record(stage).run(cfg)


def stage_inputs(cfg: JobConfig, stage: str) -> str | None:
    """Digest of what ``stage`` reads, or None for a stage that always runs (extract)."""
    from pipeline.config import config_hash

    inputs = _record(stage).inputs
    if inputs is None:
        return None
    blob = json.dumps([config_hash(cfg), inputs(cfg)], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _stamp_path(cfg: JobConfig, stage: str) -> Path:
    return Path(cfg.output) / STAMPS / f"{stage}.json"


def is_current(cfg: JobConfig, stage: str) -> bool:
    """Whether ``stage``'s outputs exist and were made from its current inputs."""
    digest = stage_inputs(cfg, stage)
    if digest is None or not _record(stage).outputs_exist(cfg):
        return False
    try:
        stamp = json.loads(_stamp_path(cfg, stage).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("inputs") == digest


def run_stages(
    cfg: JobConfig,
    stages: Sequence[str] = STAGES,
    *,
    force: bool = False,
    call: Callable[[JobConfig, str], Any] | None = None,
) -> dict[str, bool]:
    """Run ``stages`` in order, skipping those whose outputs are current.

    Args:
        cfg: the run config.
        stages: stage names, a subsequence of :data:`STAGES`.
        force: run every stage even when current.
        call: runs one stage (default :func:`call_stage`: import and call ``pipeline.<stage>``).

    Returns:
        Stage name -> whether it ran (False: skipped as current).

    Raises:
        ValueError: an unknown stage name.
        OutputLockedError: another run is writing ``cfg.output``.
        Exception: whatever a stage raises; later stages do not run and its stamp is removed.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"Expected stages from {list(STAGES)}, but got {unknown}")
    call = call or call_stage
    from pipeline.config import write_resolved_config
    from pipeline.paths import output_lock
    from pipeline.storage import check_local

    check_local(cfg)
    with output_lock(cfg.output):
        # What produced the outputs, beside them, before any stage writes.
        write_resolved_config(cfg)
        return _run_locked(cfg, stages, force, call)


def _run_locked(
    cfg: JobConfig, stages: Sequence[str], force: bool, call: Callable[[JobConfig, str], Any]
) -> dict[str, bool]:
    ran: dict[str, bool] = {}
    for stage in stages:
        if not force and is_current(cfg, stage):
            logger.info("%s: current, skipped", stage)
            ran[stage] = False
            continue
        stamp = _stamp_path(cfg, stage)
        stamp.unlink(missing_ok=True)
        logger.info("%s: running", stage)
        call(cfg, stage)
        digest = stage_inputs(cfg, stage)
        if digest is not None:
            atomic_write_json(stamp, {"inputs": digest})
        ran[stage] = True
    return ran
