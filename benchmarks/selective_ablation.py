"""Ablation: which ingredients of selective scaling beat temperature scaling, and where (issue 8).

Reads the logit shards of a run (``OUTPUT/shards/<fp12>/<dataset>/``, written by stage 1, e.g.
``make demo`` or ``segcal extract configs/camvid_espnet.yaml``), splits the calibration images
into a fit part and a held-out part by `pipeline.fit.split_heldout` (an image and its corrupted
copies fall on the same side), samples pixels at label resolution with
`pipeline.fit.sample_pixels` (and strided whole maps with `pipeline.fit.record_map` for the
spatial selector), fits every variant and prints, per test set:

- image-wise ECE (`pipeline.metrics.image_ece`: each image's 15-bin ECE, void ignored,
  averaged over images) of every variant, at label resolution, as `pipeline.evaluate` does;
- the misprediction-detection AUROC of each selector beside 1 - max p (the baseline detector);
- each selector's flag rate, precision and recall (flagged: P(mispredicted) > 0.5).

Calibration datasets with a ``corruption`` (corrupted copies of the calibration images; see
the README) are used only by the variants marked ``aug``; without them those variants are
skipped. The recommended variant is picked by a rule computed on calibration data only: among
`CANDIDATES`, the one whose worst held-out set (the held-out clean images, and each corrupted
copy of them) has the lowest image-wise ECE relative to TS, i.e. the most uniform improvement
over TS. The table also prints each variant's mean held-out ECE (the first rule tried, which
rewarded variants that are very good under shift and worse than TS in-domain). Test sets are
never used to fit or choose anything.

Run:
    .venv/bin/python benchmarks/selective_ablation.py --run ../runs/camvid_espnet
    .venv/bin/python benchmarks/selective_ablation.py --run DIR --eval-stride 2   # faster
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from torchmetrics.functional.classification import binary_auroc

from pipeline.calibrators import CALIBRATORS, Calibrator, FitData, build_calibrator
from pipeline.fit import record_map, sample_pixels, split_heldout
from pipeline.metrics import image_ece
from pipeline.shards import ImageRecord, Manifest, iter_dataset, read_manifest, upsample_logits

N_BINS = 15
# Pixels per image for the AUROC (every k-th valid pixel): exact ranks on a fixed subsample.
AUROC_STRIDE = 7

# label -> (registry name, options, uses corrupted calibration data). Selective variants share
# the paper's training recipe (balanced MLP selector, AdamW, held-out early stopping).
FAST = {"batch_size": 16384}  # big AdamW batches: the augmented fits see ~10x more pixels
# Fitted T_cor and T_mis, soft gate, rich features: what most selective variants build on.
SOFT_RICH = {"t_mis": "fit", "t_cor": "fit", "gate": "soft", "features": "rich"}
ON_TS = {**SOFT_RICH, "base": "temperature", **FAST}  # ... on top of temperature scaling
CONTEXT = {"context": True, "local": False, "hidden": 16, "epochs": 10}  # map-mean selector
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "TS": ("temperature", {}, False),
    "TS-aug": ("temperature", {}, True),
    "sel-paper": ("selective", {"t_mis": 1e10}, False),
    "sel-fitT": ("selective", {"t_mis": "fit", "t_cor": "fit", **FAST}, False),
    "sel-soft": ("selective", {"t_mis": "fit", "t_cor": "fit", "gate": "soft", **FAST}, False),
    "sel-rich": ("selective", {**SOFT_RICH, **FAST}, False),
    "sel-onTS": ("selective", ON_TS, False),
    # As sel-onTS, but T_cor stays 1: pixels the selector trusts keep TS's calibration and only
    # flagged ones get the fitted T_mis (the paper's T_cor = 1, on top of TS).
    "sel-onTS-keepT": ("selective", {**ON_TS, "t_cor": 1.0}, False),
    "sel-pcT": ("selective", {**ON_TS, "per_class_t_cor": True}, False),
    "sel-aug": ("selective", ON_TS, True),
    "sel-refine-aug": ("selective", {**ON_TS, "refine": True}, True),
    "sel-context-refine-aug": (
        "selective_spatial", {**SOFT_RICH, "base": "temperature", **CONTEXT, "refine": True},
        True,
    ),
    "sel-context-aug": ("selective_spatial", {**SOFT_RICH, "base": "temperature", **CONTEXT}, True),
    # Image-level temperature (IBTS: one T per image from a conv net over the log-probabilities
    # and the image) trained on the corrupted copies too: a reference for the selective rows.
    "ibts-aug": ("ibts", {"epochs": 10}, True),
    # The context selector (soft gate, rich features) on top of that image-level temperature.
    "sel-context-on-ibts-aug": (
        "selective_spatial",
        {**SOFT_RICH, "base": "ibts", "base_options": {"epochs": 10}, **CONTEXT}, True,
    ),
}
# The candidates the recommendation is picked from: the pointwise selectors. The context
# selectors are left out: they see whole images, and the held-out images are frames of the same
# video sequence as the fit images, so their held-out scores overstate how they transfer (the
# context selector scores 0.015 on held-out val and 0.083 on the day test set).
CANDIDATES = ("sel-onTS", "sel-onTS-keepT", "sel-pcT", "sel-aug", "sel-refine-aug")


@dataclass
class Split:
    """Calibration data of one part (fit or held-out): pixels, maps and held-out records."""

    clean_pixels: list[FitData] = field(default_factory=list)
    shifted_pixels: list[FitData] = field(default_factory=list)
    clean_maps: list[FitData] = field(default_factory=list)
    shifted_maps: list[FitData] = field(default_factory=list)
    records: dict[str, list[ImageRecord]] = field(default_factory=lambda: defaultdict(list))


def find_datasets(run: Path) -> dict[str, tuple[Path, Manifest]]:
    """Dataset name -> (folder, manifest) of every extracted dataset under ``run/shards``.

    Raises:
        FileNotFoundError: When no extracted dataset is found.
        ValueError: When the shards of several models are present.
    """
    folders = sorted(run.glob("shards/*/*/manifest.json"))
    if not folders:
        raise FileNotFoundError(
            f"Expected extracted shards under {run / 'shards'}, but found none: run the "
            "extraction of the demo config first"
        )
    models = {p.parent.parent.name for p in folders}
    if len(models) > 1:
        raise ValueError(f"Expected the shards of one model under {run}, but got {sorted(models)}")
    return {p.parent.name: (p.parent, read_manifest(p.parent)) for p in folders}


def corrupted_names(run: Path, config: Path | None) -> set[str]:
    """Names of the calibration datasets with a ``corruption``, from the run's config.

    Uses ``config`` or else ``run/config.resolved.yaml``; without either, no dataset counts as
    corrupted (the ``aug`` variants are then skipped).
    """
    path = config or run / "config.resolved.yaml"
    if not path.is_file():
        return set()
    raw = yaml.safe_load(path.read_text())
    return {
        d["name"] for d in raw.get("datasets", [])
        if d.get("role") == "calibration" and d.get("corruption")
    }


def read_calibration(
    datasets: dict[str, tuple[Path, Manifest]], shifted: set[str], with_maps: bool,
    args: argparse.Namespace,
) -> tuple[Split, Split]:
    """Sample the fit and held-out parts of every calibration dataset in one pass."""
    calibration = {n: v for n, v in datasets.items() if v[1].role == "calibration"}
    ids = {i for _, m in calibration.values() for i in m.image_ids()}
    held_ids = split_heldout(ids, args.heldout_fraction, args.seed)
    parts = {False: Split(), True: Split()}
    for name, (folder, manifest) in sorted(calibration.items()):
        is_shifted = name in shifted
        for record in iter_dataset(folder):
            held = record.image_id in held_ids
            part = parts[held]
            pixels = sample_pixels(
                [record], pixels_per_image=args.pixels, seed=args.seed,
                ignore_index=manifest.ignore_index,
            )
            (part.shifted_pixels if is_shifted else part.clean_pixels).append(pixels)
            if with_maps:
                z, y, image = record_map(record, stride=args.map_stride)
                maps = FitData(z[None], y[None], image[None], manifest.ignore_index)
                (part.shifted_maps if is_shifted else part.clean_maps).append(maps)
            if held:
                part.records[name].append(record)
    return parts[False], parts[True]


def concat(parts: list[FitData]) -> FitData:
    """Concatenate pixels or maps (images kept when present)."""
    images = None if parts[0].images is None else torch.cat([p.images for p in parts])
    return FitData(
        torch.cat([p.logits for p in parts]), torch.cat([p.labels for p in parts]), images,
        parts[0].ignore_index,
    )


def fit_variants(fit: Split, held: Split, names: list[str], seed: int) -> dict[str, Calibrator]:
    """Fit the named variants on the fit part, model-picking on the held-out part."""
    fitted: dict[str, Calibrator] = {}
    for label in names:
        name, options, aug = VARIANTS[label]
        spatial = CALIBRATORS[name].spatial
        kind = "maps" if spatial else "pixels"
        fit_parts = getattr(fit, f"clean_{kind}") + (getattr(fit, f"shifted_{kind}") if aug else [])
        held_parts = getattr(held, f"clean_{kind}") + (
            getattr(held, f"shifted_{kind}") if aug else []
        )
        data, heldout = concat(fit_parts), concat(held_parts)
        calibrator = build_calibrator(name, data.logits.shape[1], **options)
        start = time.perf_counter()
        calibrator.fit(
            data.logits, data.labels, ignore_index=data.ignore_index, images=data.images,
            heldout=heldout, seed=seed,
        )
        fitted[label] = calibrator
        print(f"fitted {label:16s} in {time.perf_counter() - start:6.1f}s  {calibrator.summary()}",
              flush=True)
    return fitted


@dataclass
class SetScores:
    """Running per-test-set results: per-image ECEs, AUROC subsamples, flag counts."""

    ece: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    scores: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    wrong: list[torch.Tensor] = field(default_factory=list)
    flags: dict[str, np.ndarray] = field(default_factory=lambda: defaultdict(lambda: np.zeros(4)))


def score_record(
    record: ImageRecord, calibrators: dict[str, Calibrator | None], ignore_index: int,
    stride: int, out: SetScores,
) -> None:
    """Add one image's image ECE per variant, its selector scores and its flag counts."""
    size = (record.height, record.width)
    logits = upsample_logits(record.logits, size)[None, :, ::stride, ::stride]
    labels = torch.from_numpy(record.labels.astype(np.int64))[None, ::stride, ::stride]
    image = torch.from_numpy(np.array(record.image)).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
    image = image[:, :, ::stride, ::stride].clamp(0.0, 1.0)
    valid = (labels != ignore_index).reshape(-1)
    if not bool(valid.any()):
        return
    wrong = (logits.argmax(1) != labels).reshape(-1)[valid]
    sub = slice(None, None, AUROC_STRIDE)
    out.wrong.append(wrong[sub])
    with torch.inference_mode():
        for label, calibrator in calibrators.items():
            if calibrator is None:
                calibrated = logits
                out.scores["1 - max p"].append(
                    (1 - logits.softmax(1).amax(1)).reshape(-1)[valid][sub]
                )
            else:
                cal_image = image if type(calibrator).spatial else None
                calibrated = calibrator(logits, cal_image)
                p_mis = calibrator.mis_score(logits, cal_image)
                if p_mis is not None:
                    p_mis = p_mis.reshape(-1)[valid]
                    out.scores[label].append(p_mis[sub])
                    flag = p_mis > 0.5
                    out.flags[label] += [
                        int(flag.sum()), int((flag & wrong).sum()), int(wrong.sum()), len(flag)
                    ]
            # preds from the logits: a 1e10 temperature flattens probabilities into float ties
            out.ece[label].append(image_ece(
                calibrated.softmax(1), labels, n_bins=N_BINS, ignore_index=ignore_index,
                preds=calibrated.argmax(1),
            ))


