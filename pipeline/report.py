"""The Markdown and HTML report of an evaluated run: the answer first, then the evidence.

Run it with ``segcal report CONFIG`` (or ``pipeline.report.write(cfg)``) after ``segcal
evaluate``. It reads the tables in ``OUTPUT`` (``summary.csv``, ``domain_shift.csv``,
``best.csv``, ``per_image.parquet`` and the artifact cards ``artifacts/*/calibrator.json``) and
writes ``OUTPUT/report.md``, ``OUTPUT/report.html`` and its figures in ``OUTPUT/plots/``.

The page, top to bottom (sections with nothing to show are left out):

1. The recommendation, decided on the held-out calibration images only
   (:func:`pipeline.report_data.recommend`), in two or three sentences.
2. The matrix of image-wise ECE, test sets x calibrators, coloured per set, the best marked,
   the 95% interval in a second line and on hover; uncalibrated (and oracle bounds) first.
3. Shift curves: per corruption family, image-wise ECE against severity per calibrator
   (``plots/shift-<family>.png``, one y-axis for all), and each shifted set against its
   reference domain.
4. Label-free estimates (when ``label_free.csv`` exists): per monitor or test set the drift
   score and alarm, and for uncalibrated and the recommended calibrator the estimated pixel
   accuracy (ATC, DoC) and image-wise ECE beside the truth (labelled sets only), with the mean
   absolute error over the labelled sets, and per calibrator the same errors.
5. Each calibrator's fitted values in words, the selector diagnostics, classwise ECE per class.
6. The full summary, one sortable group per dataset, a glossary, and per dataset a reliability
   diagram over a confidence histogram (``plots/<dataset>.png``).

The reliability bins are the sums of the per-image statistics rows, never recomputed from
pixels. The HTML is self-contained apart from the PNG files it names by relative path: its
style and its few lines of script (column sorting) are inline, nothing comes from the network,
so it opens from disk.

Files are written to a temporary folder inside ``OUTPUT`` and moved into place at the end,
``report.html`` last, so a failed run leaves the previous report readable.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline import report_calibrators as rc
from pipeline import report_data as rd
from pipeline import report_label_free as rlf
from pipeline.config import JobConfig, config_hash
from pipeline.evaluate_tables import UNCALIBRATED
from pipeline.metrics.functional import ece_from_bins
from pipeline.paths import (
    BEST,
    DOMAIN_SHIFT,
    LABEL_FREE,
    PER_IMAGE,
    REPORT_HTML,
    REPORT_MD,
    SUMMARY,
    atomic_write_text,
    scratch_dir,
)

PLOTS = "plots"
_BIN_COLUMNS = ("count", "conf_sum", "correct_sum")
_PER_IMAGE_COLUMNS = (
    "dataset", "role", "reference", "calibrator", "image_id", "img_ece", "num_classes",
    "mis_hist_cor", "mis_hist_inc", "cls_count", "cls_conf_sum", "cls_correct_sum",
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
    tables = {name: pd.read_csv(output / name) for name in (SUMMARY, DOMAIN_SHIFT, BEST)}
    if (output / LABEL_FREE).is_file():  # only with monitor or test sets
        tables[LABEL_FREE] = pd.read_csv(output / LABEL_FREE)
    return tables


def reliability_bins(per_image: Path) -> dict[tuple[str, str], tuple[np.ndarray, ...]]:
    """Top-label bins per dataset x calibrator, summed over the per-image rows.

    Args:
        per_image: the ``per_image.parquet`` table (only the bin columns are read).

    Returns:
        (dataset, calibrator) -> ``(count, conf_sum, correct_sum)``, each (n_bins,).
    """
    rows = pd.read_parquet(per_image, columns=["dataset", "calibrator", *_BIN_COLUMNS])
    rows = rows[rows["count"].notna()]  # monitor sets: no labels, no bins
    bins = {}
    for key, group in rows.groupby(["dataset", "calibrator"], sort=False):
        bins[key] = tuple(np.stack(group[c].to_numpy()).sum(0) for c in _BIN_COLUMNS)
    return bins


def read_per_image(per_image: Path) -> pd.DataFrame:
    """The per-image rows the report needs (ECE, selector histograms, classwise bins)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(per_image).names)
    return pd.read_parquet(per_image, columns=[c for c in _PER_IMAGE_COLUMNS if c in names])


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


