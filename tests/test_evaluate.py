from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, make_logits

from pipeline import evaluate, evaluate_rows
from pipeline.calibrators import Calibrator, build_calibrator, save
from pipeline.config import config_hash, parse_config
from pipeline.extract import content_hash
from pipeline.metrics import ece, image_ece, image_stats
from pipeline.models import model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import (
    ImageRecord,
    Manifest,
    read_manifest,
    upsample_logits,
    write_manifest,
    write_shard,
)

H, W = 12, 16  # label resolution; logits are stored at half of it
IGNORE = 255
DATASETS = (
    # name, role, domain, reference, images, seed, logit scale
    ("day", "test", "day", None, 5, 1, 3.0),
    ("dusk", "test", "dusk", "day", 4, 2, 6.0),
)


def _records(name, role, domain, n, seed, scale, fingerprint):
    """Logits stored at half the label resolution, over-confident by a temperature ``scale``."""
    logits, _ = make_logits(n, NUM_CLASSES, H // 2, W // 2, scale=scale, seed=seed)
    logits = logits.half()
    up = torch.stack([upsample_logits(x, (H, W)) for x in logits])
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(up / scale, dim=1).permute(0, 2, 3, 1).reshape(-1, NUM_CLASSES)
    labels = torch.multinomial(probs, 1, generator=g).reshape(n, H, W)
    labels[:, 0, :3] = IGNORE  # a few void pixels
    images = torch.randint(0, 256, (n, H // 2, W // 2, 3), generator=g, dtype=torch.uint8)
    return [
        ImageRecord(
            dataset=name, domain=domain, role=role, image_id=f"{name}_{i:02d}", uri=f"{i}.png",
            height=H, width=W, model_fingerprint=fingerprint,
            labels=labels[i].numpy().astype(np.uint8), logits=logits[i].numpy(),
            image=images[i].numpy(),
        )
        for i in range(n)
    ]


def write_dataset(cfg, ds, records, paths, *, class_names=None):
    """Two shards plus a manifest, as the extract stage leaves them."""
    directory = paths.dataset_dir(ds.name)
    half = max(1, len(records) // 2)
    parts = [records[:half], records[half:]] if len(records) > 1 else [records]
    shards = [write_shard(directory / f"part-{i:05d}.parquet", p) for i, p in enumerate(parts)]
    write_manifest(directory, Manifest(
        dataset=ds.name, role=ds.role, domain=ds.domain, reference=ds.reference,
        num_classes=cfg.model.num_classes, class_names=class_names or cfg.model.names(),
        ignore_index=ds.ignore_index, model_fingerprint=paths.model_fingerprint,
        config_hash=config_hash(cfg), shards=shards, content_hash=content_hash(ds, cfg.extract),
    ))


def fit_temperature_artifact(paths, records, label="temperature", class_names=None):
    logits = torch.stack([upsample_logits(r.logits, (H, W)) for r in records])
    labels = torch.stack([torch.from_numpy(r.labels.astype(np.int64)) for r in records])
    ts = build_calibrator("temperature", NUM_CLASSES).fit(logits, labels, ignore_index=IGNORE)
    names = class_names or [f"class_{i}" for i in range(NUM_CLASSES)]
    save(ts, paths.artifact_dir(label), class_names=names, ignore_index=IGNORE)
    return ts


@pytest.fixture(autouse=True)
def _cpu_evaluation(monkeypatch):
    """Evaluate on the CPU even where a GPU is visible.

    These tests compare with CPU references to 1e-12; the GPU path, whose float32 kernels round
    differently, has its own tests (tests/test_evaluate_device.py).
    """
    monkeypatch.setattr(evaluate, "_use_gpu", lambda cfg: "false")


def make_run(root: Path, datasets=DATASETS, *, evaluate_options=None, calibrators=None):
    """A run folder with extracted shards and a fitted temperature artifact.

    Returns the config and, per dataset name, its records.
    """
    weights = root / "model.pt"
    weights.write_bytes(b"not really a model")
    raw = {
        "output": str(root / "run"),
        "model": {"kind": "torchscript", "path": str(weights), "num_classes": NUM_CLASSES},
        "datasets": [
            {"name": n, "role": role, "domain": dom, "reference": ref,
             "images": str(root / "data"), "labels": str(root / "data")}
            for n, role, dom, ref, *_ in datasets
        ],
        "calibrators": calibrators or [{"name": "temperature"}],
        "evaluate": {"bootstrap": 200, **(evaluate_options or {})},
    }
    cfg = parse_config(raw)
    paths = RunPaths(Path(cfg.output), model_fingerprint(cfg.model))
    records = {}
    for ds, (name, role, dom, _, n, seed, scale) in zip(cfg.datasets, datasets, strict=True):
        records[name] = _records(name, role, dom, n, seed, scale, paths.model_fingerprint)
        write_dataset(cfg, ds, records[name], paths)
    # Fitted on other logits of the same kind, so that it is not the identity.
    fit_temperature_artifact(paths, _records("cal", "calibration", "day", 4, 9, 3.0, "x"))
    return cfg, records


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    cfg, records = make_run(tmp_path_factory.mktemp("eval"))
    output = evaluate.run(cfg, local=True)
    return cfg, records, output


def _probs(records, calibrator):
    logits = torch.stack([upsample_logits(r.logits, (H, W)) for r in records])
    with torch.no_grad():
        logits = logits if calibrator is None else calibrator(logits)
    labels = torch.stack([torch.from_numpy(r.labels.astype(np.int64)) for r in records])
    return torch.softmax(logits, dim=1), labels  # float32, as the stage does


# ---------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("calibrator", ["uncalibrated", "temperature"])
@pytest.mark.parametrize("dataset", ["day", "dusk"])
def test_summary_equals_metrics_on_same_logits(evaluated, dataset, calibrator):
    cfg, records, output = evaluated
    summary = pd.read_csv(output / "summary.csv")
    row = summary[(summary.dataset == dataset) & (summary.calibrator == calibrator)]
    assert len(row) == 1
    row = row.iloc[0]
    cal = None
    if calibrator != "uncalibrated":
        from pipeline.calibrators import load

        cal = load(Path(cfg.output) / "artifacts" / calibrator)
    probs, labels = _probs(records[dataset], cal)
    valid = labels != IGNORE

    assert row.ece == pytest.approx(ece(probs, labels, ignore_index=IGNORE), abs=1e-12)
    assert row.img_ece == pytest.approx(image_ece(probs, labels, ignore_index=IGNORE), abs=1e-12)
    per_image = [image_ece(probs[i : i + 1], labels[i : i + 1], ignore_index=IGNORE)
                 for i in range(len(probs))]
    assert row.img_ece_std == pytest.approx(np.std(per_image), abs=1e-9)
    assert row.n_images == len(records[dataset])
    assert row.n_pixels == int(valid.sum())
    # Independent oracles straight from the probabilities.
    nll = F.nll_loss(torch.log(probs.double()), labels, ignore_index=IGNORE)
    assert row.nll == pytest.approx(float(nll), rel=1e-6)
    onehot = F.one_hot(labels.where(valid, 0), NUM_CLASSES).permute(0, 3, 1, 2).double()
    brier = ((probs.double() - onehot) ** 2).sum(1)[valid].mean()
    assert row.brier == pytest.approx(float(brier), rel=1e-6)
    acc = (probs.argmax(1) == labels)[valid].double().mean()
    assert row.pixel_acc == pytest.approx(float(acc), abs=1e-12)
    # The rest against the metrics package's own per-image statistics, summed.
    total = sum(image_stats(probs[i], labels[i], ignore_index=IGNORE) for i in range(len(probs)))
    for name in ("mce", "ace", "sce", "miou", "boundary_ece", "ece_correct", "ece_incorrect",
                 "msp_auroc"):
        assert row[name] == pytest.approx(getattr(total, name)(), abs=1e-12), name
    # Not selectors: no misprediction detection of their own.
    assert math.isnan(row.mis_auroc)
    assert math.isnan(row.flag_precision)


def test_summary_has_the_required_columns_and_order(evaluated):
    _, _, output = evaluated
    summary = pd.read_csv(output / "summary.csv")
    required = ["dataset", "domain", "reference", "calibrator", "n_images", "n_pixels",
                "img_ece", "img_ece_std", "img_ece_lo", "img_ece_hi", "ece", "mce", "ace", "sce",
                "nll", "brier", "miou", "pixel_acc", "boundary_ece", "ece_correct",
                "ece_incorrect", "mis_auroc", "msp_auroc", "flag_precision", "flag_recall"]
    assert set(required) <= set(summary.columns)
    assert list(zip(summary.dataset, summary.calibrator, strict=True)) == [
        ("day", "uncalibrated"), ("day", "temperature"),
        ("dusk", "uncalibrated"), ("dusk", "temperature"),
    ]
    assert (summary.img_ece_lo <= summary.img_ece).all()
    assert (summary.img_ece <= summary.img_ece_hi).all()


def test_per_image_rows_hold_each_image(evaluated):
    cfg, records, output = evaluated
    per_image = pd.read_parquet(output / "per_image.parquet")
    assert len(per_image) == sum(len(r) for r in records.values()) * 2
    assert not per_image.duplicated(["dataset", "image_id", "calibrator"]).any()
    row = per_image[(per_image.image_id == "dusk_02") & (per_image.calibrator == "uncalibrated")]
    probs, labels = _probs(records["dusk"][2:3], None)
    assert row.img_ece.item() == pytest.approx(image_ece(probs, labels, ignore_index=IGNORE))


def test_temperature_beats_uncalibrated_on_over_confident_logits(evaluated):
    # The stored logits are over-confident by design (conftest.make_logits); the fitted
    # temperature must bring image-wise ECE down, and best.csv must say so.
    _, _, output = evaluated
    best = pd.read_csv(output / "best.csv").set_index("domain")
    assert list(best.index) == ["day", "dusk"]
    assert (best.best == "temperature").all()
    expected = (best.uncalibrated_img_ece - best.img_ece) / best.uncalibrated_img_ece
    np.testing.assert_allclose(best.reduction, expected)
    assert (best.reduction > 0).all()


def test_domain_shift_rows_are_shifted_minus_reference(evaluated):
    _, _, output = evaluated
    summary = pd.read_csv(output / "summary.csv").set_index(["dataset", "calibrator"])
    shift = pd.read_csv(output / "domain_shift.csv")
    assert sorted(shift.calibrator) == ["temperature", "uncalibrated"]
    for row in shift.itertuples():
        assert (row.dataset, row.reference, row.reference_datasets) == ("dusk", "day", "day")
        for m in evaluate.SHIFT_METRICS:
            ref = summary.loc[("day", row.calibrator), m]
            value = summary.loc[("dusk", row.calibrator), m]
            assert getattr(row, f"{m}_reference") == pytest.approx(ref, nan_ok=True)
            assert getattr(row, m) == pytest.approx(value, nan_ok=True)
            assert getattr(row, f"{m}_delta") == pytest.approx(value - ref, nan_ok=True)


def test_reference_domain_pools_its_datasets(tmp_path):
    datasets = (
        ("day1", "test", "day", None, 2, 1, 3.0),
        ("day2", "test", "day", None, 3, 4, 5.0),
        ("fog", "test", "fog", "day", 2, 2, 6.0),
    )
    cfg, _ = make_run(tmp_path, datasets, evaluate_options={"bootstrap": 0})
    output = evaluate.run(cfg, local=True)
    summary = pd.read_csv(output / "summary.csv").set_index(["dataset", "calibrator"])
    shift = pd.read_csv(output / "domain_shift.csv").set_index("calibrator")
    for cal in ("uncalibrated", "temperature"):
        day = summary.loc[[("day1", cal), ("day2", cal)]]
        pooled = np.average(day.img_ece, weights=day.n_images)
        assert shift.loc[cal, "img_ece_reference"] == pytest.approx(pooled, abs=1e-12)
        assert shift.loc[cal, "reference_datasets"] == "day1+day2"
    # Image-wise ECE of a pooled domain is the image-weighted mean in best.csv, too.
    best = pd.read_csv(output / "best.csv").set_index("domain")
    assert best.loc["day", "datasets"] == "day1+day2"
    assert best.loc["day", "n_images"] == 5
    assert summary.img_ece_lo.isna().all()  # bootstrap: 0


def test_heldout_part_of_the_calibration_set_is_evaluated_as_the_fit_stage_split_it(tmp_path):
    from pipeline.fit import split_heldout

    datasets = (
        ("cal", "calibration", "day", None, 7, 3, 3.0),
        ("dusk", "test", "dusk", "day", 3, 2, 6.0),
    )
    cfg, records = make_run(tmp_path, datasets, evaluate_options={"bootstrap": 0})
    output = evaluate.run(cfg, local=True)
    held = split_heldout([r.image_id for r in records["cal"]], cfg.fit.heldout_fraction,
                         cfg.fit.seed)
    assert 0 < len(held) < 7
    per_image = pd.read_parquet(output / "per_image.parquet")
    cal = per_image[per_image.dataset == "cal-heldout"]
    assert set(cal.image_id) == held
    assert set(cal.role) == {"calibration"}
    # With no day test set, the held-out calibration images are dusk's reference.
    shift = pd.read_csv(output / "domain_shift.csv")
    assert set(shift.reference_datasets) == {"cal-heldout"}
    assert list(pd.read_csv(output / "best.csv").domain) == ["dusk"]

    no_heldout = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"include_heldout": False})})
    with pytest.raises(ValueError, match=r"domain 'day', the `reference` of dataset 'dusk'"):
        evaluate.run(no_heldout, local=True)


