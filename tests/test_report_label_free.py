"""The report's label-free section (``label_free.csv``) and the oracle bound in the matrix.

The run folder is written by hand: a small ``summary.csv`` (held-out and test rows, an
``oracle_ts`` bound on the test sets) and a ``label_free.csv`` in the contract's columns, with
two labelled test sets and one monitor set.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import report
from pipeline import report_label_free as rlf
from pipeline.config import parse_config
from pipeline.paths import LABEL_FREE

LABEL_FREE_COLUMNS = (
    "dataset", "domain", "reference", "role", "calibrator", "n_images", "drift_score",
    "drift_threshold", "drift_alarm", "est_pixel_acc", "est_pixel_acc_doc", "est_img_ece",
    "true_pixel_acc", "true_img_ece",
)
NAN = math.nan


def _summary() -> pd.DataFrame:
    rows = []
    # Held-out: temperature clearly best (intervals apart), 30 images.
    for c, v in (("uncalibrated", 0.10), ("temperature", 0.03), ("selective", 0.06)):
        rows.append({"dataset": "cal-heldout", "domain": "day", "reference": None,
                     "role": "calibration", "calibrator": c, "n_images": 30, "img_ece": v,
                     "img_ece_lo": v - 0.005, "img_ece_hi": v + 0.005, "nll": 0.5,
                     "mis_auroc": NAN})
    for dataset, ref in (("day", None), ("fog-3", "day")):
        for c, v in (("uncalibrated", 0.12), ("temperature", 0.05), ("selective", 0.07),
                     ("oracle_ts", 0.01)):
            rows.append({"dataset": dataset, "domain": dataset, "reference": ref,
                         "role": "test", "calibrator": c, "n_images": 8, "img_ece": v,
                         "img_ece_lo": v - 0.01, "img_ece_hi": v + 0.01, "nll": 0.6,
                         "mis_auroc": NAN})
    return pd.DataFrame(rows)


def _label_free() -> pd.DataFrame:
    # dataset, role, drift, threshold, alarm, {calibrator: (ATC, DoC, true acc, est, true ECE)}
    sets = (
        ("day", "test", 0.10, 0.40, False,
         {"uncalibrated": (0.90, 0.88, 0.91, 0.050, 0.060),
          "temperature": (0.89, 0.87, 0.91, 0.020, 0.030),
          "selective": (0.85, 0.80, 0.91, 0.030, 0.070)}),
        ("fog-3", "test", 0.90, 0.40, True,
         {"uncalibrated": (0.70, 0.75, 0.66, 0.200, 0.250),
          "temperature": (0.72, 0.74, 0.66, 0.150, 0.160),
          "selective": (0.60, 0.70, 0.66, 0.100, 0.120)}),
        ("night-cam", "monitor", 0.70, 0.40, True,
         {"uncalibrated": (0.61, 0.62, NAN, 0.300, NAN),
          "temperature": (0.63, 0.64, NAN, 0.210, NAN),
          "selective": (0.50, 0.55, NAN, 0.100, NAN)}),
    )
    rows = []
    for dataset, role, drift, threshold, alarm, values in sets:
        for c, (atc, doc, acc, est, ece) in values.items():
            rows.append({"dataset": dataset, "domain": dataset, "reference": None, "role": role,
                         "calibrator": c, "n_images": 8, "drift_score": drift,
                         "drift_threshold": threshold, "drift_alarm": alarm,
                         "est_pixel_acc": atc, "est_pixel_acc_doc": doc, "est_img_ece": est,
                         "true_pixel_acc": acc, "true_img_ece": ece})
    return pd.DataFrame(rows, columns=LABEL_FREE_COLUMNS)


@pytest.fixture
def cfg(tmp_path):
    return parse_config({
        "output": str(tmp_path / "out"),
        "model": {"kind": "python", "path": "tests.fake:model", "num_classes": 3},
        "datasets": [],
        "calibrators": [{"name": "temperature"}, {"name": "selective"}],
    })


def _tables(label_free: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    tables = {"summary.csv": _summary(), "domain_shift.csv": pd.DataFrame(),
              "best.csv": pd.DataFrame()}
    if label_free is not None:
        tables[LABEL_FREE] = label_free
    return tables


def _section(markdown: str) -> str:
    start = markdown.index("## Label-free estimates")
    return markdown[start:markdown.index("\n## ", start + 1)]


def test_label_free_section_shows_estimates_beside_the_truth(cfg):
    markdown, page = report.render(cfg, _tables(_label_free()), {})
    section = _section(markdown)
    assert "Drift alarm on 2 of the 3 sets (1 without labels): fog-3, night-cam." in section
    lines = section.splitlines()
    head = next(line for line in lines if line.startswith("| set |"))
    # uncalibrated and the recommended calibrator (temperature), nothing else.
    assert "temperature: pixel acc ATC / DoC / true" in head
    assert "uncalibrated: img_ece est. / true" in head
    assert "selective" not in head
    fog = next(line for line in lines if line.startswith("| fog-3 |"))
    assert fog == ("| fog-3 | test | 8 | 0.900 | 0.400 | ALARM | 0.700 / 0.750 / 0.660 | "
                   "0.2000 / 0.2500 | 0.720 / 0.740 / 0.660 | 0.1500 / 0.1600 |")
    night = next(line for line in lines if line.startswith("| night-cam |"))
    assert night.endswith("| 0.630 / 0.640 / – | 0.2100 / – |")  # no truth without labels
    # Mean absolute error over the two labelled sets, computed here independently.
    mae = next(line for line in lines if line.startswith("| mean absolute error (2 labelled"))
    t_atc = (abs(0.89 - 0.91) + abs(0.72 - 0.66)) / 2
    t_doc = (abs(0.87 - 0.91) + abs(0.74 - 0.66)) / 2
    t_ece = (abs(0.02 - 0.03) + abs(0.15 - 0.16)) / 2
    assert mae.endswith(f"| {t_atc:.3f} / {t_doc:.3f} | {t_ece:.4f} |")
    # Per calibrator: every one, the monitor set left out of the errors.
    errors = rlf.label_free_errors(_label_free())
    assert list(errors.index) == ["uncalibrated", "temperature", "selective"]
    assert errors.loc["selective", "img_ece MAE"] == pytest.approx((0.04 + 0.02) / 2)
    assert errors.loc["temperature", "pixel acc MAE (ATC)"] == pytest.approx(t_atc)
    assert (errors["labelled sets"] == 2).all()
    # The same in the HTML page, after the matrix.
    assert page.index('id="matrix"') < page.index('<h2 id="label-free">')
    assert "<td>0.720 / 0.740 / 0.660</td>" in page
    assert "<td>ALARM</td>" in page
    assert f"<td>{errors.loc['selective', 'img_ece MAE']:.4f}</td>" in page


def test_label_free_section_is_left_out_without_the_table(cfg):
    markdown, page = report.render(cfg, _tables(None), {})
    assert "Label-free" not in markdown
    assert "Label-free" not in page
    markdown, page = report.render(cfg, _tables(_label_free().iloc[:0]), {})
    assert "Label-free" not in markdown


def test_only_monitor_sets_give_no_error_row(cfg):
    lf = _label_free()
    lf = lf[lf["role"] == "monitor"]
    markdown, _ = report.render(cfg, _tables(lf), {})
    section = _section(markdown)
    assert "No drift alarm" not in section
    assert "Drift alarm on 1 of the 1 sets (1 without labels): night-cam." in section
    assert "mean absolute error" not in section
    assert "labelled sets, per calibrator" not in section


def test_an_oracle_in_the_label_free_table_is_not_an_estimate_to_score():
    lf = _label_free()
    oracle = lf[lf["calibrator"] == "temperature"].assign(calibrator="oracle_ts")
    errors = rlf.label_free_errors(pd.concat([lf, oracle]))
    assert "oracle_ts" not in errors.index


def test_oracle_renders_as_a_bound_never_best(cfg):
    markdown, page = report.render(cfg, _tables(None), {})
    matrix = page[page.index('id="matrix"'):]
    matrix = matrix[:matrix.index("</table>")]
    assert ('<th class="ref" title="bound: a temperature fitted on each test set&#x27;s own '
            'labels; never recommended">oracle_<wbr>ts</th>') in matrix
    # The oracle has the lowest value on every test set, yet the star is temperature's.
    for row in matrix.split("<tr")[1:]:
        if "★" in row:
            star = row[:row.index("★")]
            assert star[star.rindex("title="):].startswith('title="temperature on')
    assert "oracle columns are bounds" in page
    assert "`oracle_ts`: a bound, not a calibrator" in markdown
    # The recommendation never names the bound.
    assert "Use temperature" in markdown


def test_read_tables_picks_up_label_free_csv_when_present(tmp_path):
    for name in ("summary.csv", "domain_shift.csv", "best.csv"):
        pd.DataFrame({"dataset": ["day"]}).to_csv(tmp_path / name, index=False)
    (tmp_path / "per_image.parquet").write_bytes(b"")
    assert LABEL_FREE not in report.read_tables(tmp_path)
    _label_free().to_csv(tmp_path / LABEL_FREE, index=False)
    table = report.read_tables(tmp_path)[LABEL_FREE]
    assert len(table) == 9
    # Read back from CSV the section is the same as from the frame.
    assert rlf.label_free_table(table, ["temperature"]).equals(
        rlf.label_free_table(_label_free(), ["temperature"]))


def test_reliability_bins_skip_monitor_rows_without_bins(tmp_path):
    per_image = pd.DataFrame({
        "dataset": ["day", "day", "night-cam"], "calibrator": ["temperature"] * 3,
        "count": [np.array([1, 2]), np.array([0, 3]), None],
        "conf_sum": [np.array([0.5, 1.5]), np.array([0.0, 2.7]), None],
        "correct_sum": [np.array([1.0, 1.0]), np.array([0.0, 3.0]), None],
    })
    per_image.to_parquet(tmp_path / "per_image.parquet")
    bins = report.reliability_bins(tmp_path / "per_image.parquet")
    assert list(bins) == [("day", "temperature")]
    count, conf_sum, _ = bins[("day", "temperature")]
    assert count.tolist() == [1, 5]
    assert conf_sum.tolist() == pytest.approx([0.5, 4.2])


def test_label_free_alarm_cells_read_csv_spellings():
    assert [rlf._alarm(v) for v in (True, False, "True", "false", NAN, None)] == [
        "ALARM", "no", "ALARM", "no", "–", "–"]
    assert Path(LABEL_FREE).name == "label_free.csv"


def test_label_free_section_fits_the_1400px_window(cfg, tmp_path):
    browser = pytest.importorskip("test_report_browser")
    if browser.CHROMIUM is None:
        pytest.skip("needs chromium (apt install chromium)")
    _, page = report.render(cfg, _tables(_label_free()), {})
    path = tmp_path / "report.html"
    path.write_text(page)
    seen = browser.probe(path)
    assert seen["clientWidth"] == browser.WIDTH
    assert seen["scrollWidth"] <= browser.WIDTH


def test_report_of_a_real_run_with_monitor_sets(tmp_path_factory):
    # A synthetic extract -> fit -> evaluate with two monitor sets (tests/test_monitor.py),
    # then the report: the section lists every test and monitor set, monitors without truth.
    monitor = pytest.importorskip("test_monitor")
    cfg, output = monitor.run.__wrapped__(tmp_path_factory)
    page = report.write(cfg).read_text()
    markdown = (Path(output) / "report.md").read_text()
    section = _section(markdown)
    lf = pd.read_csv(Path(output) / LABEL_FREE)
    assert set(lf["dataset"]) == {"day", "cal_test", "cal_monitor", "dark"}
    for dataset in lf["dataset"].unique():
        assert f"| {dataset} |" in section
    dark = next(line for line in section.splitlines() if line.startswith("| dark |"))
    assert "/ – |" in dark  # estimates only
    assert "mean absolute error (2 labelled sets)" in section
    assert '<h2 id="label-free">' in page
    # No reliability figure for a monitor set (no labels, no bins).
    assert not (Path(output) / "plots" / "dark.png").exists()