def evaluate(
    sets: dict[str, list[ImageRecord] | Path], calibrators: dict[str, Calibrator | None],
    ignore_index: int, stride: int,
) -> dict[str, SetScores]:
    """Score every set (records in memory, or a dataset folder streamed from its shards)."""
    results = {}
    for name, source in sets.items():
        out = SetScores()
        records = iter_dataset(source) if isinstance(source, Path) else source
        for record in records:
            score_record(record, calibrators, ignore_index, stride, out)
        results[name] = out
    return results


def auroc(out: SetScores, label: str) -> float:
    wrong = torch.cat(out.wrong)
    if wrong.all() or not wrong.any():
        return math.nan
    return float(binary_auroc(torch.cat(out.scores[label]), wrong.long()))


def table(rows: dict[str, dict[str, str]], columns: list[str], first: str) -> str:
    """A Markdown table: one row per key of ``rows``."""
    lines = [f"| {first} | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(r.get(c, "") for c in columns) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the run's output folder")
    parser.add_argument("--config", type=Path, help="the run's config (default: "
                        "RUN/config.resolved.yaml), to tell corrupted calibration sets apart")
    parser.add_argument("--pixels", type=int, default=1024, help="fit pixels per image")
    parser.add_argument("--heldout-fraction", type=float, default=0.5)
    parser.add_argument("--map-stride", type=int, default=8, help="stride of spatial fit maps")
    parser.add_argument("--eval-stride", type=int, default=2,
                        help="evaluate every k-th row and column (1: all pixels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    datasets = find_datasets(args.run)
    shifted = corrupted_names(args.run, args.config) & set(datasets)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"Expected variants among {list(VARIANTS)}, but got {unknown}")
    if not shifted:
        skipped = [n for n in names if VARIANTS[n][2]]
        names = [n for n in names if not VARIANTS[n][2]]
        if skipped:
            print(f"no corrupted calibration datasets: skipping {skipped}")
    with_maps = any(CALIBRATORS[VARIANTS[n][0]].spatial for n in names)
    fit, held = read_calibration(datasets, shifted, with_maps, args)
    print(f"calibration: {len(fit.clean_pixels)} fit / {len(held.clean_pixels)} held-out clean "
          f"images, {len(fit.shifted_pixels)} / {len(held.shifted_pixels)} corrupted copies "
          f"({sorted(shifted)}); read in {time.perf_counter() - start:.0f}s", flush=True)

    calibrators: dict[str, Calibrator | None] = {"uncal": None}
    calibrators |= fit_variants(fit, held, names, args.seed)
    ignore_index = next(iter(datasets.values()))[1].ignore_index

    # The rule, on calibration data only: the lowest worst-case held-out ECE ratio to TS.
    held_scores = evaluate(dict(held.records), calibrators, ignore_index, args.eval_stride)
    held_ece = {
        label: float(np.mean([e for s in held_scores.values() for e in s.ece[label]]))
        for label in calibrators
    }
    per_set = {n: {lb: float(np.mean(s.ece[lb])) for lb in calibrators}
               for n, s in held_scores.items()}
    worst_ratio = (
        {lb: max(ece[lb] / ece["TS"] for ece in per_set.values()) for lb in calibrators}
        if "TS" in calibrators else {}
    )
    candidates = [c for c in CANDIDATES if c in calibrators and worst_ratio]
    pick = min(candidates, key=worst_ratio.__getitem__) if candidates else None

    datasets = find_datasets(args.run)  # again: tests need not exist before the fits
    tests = {n: folder for n, (folder, m) in datasets.items() if m.role == "test"}
    tests = dict(sorted(tests.items(), key=lambda kv: list(datasets).index(kv[0])))
    results = evaluate(tests, calibrators, ignore_index, args.eval_stride)

    labels = list(calibrators)
    ece_rows: dict[str, dict[str, str]] = {}
    wins = 0
    for name, out in results.items():
        means = {label: float(np.mean(out.ece[label])) for label in labels}
        best = min(means.values())
        ece_rows[name] = {
            label: (f"**{v:.3f}**" if v == best else f"{v:.3f}") for label, v in means.items()
        }
        if pick is not None:
            wins += means[pick] < means["TS"]
    for name, out in held_scores.items():
        ece_rows[f"held-out {name}"] = {
            label: f"{float(np.mean(out.ece[label])):.3f}" for label in labels
        }
    ece_rows["held-out mean"] = {label: f"{v:.3f}" for label, v in held_ece.items()}
    ece_rows["worst held-out ratio to TS (rule)"] = {
        label: f"{v:.3f}" for label, v in worst_ratio.items()
    }
    print(f"\n## Image-wise ECE ({N_BINS} bins, void ignored; eval stride {args.eval_stride})\n")
    print(table(ece_rows, labels, "test set"))

    selectors = [lb for lb in labels if results and any(
        results[n].scores.get(lb) for n in results)]
    selectors = [s for s in selectors if s != "uncal"]
    auroc_rows = {
        name: {c: f"{auroc(out, c):.3f}" for c in ["1 - max p", *selectors]}
        for name, out in results.items()
    }
    print("\n## Misprediction AUROC (selector P(mis) vs 1 - max p)\n")
    print(table(auroc_rows, ["1 - max p", *selectors], "test set"))
    flag_rows = {}
    for name, out in results.items():
        row = {"error rate": f"{float(torch.cat(out.wrong).float().mean()):.2f}"}
        for s in selectors:
            flagged, hit, n_wrong, total = out.flags[s]
            precision = hit / flagged if flagged else math.nan
            recall = hit / n_wrong if n_wrong else math.nan
            row[s] = f"{flagged / total:.2f} / {precision:.2f} / {recall:.2f}"
        flag_rows[name] = row
    print("\n## Flags (P(mis) > 0.5): rate / precision / recall\n")
    print(table(flag_rows, ["error rate", *selectors], "test set"))
    if pick is not None:
        print(f"\nRule (lowest worst-case held-out ECE ratio to TS among {candidates}): {pick}; "
              f"lower image-wise ECE than TS on {wins}/{len(results)} test sets")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
