"""The history page of a refresh registry: image-wise ECE per domain over the nights.

``pipeline.report_history.write(REGISTRY)`` reads the registry's ``history.jsonl`` and, for
every decision that stored a challenger run, that run's ``summary.csv``; it writes
``REGISTRY/history.html`` and one small plot per test domain, ``REGISTRY/history/<domain>.png``:
the domain's image-wise ECE (pooled over its test sets, weighted by images) per calibrator, one
point per decision, with the promotions marked by vertical lines. The page also lists every
decision (time, decision, run, drift alarms, reason) and, when a refresh recorded them, the last
night's drift alarms and label-free estimates per set (``label_free`` in the history entry,
see :func:`pipeline.refresh_label_free.label_free_record`). Like the run report, it is one
HTML file with its images beside it and opens offline.

Only the decisions that name a stored run (``challenger``) have numbers; failed refreshes are
listed without.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import registry
from pipeline.paths import atomic_write_text, scratch_dir

HISTORY_HTML = "history.html"
HISTORY_PLOTS = "history"


def history_table(root: str | Path) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """The decisions and, per decision with a stored run, image-wise ECE per domain.

    Args:
        root: the registry folder.

    Returns:
        ``(entries, table)``: the history entries, oldest first, and a table with columns
        ``step, time, decision, run, domain, calibrator, img_ece`` (``step`` indexes
        ``entries``); a run whose summary cannot be read is left out of the table.
    """
    entries = registry.history(root)
    records = []
    for step, entry in enumerate(entries):
        run = entry.get("challenger")
        if not run:
            continue
        try:
            summary = registry.read_summary(root, run)
        except (registry.RegistryError, ValueError, OSError):
            continue
        if not {"domain", "calibrator", "img_ece", "n_images"} <= set(summary.columns):
            continue  # not a summary evaluate wrote (a stub, or a run from before domains)
        test = summary[summary["role"] == "test"] if "role" in summary else summary
        for (domain, calibrator), g in test.groupby(["domain", "calibrator"], sort=False):
            records.append({
                "step": step, "time": entry.get("time", ""), "decision": entry.get("decision"),
                "run": run, "domain": domain, "calibrator": calibrator,
                "img_ece": float(np.average(g["img_ece"], weights=g["n_images"])),
            })
    columns = ["step", "time", "decision", "run", "domain", "calibrator", "img_ece"]
    return entries, pd.DataFrame.from_records(records, columns=columns)


def plot_domain(domain: str, rows: pd.DataFrame, promoted: list[int], path: Path) -> Path:
    """Image-wise ECE of one domain per decision, one line per calibrator, promotions marked."""
    fig = Figure(figsize=(3.2, 3.2))
    ax = fig.subplots()
    for i, (calibrator, g) in enumerate(rows.groupby("calibrator", sort=False)):
        style = {"color": "black", "ls": "--"} if calibrator == registry.UNCALIBRATED else \
            {"color": f"C{i % 10}"}
        ax.plot(g["step"], g["img_ece"], marker="o", ms=3, lw=1.2, label=calibrator, **style)
    for step in promoted:
        ax.axvline(step, color="#2a7", lw=1, alpha=0.6)
    ax.set(title=domain, xlabel="decision (green: promoted)", ylabel="image-wise ECE",
           ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2,
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _alarms(entry: dict[str, Any]) -> str:
    record = entry.get("label_free")
    if not isinstance(record, dict):
        return "–"
    alarms = record.get("alarms") or []
    return ", ".join(map(str, alarms)) if alarms else "none"


def _cell(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def label_free_html(entry: dict[str, Any]) -> str:
    """One history entry's drift alarms and label-free estimates as a table, one row per set."""
    esc = html.escape
    record = entry.get("label_free")
    if not isinstance(record, dict) or not record.get("sets"):
        return ""
    calibrator = record.get("calibrator") or "no calibrator (estimates not measured)"
    rows = []
    for s in record["sets"]:
        alarm = {True: "<b>ALARM</b>", False: "ok"}.get(s.get("drift_alarm"), "–")
        cls = ' class="alarm"' if s.get("drift_alarm") else ""
        rows.append(
            f"<tr{cls}><td>{esc(str(s.get('dataset')))}</td><td>{esc(str(s.get('role') or '–'))}"
            f"</td><td>{_cell(s.get('drift_score'))}</td><td>{_cell(s.get('drift_threshold'))}"
            f"</td><td>{alarm}</td><td>{_cell(s.get('est_pixel_acc'))}</td>"
            f"<td>{_cell(s.get('est_pixel_acc_doc'))}</td><td>{_cell(s.get('true_pixel_acc'))}"
            f"</td><td>{_cell(s.get('est_img_ece'), 4)}</td>"
            f"<td>{_cell(s.get('true_img_ece'), 4)}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in (
        "set", "role", "drift score", "threshold", "alarm", "pixel acc (ATC)", "pixel acc (DoC)",
        "true pixel acc", "image-wise ECE (est.)", "true image-wise ECE"))
    return (f'<p>{esc(str(entry.get("time", "")))} ({esc(str(entry.get("decision", "")))}): '
            f"drift alarm on {esc(_alarms(entry))}; estimates of <b>{esc(calibrator)}</b>, the "
            "current run's calibrator, from the logits alone (the truth where the set has "
            "labels).</p>"
            f'<table id="label-free"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def render(entries: list[dict[str, Any]], figures: dict[str, str], title: str) -> str:
    """The history page: the plots, the last label-free check, then every decision."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{i}</td><td>{esc(str(e.get('time', '')))}</td>"
        f"<td>{esc(str(e.get('decision', e.get('action', ''))))}</td>"
        f"<td>{esc(str(e.get('challenger') or '–'))}</td>"
        f"<td>{esc(_alarms(e))}</td>"
        f"<td>{esc(str(e.get('reason', '')))}</td></tr>"
        for i, e in enumerate(entries))
    plots = "".join(f'<img src="{esc(src)}" alt="image-wise ECE of {esc(domain)} over time">'
                    for domain, src in figures.items())
    css = ("body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1360px;"
           "padding:0 16px 40px}.plots{display:flex;flex-wrap:wrap;gap:8px}"
           ".plots img{width:320px;max-width:100%}table{border-collapse:collapse;width:100%;"
           "font-size:12px}th,td{padding:3px 6px;border-bottom:1px solid #e4e4e4;"
           "text-align:left;vertical-align:top}td:last-child{overflow-wrap:anywhere}"
           "th{background:#f4f4f4}tr.alarm td{background:#fdecea}"
           "#label-free td:nth-child(n+3),#label-free th:nth-child(n+3){text-align:right}")
    body = [f"<h1>{esc(title)}</h1>"]
    if figures:
        body += ["<h2>Image-wise ECE per domain, decision by decision</h2>",
                 f'<div class="plots" id="history-plots">{plots}</div>']
    checked = [e for e in entries if isinstance(e.get("label_free"), dict)]
    last = label_free_html(checked[-1]) if checked else ""
    if last:
        body += ["<h2>Last night without labels: drift and label-free estimates</h2>", last]
    body += ["<h2>Decisions</h2>",
             "<table><thead><tr><th>#</th><th>time</th><th>decision</th><th>run</th>"
             "<th>drift alarms</th>"
             f"<th>reason</th></tr></thead><tbody>{rows}</tbody></table>"]
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', '<head><meta charset="utf-8">',
                      f"<title>{esc(title)}</title><style>{css}</style></head>", "<body>",
                      *body, "</body>", "</html>", ""])


def write(root: str | Path) -> Path:
    """Write ``REGISTRY/history.html`` and its plots from the registry's history.

    Args:
        root: the registry folder.

    Returns:
        The path of ``history.html``.
    """
    root = Path(root)
    entries, table = history_table(root)
    promoted = [i for i, e in enumerate(entries) if e.get("decision") == "promoted"]
    tmp = scratch_dir(root, "history")
    try:
        figures = {}
        for domain, rows in table.groupby("domain", sort=False):
            name = f"{HISTORY_PLOTS}/{domain}.png"
            plot_domain(str(domain), rows, promoted, tmp / name)
            figures[str(domain)] = name
        page = render(entries, figures, f"segcal registry history: {root.name}")
        plots = root / HISTORY_PLOTS
        if plots.exists():
            shutil.rmtree(plots)
        if figures:
            (tmp / HISTORY_PLOTS).replace(plots)
        atomic_write_text(root / HISTORY_HTML, page)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / HISTORY_HTML