def test_best_breaks_image_ece_ties_by_nll():
    summary = pd.DataFrame({
        "dataset": ["a", "a", "a", "b", "b", "b"],
        "domain": ["dusk"] * 3 + ["day"] * 3,
        "role": ["test"] * 6,
        "calibrator": ["uncalibrated", "x", "y"] * 2,
        "n_images": [4] * 6, "n_pixels": [100] * 6,
        "img_ece": [0.08, 0.04, 0.04, 0.05, 0.06, 0.07],
        "nll": [0.9, 0.7, 0.6, 0.5, 0.4, 0.3],
    })
    best = evaluate.best_per_domain(summary).set_index("domain")
    assert best.loc["dusk", "best"] == "y"  # tie on img_ece, lower NLL
    assert best.loc["dusk", "reduction"] == pytest.approx(0.5)
    assert best.loc["day", "best"] == "uncalibrated"  # nothing beats it
    assert best.loc["day", "reduction"] == 0.0


def test_best_ignores_heldout_rows():
    summary = pd.DataFrame({
        "dataset": ["cal-heldout", "cal-heldout", "t", "t"], "domain": ["day"] * 4,
        "role": ["calibration", "calibration", "test", "test"],
        "calibrator": ["uncalibrated", "x"] * 2, "n_images": [1] * 4, "n_pixels": [1] * 4,
        "img_ece": [0.5, 0.0, 0.1, 0.2], "nll": [1.0] * 4,
    })
    best = evaluate.best_per_domain(summary)
    assert best[["domain", "best", "datasets"]].values.tolist() == [["day", "uncalibrated", "t"]]


