"""The Markdown and HTML report of an evaluated run: tables, reliability diagrams, verdicts.

Run it with ``segcal report CONFIG`` (or ``pipeline.report.write(cfg)``) after ``segcal
evaluate``. It reads the tables in ``OUTPUT`` (``summary.csv``, ``domain_shift.csv``,
``best.csv`` and the bins of ``per_image.parquet``) and writes ``OUTPUT/report.md``,
``OUTPUT/report.html`` and one figure per dataset, ``OUTPUT/plots/<dataset>.png``: a
reliability diagram (accuracy against confidence per bin, with the gap to the diagonal shaded)
above a confidence histogram (the bin mass) for every calibrator.

The reliability bins are the sums of the per-image statistics rows, never recomputed from
pixels. The HTML is self-contained apart from the PNG files it names by relative path: no
script, no stylesheet and no font from the network, so it opens from disk.

Files are written to a temporary folder inside ``OUTPUT`` and moved into place at the end,
``report.html`` last, so a failed run leaves the previous report readable.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.config import JobConfig, config_hash
from pipeline.evaluate import BEST, DOMAIN_SHIFT, PER_IMAGE, SUMMARY, UNCALIBRATED
from pipeline.metrics.functional import ece_from_bins
from pipeline.paths import atomic_write_text, scratch_dir

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"
_BIN_COLUMNS = ("count", "conf_sum", "correct_sum")
_SUMMARY_SHOWN = (
    "dataset", "calibrator", "n_images", "img_ece", "ece", "mce", "ace", "sce", "nll", "brier",
    "miou", "pixel_acc", "boundary_ece", "ece_correct", "ece_incorrect", "msp_auroc",
    "mis_auroc", "flag_precision", "flag_recall",
)
_SHIFT_SHOWN = (
    "dataset", "reference", "calibrator", "img_ece_reference", "img_ece", "img_ece_delta",
    "ece_delta", "nll_delta", "miou_delta", "pixel_acc_delta",
)
_BEST_SHOWN = (
    "domain", "datasets", "n_images", "best", "img_ece", "nll", "uncalibrated_img_ece",
    "reduction",
)


# ---------------------------------------------------------------------------------------------
# Data


def read_tables(output: Path) -> dict[str, pd.DataFrame]:
    """The evaluation tables of a run folder.

    Raises:
        FileNotFoundError: a table is missing (evaluate has not run or failed).
    """
    missing = [n for n in (SUMMARY, DOMAIN_SHIFT, BEST, PER_IMAGE) if not (output / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Expected the evaluation tables {missing} in {output}, but they are missing: run "
            "`segcal evaluate` first"
        )
    return {name: pd.read_csv(output / name) for name in (SUMMARY, DOMAIN_SHIFT, BEST)}


def reliability_bins(per_image: Path) -> dict[tuple[str, str], tuple[np.ndarray, ...]]:
    """Top-label bins per dataset x calibrator, summed over the per-image rows.

    Args:
        per_image: the ``per_image.parquet`` table (only the bin columns are read).

    Returns:
        (dataset, calibrator) -> ``(count, conf_sum, correct_sum)``, each (n_bins,).
    """
    rows = pd.read_parquet(per_image, columns=["dataset", "calibrator", *_BIN_COLUMNS])
    bins = {}
    for key, group in rows.groupby(["dataset", "calibrator"], sort=False):
        bins[key] = tuple(np.stack(group[c].to_numpy()).sum(0) for c in _BIN_COLUMNS)
    return bins


# ---------------------------------------------------------------------------------------------
# Figures


def _panel(top: Axes, bottom: Axes, bins: tuple[np.ndarray, ...], title: str) -> None:
    count, conf_sum, correct_sum = bins
    n_bins = len(count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    full = count > 0
    acc = np.divide(correct_sum, count, out=np.zeros(n_bins), where=full)
    conf = np.divide(conf_sum, count, out=np.zeros(n_bins), where=full)
    top.bar(centers[full], acc[full], width=width, color="#4c72b0", edgecolor="white",
            label="accuracy")
    # The gap between each bin's accuracy and its mean confidence (the bin's ECE term).
    top.bar(centers[full], conf[full] - acc[full], bottom=acc[full], width=width,
            color="#dd8452", alpha=0.45, hatch="//", edgecolor="#c44e52", label="gap")
    top.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
    top.set(xlim=(0, 1), ylim=(0, 1), title=title, ylabel="accuracy")
    mass = count / max(int(count.sum()), 1)
    bottom.bar(centers, mass, width=width, color="#55a868", edgecolor="white")
    total = max(int(count.sum()), 1)
    bottom.axvline(conf_sum.sum() / total, color="#c44e52", lw=1.2, label="mean confidence")
    bottom.axvline(correct_sum.sum() / total, color="#4c72b0", lw=1.2, ls="--", label="accuracy")
    bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction of pixels")


def plot_dataset(
    dataset: str,
    bins: dict[str, tuple[np.ndarray, ...]],
    summary: pd.DataFrame,
    path: Path,
) -> Path:
    """One figure for a dataset: per calibrator, a reliability diagram over its histogram.

    Args:
        dataset: the dataset name (figure title).
        bins: calibrator -> ``(count, conf_sum, correct_sum)``, in panel order.
        summary: the dataset's summary rows (for the image-wise ECE in the titles).
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    img_ece = summary.set_index("calibrator")["img_ece"]
    # A bare Figure (no pyplot): Agg renders it, no display or global figure state is needed.
    fig = Figure(figsize=(3.2 * len(bins), 5.6))
    axes = fig.subplots(2, len(bins), squeeze=False, sharex=True,
                        gridspec_kw={"height_ratios": [3, 1.4]})
    for i, (calibrator, b) in enumerate(bins.items()):
        title = f"{calibrator}\nECE {ece_from_bins(*b):.3f} · img-ECE {img_ece[calibrator]:.3f}"
        _panel(axes[0, i], axes[1, i], b, title)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[1, 0].legend(loc="upper left", fontsize=7)
    fig.suptitle(dataset)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


