"""The registry's history page: image-wise ECE per domain over the decisions, promotions marked."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image

from pipeline import report_history


def _summary(scale: float) -> pd.DataFrame:
    rows = []
    for dataset, domain, n in (("day-a", "day", 2), ("day-b", "day", 6), ("fog-3", "fog-3", 4)):
        for calibrator, base in (("uncalibrated", 0.2), ("temperature", 0.1)):
            rows.append({"dataset": dataset, "domain": domain, "role": "test",
                         "calibrator": calibrator, "n_images": n,
                         "img_ece": scale * base * (2 if dataset == "day-b" else 1)})
    rows.append({"dataset": "cal-heldout", "domain": "day", "role": "calibration",
                 "calibrator": "temperature", "n_images": 3, "img_ece": 0.9})
    return pd.DataFrame(rows)


@pytest.fixture
def registry_dir(tmp_path):
    for run, scale in (("r1", 1.0), ("r2", 0.5)):
        (tmp_path / "runs" / run / "artifacts").mkdir(parents=True)
        _summary(scale).to_csv(tmp_path / "runs" / run / "summary.csv", index=False)
    entries = [
        {"time": "2026-12-01T02:00:00Z", "decision": "promoted", "challenger": "r1",
         "reason": "no champion yet"},
        {"time": "2026-12-02T02:00:00Z", "decision": "failed", "challenger": None,
         "reason": "RuntimeError: disk full"},
        {"time": "2026-12-03T02:00:00Z", "decision": "promoted", "challenger": "r2",
         "reason": "no worse anywhere"},
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return tmp_path


def test_history_table_pools_each_domain_over_its_test_sets(registry_dir):
    entries, table = report_history.history_table(registry_dir)
    assert [e["decision"] for e in entries] == ["promoted", "failed", "promoted"]
    day = table[(table.domain == "day") & (table.calibrator == "temperature")]
    # Weighted by images: (2 * 0.1 + 6 * 0.2) / 8; held-out rows are not test rows.
    assert list(day.step) == [0, 2]
    assert day.img_ece.tolist() == pytest.approx([0.175, 0.0875])
    assert set(table.domain) == {"day", "fog-3"}


def test_history_page_lists_every_decision_and_plots_every_domain(registry_dir):
    page = report_history.write(registry_dir)
    text = page.read_text()
    for reason in ("no champion yet", "RuntimeError: disk full", "no worse anywhere"):
        assert reason in text
    for domain in ("day", "fog-3"):
        assert f'<img src="history/{domain}.png"' in text
        with Image.open(registry_dir / "history" / f"{domain}.png") as image:
            assert image.format == "PNG"
    assert "<script" not in text
    assert "http" not in text
    assert not list(registry_dir.glob(".history-*"))


def test_a_decision_whose_run_is_gone_is_listed_without_numbers(registry_dir):
    with open(registry_dir / "history.jsonl", "a") as f:
        f.write(json.dumps({"decision": "kept", "challenger": "gone", "reason": "pruned"}) + "\n")
    entries, table = report_history.history_table(registry_dir)
    assert len(entries) == 4
    assert "gone" not in set(table.run)
    assert "pruned" in report_history.write(registry_dir).read_text()