# ---------------------------------------------------------------------------------------------
# Bootstrap


def test_bootstrap_interval_contains_mean_and_is_seeded():
    values = np.random.default_rng(3).gamma(2.0, 0.03, size=40)
    lo, hi = evaluate.bootstrap_interval(values, resamples=500, seed=7)
    assert lo < values.mean() < hi
    assert (lo, hi) == evaluate.bootstrap_interval(values, resamples=500, seed=7)
    assert (lo, hi) != evaluate.bootstrap_interval(values, resamples=500, seed=8)
    # A 95% interval of the mean is about 2 x 1.96 standard errors wide.
    se = values.std() / math.sqrt(values.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)


@pytest.mark.parametrize(
    ("values", "resamples", "expected"),
    [
        pytest.param([0.2], 100, (0.2, 0.2), id="one-image"),
        pytest.param([0.1, 0.3], 0, (math.nan, math.nan), id="no-resamples"),
        pytest.param([math.nan], 100, (math.nan, math.nan), id="no-scored-image"),
    ],
)
def test_bootstrap_interval_edge_cases(values, resamples, expected):
    got = evaluate.bootstrap_interval(np.array(values), resamples=resamples, seed=0)
    np.testing.assert_allclose(got, expected)


def test_summary_bootstrap_is_seeded_and_independent_of_row_order(evaluated):
    cfg, _, output = evaluated
    per_image = pd.read_parquet(output / "per_image.parquet")
    summaries = []
    for frame in (per_image, per_image.iloc[::-1]):
        agg = evaluate.Aggregator(bootstrap=cfg.evaluate.bootstrap, seed=cfg.evaluate.seed)
        agg.add(frame)
        summaries.append(agg.summary().sort_values(["dataset", "calibrator"], ignore_index=True))
    pd.testing.assert_frame_equal(summaries[0], summaries[1])
    written = pd.read_csv(output / "summary.csv").sort_values(["dataset", "calibrator"],
                                                              ignore_index=True)
    np.testing.assert_allclose(written.img_ece_lo, summaries[0].img_ece_lo)


