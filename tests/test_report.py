from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_evaluate import DATASETS, make_run

from pipeline import evaluate, report, report_calibrators, report_data
from pipeline.metrics.functional import ece_from_bins


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    cfg, _ = make_run(tmp_path_factory.mktemp("report"))
    evaluate.run(cfg, local=True)
    return cfg, report.write(cfg)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self.scripts.append("src" in dict(attrs))
            return
        self.refs += [value for name, value in attrs if name in ("src", "href")]


def _outputs(output: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in output.rglob("*") if p.is_file()
            and "shards" not in p.parts and "artifacts" not in p.parts}


def test_report_files_exist_and_html_references_only_existing_files(reported):
    cfg, page = reported
    output = Path(cfg.output)
    assert page == output / "report.html"
    parser = _Refs()
    parser.feed(page.read_text())
    assert not {"link", "iframe"} & set(parser.tags)  # nothing fetched
    assert parser.scripts == [False]  # one inline script (column sorting), none from a file
    assert sorted(parser.refs) == ["plots/day.png", "plots/dusk.png"]
    for ref in parser.refs:
        assert not Path(ref).is_absolute()
        with Image.open(output / ref) as image:
            assert image.format == "PNG"
            assert image.width > 300
    markdown = (output / "report.md").read_text()
    assert "![day](plots/day.png)" in markdown
    assert sorted(p.name for p in (output / "plots").iterdir()) == ["day.png", "dusk.png"]


def test_tables_in_the_report_are_the_csv_tables(reported):
    cfg, page = reported
    summary = pd.read_csv(Path(cfg.output) / "summary.csv")
    text = page.read_text()
    for row in summary.itertuples():
        assert f"{row.nll:.4f}" in text
        # The interval in its own column, in one unwrapped cell.
        assert f"<td>[{row.img_ece_lo:.4f}, {row.img_ece_hi:.4f}]</td>" in text
    # One group (tbody) per dataset in the sortable summary.
    table = text[text.index('id="summary"'):]
    assert table.count("<tbody>") == summary.dataset.nunique()
    # A glossary entry for every column shown.
    head = table[table.index("<thead>"):table.index("</thead>")].replace("<wbr>", "")
    columns = [c.split("</th>")[0] for c in head.split("<th>")[1:]]
    assert "img_ece 95%" in columns
    for column in columns:
        assert f"<dt>{column}</dt>" in text


def test_reliability_bins_are_the_summed_image_rows(reported):
    cfg, _ = reported
    output = Path(cfg.output)
    bins = report.reliability_bins(output / "per_image.parquet")
    summary = pd.read_csv(output / "summary.csv")
    assert set(bins) == set(zip(summary.dataset, summary.calibrator, strict=True))
    for row in summary.itertuples():
        count, conf_sum, correct_sum = bins[(row.dataset, row.calibrator)]
        assert count.sum() == row.n_pixels
        assert ece_from_bins(count, conf_sum, correct_sum) == pytest.approx(row.ece, abs=1e-12)


def test_missing_tables_are_refused(tmp_path):
    cfg, _ = make_run(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"tables \['summary.csv', .*run `segcal evaluate`"):
        report.write(cfg)


def test_failed_report_leaves_the_previous_one_and_drops_stale_plots(tmp_path, monkeypatch):
    cfg, _ = make_run(tmp_path, evaluate_options={"bootstrap": 0})
    output = evaluate.run(cfg, local=True)
    report.write(cfg)
    before = _outputs(output)

    real, calls = report.plot_dataset, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "plot_dataset", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        report.write(cfg)
    assert _outputs(output) == before
    assert not list(output.glob(".report-*"))

    monkeypatch.setattr(report, "plot_dataset", real)
    stale = output / "plots" / "removed-dataset.png"
    stale.write_bytes(b"")
    report.write(cfg)
    assert not stale.exists()
    assert np.all([(output / "plots" / f"{d}.png").is_file() for d in ("day", "dusk")])