def plot_family(kind: str, curve: pd.DataFrame, ylim: tuple[float, float], path: Path) -> Path:
    """One small figure: image-wise ECE against corruption severity, one line per calibrator.

    Args:
        kind: the corruption family (title).
        curve: severity (index; 0 is the reference domain) x calibrator image-wise ECE.
        ylim: the y-axis range, the same for every family.
        path: the PNG file to write.

    Returns:
        ``path``.
    """
    fig = Figure(figsize=(3.2, 3.4))
    ax = fig.subplots()
    for i, calibrator in enumerate(curve.columns):
        style = {"color": "black", "ls": "--"} if calibrator == UNCALIBRATED else \
            {"color": f"C{i % 10}"}
        ax.plot(curve.index, curve[calibrator], marker="o", ms=3, lw=1.4, label=calibrator,
                **style)
    ax.set(title=kind, xlabel="severity (0: reference)", ylabel="image-wise ECE", ylim=ylim,
           xticks=list(curve.index))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2,
              frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# What the report shows


@dataclass
class Content:
    """Everything the report shows, ready to render as Markdown or HTML."""

    title: str
    source: str
    config_hash: str
    recommendation: rd.Recommendation
    lines: list[str]
    summary: pd.DataFrame
    columns: list[str]
    best: dict[str, str]
    heldout_sets: list[str]
    test_sets: list[str]
    shift: pd.DataFrame
    shift_figures: dict[str, str]
    params: dict[str, str]
    selectors: pd.DataFrame
    selector_text: str
    classes: pd.DataFrame
    classes_where: str
    figures: dict[str, str]
    label_free: pd.DataFrame = field(default_factory=pd.DataFrame)
    label_free_errors: pd.DataFrame = field(default_factory=pd.DataFrame)
    label_free_text: str = ""


def build(
    cfg: JobConfig,
    tables: Mapping[str, pd.DataFrame],
    figures: Mapping[str, str],
    *,
    per_image: pd.DataFrame | None = None,
    shift_figures: Mapping[str, str] | None = None,
    cards: Mapping[str, Mapping] | None = None,
) -> Content:
    """Assemble the report's content from the run's tables.

    Args:
        cfg: the run config.
        tables: the evaluation tables by file name.
        figures: dataset -> reliability figure path relative to the output folder.
        per_image: the per-image rows (:data:`_PER_IMAGE_COLUMNS`); None leaves out what needs
            them (pooled held-out intervals over several sets, flagged share, classes).
        shift_figures: corruption family -> figure path relative to the output folder.
        cards: calibrator label -> artifact card.

    Returns:
        The content.
    """
    summary = tables[SUMMARY]
    ece = None if per_image is None else per_image[["dataset", "calibrator", "image_id",
                                                    "img_ece"]]
    heldout = rd.heldout_table(summary, ece, resamples=cfg.evaluate.bootstrap,
                               seed=cfg.evaluate.seed)
    rec = rd.recommend(heldout, sizes=rc.parameter_counts(cards or {}))
    lines = list(rec.lines)
    outcome = rd.outcome_on_tests(summary, rec.pick or (rec.leader if rec.kind != "no held-out data"
                                                     else None))
    if outcome:
        lines.append(outcome)
    flagged = {} if per_image is None else rc.flagged_share(per_image)
    params = {label: rc.describe_card(card, flagged.get(label))
              for label, card in (cards or {}).items()}
    columns = rd.matrix_columns(summary)
    held = rd.is_heldout(summary)
    selectors = rc.selector_table(summary)
    if per_image is not None:
        classes, where = rc.class_table(per_image, cfg.model.names(), columns)
    else:
        classes, where = pd.DataFrame(), ""
    lf = tables.get(LABEL_FREE)
    lf = pd.DataFrame() if lf is None else lf
    chosen = rec.pick or rec.leader
    shown = [UNCALIBRATED] + ([chosen] if chosen and not rd.is_reference_column(chosen) else [])
    lf_errors = pd.DataFrame() if lf.empty else rlf.label_free_errors(lf)
    return Content(
        title=f"segcal report: {Path(cfg.output).name}",
        source=str(cfg.source or "<dict>"), config_hash=config_hash(cfg),
        recommendation=rec, lines=lines, summary=summary, columns=columns,
        best=rd.best_per_set(summary),
        heldout_sets=list(dict.fromkeys(summary.loc[held, "dataset"])),
        test_sets=list(dict.fromkeys(summary.loc[~held & (summary["role"] == "test"),
                                                 "dataset"])),
        shift=tables[DOMAIN_SHIFT], shift_figures=dict(shift_figures or {}), params=params,
        selectors=selectors, selector_text=rc.selector_sentence(summary),
        classes=classes, classes_where=where, figures=dict(figures),
        label_free=rlf.label_free_table(lf, shown),
        label_free_errors=lf_errors.rename_axis("calibrator").reset_index(),
        label_free_text=rlf.label_free_sentence(lf),
    )