def test_aggregating_in_batches_equals_aggregating_at_once(evaluated):
    cfg, _, output = evaluated
    per_image = pd.read_parquet(output / "per_image.parquet")
    whole = evaluate.Aggregator(bootstrap=0, seed=0)
    whole.add(per_image)
    parts = evaluate.Aggregator(bootstrap=0, seed=0)
    for chunk in np.array_split(np.arange(len(per_image)), 5):
        parts.add(per_image.iloc[chunk])
    pd.testing.assert_frame_equal(whole.summary(), parts.summary(), check_like=True)


# ---------------------------------------------------------------------------------------------
# One image: spatial calibrators get the image, selectors add their score


class _SpatialSelector(Calibrator):
    name = "spatial_selector_test"
    spatial = True

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.seen = []
        self.fitted.fill_(True)

    def _calibrate(self, logits, image):
        self.seen.append(image)
        return logits / 2

    def _fit(self, data, heldout):
        raise NotImplementedError

    def mis_score(self, logits, image=None):
        # A perfect detector on the logits it is given: 1 where argmax is wrong.
        return (logits.argmax(1) != self.truth).float()


def test_image_rows_pass_the_upsampled_image_and_the_selector_score():
    record = _records("d", "test", "day", 1, 5, 3.0, "fp")[0]
    selector = _SpatialSelector(NUM_CLASSES)
    labels = torch.from_numpy(record.labels.astype(np.int64))
    selector.truth = labels
    rows = evaluate.image_rows(
        record, {"uncalibrated": None, "sel": selector},
        meta={"dataset": "d", "domain": "day", "reference": None, "role": "test"},
        n_bins=15, boundary_width=2, ignore_index=IGNORE,
    )
    assert [r["calibrator"] for r in rows] == ["uncalibrated", "sel"]
    (image,) = selector.seen
    assert image.shape == (1, 3, H, W)
    expected = F.interpolate(torch.from_numpy(record.image).permute(2, 0, 1)[None].float() / 255,
                             size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(image, expected)
    from pipeline.metrics import ImageStats

    sel = ImageStats.from_row(rows[1])
    assert sel.mis_auroc() == 1.0  # the score equals the misprediction indicator
    assert sel.mis_precision() == 1.0
    assert sel.mis_recall() == 1.0
    assert math.isnan(ImageStats.from_row(rows[0]).mis_auroc())


def test_a_huge_temperature_keeps_every_prediction():
    """Selective scaling's published T_mis = 1e10 flattens probabilities but never the argmax."""
    record = _records("d", "test", "day", 1, 6, 3.0, "fp")[0]
    hot = build_calibrator("temperature", NUM_CLASSES)
    hot.fit(torch.randn(64, NUM_CLASSES), torch.randint(0, NUM_CLASSES, (64,)))
    with torch.no_grad():
        hot.log_temperature.fill_(math.log(1e10))
    rows = evaluate.image_rows(
        record, {"uncalibrated": None, "hot": hot},
        meta={"dataset": "d", "domain": "day", "reference": None, "role": "test"},
        n_bins=15, boundary_width=2, ignore_index=IGNORE,
    )
    from pipeline.metrics import ImageStats

    raw, flat = (ImageStats.from_row(r) for r in rows)
    np.testing.assert_array_equal(flat.confusion, raw.confusion)
    assert flat.pixel_acc() == raw.pixel_acc() < 1.0
    # every confidence is 1/C, so the image's ECE is |1/C - accuracy|
    assert flat.ece() == pytest.approx(abs(1 / NUM_CLASSES - raw.pixel_acc()), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input


def _drop_manifest(cfg, paths):
    (paths.dataset_dir("dusk") / "manifest.json").unlink()


def _other_classes(cfg, paths):
    shutil.rmtree(paths.artifact_dir("temperature"))
    records = _records("cal", "calibration", "day", 2, 9, 3.0, "x")
    fit_temperature_artifact(paths, records, class_names=list("abcde"))


def _other_extract_config(cfg, paths):
    m = read_manifest(paths.dataset_dir("day"))
    write_manifest(paths.dataset_dir("day"),
                   Manifest(**{**m.__dict__, "content_hash": "0123456789abcdef",
                               "config_hash": "feedfacefeedface"}))


def _other_model(cfg, paths):
    m = read_manifest(paths.dataset_dir("day"))
    other = Manifest(**{**m.__dict__, "model_fingerprint": "b" * 64})
    write_manifest(paths.dataset_dir("day"), other)


def _no_artifact(cfg, paths):
    shutil.rmtree(paths.artifact_dir("temperature"))


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        pytest.param(_drop_manifest, FileNotFoundError,
                     r"dataset 'dusk' .* manifest at .*dusk/manifest.json.* run `segcal extract`",
                     id="no-manifest"),
        pytest.param(_other_classes, ValueError,
                     r"classes of artifact .*temperature/calibrator.json \(5: \['a', 'b'.*\) to "
                     r"equal those of the shards in .*manifest.json \(5: \['class_0'",
                     id="artifact-classes"),
        pytest.param(_other_extract_config, ValueError,
                     r"content hash [0-9a-f]{16}, config hash [0-9a-f]{16}\), but they were "
                     r"extracted with content hash '0123456789abcdef' by config hash "
                     r"feedfacefeedface", id="other-config-hash"),
        pytest.param(_other_model, ValueError, r"come from model [0-9a-f]{12} .* come from bbbb",
                     id="other-model"),
        pytest.param(_no_artifact, FileNotFoundError,
                     r"artifact for calibrator 'temperature' .* run `segcal fit` first",
                     id="no-artifact"),
    ],
)
def test_bad_run_directory_is_refused(tmp_path, corrupt, error, match):
    cfg, _ = make_run(tmp_path)
    corrupt(cfg, RunPaths(Path(cfg.output), model_fingerprint(cfg.model)))
    with pytest.raises(error, match=match):
        evaluate.run(cfg, local=True)
    assert not (Path(cfg.output) / "summary.csv").exists()


