"""What the report says: the recommendation rule, fitted values in words, families, tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipeline import report_calibrators as rc
from pipeline import report_data as rd
from pipeline.evaluate import bootstrap_interval


def _heldout(rows):
    """A held-out table from ``{calibrator: (img_ece, lo, hi, n_images)}``."""
    return pd.DataFrame.from_dict(
        {c: {"img_ece": m, "lo": lo, "hi": hi, "nll": 0.5, "n_images": n}
         for c, (m, lo, hi, n) in rows.items()}, orient="index")


def test_recommends_the_leader_when_its_interval_overlaps_no_other():
    rec = rd.recommend(_heldout({"uncalibrated": (0.10, 0.09, 0.11, 20),
                                 "temperature": (0.04, 0.03, 0.05, 20),
                                 "selective": (0.07, 0.06, 0.08, 20)}))
    assert (rec.pick, rec.kind, rec.tied) == ("temperature", "clear", [])
    assert rec.lines[0].startswith("Use temperature: temperature has the lowest image-wise ECE "
                                   "on the 20 held-out calibration images, 0.040 [0.030, 0.050]"
                                   " against uncalibrated's 0.100 [0.090, 0.110]")


def test_overlapping_intervals_give_no_clear_winner():
    # The case of the issue: the leader's interval fully overlaps uncalibrated's.
    rec = rd.recommend(_heldout({"uncalibrated": (0.113, 0.0948, 0.1313, 20),
                                 "temperature": (0.118, 0.100, 0.135, 20),
                                 "selective": (0.112, 0.0951, 0.1295, 20)}),
                       sizes={"temperature": 1, "selective": 761})
    assert (rec.pick, rec.kind) == (None, "no clear winner")
    assert rec.leader == "selective"
    assert rec.tied == ["uncalibrated", "temperature"]
    assert rec.lines[0].startswith("No clear winner on the held-out calibration data")
    assert "None is clearly better than uncalibrated." in rec.lines[0]
    assert rec.lines[1] == ("Any of them is defensible; prefer the simplest: temperature, "
                            "with 1 fitted parameter.")


def test_parameter_counts_come_from_the_cards_calibrators():
    cards = {"ts": {"name": "temperature", "num_classes": 5, "options": {}},
             "vs": {"name": "vector", "num_classes": 5},
             "gone": {"name": "no_such_calibrator", "num_classes": 5}, "old": {"name": "vector"}}
    assert rc.parameter_counts(cards) == {"ts": 1, "vs": 10}


def test_too_small_a_heldout_part_names_no_winner_and_states_the_threshold():
    rec = rd.recommend(_heldout({"uncalibrated": (0.10, 0.10, 0.10, 1),
                                 "temperature": (0.04, 0.04, 0.04, 1)}))
    assert (rec.pick, rec.kind) == (None, "too small")
    assert rec.lines[0] == ("No recommendation: the held-out part has 1 image, fewer than the "
                            f"{rd.MIN_HELDOUT_IMAGES} needed to decide (its intervals say "
                            "little).")
    assert rd.recommend(_heldout({"uncalibrated": (0.1, 0.09, 0.11, 9),
                                  "temperature": (0.04, 0.03, 0.05, 9)})).kind == "too small"
    assert rd.recommend(_heldout({"uncalibrated": (0.1, 0.09, 0.11, 10),
                                  "temperature": (0.04, 0.03, 0.05, 10)})).kind == "clear"


def test_no_heldout_rows_and_no_intervals_give_no_recommendation():
    rec = rd.recommend(_heldout({}))
    assert (rec.pick, rec.kind) == (None, "no held-out data")
    assert "test sets are never used to choose" in rec.lines[0]
    rec = rd.recommend(_heldout({"uncalibrated": (0.1, math.nan, math.nan, 30),
                                 "temperature": (0.04, math.nan, math.nan, 30)}))
    assert (rec.pick, rec.kind) == (None, "no intervals")


def test_uncalibrated_can_win_and_an_oracle_is_never_picked():
    rec = rd.recommend(_heldout({"uncalibrated": (0.02, 0.01, 0.03, 30),
                                 "oracle_ts": (0.001, 0.0, 0.002, 30),
                                 "temperature": (0.08, 0.07, 0.09, 30)}))
    assert rec.pick == "uncalibrated"
    assert rec.lines[0].startswith("Keep the model uncalibrated")


def _summary(rows):
    columns = ["dataset", "domain", "reference", "role", "calibrator", "n_images", "img_ece",
               "img_ece_lo", "img_ece_hi", "nll", "mis_auroc", "msp_auroc", "flag_precision",
               "flag_recall"]
    return pd.DataFrame(rows, columns=columns)


def test_the_recommendation_never_looks_at_test_rows():
    nan = math.nan
    summary = _summary([
        ("cal-heldout", "day", None, "calibration", "uncalibrated", 30, .10, .09, .11, 1, nan,
         .8, nan, nan),
        ("cal-heldout", "day", None, "calibration", "temperature", 30, .04, .03, .05, 1, nan, .8,
         nan, nan),
        ("cal-heldout", "day", None, "calibration", "selective", 30, .07, .06, .08, 1, .7, .8,
         .3, .4),
        # On the test set selective is far better: it must not matter.
        ("fog", "fog", "day", "test", "uncalibrated", 30, .30, .29, .31, 1, nan, .8, nan, nan),
        ("fog", "fog", "day", "test", "temperature", 30, .20, .19, .21, 1, nan, .8, nan, nan),
        ("fog", "fog", "day", "test", "selective", 30, .01, .00, .02, 1, .9, .8, .5, .6),
    ])
    heldout = rd.heldout_table(summary, None, resamples=0, seed=0)
    assert list(heldout.index) == ["uncalibrated", "temperature", "selective"]
    assert rd.recommend(heldout).pick == "temperature"
    assert rd.best_per_set(summary) == {"cal-heldout": "temperature", "fog": "selective"}
    assert rd.outcome_on_tests(summary, "temperature") == (
        "On the test sets (shown, not used to choose) temperature is lowest on 0 of 1; "
        "image-wise ECE -33% against uncalibrated on average.")
    # The selector diagnostics say plainly where the selector is no better than 1 - max p.
    table = rc.selector_table(summary)
    assert table.to_dict("records") == [
        {"set": "cal-heldout", "selective: AUROC / 1 - max p": "0.700 / 0.800 no better",
         "selective: flags precision / recall": "0.300 / 0.400"},
        {"set": "fog", "selective: AUROC / 1 - max p": "0.900 / 0.800",
         "selective: flags precision / recall": "0.500 / 0.600"},
    ]
    assert rc.selector_sentence(summary) == (
        "selective's selector is no better than 1 - max p on 1 of 2 sets.")


def test_several_heldout_sets_are_pooled_image_by_image():
    summary = _summary([
        (f"{d}-heldout", "day", None, "calibration", c, 3, 0.0, 0.0, 0.0, 1.0, math.nan, 0.8,
         math.nan, math.nan) for d in ("a", "b") for c in ("uncalibrated", "temperature")])
    rng = np.random.default_rng(0)
    per_image = pd.DataFrame([
        {"dataset": f"{d}-heldout", "calibrator": c, "image_id": f"{d}{i}",
         "img_ece": float(rng.uniform())}
        for d in ("a", "b") for c in ("uncalibrated", "temperature") for i in range(3)])
    table = rd.heldout_table(summary, per_image, resamples=100, seed=3)
    mine = per_image[per_image.calibrator == "temperature"].sort_values(["dataset", "image_id"])
    assert table.loc["temperature", "n_images"] == 6
    assert table.loc["temperature", "img_ece"] == pytest.approx(mine.img_ece.mean())
    lo, hi = bootstrap_interval(mine.img_ece.to_numpy(), resamples=100, seed=3)
    assert (table.loc["temperature", "lo"], table.loc["temperature", "hi"]) == (lo, hi)


# flagged: the share of held-out pixels a selector flags, known only for calibrators that score
# pixels (the selective family).
@pytest.mark.parametrize(("card", "flagged", "words"), [
    ({"name": "temperature", "summary": {"temperature": 1.3124}}, None,
     "one temperature, T = 1.31"),
    ({"name": "ets", "summary": {"temperature": 1.5, "weights": [0.9, 0.08, 0.02]}}, None,
     "one temperature, T = 1.50, mixed with the raw and the uniform distribution (weights "
     "0.900 / 0.0800 / 0.0200)"),
    ({"name": "selective", "options": {"gate": "hard", "features": "logprobs"},
      "summary": {"t_mis": 1e10, "t_cor": 1.0}}, 0.125,
     "a selector flags likely-wrong pixels (hard gate, features logprobs); flagged pixels get "
     "T_mis = 1e+10 (the uniform distribution), the others T_cor = 1.00; flags 12.5% of the "
     "held-out pixels"),
    ({"name": "selective", "options": {"gate": "soft", "features": "rich", "base": "temperature"},
      "summary": {"t_mis": 2.5, "t_cor": 1.0, "base": {"temperature": 1.29}}}, 0.125,
     "a selector flags likely-wrong pixels (soft gate, features rich); flagged pixels get "
     "T_mis = 2.50, the others T_cor = 1.00; on top of temperature (one temperature, T = 1.29); "
     "flags 12.5% of the held-out pixels"),
    ({"name": "meta_cal", "summary": {"temperature": 1.2, "threshold": None}}, None,
     "one temperature, T = 1.20; nothing gated"),
    ({"name": "mystery", "summary": {"alpha": 0.5, "beta": [1.0, 3.0]}}, None,
     "alpha = 0.500, beta = mean 2.00, range 1.00 to 3.00"),
])
def test_fitted_values_in_plain_words(card, flagged, words):
    assert rc.describe_card(card, flagged=flagged) == words


def test_corruption_families_from_names_with_the_reference_at_severity_zero():
    rows = [("day", "day", None), ("fog-1", "fog-1", "day"), ("fog-3", "fog-3", "day"),
            ("dusk", "dusk", "day"), ("dark_5", "dark_5", "day")]
    summary = pd.DataFrame([
        {"dataset": d, "domain": dom, "reference": ref, "role": "test", "calibrator": c,
         "n_images": 2, "img_ece": e}
        for (d, dom, ref), base in zip(rows, [0.1, 0.2, 0.3, 0.15, 0.5], strict=True)
        for c, e in (("uncalibrated", base), ("temperature", base / 2))])
    fams = rd.families(None, summary)
    assert fams == {"fog": {1: "fog-1", 3: "fog-3"}, "dark": {5: "dark_5"}}
    curves = rd.family_curves(summary, fams)
    assert curves["fog"].to_dict("index") == {
        0: {"uncalibrated": 0.1, "temperature": 0.05},
        1: {"uncalibrated": 0.2, "temperature": 0.1},
        3: {"uncalibrated": 0.3, "temperature": 0.15}}
    assert list(curves["dark"].index) == [0, 5]


def test_reference_columns_come_first_and_an_oracle_is_never_best():
    summary = pd.DataFrame({
        "dataset": ["fog"] * 4, "calibrator": ["temperature", "uncalibrated", "oracle_ts", "ets"],
        "img_ece": [0.05, 0.1, 0.01, 0.06], "nll": [1.0] * 4})
    assert rd.matrix_columns(summary) == ["uncalibrated", "oracle_ts", "temperature", "ets"]
    assert rd.best_per_set(summary) == {"fog": "temperature"}


def test_adaptive_cards_are_described_in_words():
    # A card whose summary holds a list of feature names (not numbers) once failed the report.
    summary = {"features": ["mean_confidence", "mean_entropy"], "gate": "soft", "hidden": 16,
               "temperature": 1.3199987}
    gated = rc.describe_card({"name": "adaptive_ts_gated", "summary": summary})
    assert gated.startswith("a temperature per image, T = 1.32")
    assert "(mean_confidence, mean_entropy)" in gated
    assert "soft gate" in gated
    plain = rc.describe_card({"name": "adaptive_ts", "summary": summary})
    assert "gate" not in plain