LABEL_FREE_NOTE = (
    "From the logits alone, against the held-out calibration images (pipeline/label_free.py): "
    "the drift score is the energy distance between the set's per-image mean confidence and "
    "entropy and theirs (standardised by their spread; it grows with the shift), with an alarm "
    "above a threshold bootstrapped from them alone (independent images like them raise it "
    "about 5% of the time; frames of another video sequence can differ by more); pixel "
    "accuracy is estimated by ATC (average thresholded confidence) and DoC (difference of "
    "confidences), image-wise "
    "ECE from each calibrator's confidences with an accuracy map matched to ATC. Labelled "
    "test sets are treated as if unlabelled, their truth beside each estimate; monitor sets "
    "have estimates only."
)


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    if value is None:
        return "–"
    return str(value)


def _markdown_table(table: pd.DataFrame, digits: int = 4) -> str:
    head = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(_fmt(v, digits) for v in row) + " |"
            for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def summary_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary's shown columns (those not entirely NaN), the interval as its own column."""
    shown = summary.copy()
    if {"img_ece_lo", "img_ece_hi"} <= set(shown) and shown["img_ece_lo"].notna().any():
        shown["img_ece 95%"] = [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in
                                zip(shown["img_ece_lo"], shown["img_ece_hi"], strict=True)]
    keep = ["dataset", *[c for c in rd.SUMMARY_SHOWN if c in shown
                         and not shown[c].isna().all()]]
    return shown[keep]


def matrix_cells(content: Content, dataset: str) -> list[tuple[str, float, float, float, bool]]:
    """Per matrix column: ``(calibrator, img_ece, lo, hi, is_best)`` (NaN where missing)."""
    rows = content.summary[content.summary["dataset"] == dataset].set_index("calibrator")
    out = []
    for c in content.columns:
        if c in rows.index:
            r = rows.loc[c]
            out.append((c, float(r["img_ece"]), float(r.get("img_ece_lo", math.nan)),
                        float(r.get("img_ece_hi", math.nan)), content.best.get(dataset) == c))
        else:
            out.append((c, math.nan, math.nan, math.nan, False))
    return out


def shift_matrix(content: Content) -> pd.DataFrame:
    """Shifted set x calibrator: ``img_ece (delta to the reference domain)`` as text."""
    shift = content.shift
    if shift.empty:
        return pd.DataFrame()
    cells = {}
    for (dataset, reference), g in shift.groupby(["dataset", "reference"], sort=False):
        g = g.set_index("calibrator")
        cells[(dataset, reference)] = {
            c: f"{g.loc[c, 'img_ece']:.3f} ({g.loc[c, 'img_ece_delta']:+.3f})"
            for c in content.columns if c in g.index}
    table = pd.DataFrame.from_dict(cells, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["dataset", "reference"])
    return table.reset_index()