def test_artifact_of_another_calibrator_is_refused(tmp_path):
    cfg, _ = make_run(tmp_path, calibrators=[{"name": "vector", "label": "temperature"}])
    with pytest.raises(ValueError, match=r"hold calibrator 'vector' .* but it holds 'temperature'"):
        evaluate.run(cfg, local=True)


@pytest.mark.parametrize(
    ("datasets", "match"),
    [
        pytest.param((("day", "calibration", "day", None, 2, 1, 3.0),),
                     r"at least one dataset with role 'test' or 'monitor'", id="no-test-set"),
        pytest.param((("fog", "test", "fog", "night", 2, 1, 3.0),),
                     r"dataset .* of domain 'night', the `reference` of dataset 'fog'",
                     id="missing-reference"),
    ],
)
def test_bad_config_is_refused(tmp_path, datasets, match):
    cfg, _ = make_run(tmp_path, datasets, evaluate_options={"include_heldout": False})
    with pytest.raises(ValueError, match=match):
        evaluate.run(cfg, local=True)


# ---------------------------------------------------------------------------------------------
# Failure safety


def test_interrupted_evaluation_leaves_the_previous_report_intact(tmp_path, monkeypatch):
    from pipeline import report

    cfg, _ = make_run(tmp_path, evaluate_options={"bootstrap": 0})
    output = evaluate.run(cfg, local=True)
    report.write(cfg)
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()
              and "shards" not in p.parts and "artifacts" not in p.parts}
    assert {p.name for p in before} >= {*evaluate.TABLES, "report.html", "report.md"}

    calls = []
    real = evaluate.image_stats_per_calibrator

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a killed run, not only an exception
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_rows, "image_stats_per_calibrator", failing)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(cfg, local=True)
    after = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()
             and "shards" not in p.parts and "artifacts" not in p.parts}
    assert after == before
    assert not list(output.glob(".evaluate-*"))


