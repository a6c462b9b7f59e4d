"""The nightly refresh with label-free monitoring: drift alarms and estimates in the history,
exit code 4, the run's calibrator (oracle bounds never, adaptive ones only when allowed), and
``segcal status`` showing the last night's check.

Stages are fakes: fit writes each calibrator's image-wise ECE into its card; evaluate writes a
``summary.csv`` (held-out and test rows) and a ``label_free.csv`` in the contract's columns
whose estimates are read back from the cards, so the champion's re-evaluation is told apart
from the challenger's by its numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import cli, refresh_label_free, registry, report_history
from pipeline import refresh as refresh_mod
from pipeline import stages as stages_mod
from pipeline.config import parse_config
from pipeline.refresh import refresh
from pipeline.refresh_label_free import label_free_record, read_label_free, run_calibrator

LABEL_FREE_COLUMNS = (
    "dataset", "domain", "reference", "role", "calibrator", "n_images", "drift_score",
    "drift_threshold", "drift_alarm", "est_pixel_acc", "est_pixel_acc_doc", "est_img_ece",
    "true_pixel_acc", "true_img_ece",
)
SETS = (("dusk", "test", 0.80), ("night-cam", "monitor", 0.62))  # name, role, true pixel acc


class LabelFreeStages:
    """fit: ``ece[label]`` into each card; evaluate: summary + label_free.csv from the cards.

    ``alarm`` names the sets whose drift alarm fires; ``write_label_free`` False leaves the
    table out (a run without monitor or test sets).
    """

    def __init__(self, ece: dict[str, float], alarm: tuple[str, ...] = ()):
        self.ece = ece
        self.alarm = set(alarm)
        self.write_label_free = True
        self.calls: list[tuple[str, str]] = []
        self.fail: str | None = None

    def __call__(self, cfg, stage):
        out = Path(cfg.output)
        self.calls.append((out.name, stage))
        if stage == self.fail:
            raise RuntimeError(f"{stage} exploded")
        if stage == "fit":
            for spec in cfg.calibrators:
                d = out / "artifacts" / spec.key
                d.mkdir(parents=True, exist_ok=True)
                card = {"name": spec.name, "ece": self.ece[spec.key]}
                (d / "calibrator.json").write_text(json.dumps(card))
        elif stage == "evaluate":
            cards = {s.key: json.loads((out / "artifacts" / s.key / "calibrator.json").read_text())
                     for s in cfg.calibrators}
            ece = {"uncalibrated": 0.2, **{k: c["ece"] for k, c in cards.items()}}
            rows = []
            for dataset, role, offset in (("cal-heldout", "calibration", 0.0),
                                          ("dusk", "test", 0.01)):
                rows += [{"dataset": dataset, "domain": "day", "role": role, "calibrator": c,
                          "n_images": 20, "img_ece": v + offset, "nll": 0.5}
                         for c, v in ece.items()]
            pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
            if self.write_label_free:
                lf = []
                for dataset, role, acc in SETS:
                    labelled = role == "test"
                    lf += [{
                        "dataset": dataset, "domain": dataset, "reference": None, "role": role,
                        "calibrator": c, "n_images": 7, "drift_score": 0.3,
                        "drift_threshold": 0.25 if dataset in self.alarm else 0.5,
                        "drift_alarm": dataset in self.alarm, "est_pixel_acc": acc - 0.02,
                        "est_pixel_acc_doc": acc + 0.01, "est_img_ece": v + 0.001,
                        "true_pixel_acc": acc if labelled else math.nan,
                        "true_img_ece": v + 0.01 if labelled else math.nan,
                    } for c, v in ece.items()]
                pd.DataFrame(lf, columns=LABEL_FREE_COLUMNS).to_csv(out / "label_free.csv",
                                                                    index=False)
        elif stage == "report":
            (out / "report.html").write_text("<html></html>")


def _cfg(tmp_path, seed=0, calibrators=("temperature", "selective")):
    return parse_config({
        "output": str(tmp_path / "out"),
        "model": {"kind": "python", "path": "tests.fake:model", "num_classes": 3},
        "datasets": [],
        "calibrators": [{"name": c} for c in calibrators],
        "fit": {"seed": seed},
    })


# --- the run's calibrator ----------------------------------------------------------------------


def _heldout(values: dict[str, float], dataset: str = "cal-heldout") -> pd.DataFrame:
    return pd.DataFrame({"dataset": dataset, "role": "calibration", "calibrator": list(values),
                         "n_images": 10, "img_ece": list(values.values()), "nll": 0.5})


def test_run_calibrator_never_picks_a_bound_and_adaptive_only_when_allowed():
    summary = _heldout({"uncalibrated": 0.1, "oracle_ts": 0.001, "adaptive_ts_gated": 0.02,
                        "temperature": 0.03, "selective": 0.04})
    assert run_calibrator(summary) == "temperature"
    assert run_calibrator(summary, allow_adaptive=True) == "adaptive_ts_gated"


def test_run_calibrator_pools_heldout_sets_by_images_and_ignores_test_rows():
    a = _heldout({"temperature": 0.05, "selective": 0.01}, "a-heldout").assign(n_images=1)
    b = _heldout({"temperature": 0.02, "selective": 0.03}, "b-heldout").assign(n_images=9)
    test = _heldout({"temperature": 0.9, "selective": 0.0}, "fog").assign(role="test")
    # temperature: (0.05 + 9 * 0.02) / 10 = 0.023; selective: (0.01 + 9 * 0.03) / 10 = 0.028.
    assert run_calibrator(pd.concat([a, b, test])) == "temperature"


def test_run_calibrator_can_keep_the_model_and_needs_heldout_rows():
    assert run_calibrator(_heldout({"uncalibrated": 0.01, "temperature": 0.03})) == "uncalibrated"
    assert run_calibrator(_heldout({"temperature": 0.03}).assign(role="test",
                                                                 dataset="fog")) is None
    assert run_calibrator(pd.DataFrame({"dataset": ["a"], "calibrator": ["t"],
                                        "img_ece": [0.1]})) is None  # a summary without roles


# --- the history record ------------------------------------------------------------------------


def test_label_free_record_round_trips_the_csv(tmp_path):
    rows = pd.DataFrame([
        {"dataset": "fog-3", "domain": "fog-3", "reference": "day", "role": "test",
         "calibrator": c, "n_images": 5, "drift_score": 0.7, "drift_threshold": 0.2,
         "drift_alarm": True, "est_pixel_acc": 0.71 + i, "est_pixel_acc_doc": 0.7,
         "est_img_ece": 0.05, "true_pixel_acc": 0.74, "true_img_ece": 0.06}
        for i, c in enumerate(("uncalibrated", "temperature"))
    ] + [
        # An alarm that could not be decided (NaN) makes the column object-typed on reading.
        {"dataset": "cam-2", "domain": "cam-2", "reference": None, "role": "monitor",
         "calibrator": "temperature", "n_images": 3, "drift_score": math.nan,
         "drift_threshold": 0.2, "drift_alarm": None, "est_pixel_acc": 0.6,
         "est_pixel_acc_doc": 0.61, "est_img_ece": 0.07, "true_pixel_acc": math.nan,
         "true_img_ece": math.nan},
    ], columns=LABEL_FREE_COLUMNS)
    rows.to_csv(tmp_path / "label_free.csv", index=False)
    record = label_free_record(read_label_free(tmp_path / "label_free.csv"), "temperature")
    assert record["calibrator"] == "temperature"
    assert record["alarms"] == ["fog-3"]
    fog, cam = record["sets"]
    assert fog == {"dataset": "fog-3", "domain": "fog-3", "role": "test", "n_images": 5,
                   "drift_score": 0.7, "drift_threshold": 0.2, "drift_alarm": True,
                   "est_pixel_acc": pytest.approx(1.71), "est_pixel_acc_doc": 0.7,
                   "est_img_ece": 0.05, "true_pixel_acc": 0.74, "true_img_ece": 0.06}
    assert cam["drift_alarm"] is None
    assert cam["drift_score"] is None
    assert cam["true_pixel_acc"] is None
    assert cam["true_img_ece"] is None
    json.dumps(record, allow_nan=False)  # valid JSON: no NaN anywhere

    drift_only = label_free_record(read_label_free(tmp_path / "label_free.csv"), "temperature",
                                   estimates=False)
    assert drift_only["calibrator"] is None
    assert drift_only["alarms"] == ["fog-3"]
    assert all(s["est_img_ece"] is None for s in drift_only["sets"])


def test_a_label_free_table_without_its_columns_is_named(tmp_path):
    pd.DataFrame({"dataset": ["a"], "calibrator": ["t"]}).to_csv(tmp_path / "lf.csv", index=False)
    with pytest.raises(ValueError, match=r"Expected .*lf.csv to have columns .* lacks "
                                         r"\['drift_score'"):
        read_label_free(tmp_path / "lf.csv")


# --- refresh -----------------------------------------------------------------------------------


def test_refresh_records_drift_and_the_promoted_calibrators_estimates(tmp_path):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04}, alarm=("night-cam",))
    entry = refresh(_cfg(tmp_path), root, call=stages)
    assert entry["decision"] == "promoted"  # the alarm does not change the decision
    assert registry.current(root) == entry["challenger"]
    assert entry["drift_alarm"] is True
    record = entry["label_free"]
    assert record["calibrator"] == "selective"  # lowest held-out image-wise ECE
    assert record["alarms"] == ["night-cam"]
    assert record["source"] == str(tmp_path / "out" / "label_free.csv")
    dusk, night = record["sets"]
    assert (dusk["role"], night["role"]) == ("test", "monitor")
    assert dusk["est_img_ece"] == pytest.approx(0.041)
    assert dusk["true_img_ece"] == pytest.approx(0.05)
    assert (dusk["est_pixel_acc"], dusk["true_pixel_acc"]) == (pytest.approx(0.78), 0.80)
    assert night["true_pixel_acc"] is None
    assert night["est_pixel_acc"] == pytest.approx(0.60)
    assert registry.history(root)[-1]["label_free"] == record
    # The run's copy in the registry keeps its table.
    assert (root / "runs" / entry["challenger"] / "label_free.csv").is_file()


def test_a_kept_champion_reports_its_own_estimates_on_todays_data(tmp_path):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04})
    champion = refresh(_cfg(tmp_path), root, call=stages)["challenger"]
    stages.ece = {"temperature": 0.09, "selective": 0.08}  # worse: kept
    entry = refresh(_cfg(tmp_path, seed=1), root, call=stages)
    assert entry["decision"] == "kept"
    assert registry.current(root) == champion
    record = entry["label_free"]
    assert entry["drift_alarm"] is False
    assert record["alarms"] == []
    assert record["source"] == str(tmp_path / "out" / "champion_eval" / "label_free.csv")
    assert record["calibrator"] == "selective"
    # The champion's selective (0.04), measured on today's shards, not the challenger's (0.08).
    assert record["sets"][0]["est_img_ece"] == pytest.approx(0.041)


def test_kept_without_a_shared_calibrator_records_the_drift_only(tmp_path):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04, "vector": 0.03},
                             alarm=("dusk",))
    refresh(_cfg(tmp_path), root, call=stages)
    entry = refresh(_cfg(tmp_path, calibrators=("vector",)), root, call=stages)
    assert entry["decision"] == "kept"  # nothing in common with the champion
    record = entry["label_free"]
    assert record["calibrator"] is None
    assert record["alarms"] == ["dusk"]
    assert all(s["est_img_ece"] is None for s in record["sets"])


def test_identical_rerun_reads_todays_table_not_a_stale_champion_eval(tmp_path):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04})
    refresh(_cfg(tmp_path), root, call=stages)
    stale = tmp_path / "out" / "champion_eval"
    stale.mkdir()
    (stale / "label_free.csv").write_text("garbage\n")
    entry = refresh(_cfg(tmp_path), root, call=stages)
    assert "identical" in entry["reason"]
    assert entry["label_free"]["source"] == str(tmp_path / "out" / "label_free.csv")


def test_without_label_free_table_nothing_is_recorded(tmp_path):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04})
    stages.write_label_free = False
    entry = refresh(_cfg(tmp_path), root, call=stages)
    assert entry["decision"] == "promoted"
    assert "label_free" not in entry
    assert "drift_alarm" not in entry


def test_a_broken_label_free_table_fails_the_refresh_before_the_switch(tmp_path, monkeypatch):
    root = tmp_path / "reg"
    stages = LabelFreeStages({"temperature": 0.05, "selective": 0.04})
    champion = refresh(_cfg(tmp_path), root, call=stages)["challenger"]
    real = refresh_label_free.read_label_free

    def broken(path):
        raise ValueError(f"Expected {path} to have columns [...], but it lacks ['drift_score']")

    monkeypatch.setattr(refresh_label_free, "read_label_free", broken)
    stages.ece = {"temperature": 0.01, "selective": 0.01}  # would be promoted
    with pytest.raises(ValueError, match="lacks"):
        refresh(_cfg(tmp_path, seed=1), root, call=stages)
    monkeypatch.setattr(refresh_label_free, "read_label_free", real)
    assert registry.current(root) == champion
    assert registry.history(root)[-1]["decision"] == "failed"


def test_adaptive_rows_neither_promote_nor_block_unless_allowed(tmp_path):
    root = tmp_path / "reg"
    names = ("temperature", "adaptive_ts")
    stages = LabelFreeStages({"temperature": 0.05, "adaptive_ts": 0.01})
    first = refresh(_cfg(tmp_path, calibrators=names), root, call=stages)
    assert first["label_free"]["calibrator"] == "temperature"  # adaptive is better, not allowed
    assert first["allow_adaptive"] is False

    stages.ece = {"temperature": 0.05, "adaptive_ts": 0.30}  # adaptive much worse
    entry = refresh(_cfg(tmp_path, seed=1, calibrators=names), root, call=stages)
    assert entry["decision"] == "promoted"
    assert {c["calibrator"] for c in entry["comparisons"]} == {"temperature"}

    stages.ece = {"temperature": 0.05, "adaptive_ts": 0.60}
    entry = refresh(_cfg(tmp_path, seed=2, calibrators=names), root, call=stages,
                    allow_adaptive=True)
    assert entry["decision"] == "kept"
    assert "adaptive_ts" in entry["reason"]

    stages.ece = {"temperature": 0.05, "adaptive_ts": 0.01}
    entry = refresh(_cfg(tmp_path, seed=3, calibrators=names), root, call=stages,
                    allow_adaptive=True)
    assert entry["decision"] == "promoted"
    assert entry["label_free"]["calibrator"] == "adaptive_ts"


def test_oracle_rows_never_count_in_a_decision():
    champ = pd.DataFrame({"dataset": ["fog"] * 2, "calibrator": ["temperature", "oracle_ts"],
                          "img_ece": [0.05, 0.01]})
    chall = champ.assign(img_ece=[0.05, 0.50])
    decision = registry.compare(chall, champ, tolerance=0.0)
    assert decision.promote
    assert [c.calibrator for c in decision.comparisons] == ["temperature"]


# --- CLI: exit code 4 and status -----------------------------------------------------------------


@pytest.fixture
def cli_stages(monkeypatch):
    fake = LabelFreeStages({"ts": 0.05}, alarm=("night-cam",))
    monkeypatch.setattr(stages_mod, "call_stage", fake)
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: None)
    return fake


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output": "out",
        "model": {"kind": "python", "path": "tests.extract_helpers:tiny_net", "num_classes": 4},
        "datasets": [],
        "calibrators": [{"name": "temperature", "label": "ts"}],
    }))
    return path


def segcal(*argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_drift_alarm_exits_4_after_promoting_and_recording(config, cli_stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    code, out, err = segcal("refresh", config, "--registry", reg, "--no-check", capsys=capsys)
    assert code == cli.DRIFT == 4
    assert out.startswith("promoted: ")
    assert registry.current(reg) is not None
    assert "drift alarm on 1 of 2 sets: night-cam; estimates of ts" in out
    assert "drift alarm on night-cam (exit code 4" in err
    night = next(line for line in out.splitlines() if line.strip().startswith("night-cam"))
    assert "ALARM" in night
    assert "0.250" in night
    assert registry.history(reg)[-1]["drift_alarm"] is True


def test_no_drift_exit_and_no_alarm_exit_0(config, cli_stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    code, _, _ = segcal("refresh", config, "--registry", reg, "--no-check", "--no-drift-exit",
                        capsys=capsys)
    assert code == cli.OK
    cli_stages.alarm = set()
    code, out, _ = segcal("refresh", config, "--registry", reg, "--no-check", "--set",
                          "fit.seed=1", capsys=capsys)
    assert code == cli.OK
    assert "drift alarm on none of 2 sets" in out


def test_a_failure_still_exits_1_even_with_an_alarm(config, cli_stages, tmp_path, capsys):
    cli_stages.fail = "report"
    code, _, err = segcal("refresh", config, "--registry", tmp_path / "reg", "--no-check",
                          capsys=capsys)
    assert code == cli.FAILED
    assert "report exploded" in err


def test_status_shows_the_last_label_free_check(config, cli_stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    segcal("refresh", config, "--registry", reg, "--no-check", capsys=capsys)
    # A later entry without label-free data (a manual promotion) does not hide the check.
    run = registry.current(reg)
    segcal("promote", reg, run, "--reason", "ops", capsys=capsys)
    code, out, _ = segcal("status", reg, "--html", capsys=capsys)
    assert code == cli.OK
    lines = out.splitlines()
    check = next(i for i, line in enumerate(lines) if line.startswith("last label-free check:"))
    assert "(promoted)" in lines[check]
    assert lines[check + 1].startswith("drift alarm on 1 of 2 sets: night-cam")
    dusk = next(line for line in lines if line.strip().startswith("dusk"))
    # est pixel acc (ATC) 0.78, DoC 0.81, true 0.80; image-wise ECE 0.051 est, 0.060 true.
    assert dusk.split()[1:] == ["test", "0.300/0.500", "ok", "0.780", "0.810", "0.800",
                                "0.0510", "0.0600"]
    night = next(line for line in lines if line.strip().startswith("night-cam"))
    assert night.split()[-2:] == ["0.0510", "–"]  # a monitor set has no truth
    page = (reg / "history.html").read_text()
    assert 'id="label-free"' in page
    assert '<tr class="alarm"><td>night-cam</td>' in page
    assert "<td>night-cam</td><td>ops</td>" not in page  # alarms column: "–" for the promotion


def test_status_and_history_page_read_old_entries_without_label_free(tmp_path, capsys):
    reg = tmp_path / "reg"
    reg.mkdir()
    (reg / "history.jsonl").write_text(json.dumps(
        {"time": "2026-12-01T02:00:00Z", "action": "refresh", "decision": "kept",
         "challenger": None, "reason": "old entry"}) + "\n")
    code, out, _ = segcal("status", reg, "--html", capsys=capsys)
    assert code == cli.OK
    assert "label-free" not in out
    page = report_history.write(reg).read_text()
    assert 'id="label-free"' not in page
    assert "without labels" not in page
    assert "<td>–</td><td>old entry</td>" in page


def test_exit_code_4_is_documented_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "4 refresh done but a drift alarm fired" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["refresh", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-drift-exit" in text
    assert "--allow-adaptive" in text
    assert "4  ``refresh`` only" in cli.__doc__
    assert "exits with code 4" in " ".join(refresh_mod.__doc__.split())


def test_adapted_labels_come_from_the_cards_not_the_names(tmp_path):
    """A label is target-adapted when its artifact's class is, whatever the label says."""
    from pipeline.calibrators import build_calibrator, save

    run = tmp_path / "run"
    for label, name in (("night", "adaptive_ts"), ("adaptive_ts", "temperature")):
        calibrator = build_calibrator(name, 3)
        calibrator.fitted.fill_(True)
        for band in ("band_lo", "band_hi"):  # finite, as a fit leaves them
            if hasattr(calibrator, band):
                getattr(calibrator, band).zero_()
        save(calibrator, run / "artifacts" / label, class_names=None, ignore_index=None)
    adapted = registry.adapted_labels(run)
    assert "night" in adapted
    assert "adaptive_ts" not in adapted
    assert "adaptive_ts_gated" in adapted  # no card: counts by its registry name
    summary = _heldout({"uncalibrated": 0.1, "night": 0.01, "adaptive_ts": 0.03})
    assert run_calibrator(summary, adapted=adapted) == "adaptive_ts"
    assert run_calibrator(summary, adapted=adapted, allow_adaptive=True) == "night"
    # Adapted in either run means adapted in both: the champion's card counts too.
    other = tmp_path / "other"
    calibrator = build_calibrator("temperature", 3)
    calibrator.fitted.fill_(True)
    save(calibrator, other / "artifacts" / "night", class_names=None, ignore_index=None)
    assert "night" in registry.adapted_labels(run, other)
    assert "night" in registry.adapted_labels(other, run)
