"""The HTML page of a report: one file, inline style and script, sized for a 1400 px window.

:func:`render_html` turns :class:`pipeline.report.Content` into the page. Layout rules that
keep it inside the window: every table has ``table-layout: fixed`` (or fits by construction)
and a width of 100%, headers wrap (after underscores too), interval cells never wrap, and the
long summary table sits in a box that scrolls by itself rather than widening the page.
The only script sorts a table's rows within each dataset group when a header is clicked.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline import report_data as rd

if TYPE_CHECKING:
    from pipeline.report import Content

_CSS = """
*{box-sizing:border-box}
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1360px;color:#222;
padding:0 16px 40px}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:17px;margin:22px 0 6px;
border-bottom:1px solid #ddd}
.meta{color:#666;font-size:12px;margin:0 0 8px}
.rec{border-left:5px solid #2a7;background:#f3faf6;padding:8px 12px;margin:8px 0}
.rec.none{border-color:#d90;background:#fdf8ec}
.rec p{margin:3px 0}.rec p:first-child{font-weight:600}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{padding:3px 5px;border-bottom:1px solid #e4e4e4;text-align:right}
th{background:#f4f4f4;font-weight:600;font-size:12px;vertical-align:bottom}
th:first-child,td:first-child{text-align:left}
table.m{font-size:13px;table-layout:fixed}
table.m th,table.m td{overflow-wrap:anywhere}
table.m th:first-child{width:170px}
table.m td,table.m th{text-align:center;line-height:1.15}
table.m td:first-child,table.m th:first-child{text-align:left}
table.m th.ref,table.m td.ref{border-left:2px solid #bbb}
table.m th.ref{font-style:italic;color:#555}
table.m td.best{font-weight:700;outline:2px solid #185;outline-offset:-2px}
table.m tr.held td:first-child{font-style:italic}
table.m tr.sep td{background:#fafafa;color:#666;font-size:11px;text-align:left;
border-bottom:1px solid #ccc}
.ci{display:block;font-size:10px;color:#555;font-weight:400;white-space:nowrap}
.small{font-size:12px;color:#555}
.plots{display:flex;flex-wrap:wrap;gap:8px}
.plots img{width:320px;max-width:100%;border:1px solid #eee}
img.rel{max-width:100%;border:1px solid #eee}
table.t{font-size:12px}
table.s{font-size:11px}
table.s td{white-space:nowrap}
table.lf td{white-space:nowrap}
table.s th{cursor:pointer}
table.s tr.g th{background:#e9eef5;text-align:left;font-size:12px;cursor:default}
.scroll{overflow-x:auto;max-width:100%}
ul.params{padding-left:18px;margin:4px 0}
dl.gl{columns:2;column-gap:32px;font-size:12px;margin:4px 0}
dl.gl dt{font-family:monospace;font-weight:600;break-after:avoid}
dl.gl dd{margin:0 0 4px 12px;break-inside:avoid}
code{background:#f4f4f4;padding:0 3px}
"""

# Sorts each tbody's data rows (tr.r) by the clicked column; numbers by value, text otherwise.
_JS = """
document.querySelectorAll('table.s').forEach(function(t){
  t.querySelectorAll('thead th').forEach(function(th,i){
    th.title='click to sort';
    th.addEventListener('click',function(){
      var asc=th.dataset.dir!=='asc';th.dataset.dir=asc?'asc':'desc';
      t.querySelectorAll('tbody').forEach(function(tb){
        var rows=Array.prototype.slice.call(tb.querySelectorAll('tr.r'));
        rows.sort(function(a,b){
          var x=a.cells[i].textContent,y=b.cells[i].textContent;
          var p=parseFloat(x),q=parseFloat(y);
          var c=(isNaN(p)||isNaN(q))?x.localeCompare(y):p-q;
          return asc?c:-c;});
        rows.forEach(function(r){tb.appendChild(r);});});});});});
"""

esc = html.escape

_REF_TITLE = {
    True: "reference, never recommended",
    False: "bound: a temperature fitted on each test set's own labels; never recommended",
}


def _head(name: str) -> str:
    """A header cell's text, allowed to break after underscores."""
    return esc(str(name)).replace("_", "_<wbr>")


def _fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    if value is None:
        return "–"
    return str(value)


def _colour(value: float, lo: float, hi: float) -> str:
    """Green (lowest in the row) to red (highest), light enough for black text."""
    if math.isnan(value):
        return "#f7f7f7"
    t = 0.0 if hi <= lo else (value - lo) / (hi - lo)
    return f"hsl({120 * (1 - t):.0f},60%,{84 + 4 * abs(t - 0.5):.0f}%)"


def table_html(table: pd.DataFrame, *, digits: int = 4, cls: str = "t") -> str:
    """A plain table (numbers right-aligned, first column left)."""
    head = "".join(f"<th>{_head(c)}</th>" for c in table.columns)
    rows = ["<tr>" + "".join(f"<td>{esc(_fmt(v, digits))}</td>" for v in row) + "</tr>"
            for row in table.itertuples(index=False)]
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def matrix_html(content: Content) -> str:
    """The image-wise ECE matrix: sets x calibrators, coloured per set, best marked."""
    from pipeline.report import matrix_cells

    head = ['<th>set</th>'] + [
        f'<th class="ref" title="{esc(_REF_TITLE[c == rd.UNCALIBRATED])}">{_head(c)}</th>'
        if rd.is_reference_column(c) else f"<th>{_head(c)}</th>" for c in content.columns]
    body = []
    n = len(content.columns) + 1
    groups = [("held-out calibration images: the recommendation is decided here", "held",
               content.heldout_sets),
              ("test sets: shown, never used to choose", "", content.test_sets)]
    for label, cls, sets in groups:
        if not sets:
            continue
        body.append(f'<tr class="sep"><td colspan="{n}">{esc(label)}</td></tr>')
        for dataset in sets:
            cells = matrix_cells(content, dataset)
            values = [v for c, v, *_ in cells if not math.isnan(v)
                      and (not rd.is_reference_column(c) or c == rd.UNCALIBRATED)]
            lo, hi = (min(values), max(values)) if values else (0.0, 0.0)
            tds = []
            for c, v, ci_lo, ci_hi, best in cells:
                classes = [k for k, on in (("ref", rd.is_reference_column(c)), ("best", best))
                           if on]
                interval = "" if math.isnan(ci_lo) else f"[{ci_lo:.3f}, {ci_hi:.3f}]"
                title = f"{c} on {dataset}: {_fmt(v)}" + (
                    f", 95% interval {interval}" if interval else "")
                mark = " ★" if best else ""
                attr = f' class="{" ".join(classes)}"' if classes else ""
                tds.append(
                    f'<td{attr} style="background:{_colour(v, lo, hi)}" '
                    f'title="{esc(title)}">{_fmt(v, 3)}{mark}'
                    f'<span class="ci">{interval}</span></td>')
            row_cls = f' class="{cls}"' if cls else ""
            body.append(f"<tr{row_cls}><td>{esc(dataset)}</td>{''.join(tds)}</tr>")
    return (f'<table class="m" id="matrix"><thead><tr>{"".join(head)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def summary_html(table: pd.DataFrame) -> str:
    """The full summary: one tbody per dataset (a group row), sortable by header."""
    columns = [c for c in table.columns if c != "dataset"]
    head = "".join(f"<th>{_head(c)}</th>" for c in columns)
    bodies = []
    for dataset, g in table.groupby("dataset", sort=False):
        rows = [f'<tr class="g"><th colspan="{len(columns)}">{esc(str(dataset))}</th></tr>']
        for row in g[columns].itertuples(index=False):
            rows.append('<tr class="r">' + "".join(f"<td>{esc(_fmt(v))}</td>" for v in row)
                        + "</tr>")
        bodies.append(f"<tbody>{''.join(rows)}</tbody>")
    return (f'<div class="scroll"><table class="s" id="summary"><thead><tr>{head}</tr></thead>'
            f'{"".join(bodies)}</table></div>')


def render_html(content: Content) -> str:
    """The report page."""
    from pipeline.report import shift_matrix, summary_rows

    rec = content.recommendation
    box = "rec" if rec.pick else "rec none"
    body = [f"<h1>{esc(content.title)}</h1>",
            f'<p class="meta">Config <code>{esc(content.source)}</code> '
            f"(hash <code>{esc(content.config_hash)}</code>).</p>",
            f'<div class="{box}" id="recommendation">'
            + "".join(f"<p>{esc(line)}</p>" for line in content.lines) + "</div>"]
    if content.heldout_sets or content.test_sets:
        body += ["<h2>Image-wise ECE per set</h2>",
                 '<p class="small">Lower is better. Colour runs from the lowest (green) to the '
                 "highest (red) value of each row; ★ marks the lowest; the second line is the "
                 "95% bootstrap interval over images (also on hover). Reference columns "
                 "(italic) are never recommended"
                 + (": oracle columns are bounds, fitted on each test set's own labels, which "
                    "show how much of its error one temperature could remove"
                    if any("oracle" in c.lower() for c in content.columns) else "")
                 + ".</p>", matrix_html(content)]
    if content.shift_figures:
        body += ["<h2>Shift curves</h2>",
                 '<p class="small">Per corruption family, image-wise ECE against severity '
                 "(0: the reference domain); all plots share one y-axis.</p>",
                 '<div class="plots" id="shift-plots">']
        body += [f'<img src="{esc(src)}" alt="image-wise ECE against severity, {esc(kind)}">'
                 for kind, src in content.shift_figures.items()]
        body.append("</div>")
    shift = shift_matrix(content)
    if not shift.empty:
        body += ["<h2>In-domain vs shifted</h2>",
                 '<p class="small">Image-wise ECE on each shifted set; in brackets, minus the '
                 "same calibrator's on the reference domain.</p>", table_html(shift)]
    if not content.label_free.empty:
        from pipeline.report import LABEL_FREE_NOTE

        body += ['<h2 id="label-free">Label-free estimates</h2>',
                 f"<p>{esc(content.label_free_text)}</p>",
                 f'<p class="small">{esc(LABEL_FREE_NOTE)}</p>',
                 table_html(content.label_free, cls="t lf")]
        if not content.label_free_errors.empty:
            body += ['<p class="small">Mean absolute error of each estimate over the labelled '
                     "sets, per calibrator:</p>", table_html(content.label_free_errors)]
    if content.params:
        body += ["<h2>Fitted calibrators</h2>", '<ul class="params">']
        body += [f"<li><b>{esc(label)}</b>: {esc(text)}</li>"
                 for label, text in content.params.items()]
        body.append("</ul>")
    if not content.selectors.empty:
        body += ["<h2>Selector diagnostics</h2>", f"<p>{esc(content.selector_text)}</p>",
                 table_html(content.selectors)]
    if not content.classes.empty:
        body += ["<h2>Classwise ECE per class</h2>",
                 f'<p class="small">Pooled over {esc(content.classes_where)}; worst classes '
                 "first. Calibrator columns hold that calibrator's classwise ECE; mean p "
                 "against pixel share is the class's confidence against its frequency.</p>",
                 table_html(content.classes)]
    rows = summary_rows(content.summary)
    body += ["<h2>Summary</h2>",
             '<p class="small">One group per dataset; click a header to sort within each '
             "group.</p>", summary_html(rows), "<h2>Glossary</h2>", '<dl class="gl">']
    body += [f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rd.glossary(rows.columns).items()]
    body.append("</dl>")
    if content.figures:
        body.append("<h2>Reliability diagrams</h2>")
        for dataset, src in content.figures.items():
            body += [f"<h3>{esc(dataset)}</h3>",
                     f'<img class="rel" src="{esc(src)}" '
                     f'alt="reliability diagrams of {esc(dataset)}">']
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width">',
        f"<title>{esc(content.title)}</title>", f"<style>{_CSS}</style>", "</head>",
        "<body>", *body, f"<script>{_JS}</script>", "</body>", "</html>", "",
    ])