# ---------------------------------------------------------------------------------------------
# Ray Data


@pytest.mark.ray
def test_ray_data_path_equals_in_process_path(ray_local, evaluated, tmp_path):
    cfg, _, local_output = evaluated
    # One actor: each actor imports torch, which is most of this test's time on a small machine.
    ray_cfg = cfg.model_copy(update={
        "output": str(tmp_path / "run"),
        "evaluate": cfg.evaluate.model_copy(update={"num_actors": 1}),
    })
    shutil.copytree(local_output / "shards", tmp_path / "run" / "shards")
    shutil.copytree(local_output / "artifacts", tmp_path / "run" / "artifacts")
    output = evaluate.run(ray_cfg)
    keys = ["dataset", "calibrator"]
    for name in ("summary.csv", "domain_shift.csv", "best.csv"):
        got, want = pd.read_csv(output / name), pd.read_csv(local_output / name)
        sort = keys if "calibrator" in got else ["domain"]
        pd.testing.assert_frame_equal(got.sort_values(sort, ignore_index=True),
                                      want.sort_values(sort, ignore_index=True))
    got = pd.read_parquet(output / "per_image.parquet")
    want = pd.read_parquet(local_output / "per_image.parquet")
    order = ["dataset", "calibrator", "image_id"]
    got = got.sort_values(order, ignore_index=True)
    want = want.sort_values(order, ignore_index=True)
    pd.testing.assert_frame_equal(got[["img_ece", "nll_sum", "n_images"]],
                                  want[["img_ece", "nll_sum", "n_images"]])