# ---------------------------------------------------------------------------------------------
# Text


def verdicts(summary: pd.DataFrame, best: pd.DataFrame) -> list[str]:
    """One plain-language line per test domain (and per selector's detection quality).

    Example:
        >>> best = pd.DataFrame({"domain": ["dusk"], "best": ["temperature"],
        ...     "img_ece": [0.042], "uncalibrated_img_ece": [0.064], "reduction": [0.34375]})
        >>> verdicts(pd.DataFrame(columns=["role", "domain", "mis_auroc"]), best)
        ['dusk: uncalibrated image-wise ECE 0.064; best is temperature (0.042, -34%)']
    """
    lines = []
    for row in best.itertuples(index=False):
        base = f"{row.domain}: uncalibrated image-wise ECE {row.uncalibrated_img_ece:.3f}"
        if row.best == UNCALIBRATED:
            lines.append(f"{base}; no calibrator improves on it")
        else:
            change = -100 * row.reduction
            lines.append(f"{base}; best is {row.best} ({row.img_ece:.3f}, {change:+.0f}%)")
        selectors = summary[(summary["role"] == "test") & (summary["domain"] == row.domain)
                            & summary["mis_auroc"].notna()]
        for s in selectors.itertuples(index=False):
            lines.append(
                f"{s.dataset}: selector of {s.calibrator} detects mispredictions with AUROC "
                f"{s.mis_auroc:.2f} (1 - max p: {s.msp_auroc:.2f}); its flags have precision "
                f"{s.flag_precision:.2f} and recall {s.flag_recall:.2f} "
                f"(1 - max p > 0.5: {s.msp_precision:.2f} / {s.msp_recall:.2f})"
            )
    return lines


