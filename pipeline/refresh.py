"""The nightly refresh with champion/challenger promotion.

The stages themselves, and the runner that skips current ones, are in :mod:`pipeline.stages`.

:func:`refresh` (``segcal refresh``) runs the stages, then re-evaluates the champion's
calibrators on the same shards (so both are measured on today's data), compares by image-wise
ECE (:func:`pipeline.registry.compare`), stores the challenger in the registry and promotes it
only when it is no worse within ``cfg.refresh.tolerance``. Everything after the lock is taken
is recorded in ``history.jsonl``; a failure leaves ``current`` as it was.

Monitoring without labels. When evaluate wrote ``OUTPUT/label_free.csv`` (monitor and test
sets), the night's entry also keeps, per set, the drift score, its threshold and alarm, and the
label-free estimates (ATC and DoC pixel accuracy, image-wise ECE; the truth where labels exist)
of the current run's calibrator (:func:`run_calibrator`) on today's data. A drift alarm does
not change the decision: the refresh promotes or keeps as usual, and ``segcal refresh`` then
exits with code 4 (``--no-drift-exit``: 0). Oracle bounds are never compared nor chosen;
target-adapted calibrators only with ``allow_adaptive`` (``segcal refresh --allow-adaptive``).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import registry, stages
from pipeline.paths import (
    CARD,
    LABEL_FREE,
    SUMMARY,
)

if TYPE_CHECKING:
    from pipeline.config import JobConfig

logger = logging.getLogger(__name__)

CHAMPION_EVAL = "champion_eval"
ESTIMATES = ("est_pixel_acc", "est_pixel_acc_doc", "est_img_ece", "true_pixel_acc", "true_img_ece")
"""The label-free estimates (and their truth) of one calibrator that ``history.jsonl`` keeps."""


def _source_changes(cfg: JobConfig) -> dict[str, dict[str, int]]:
    """Per dataset, what the last extraction did: images added, changed at the source, removed."""
    from pipeline.models import model_fingerprint
    from pipeline.paths import RunPaths
    from pipeline.shards import read_manifest

    try:
        paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
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


# --- label-free monitoring --------------------------------------------------------------------


def run_calibrator(
    summary: pd.DataFrame, *, allow_adaptive: bool = False, adapted: Collection[str] | None = None
) -> str | None:
    """The calibrator a run ships: the lowest image-wise ECE on its held-out calibration images.

    The same ranking as the report's recommendation (:func:`pipeline.report_data.recommend`:
    held-out rows only, image-wise ECE pooled over images, ties by NLL), without its
    clear-winner test: a nightly record needs one name, and when no calibrator is clearly
    better the leader is as good as any. ``uncalibrated`` can win (the model is kept as it
    is); oracle bounds never; target-adapted calibrators only with ``allow_adaptive``.

    Args:
        summary: the run's ``summary.csv``.
        allow_adaptive: let a target-adapted calibrator be chosen.
        adapted: the run's target-adapted labels (`pipeline.registry.adapted_labels`); None:
            those named after an adapted class.

    Returns:
        The calibrator label, or None when the summary has no held-out rows (or not the
        columns ``dataset, role, calibrator, n_images, img_ece, nll``).

    Example:
        >>> s = pd.DataFrame({"dataset": ["cal-heldout"] * 3, "role": ["calibration"] * 3,
        ...     "calibrator": ["uncalibrated", "temperature", "adaptive_ts"],
        ...     "n_images": [20] * 3, "img_ece": [0.10, 0.04, 0.03], "nll": [0.5, 0.4, 0.4]})
        >>> run_calibrator(s), run_calibrator(s, allow_adaptive=True)
        ('temperature', 'adaptive_ts')
    """
    needed = {"dataset", "role", "calibrator", "n_images", "img_ece", "nll"}
    if not needed <= set(summary.columns):
        return None
    held = (summary["role"] == "calibration") | summary["dataset"].astype(str).str.endswith(
        "-heldout"
    )
    rows = summary[held & summary["img_ece"].notna()]
    adapted = registry.adapted_labels() if adapted is None else adapted
    allowed = rows["calibrator"].astype(str).map(
        lambda c: c == registry.UNCALIBRATED
        or registry.is_candidate(c, allow_adaptive=allow_adaptive, adapted=adapted)
    ).astype(bool)
    rows = rows[allowed]
    if rows.empty:
        return None
    pooled = rows.groupby("calibrator", sort=False).apply(
        lambda g: pd.Series({
            "img_ece": np.average(g["img_ece"], weights=g["n_images"]),
            "nll": np.average(g["nll"], weights=g["n_images"]),
        }),
        include_groups=False,
    )
    return str(pooled.sort_values(["img_ece", "nll"], kind="stable").index[0])


def _number(value: Any) -> float | None:
    # JSON has no NaN: a value that was not measured is null.
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _flag(value: Any) -> bool | None:
    # pandas reads a bool column back as bool, but as object (True/False/NaN) when some rows
    # have no value.
    if isinstance(value, str):
        text = value.strip().lower()
        return True if text == "true" else False if text == "false" else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value)


def read_label_free(path: Path) -> pd.DataFrame:
    """A ``label_free.csv``, checked to have the columns the refresh reads.

    Raises:
        ValueError: a needed column is missing (the message names the file).
    """
    table = pd.read_csv(path)
    needed = ["dataset", "calibrator", "drift_score", "drift_threshold", "drift_alarm", *ESTIMATES]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise ValueError(f"Expected {path} to have columns {needed}, but it lacks {missing}")
    return table


def label_free_record(
    table: pd.DataFrame, calibrator: str | None, *, estimates: bool = True
) -> dict[str, Any]:
    """What ``history.jsonl`` keeps of a run's ``label_free.csv``.

    Args:
        table: the ``label_free.csv`` rows (one per set and calibrator).
        calibrator: the calibrator whose estimates are kept (None: none).
        estimates: False keeps the drift only (the estimates in ``table`` are of another run's
            calibrators).

    Returns:
        ``{"calibrator", "alarms", "sets"}``: ``alarms`` names the sets whose drift alarm
        fired; ``sets`` holds one dict per set with ``dataset, domain, role, n_images,
        drift_score, drift_threshold, drift_alarm`` and the calibrator's :data:`ESTIMATES`
        (null where not measured: a monitor set has no truth).
    """
    sets = []
    for dataset, rows in table.groupby("dataset", sort=False):
        # Drift is measured on the uncalibrated logits: the same on every row of the set.
        first = rows.iloc[0]
        item: dict[str, Any] = {"dataset": str(dataset)}
        for key in ("domain", "role"):
            item[key] = None if pd.isna(first.get(key)) else str(first.get(key))
        n_images = _number(first.get("n_images"))
        item["n_images"] = None if n_images is None else int(n_images)
        item["drift_score"] = _number(first["drift_score"])
        item["drift_threshold"] = _number(first["drift_threshold"])
        item["drift_alarm"] = _flag(first["drift_alarm"])
        mine = rows[rows["calibrator"] == calibrator] if estimates else rows.iloc[:0]
        for key in ESTIMATES:
            item[key] = _number(mine[key].iloc[0]) if len(mine) else None
        sets.append(item)
    return {
        "calibrator": calibrator if estimates else None,
        "alarms": [s["dataset"] for s in sets if s["drift_alarm"]],
        "sets": sets,
    }


def _label_free_entry(
    cfg: JobConfig,
    root: Path,
    *,
    promote: bool,
    champion: str | None,
    champion_evaluated: bool,
    allow_adaptive: bool,
    adapted: Collection[str],
) -> dict[str, Any] | None:
    """The night's label-free record for the run that is current after the decision."""
    output = Path(cfg.output)
    today = output / LABEL_FREE
    if not today.is_file():
        return None  # no monitor or test set, or a run from before label-free monitoring
    if promote or champion is None:
        summary = pd.read_csv(output / SUMMARY)
    else:
        summary = registry.read_summary(root, champion)
    calibrator = run_calibrator(summary, allow_adaptive=allow_adaptive, adapted=adapted)
    champion_today = output / CHAMPION_EVAL / LABEL_FREE
    if promote or not champion_evaluated:
        # Promoted, or kept because today's artifacts are the champion's own: today's table.
        record = label_free_record(read_label_free(today), calibrator)
        source = str(today)
    elif champion_today.is_file():
        record = label_free_record(read_label_free(champion_today), calibrator)
        source = str(champion_today)
    else:
        # The champion was not re-evaluated (no calibrator in common): the drift is the
        # model's, but today's estimates belong to the challenger's calibrators.
        record = label_free_record(read_label_free(today), calibrator, estimates=False)
        source = str(today)
    return {**record, "source": source}


def refresh(
    cfg: JobConfig,
    root: str | Path,
    *,
    call: Callable[[JobConfig, str], Any] | None = None,
    allow_adaptive: bool = False,
) -> dict[str, Any]:
    """The nightly refresh: extract what is new, refit, evaluate, compare, maybe promote.

    With a ``label_free.csv`` in the run folder (monitor or test sets), the entry also holds
    ``label_free`` (see :func:`label_free_record`: per set the drift score, threshold and
    alarm, and the estimates of the current run's calibrator on today's data) and
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
            label_free = _label_free_entry(
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