@pytest.mark.parametrize(
    ("cpus", "requested", "items", "size", "num_cpus"),
    [
        pytest.param(2.0, None, 10, 2, 0.5, id="2cpu"),
        pytest.param(1.0, None, 10, 1, 0.5, id="1cpu"),
        pytest.param(8.0, None, 10, 8, 7 / 8, id="8cpu"),
        pytest.param(8.0, None, 3, 3, 1.0, id="few-shards"),
        pytest.param(8.0, 2, 10, 2, 1.0, id="requested"),
    ],
)
def test_actor_pool_leaves_a_cpu_for_read_tasks(monkeypatch, cpus, requested, items, size,
                                                num_cpus):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": cpus})
    got_size, got_cpus, gpus, threads = evaluate._pool(requested, items)
    assert (got_size, gpus, threads) == (size, 0, 1)
    assert got_cpus == pytest.approx(num_cpus)
    # the actors and one read task fit at once (ray-project/ray#44687)
    assert got_size * got_cpus + min(1.0, cpus / 2) <= cpus


def test_actor_pool_clamps_requests_with_a_warning(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0})
    with pytest.warns(UserWarning, match=r"`evaluate.num_actors`=4 exceeds the 2 free CPUs"):
        assert evaluate._pool(4, 10)[0] == 2


@pytest.mark.parametrize(
    ("resources", "use_gpu", "size", "gpus"),
    [
        pytest.param({"CPU": 16.0, "GPU": 2.0}, "auto", 2, 1, id="auto-gpus"),
        pytest.param({"CPU": 16.0, "GPU": 1.0}, "true", 1, 1, id="true-gpu"),
        pytest.param({"CPU": 16.0, "GPU": 2.0}, "false", 10, 0, id="false-cpus"),
        pytest.param({"CPU": 4.0}, "auto", 4, 0, id="auto-no-gpu"),
    ],
)
def test_actor_pool_takes_a_gpu_per_actor_when_the_cluster_has_them(
    monkeypatch, resources, use_gpu, size, gpus
):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: resources)
    got_size, num_cpus, got_gpus, _ = evaluate._pool(None, 10, use_gpu)
    assert (got_size, got_gpus) == (size, gpus)
    assert got_size * num_cpus + 1.0 <= resources["CPU"]


def test_use_gpu_true_without_a_gpu_fails_early(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 4.0})
    with pytest.raises(RuntimeError, match=r"free GPU .* `evaluate.use_gpu`=true"):
        evaluate._pool(None, 10, "true")
    with pytest.raises(ValueError, match=r"`evaluate.use_gpu` to be auto, true or false"):
        evaluate.resolve_device("sometimes")
    if not torch.cuda.is_available():
        assert evaluate.resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match=r"CUDA device"):
            evaluate.resolve_device(True)


def test_reuse_freed_memory_sets_glibc_options_where_there_are_any():
    import ctypes
    import platform

    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
        glibc = True
    except (OSError, AttributeError):
        glibc = False
    assert evaluate_rows._reuse_freed_memory() is (glibc and platform.system() == "Linux")
    # Idempotent: every CPU evaluator in a process calls it.
    assert evaluate_rows._reuse_freed_memory() is (glibc and platform.system() == "Linux")