def render_markdown(content: Content) -> str:
    """The report as Markdown (for terminals and pull-request comments)."""
    md = [f"# {content.title}", "",
          f"Config `{content.source}` (hash `{content.config_hash}`).", "", "## Recommendation", ""]
    md += [*content.lines, ""]
    sets = content.heldout_sets + content.test_sets
    if sets:
        md += ["## Image-wise ECE per set (lower is better; ★ best per set)", ""]
        rows = []
        for dataset in sets:
            cells = [f"**{v:.3f}** ★" if best else _fmt(v, 3)
                     for _, v, _, _, best in matrix_cells(content, dataset)]
            name = f"{dataset} (held-out: decides)" if dataset in content.heldout_sets else dataset
            rows.append([name, *cells])
        md += [_markdown_table(pd.DataFrame(rows, columns=["set", *content.columns])), ""]
        bounds = [c for c in content.columns if "oracle" in c.lower()]
        if bounds:
            md += [f"{', '.join(f'`{c}`' for c in bounds)}: a bound, not a calibrator: a "
                   "temperature fitted on each test set's own labels, shown for how much of "
                   "its error one temperature could remove; never recommended or marked best.",
                   ""]
    if content.shift_figures:
        md += ["## Shift curves", ""]
        md += [f"![{kind}]({src})" for kind, src in content.shift_figures.items()] + [""]
    shift = shift_matrix(content)
    if not shift.empty:
        md += ["## In-domain vs shifted",  "",
               "Image-wise ECE on each shifted set (in brackets: minus its reference domain's).",
               "", _markdown_table(shift), ""]
    if not content.label_free.empty:
        md += ["## Label-free estimates", "", content.label_free_text, "", LABEL_FREE_NOTE, "",
               _markdown_table(content.label_free), ""]
        if not content.label_free_errors.empty:
            md += ["Mean absolute error of each estimate over the labelled sets, per calibrator:",
                   "", _markdown_table(content.label_free_errors), ""]
    if content.params:
        md += ["## Fitted calibrators", ""]
        md += [f"- **{label}**: {text}" for label, text in content.params.items()] + [""]
    if not content.selectors.empty:
        md += ["## Selector diagnostics", "", content.selector_text, "",
               _markdown_table(content.selectors), ""]
    if not content.classes.empty:
        md += ["## Classwise ECE per class (worst first)", "",
               f"Pooled over {content.classes_where}. Calibrator columns: that calibrator's "
               "classwise ECE; mean p against pixel share is confidence against frequency.", "",
               _markdown_table(content.classes, 4), ""]
    rows = summary_rows(content.summary)
    md += ["## Summary", "", _markdown_table(rows), ""]
    md += ["## Glossary", ""]
    md += [f"- `{k}`: {v}" for k, v in rd.glossary(rows.columns).items()] + [""]
    if content.figures:
        md += ["## Reliability diagrams", ""]
        for dataset, src in content.figures.items():
            md += [f"### {dataset}", "", f"![{dataset}]({src})", ""]
    return "\n".join(md)


def render(
    cfg: JobConfig,
    tables: Mapping[str, pd.DataFrame],
    figures: Mapping[str, str],
    *,
    per_image: pd.DataFrame | None = None,
    shift_figures: Mapping[str, str] | None = None,
    cards: Mapping[str, Mapping] | None = None,
) -> tuple[str, str]:
    """The report as Markdown and as HTML.

    Args:
        cfg: the run config (named in the header).
        tables: the evaluation tables by file name.
        figures: dataset -> figure path relative to the output folder.
        per_image: as for :func:`build`.
        shift_figures: as for :func:`build`.
        cards: as for :func:`build`.

    Returns:
        ``(markdown, html)``.
    """
    from pipeline.report_html import render_html

    content = build(cfg, tables, figures, per_image=per_image, shift_figures=shift_figures,
                    cards=cards)
    return render_markdown(content), render_html(content)


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
        per_image = read_per_image(output / PER_IMAGE)
        figures = {}
        for dataset, rows in summary.groupby("dataset", sort=False):
            panels = {c: bins[(dataset, c)] for c in rows["calibrator"]}
            name = f"{PLOTS}/{dataset}.png"
            plot_dataset(dataset, panels, rows, tmp / name)
            figures[dataset] = name
        curves = rd.family_curves(summary, rd.families(cfg, summary))
        shift_figures = {}
        if curves:
            values = np.concatenate([c.to_numpy(dtype=float).ravel() for c in curves.values()])
            values = values[np.isfinite(values)]
            top = float(values.max()) if values.size and values.max() > 0 else 1.0
            for kind, curve in curves.items():
                name = f"{PLOTS}/shift-{kind}.png"
                plot_family(kind, curve, (0.0, 1.05 * top), tmp / name)
                shift_figures[kind] = name
        cards = rc.read_cards(output, [c for c in rd.matrix_columns(summary)
                                       if not rd.is_reference_column(c)])
        markdown, page = render(cfg, tables, figures, per_image=per_image,
                                shift_figures=shift_figures, cards=cards)
        atomic_write_text(tmp / REPORT_MD, markdown)
        atomic_write_text(tmp / REPORT_HTML, page)
        plots = output / PLOTS
        plots.mkdir(exist_ok=True)
        written = [*figures.values(), *shift_figures.values()]
        for name in written:
            os.replace(tmp / name, output / name)
        os.replace(tmp / REPORT_MD, output / REPORT_MD)
        os.replace(tmp / REPORT_HTML, output / REPORT_HTML)
        for stale in set(plots.glob("*.png")) - {output / n for n in written}:
            stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output / REPORT_HTML
