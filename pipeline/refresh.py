"""The nightly refresh with champion/challenger promotion.

The stages themselves, and the runner that skips current ones, are in :mod:`pipeline.stages`.

:func:`refresh` (``segcal refresh``) runs the stages, then re-evaluates the champion's
calibrators on the same shards (so both are measured on today's data), compares by image-wise
ECE (:func:`pipeline.registry.compare`), stores the challenger in the registry and promotes it
only when it is no worse within ``cfg.refresh.tolerance``. Everything after the lock is taken
is recorded in ``history.jsonl``; a failure leaves ``current`` as it was.

Monitoring without labels. When evaluate wrote ``OUTPUT/label_free.csv`` (monitor and test
sets), the night's entry also keeps the drift and label-free estimates of the current run's
calibrator on today's data (:mod:`pipeline.refresh_label_free`). A drift alarm does not change
the decision: the refresh promotes or keeps as usual, and ``segcal refresh`` then
exits with code 4 (``--no-drift-exit``: 0). Oracle bounds are never compared nor chosen;
target-adapted calibrators only with ``allow_adaptive`` (``segcal refresh --allow-adaptive``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline import registry, stages
from pipeline.paths import CARD, CHAMPION_EVAL, SUMMARY
from pipeline.refresh_label_free import label_free_entry

if TYPE_CHECKING:
    from pipeline.config import JobConfig

logger = logging.getLogger(__name__)


def _source_changes(cfg: JobConfig) -> dict[str, dict[str, int]]:
    """Per dataset, what the last extraction did: images added, changed at the source, removed."""
    from pipeline.models import model_fingerprint
    from pipeline.paths import RunPaths
    from pipeline.shards import read_manifest

    try:
        paths = RunPaths.for_run(cfg, model_fingerprint(cfg.model))
    except (OSError, ValueError):  # a stubbed stage in tests, with no model file
        return {}
    out: dict[str, dict[str, int]] = {}
    for ds in cfg.datasets:
        try:
            out[ds.name] = read_manifest(paths.dataset_dir(ds.name)).changes
        except (FileNotFoundError, ValueError):  # a stubbed stage in tests wrote no manifest
            out[ds.name] = {}
    return out


# --- refresh -----------------------------------------------------------------------------------


def _card_name(artifact: Path) -> str | None:
    # The registry name in an artifact's card (calibrator.json), None when there is no card.
    try:
        return json.loads((artifact / CARD).read_text()).get("name")
    except (OSError, ValueError):
        return None


def champion_summary(
    cfg: JobConfig,
    champion_dir: Path,
    *,
    call: Callable[[JobConfig, str], Any] | None = None,
) -> pd.DataFrame:
    """Evaluate the champion's calibrators on the challenger's shards.

    The champion's artifacts are copied next to a link to this run's shards in
    ``OUTPUT/champion_eval``, and evaluate runs there for the calibrators both runs have
    (same label and registry name; no bootstrap: the decision reads only image-wise ECE).
    Both runs are then measured on the same images, the held-out split included (it depends
    only on the image ids and ``fit.seed``); as the calibration set grows, a few images the
    champion was fitted on can fall into today's held-out part, which can only favour the
    champion.

    Returns:
        The champion's summary table on today's data (may hold only ``uncalibrated`` rows when
        the runs share no calibrator).
    """
    scratch = Path(cfg.output) / CHAMPION_EVAL
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "shards").symlink_to(Path(cfg.output).resolve() / "shards")
    shutil.copytree(champion_dir / registry.ARTIFACTS, scratch / registry.ARTIFACTS)
    shared = [
        s for s in cfg.calibrators if _card_name(scratch / registry.ARTIFACTS / s.key) == s.name
    ]
    if not shared:
        return pd.DataFrame(columns=[*registry.KEY_COLUMNS, registry.METRIC])
    champ_cfg = cfg.model_copy(
        update={
            "output": str(scratch),
            "calibrators": shared,
            "evaluate": cfg.evaluate.model_copy(update={"bootstrap": 0}),
        }
    )
    (call or stages.call_stage)(champ_cfg, "evaluate")
    return pd.read_csv(scratch / SUMMARY)


def refresh(
    cfg: JobConfig,
    root: str | Path,
    *,
    call: Callable[[JobConfig, str], Any] | None = None,
    allow_adaptive: bool = False,
) -> dict[str, Any]:
    """The nightly refresh: extract what is new, refit, evaluate, compare, maybe promote.

    With a ``label_free.csv`` in the run folder (monitor or test sets), the entry also holds
    ``label_free`` (see :func:`pipeline.refresh_label_free.label_free_record`: per set the
    drift score, threshold and alarm, and the estimates of the current run's calibrator on
    today's data) and
    ``drift_alarm`` (whether any set's alarm fired). A drift alarm never changes the decision;
    ``segcal refresh`` turns it into exit code 4.

    Args:
        cfg: the run config; ``cfg.refresh.tolerance`` bounds how much worse a row may be.
        root: the registry folder.
        call: runs one stage (see :func:`run_stages`).
        allow_adaptive: let the target-adapted calibrators (adaptive temperatures) count in the
            decision and be the run's calibrator; by default they are stored with the run but
            neither promote it nor hold it back.

    Returns:
        The history entry recorded for this decision (``decision`` is ``promoted`` or ``kept``).

    Raises:
        RegistryError: the registry is locked or its ``current`` is broken (nothing recorded).
        Exception: a stage failed; recorded as ``failed`` in the history, ``current`` unchanged.
    """
    from pipeline.config import config_hash

    with registry.lock(root) as root:
        champion = registry.current(root)
        entry: dict[str, Any] = {
            "action": "refresh",
            "config_hash": config_hash(cfg),
            "output": str(cfg.output),
            "champion": champion,
            "tolerance": cfg.refresh.tolerance,
            "allow_adaptive": allow_adaptive,
        }
        try:
            ran = stages.run_stages(cfg, call=call)
            entry["stages_ran"] = [s for s, r in ran.items() if r]
            entry["sources"] = _source_changes(cfg)
            # Which labels adapt to the target images, from both runs' artifact cards.
            adapted = registry.adapted_labels(
                cfg.output, *([registry.run_dir(root, champion)] if champion else [])
            )
            # The same artifacts as a stored run (nothing new since) are not stored twice.
            challenger = registry.find_run(root, registry.artifact_digest(cfg.output))
            entry["challenger"] = challenger
            champion_evaluated = False
            if challenger is not None and challenger == champion:
                decision = registry.Decision(
                    False,
                    "challenger artifacts are identical to the champion's (no change)",
                    cfg.refresh.tolerance,
                )
            else:
                summary = pd.read_csv(Path(cfg.output) / SUMMARY)
                champ = (
                    None
                    if champion is None
                    else champion_summary(cfg, registry.run_dir(root, champion), call=call)
                )
                champion_evaluated = champion is not None
                decision = registry.compare(
                    summary, champ, tolerance=cfg.refresh.tolerance,
                    allow_adaptive=allow_adaptive, adapted=adapted,
                )
                if challenger is None:
                    meta = {"config_hash": entry["config_hash"], "config": str(cfg.source)}
                    challenger = registry.add_run(root, cfg.output, meta)
                    entry["challenger"] = challenger
            # Read before `current` moves: a table that cannot be read fails the refresh
            # with nothing switched.
            label_free = label_free_entry(
                cfg, root, promote=decision.promote, champion=champion,
                champion_evaluated=champion_evaluated, allow_adaptive=allow_adaptive,
                adapted=adapted,
            )
            if label_free is not None:
                entry["label_free"] = label_free
                entry["drift_alarm"] = bool(label_free["alarms"])
            if decision.promote:
                registry.switch(root, challenger)
        except Exception as err:
            registry.record(
                root, {**entry, "decision": "failed", "reason": f"{type(err).__name__}: {err}"}
            )
            raise
        result = decision.to_dict()
        return registry.record(
            root,
            {
                **entry,
                "decision": "promoted" if decision.promote else "kept",
                "current": registry.current(root),
                "reason": result["reason"],
                "comparisons": result["comparisons"],
            },
        )
