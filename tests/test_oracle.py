"""The oracle temperature: fitted on each labelled test set's own labels, a bound, never best."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_evaluate import make_run

from pipeline import evaluate, fit, oracle, sampling
from pipeline.calibrators import load
from pipeline.models import model_fingerprint
from pipeline.paths import ORACLE, RunPaths

# name, role, domain, reference, images, seed, true temperature (the logits' scale)
DATASETS = (
    ("cal", "calibration", "day", None, 6, 3, 3.0),
    ("day", "test", "day", None, 40, 1, 3.0),
    ("dusk", "test", "dusk", "day", 40, 2, 6.0),
)


@pytest.fixture(autouse=True)
def _cpu_evaluation(monkeypatch):
    monkeypatch.setattr(evaluate, "_use_gpu", lambda cfg: "false")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run with shards of two test sets and a calibration set, oracles fitted and evaluated."""
    cfg, records = make_run(tmp_path_factory.mktemp("oracle"), DATASETS,
                            evaluate_options={"bootstrap": 0})
    paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
    oracles = oracle.fit_oracles(cfg, paths)
    oracle.save_oracles(cfg, paths, oracles)
    output = evaluate.run(cfg, local=True)
    return cfg, paths, oracles, output


def test_oracle_recovers_each_test_sets_known_temperature(run):
    _, paths, oracles, _ = run
    found = {o.dataset: o.calibrator.temperature for o in oracles}
    assert set(found) == {"day", "dusk"}
    # 40 images x 192 labelled pixels (minus 3 void ones) drawn from softmax(logits / T):
    # the NLL fit recovers T to a few percent (measured: day 2.96, dusk 6.1).
    assert found["day"] == pytest.approx(3.0, rel=0.08)
    assert found["dusk"] == pytest.approx(6.0, rel=0.08)
    for name, t in found.items():
        card = json.loads((paths.oracle_dir(name) / "calibrator.json").read_text())
        assert card["name"] == "temperature"
        assert card["metrics"]["bound"] is True
        assert card["metrics"]["dataset"] == name
        assert load(paths.oracle_dir(name)).temperature == pytest.approx(t)


def test_no_oracle_for_calibration_sets(run):
    _, paths, _, _ = run
    assert sorted(p.name for p in (paths.artifacts / ORACLE).iterdir()) == ["day", "dusk"]


def test_oracle_rows_per_labelled_test_set_only(run):
    _, _, _, output = run
    summary = pd.read_csv(output / "summary.csv")
    oracle = summary[summary["calibrator"] == ORACLE]
    assert sorted(oracle["dataset"]) == ["day", "dusk"]
    assert "cal-heldout" in set(summary["dataset"])
    per_image = pd.read_parquet(output / "per_image.parquet", columns=["dataset", "calibrator"])
    assert set(per_image.loc[per_image["calibrator"] == ORACLE, "dataset"]) == {"day", "dusk"}
    # Right after uncalibrated in each set's rows.
    day = summary[summary["dataset"] == "day"]["calibrator"].tolist()
    assert day[:2] == ["uncalibrated", ORACLE]


def test_oracle_minimises_each_sets_nll(run):
    # Fitted on every labelled pixel of the set (4096 per image > 192): no temperature does
    # better on that set's NLL, the temperature fitted elsewhere included.
    _, _, _, output = run
    summary = pd.read_csv(output / "summary.csv").set_index(["dataset", "calibrator"])
    nll = summary["nll"]
    for name in ("day", "dusk"):
        assert nll[(name, ORACLE)] <= nll[(name, "temperature")] + 1e-6
        assert nll[(name, ORACLE)] < nll[(name, "uncalibrated")]


def test_oracle_is_never_best(run):
    _, _, _, output = run
    assert ORACLE not in set(pd.read_csv(output / "best.csv")["best"])
    # Even where it has the lowest image-wise ECE.
    summary = pd.DataFrame({
        "dataset": ["d"] * 3, "domain": ["fog"] * 3, "role": ["test"] * 3,
        "calibrator": ["uncalibrated", ORACLE, "temperature"], "n_images": [2] * 3,
        "n_pixels": [8] * 3, "img_ece": [0.2, 0.01, 0.1], "nll": [1.0, 0.5, 0.8],
    })
    assert evaluate.best_per_domain(summary)["best"].tolist() == ["temperature"]


def test_stale_or_missing_oracles_are_left_out(run, tmp_path, caplog):
    cfg, paths, oracles, _ = run
    assert set(sampling.oracle_artifacts(cfg, paths)) == {"day", "dusk"}
    # Saving only the day oracle removes the folder of dusk (a set no longer listed).
    copy = cfg.model_copy(update={"output": str(tmp_path / "run")})
    copy_paths = RunPaths(tmp_path / "run", paths.model_fingerprint)
    oracle.save_oracles(copy, copy_paths, oracles)
    oracle.save_oracles(copy, copy_paths, [o for o in oracles if o.dataset == "day"])
    assert sorted(p.name for p in (copy_paths.artifacts / ORACLE).iterdir()) == ["day"]
    # Shards that changed since the oracle was fitted: left out, with a warning.
    card = paths.oracle_dir("day") / "calibrator.json"
    text = card.read_text()
    try:
        card.write_text(text.replace('"data_fingerprint": "', '"data_fingerprint": "0'))
        with caplog.at_level("WARNING"):
            assert set(sampling.oracle_artifacts(cfg, paths)) == {"dusk"}
        assert "fitted on other shards" in caplog.text
    finally:
        card.write_text(text)


def test_a_calibrator_may_not_take_the_oracle_label(tmp_path):
    cfg, _ = make_run(tmp_path, DATASETS[:2], calibrators=[
        {"name": "temperature", "label": ORACLE}])
    with pytest.raises(ValueError, match=r"use a label other than 'oracle_ts'"):
        fit.run(cfg)


def test_fit_is_stale_when_a_test_sets_shards_change(run, tmp_path):
    # The oracles are fitted on the test sets' shards, so `segcal run` must redo fit when they
    # change, not only when the calibration shards do.
    import dataclasses
    import shutil

    from pipeline import stages
    from pipeline.shards import read_manifest, write_manifest

    cfg, paths, _, _ = run
    copy = cfg.model_copy(update={"output": str(tmp_path / "run")})
    shutil.copytree(cfg.output, copy.output)
    copied = RunPaths(Path(copy.output), paths.model_fingerprint)
    before = stages.stage_inputs(copy, "fit")
    assert stages.stage_inputs(copy, "fit") == before  # deterministic

    manifest = read_manifest(copied.dataset_dir("dusk"))
    write_manifest(copied.dataset_dir("dusk"),
                   dataclasses.replace(manifest, shards=manifest.shards[:-1]))
    assert stages.stage_inputs(copy, "fit") != before