SHIFTED = (
    # name, role, domain, reference, images, seed, logit scale
    ("cal", "calibration", "day", None, 12, 3, 3.0),
    ("day", "test", "day", None, 4, 1, 3.0),
    ("fog-1", "test", "fog-1", "day", 3, 2, 4.0),
    ("fog-3", "test", "fog-3", "day", 3, 4, 6.0),
)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A run with a held-out calibration part and one corruption family at two severities."""
    cfg, _ = make_run(tmp_path_factory.mktemp("shifted"), SHIFTED)
    evaluate.run(cfg, local=True)
    return cfg, report.write(cfg)


def test_first_screen_is_the_recommendation_then_the_matrix(shifted):
    cfg, page = shifted
    text = page.read_text()
    summary = pd.read_csv(Path(cfg.output) / "summary.csv")
    held = summary[summary.dataset == "cal-heldout"]
    n = int(held.n_images.iloc[0])
    assert 0 < n < report_data.MIN_HELDOUT_IMAGES
    assert text.index('id="recommendation"') < text.index("<table")
    assert text.index("<table") == text.index('<table class="m" id="matrix">')  # the first table
    box = text[text.index('id="recommendation"'):text.index("</div>")]
    assert f"the held-out part has {n} image" in box
    assert f"fewer than the {report_data.MIN_HELDOUT_IMAGES} needed to decide" in box
    # The matrix: the held-out row apart, then one row per test set; one star per row.
    matrix = text[text.index('id="matrix"'):]
    matrix = matrix[:matrix.index("</table>")]
    rows = matrix.split("<tr")[2:]
    names = [r.split("<td>")[1].split("</td>")[0] for r in rows if 'class="sep"' not in r]
    assert names == ["cal-heldout", "day", "fog-1", "fog-3"]
    for row, name in zip([r for r in rows if 'class="sep"' not in r], names, strict=True):
        assert row.count("★") == 1
        best = summary[summary.dataset == name].sort_values("img_ece").iloc[0]
        star = row[:row.index("★")]
        assert star[star.rindex("title="):].startswith(f'title="{best.calibrator} on {name}')
        # The interval on hover and in a second line.
        r = summary[(summary.dataset == name) & (summary.calibrator == "uncalibrated")].iloc[0]
        assert f"[{r.img_ece_lo:.3f}, {r.img_ece_hi:.3f}]" in row
        assert 'class="ref"' in row  # uncalibrated is a reference column


def test_shift_curves_fitted_values_and_classes(shifted):
    cfg, page = shifted
    output = Path(cfg.output)
    text = page.read_text()
    assert '<img src="plots/shift-fog.png"' in text
    with Image.open(output / "plots" / "shift-fog.png") as image:
        assert image.format == "PNG"
    assert "![fog](plots/shift-fog.png)" in (output / "report.md").read_text()
    assert "In-domain vs shifted" in text
    card = json.loads((output / "artifacts" / "temperature" / "calibrator.json").read_text())
    assert f"one temperature, T = {card['summary']['temperature']:#.3g}" in text
    # Classwise ECE per class, pooled over the unshifted test set: its mean is the set's SCE.
    summary = pd.read_csv(output / "summary.csv")
    per_image = report.read_per_image(output / "per_image.parquet")
    classes, where = report_calibrators.class_table(per_image, cfg.model.names(),
                                                    ["uncalibrated", "temperature"])
    assert where == "day"
    for c in ("uncalibrated", "temperature"):
        sce = summary[(summary.dataset == "day") & (summary.calibrator == c)].sce.iloc[0]
        assert classes[c].mean() == pytest.approx(sce, abs=1e-12)
    assert list(classes["uncalibrated"]) == sorted(classes["uncalibrated"], reverse=True)
    assert "Classwise ECE per class" in text


def test_sections_with_nothing_to_show_are_left_out(reported, tmp_path):
    _, page = reported  # day and dusk: a shifted set, but no corruption family, no selector
    text = page.read_text()
    assert "In-domain vs shifted" in text
    for absent in ("Shift curves", "Selector diagnostics", "shift-"):
        assert absent not in text
    cfg, _ = make_run(tmp_path, DATASETS[:1], evaluate_options={"bootstrap": 0})
    evaluate.run(cfg, local=True)
    text = report.write(cfg).read_text()
    assert "In-domain vs shifted" not in text
    assert "No recommendation: the run has no held-out calibration images" in text
    markdown = (Path(cfg.output) / "report.md").read_text()
    assert "## In-domain vs shifted" not in markdown
    assert "## Glossary" in markdown


def test_render_without_per_image_rows_leaves_out_what_needs_them(reported):
    cfg, _ = reported
    tables = report.read_tables(Path(cfg.output))
    markdown, page = report.render(cfg, tables, {})
    assert "Classwise ECE" not in page
    assert "Classwise ECE" not in markdown
    assert 'id="matrix"' in page
    bare = pd.DataFrame({"dataset": ["day"], "calibrator": ["uncalibrated"]})
    assert report_calibrators.flagged_share(bare) == {}
    assert report_calibrators.class_table(bare, [], ["uncalibrated"])[0].empty
