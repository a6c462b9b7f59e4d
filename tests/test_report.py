from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_evaluate import make_run

from pipeline import evaluate, report
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