def _fmt(value: object) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _shown(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The columns worth showing: those present and not entirely NaN."""
    keep = [c for c in columns if c in table and not table[c].isna().all()]
    shown = table[keep].copy()
    if {"img_ece_lo", "img_ece_hi", "img_ece"} <= set(table) and table["img_ece_lo"].notna().any():
        ci = zip(table["img_ece"], table["img_ece_lo"], table["img_ece_hi"], strict=True)
        shown["img_ece"] = [f"{m:.4f} [{lo:.4f}, {hi:.4f}]" for m, lo, hi in ci]
    if "reduction" in shown:
        shown["reduction"] = [_fmt(r) if math.isnan(r) else f"{100 * r:.1f}%"
                              for r in shown["reduction"]]
    return shown


def _markdown_table(table: pd.DataFrame) -> str:
    head = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _html_table(table: pd.DataFrame) -> str:
    cells = table.map(_fmt)
    return cells.to_html(index=False, border=0, classes="t", escape=True)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table.t{border-collapse:collapse;font-size:13px;margin:1em 0;display:block;overflow-x:auto}
table.t th,table.t td{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}
table.t th{background:#f4f4f4}
img{max-width:100%;border:1px solid #eee}
code{background:#f4f4f4;padding:0 3px}
"""


def render(
    cfg: JobConfig, tables: dict[str, pd.DataFrame], figures: dict[str, str]
) -> tuple[str, str]:
    """The report as Markdown and as HTML.

    Args:
        cfg: the run config (named in the header).
        tables: the evaluation tables by file name.
        figures: dataset -> figure path relative to the output folder.

    Returns:
        ``(markdown, html)``.
    """
    summary, shift, best = tables[SUMMARY], tables[DOMAIN_SHIFT], tables[BEST]
    source = str(cfg.source or "<dict>")
    sections = [
        ("Summary", _shown(summary, _SUMMARY_SHOWN),
         "One row per dataset and calibrator. img_ece is the mean over images of each image's "
         "ECE, with its 95% bootstrap interval; ece is pooled over all pixels."),
        ("Domain shift", _shown(shift, _SHIFT_SHOWN),
         "Each shifted dataset beside its reference domain; deltas are shifted minus reference."),
        ("Best calibrator per domain", _shown(best, _BEST_SHOWN),
         "Ranked by image-wise ECE, ties broken by NLL; reduction is against uncalibrated."),
    ]
    lines = verdicts(summary, best)

    md = [f"# segcal report: {Path(cfg.output).name}", "",
          f"Config `{source}` (hash `{config_hash(cfg)}`).", "", "## Verdict", ""]
    md += [f"- {line}" for line in lines] + [""]
    for title, table, note in sections:
        md += [f"## {title}", "", note, "", _markdown_table(table), ""]
    md += ["## Reliability diagrams", ""]
    for dataset, src in figures.items():
        md += [f"### {dataset}", "", f"![{dataset}]({src})", ""]

    esc = html.escape
    body = [f"<h1>segcal report: {esc(Path(cfg.output).name)}</h1>",
            f"<p>Config <code>{esc(source)}</code> (hash <code>{config_hash(cfg)}</code>).</p>",
            "<h2>Verdict</h2>", "<ul>", *[f"<li>{esc(line)}</li>" for line in lines], "</ul>"]
    for title, table, note in sections:
        body += [f"<h2>{esc(title)}</h2>", f"<p>{esc(note)}</p>", _html_table(table)]
    body.append("<h2>Reliability diagrams</h2>")
    for dataset, src in figures.items():
        body += [f"<h3>{esc(dataset)}</h3>",
                 f'<img src="{esc(src)}" alt="reliability diagrams of {esc(dataset)}">']
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>segcal report: {esc(Path(cfg.output).name)}</title>",
        f"<style>{_CSS}</style>", "</head>", "<body>", *body, "</body>", "</html>", "",
    ])
    return "\n".join(md), page


# ---------------------------------------------------------------------------------------------
# Entry point


def write(cfg: JobConfig) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` from the evaluation tables.

    Args:
        cfg: the run config; the tables are read from ``cfg.output``.

    Returns:
        The path of ``report.html``.

    Raises:
        FileNotFoundError: the evaluation tables are missing.
    """
    output = Path(cfg.output)
    tables = read_tables(output)
    summary = tables[SUMMARY]
    tmp = scratch_dir(output, "report")
    try:
        bins = reliability_bins(output / PER_IMAGE)
        figures = {}
        for dataset, rows in summary.groupby("dataset", sort=False):
            panels = {c: bins[(dataset, c)] for c in rows["calibrator"]}
            name = f"{PLOTS}/{dataset}.png"
            plot_dataset(dataset, panels, rows, tmp / name)
            figures[dataset] = name
        markdown, page = render(cfg, tables, figures)
        atomic_write_text(tmp / REPORT_MD, markdown)
        atomic_write_text(tmp / REPORT_HTML, page)
        plots = output / PLOTS
        plots.mkdir(exist_ok=True)
        for name in figures.values():
            os.replace(tmp / name, output / name)
        os.replace(tmp / REPORT_MD, output / REPORT_MD)
        os.replace(tmp / REPORT_HTML, output / REPORT_HTML)
        for stale in set(plots.glob("*.png")) - {output / n for n in figures.values()}:
            stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / REPORT_HTML
