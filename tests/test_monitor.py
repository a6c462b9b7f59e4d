"""Unlabelled (``role: monitor``) datasets end to end: listing, extraction, evaluation and
``label_free.csv``.

A tiny synthetic run, without Ray: the extraction stage's own worker
(:class:`pipeline.extract.ExtractWorker`: decode, model, shard writes) runs in-process in place
of the Ray Data pipeline, then the real fit and evaluate stages. The labels of the labelled
sets are drawn from the model's own softmax, so the model is calibrated on them and the
label-free estimates have a known target: on the calibration images themselves, seen as a
monitor set, they must match the truth measured on the same images as a test set.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import evaluate, extract, fit
from pipeline.config import ConfigError, DatasetConfig, parse_config
from pipeline.data import DataError, list_samples, load_sample, source_fingerprint
from pipeline.label_free import FEATURE_COLUMNS, LABEL_FREE_COLUMNS, N_CONF_BINS
from pipeline.models import load_model, model_fingerprint
from pipeline.paths import RunPaths
from pipeline.shards import iter_dataset, read_manifest, upsample_logits
from tests.extract_helpers import NUM_CLASSES

H, W = 24, 32
IGNORE = 255
MODEL = {"kind": "python", "path": "tests.extract_helpers:tiny_net", "num_classes": NUM_CLASSES}
# Label-free estimates on the calibration images seen as a monitor set against the truth on
# the same images: ATC's pixel accuracy to 0.05 (the goal on real data; the sampling
# noise of the threshold fitted on 6 held-out images of 768 pixels is about 0.01 here), the
# estimated image-wise ECE to 0.05.
ACC_TOLERANCE = 0.05
ECE_TOLERANCE = 0.05


def _images(folder, n, seed, *, dark=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        if dark:  # a strong shift: almost black frames
            img = (img // 16).astype(np.uint8)
        Image.fromarray(img).save(folder / f"f{i:02d}.png")


def _labels_from_model(images, labels, seed):
    """Labels drawn from the model's softmax at label resolution: a calibrated model."""
    from pipeline.config import ModelConfig

    model = load_model(ModelConfig(**MODEL))
    g = torch.Generator().manual_seed(seed)
    labels.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.glob("*.png")):
        x = torch.from_numpy(np.array(Image.open(path)))[None]
        with torch.no_grad():
            logits = model(x)[0].half()  # stored as float16, upsampled on read
        probs = torch.softmax(upsample_logits(logits, (H, W)), 0).reshape(NUM_CLASSES, -1)
        lab = torch.multinomial(probs.T, 1, generator=g).reshape(H, W).numpy().astype(np.uint8)
        lab[0, :4] = IGNORE
        Image.fromarray(lab).save(labels / path.name)


def _local_stream(cfg, ds, todo, sources, directory, fingerprint):
    """extract._stream without Ray: the CPU path's worker on one block, in this process."""
    items = {
        "image_id": np.array([s.image_id for s in todo], object),
        "uri": np.array([s.uri for s in todo], object),
        "label_uri": np.array([s.label_uri or "" for s in todo], object),
        "source": np.array([sources[s.image_id] for s in todo], object),
    }
    write = {"directory": str(directory), "dataset": ds.name, "domain": ds.domain,
             "role": ds.role, "fingerprint": fingerprint, "store_image": cfg.extract.store_image}
    worker = extract.ExtractWorker(cfg.model, cfg.extract, ds, batch_size=4, threads=1,
                                   write=write)
    for meta in worker(items)["meta"]:
        yield json.loads(meta)


@pytest.fixture
def no_ray(monkeypatch):
    calls = []

    def stream(*args):
        calls.append(args[1].name)
        yield from _local_stream(*args)

    monkeypatch.setattr(extract, "_stream", stream)
    monkeypatch.setattr(extract, "init_ray", lambda: None)
    monkeypatch.setattr(evaluate, "_use_gpu", lambda cfg: "false")
    return calls


def _raw(root):
    data = root / "data"
    return {
        "output": str(root / "run"),
        "model": MODEL,
        "datasets": [
            {"name": "cal", "role": "calibration", "domain": "day",
             "images": str(data / "cal" / "img"), "labels": str(data / "cal" / "lab")},
            # A corrupted copy (for calibrators that use one): evaluated held out, but never
            # part of the label-free reference.
            {"name": "cal_noise", "role": "calibration", "domain": "day",
             "images": str(data / "cal" / "img"), "labels": str(data / "cal" / "lab"),
             "corruption": {"kind": "noise", "severity": 5}},
            {"name": "day", "role": "test", "domain": "day",
             "images": str(data / "day" / "img"), "labels": str(data / "day" / "lab")},
            # The calibration images twice more: as a test set (the truth) and as a monitor
            # set (labels given but never read).
            {"name": "cal_test", "role": "test", "domain": "day",
             "images": str(data / "cal" / "img"), "labels": str(data / "cal" / "lab")},
            {"name": "cal_monitor", "role": "monitor", "domain": "day",
             "images": str(data / "cal" / "img"), "labels": str(data / "cal" / "lab")},
            {"name": "dark", "role": "monitor", "domain": "night", "reference": "day",
             "images": str(data / "dark" / "img")},
        ],
        "extract": {"batch_size": 4, "rows_per_shard": 64},
        "fit": {"heldout_fraction": 0.3, "epochs": 2},
        "evaluate": {"bootstrap": 0},
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    data = root / "data"
    for name, n, seed in (("cal", 20, 1), ("day", 8, 2)):
        _images(data / name / "img", n, seed)
        _labels_from_model(data / name / "img", data / name / "lab", seed)
    _images(data / "dark" / "img", 8, 3, dark=True)
    cfg = parse_config(_raw(root))
    mp = pytest.MonkeyPatch()
    mp.setattr(extract, "_stream", _local_stream)
    mp.setattr(extract, "init_ray", lambda: None)
    mp.setattr(evaluate, "_use_gpu", lambda cfg: "false")
    try:
        extract.run(cfg)
        fit.run(cfg)
        output = evaluate.run(cfg, local=True)
    finally:
        mp.undo()
    return cfg, output


# ---------------------------------------------------------------------------------------------
# Listing and decoding


def test_monitor_listing_reads_no_labels_in_any_format(tmp_path):
    _images(tmp_path / "img", 3, 0)
    ds = DatasetConfig(name="m", role="monitor", domain="night", images=str(tmp_path / "img"),
                       labels=str(tmp_path / "nowhere"))
    samples = list_samples(ds)
    assert [s.image_id for s in samples] == ["f00", "f01", "f02"]
    assert all(s.label_uri is None for s in samples)
    assert source_fingerprint(samples[0]).endswith("|-")  # no label file to fingerprint

    table = pa.table({"image": [f"img/f{i:02d}.png" for i in range(3)]})
    pacsv.write_csv(table, tmp_path / "m.csv")
    manifest = DatasetConfig(name="m", role="monitor", domain="night", format="manifest",
                             manifest=str(tmp_path / "m.csv"))
    assert [s.label_uri for s in list_samples(manifest)] == [None] * 3
    labelled = manifest.model_copy(update={"role": "test"})
    with pytest.raises(DataError, match=r"to have columns \['image', 'label'\], but \['label'\]"):
        list_samples(labelled)

    root = tmp_path / "cs"
    (root / "leftImg8bit" / "val" / "town").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(
        root / "leftImg8bit" / "val" / "town" / "a_leftImg8bit.png")
    cityscapes = DatasetConfig(name="c", role="monitor", domain="d", format="cityscapes",
                               images=str(root))
    assert [(s.image_id, s.label_uri) for s in list_samples(cityscapes)] == [("a", None)]


def test_monitor_sample_decodes_to_an_all_ignore_label_plane(tmp_path):
    _images(tmp_path / "img", 1, 0)
    ds = DatasetConfig(name="m", role="monitor", domain="night", images=str(tmp_path / "img"),
                       ignore_index=IGNORE)
    image, labels = load_sample(list_samples(ds)[0], ds, NUM_CLASSES)
    assert image.shape == (H, W, 3)
    assert labels.shape == (H, W)
    assert labels.dtype == np.uint8
    assert (labels == IGNORE).all()
    test = ds.model_copy(update={"role": "test"})
    with pytest.raises(DataError, match="Expected a label file for image .*f00.png"):
        load_sample(list_samples(ds)[0], test, NUM_CLASSES)


def test_a_calibration_or_test_set_without_labels_is_refused_naming_the_key(tmp_path):
    raw = _raw(tmp_path)
    raw["datasets"][2] = {k: v for k, v in raw["datasets"][2].items() if k != "labels"}
    with pytest.raises(ConfigError, match=r"datasets\.2: Expected `labels` to be set for format "
                       r"'folder' and role 'test'"):
        parse_config(raw)


# ---------------------------------------------------------------------------------------------
# Extraction


def test_extraction_stores_logits_and_image_without_labels(run):
    cfg, output = run
    paths = RunPaths(output, model_fingerprint(cfg.model))
    manifest = read_manifest(paths.dataset_dir("dark"))
    assert manifest.role == "monitor"
    assert manifest.labelled is False
    assert manifest.n_images == 8
    assert all(src.endswith("|-") for s in manifest.shards for src in s.sources)
    assert read_manifest(paths.dataset_dir("cal")).labelled is True
    records = list(iter_dataset(paths.dataset_dir("dark")))
    for r in records:
        assert (r.height, r.width) == (H, W)
        assert r.labels.shape == (H, W)
        assert (r.labels == IGNORE).all()
        assert r.logits.shape == (NUM_CLASSES, H // 2, W // 2)
        assert r.image is not None
        assert r.image.shape == (H // 2, W // 2, 3)
    # The monitor set of the calibration images holds the very logits of the calibration set.
    cal = {r.image_id: r.logits for r in iter_dataset(paths.dataset_dir("cal"))}
    mon = {r.image_id: r.logits for r in iter_dataset(paths.dataset_dir("cal_monitor"))}
    assert cal.keys() == mon.keys()
    assert all(np.array_equal(cal[k], mon[k]) for k in cal)


def test_a_rerun_with_nothing_new_extracts_nothing(run, no_ray):
    cfg, output = run
    paths = RunPaths(output, model_fingerprint(cfg.model))
    before = read_manifest(paths.dataset_dir("dark")).shards
    extract.run(cfg)
    assert no_ray == []  # nothing streamed: every source fingerprint matched
    assert read_manifest(paths.dataset_dir("dark")).shards == before


def test_the_gpu_path_stages_extract_a_monitor_set(tmp_path):
    """decode_batch -> LogitPredictor -> write_shards (the stages the GPU pipeline chains)."""
    from pipeline.extract_io import decode_batch, write_shards
    from pipeline.shards import read_shard

    _images(tmp_path / "img", 3, 0)
    cfg = parse_config({
        "output": str(tmp_path / "run"), "model": MODEL,
        "datasets": [{"name": "night", "role": "monitor", "domain": "night",
                      "images": str(tmp_path / "img")}],
        "extract": {"store_stride": 2},
    })
    ds = cfg.datasets[0]
    samples = list_samples(ds)
    listed = {"image_id": np.array([s.image_id for s in samples], object),
              "uri": np.array([s.uri for s in samples], object),
              "label_uri": np.array([""] * len(samples), object)}
    decoded = decode_batch(listed, ds, NUM_CLASSES)
    assert list(decoded["error"]) == ["", "", ""]
    predicted = extract.LogitPredictor(cfg.model, cfg.extract)(decoded)
    meta = write_shards(predicted, directory=str(tmp_path / "out"), dataset="night",
                        domain="night", role="monitor", fingerprint="f", store_image=True)
    [shard] = [json.loads(m)["shard"] for m in meta["meta"]]
    records = read_shard(tmp_path / "out" / shard["file"])
    assert [r.image_id for r in records] == ["f00", "f01", "f02"]
    for r in records:
        assert r.role == "monitor"
        assert (r.labels == IGNORE).all()
        assert r.labels.shape == (H, W)
        assert r.logits.shape == (NUM_CLASSES, H // 4, W // 4)  # model /2, stride 2


def test_a_nightly_rerun_extracts_only_the_new_unlabelled_images(tmp_path, no_ray):
    _images(tmp_path / "img", 3, 0)
    cfg = parse_config({
        "output": str(tmp_path / "run"), "model": MODEL,
        "datasets": [{"name": "night", "role": "monitor", "domain": "night",
                      "images": str(tmp_path / "img")}],
    })
    directory = RunPaths(tmp_path / "run", model_fingerprint(cfg.model)).dataset_dir("night")
    extract.run(cfg)
    assert read_manifest(directory).changes == {"added": 3, "changed": 0, "removed": 0}
    _images(tmp_path / "new", 4, 1)
    (tmp_path / "new" / "f03.png").rename(tmp_path / "img" / "f03.png")  # a new frame arrives
    (tmp_path / "img" / "f00.png").unlink()  # and an old one is gone
    extract.run(cfg)
    manifest = read_manifest(directory)
    assert manifest.changes == {"added": 1, "changed": 0, "removed": 1}
    assert manifest.image_ids() == {"f01", "f02", "f03"}
    assert no_ray == ["night", "night"]


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_per_image_rows_carry_features_and_monitor_rows_no_label_statistics(run):
    _, output = run
    rows = pd.read_parquet(output / evaluate.PER_IMAGE)
    assert set(FEATURE_COLUMNS) <= set(rows.columns)
    assert pq.read_schema(output / evaluate.PER_IMAGE).equals(evaluate.ROW_SCHEMA)
    for name, n in (("cal-heldout", 6), ("cal_noise-heldout", 6), ("day", 8), ("cal_test", 20),
                    ("cal_monitor", 20), ("dark", 8)):
        part = rows[rows["dataset"] == name]
        # Labelled test sets also get their oracle temperature (a bound).
        calibrators = {"uncalibrated", "temperature"} | (
            {"oracle_ts"} if name in ("day", "cal_test") else set())
        assert set(part["calibrator"]) == calibrators, name
        assert len(part) == n * len(calibrators), name
    # Every pixel counts for the features, ignore pixels included.
    assert (rows["lf_n_pixels"] == H * W).all()
    assert all(len(h) == N_CONF_BINS and sum(h) == H * W for h in rows["lf_conf_hist"])
    assert all(len(h) == NUM_CLASSES and sum(h) == H * W for h in rows["lf_pred_hist"])
    conf = rows["lf_conf_sum"] / rows["lf_n_pixels"]
    assert ((conf > 1 / NUM_CLASSES) & (conf <= 1)).all()
    assert ((rows["lf_entropy_sum"] > 0)
            & (rows["lf_entropy_sum"] / H / W <= math.log(NUM_CLASSES) + 1e-9)).all()
    monitor = rows[rows["role"] == "monitor"]
    assert monitor["img_ece"].isna().all()
    assert (monitor["n_images"] == 0).all()
    assert all(sum(c) == 0 for c in monitor["count"])
    labelled = rows[rows["role"] != "monitor"]
    assert labelled["img_ece"].notna().all()
    assert (labelled["n_images"] == 1).all()
    # The monitor copy of the calibration images has the same features as the labelled copy.
    key = ["image_id", "calibrator"]
    rows = rows[rows["calibrator"] != "oracle_ts"]
    a = rows[rows["dataset"] == "cal_test"].sort_values(key).reset_index(drop=True)
    b = rows[rows["dataset"] == "cal_monitor"].sort_values(key).reset_index(drop=True)
    for column in (*FEATURE_COLUMNS, "lf_pred_hist"):
        assert [np.asarray(v).tolist() for v in a[column]] == \
            [np.asarray(v).tolist() for v in b[column]], column


def test_monitor_sets_get_no_summary_shift_or_best_rows(run):
    _, output = run
    summary = pd.read_csv(output / evaluate.SUMMARY)
    assert set(summary["dataset"]) == {"cal-heldout", "cal_noise-heldout", "day", "cal_test"}
    shift = pd.read_csv(output / evaluate.DOMAIN_SHIFT)
    assert "dark" not in set(shift["dataset"])
    best = pd.read_csv(output / evaluate.BEST)
    assert list(best["domain"]) == ["day"]


def test_label_free_table_has_a_row_per_set_and_calibrator(run):
    _, output = run
    table = pd.read_csv(output / evaluate.LABEL_FREE)
    assert tuple(table.columns) == LABEL_FREE_COLUMNS
    assert list(zip(table["dataset"], table["calibrator"], strict=True)) == [
        (d, c) for d in ("day", "cal_test", "cal_monitor", "dark")
        for c in ("uncalibrated", "temperature")
    ]
    assert list(table["role"]) == ["test"] * 4 + ["monitor"] * 4
    assert list(table["n_images"]) == [8, 8, 20, 20, 20, 20, 8, 8]
    assert table.loc[table["dataset"] == "dark", "reference"].eq("day").all()
    for column in ("est_pixel_acc", "est_pixel_acc_doc", "est_img_ece"):
        assert table[column].between(0, 1).all(), column
    assert (table["drift_score"] >= 0).all()
    assert (table["drift_threshold"] > 0).all()


def test_true_values_are_the_summary_s_and_nan_for_monitor_sets(run):
    _, output = run
    table = pd.read_csv(output / evaluate.LABEL_FREE)
    summary = pd.read_csv(output / evaluate.SUMMARY).set_index(["dataset", "calibrator"])
    for row in table[table["role"] == "test"].itertuples():
        assert row.true_pixel_acc == summary.loc[(row.dataset, row.calibrator), "pixel_acc"]
        assert row.true_img_ece == summary.loc[(row.dataset, row.calibrator), "img_ece"]
    monitor = table[table["role"] == "monitor"]
    assert monitor["true_pixel_acc"].isna().all()
    assert monitor["true_img_ece"].isna().all()


def test_label_free_rows_are_the_estimators_on_the_clean_held_out_reference(run):
    """An independent recomputation from per_image.parquet with pipeline.label_free."""
    from pipeline import label_free as LF

    _, output = run
    rows = pd.read_parquet(output / evaluate.PER_IMAGE).sort_values("image_id", kind="stable")
    summary = pd.read_csv(output / evaluate.SUMMARY).set_index(["dataset", "calibrator"])
    table = pd.read_csv(output / evaluate.LABEL_FREE).set_index(["dataset", "calibrator"])
    heldout = rows[rows["dataset"] == "cal-heldout"]  # not cal_noise-heldout: corrupted
    for cal in ("uncalibrated", "temperature"):
        ref = LF.fit_reference(heldout[heldout["calibrator"] == cal].reset_index(drop=True),
                               summary.loc[("cal-heldout", cal), "pixel_acc"])
        for name in ("day", "dark"):
            mine = rows[(rows["dataset"] == name) & (rows["calibrator"] == cal)]
            est = LF.estimate(mine.reset_index(drop=True), ref)
            for key, value in est.items():
                assert table.loc[(name, cal), key] == pytest.approx(value, rel=1e-12), key
    unc = heldout[heldout["calibrator"] == "uncalibrated"].reset_index(drop=True)
    for name in ("day", "dark"):
        mine = rows[(rows["dataset"] == name) & (rows["calibrator"] == "uncalibrated")]
        d = LF.drift(unc, mine.reset_index(drop=True))
        assert table.loc[(name, "temperature"), "drift_score"] == pytest.approx(d.score)
        assert table.loc[(name, "temperature"), "drift_threshold"] == pytest.approx(d.threshold)
        assert bool(table.loc[(name, "temperature"), "drift_alarm"]) == d.alarm


def test_drift_is_one_value_per_set_and_fires_on_the_dark_frames(run):
    _, output = run
    table = pd.read_csv(output / evaluate.LABEL_FREE)
    drift = table.groupby("dataset")[["drift_score", "drift_threshold", "drift_alarm"]]
    assert (drift.nunique() == 1).all().all()
    alarm = table.groupby("dataset")["drift_alarm"].first()
    assert bool(alarm["dark"])
    # The calibration images themselves do not drift from their held-out part.
    assert not alarm["cal_monitor"]
    assert not alarm["cal_test"]


def test_estimates_on_the_calibration_images_match_the_truth(run):
    _, output = run
    table = pd.read_csv(output / evaluate.LABEL_FREE).set_index(["dataset", "calibrator"])
    for cal in ("uncalibrated", "temperature"):
        monitor, truth = table.loc[("cal_monitor", cal)], table.loc[("cal_test", cal)]
        # Same images, same features: the monitor copy's estimates are the test copy's.
        for column in ("est_pixel_acc", "est_pixel_acc_doc", "est_img_ece", "drift_score"):
            assert monitor[column] == truth[column], column
        assert abs(monitor["est_pixel_acc"] - truth["true_pixel_acc"]) < ACC_TOLERANCE
        assert abs(monitor["est_pixel_acc_doc"] - truth["true_pixel_acc"]) < ACC_TOLERANCE
        assert abs(monitor["est_img_ece"] - truth["true_img_ece"]) < ECE_TOLERANCE


@pytest.mark.parametrize("scale", [1e-9, 1.0, 8.0, 200.0], ids=["flat", "mild", "sharp", "p0"])
def test_cpu_features_equal_image_features(scale):
    """The CPU path's fused kernel against label_free.image_features, the one definition."""
    from pipeline.evaluate_rows import _features_cpu
    from pipeline.label_free import image_features
    from pipeline.metrics import first_argmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(NUM_CLASSES, H, W, generator=g) * scale  # 200: p underflows to 0
    logits[:, 0, 0] = 0.0  # an exact tie
    probs = torch.softmax(logits, 0)
    preds = first_argmax(logits).reshape(-1)
    got = _features_cpu(probs, logits, preds)
    want = image_features(probs, preds=torch.from_numpy(preds).reshape(H, W))
    assert set(got) == set(want)
    assert got["lf_n_pixels"] == want["lf_n_pixels"] == H * W
    assert got["lf_conf_hist"].tolist() == want["lf_conf_hist"].tolist()
    assert got["lf_pred_hist"].tolist() == want["lf_pred_hist"].tolist()
    assert got["lf_conf_sum"] == pytest.approx(want["lf_conf_sum"], rel=1e-12)
    assert got["lf_entropy_sum"] == pytest.approx(want["lf_entropy_sum"], rel=1e-6, abs=1e-9)


def test_a_nightly_config_of_a_calibration_set_and_a_monitor_set_alone(run, tmp_path, no_ray):
    """The README's nightly config: no labelled test set, only tonight's unlabelled images."""
    import shutil

    from pipeline import report

    cfg, output = run
    raw = _raw(tmp_path)
    raw["datasets"] = [d for d in raw["datasets"] if d["name"] in ("cal", "dark")]
    for d in raw["datasets"]:
        d["images"] = d["images"].replace(str(tmp_path), str(output.parent))
        if "labels" in d:
            d["labels"] = d["labels"].replace(str(tmp_path), str(output.parent))
    nightly = parse_config(raw)
    shutil.copytree(output / "shards", tmp_path / "run" / "shards")  # nothing to extract
    extract.run(nightly)
    assert no_ray == []
    fit.run(nightly)
    out = evaluate.run(nightly, local=True)
    summary = pd.read_csv(out / evaluate.SUMMARY)
    assert set(summary["dataset"]) == {"cal-heldout"}
    assert pd.read_csv(out / evaluate.BEST).empty
    table = pd.read_csv(out / evaluate.LABEL_FREE)
    assert list(zip(table["dataset"], table["calibrator"], strict=True)) == [
        ("dark", "uncalibrated"), ("dark", "temperature")]
    assert table["drift_alarm"].all()
    assert report.write(nightly).is_file()


def test_label_free_csv_is_written_before_summary_csv():
    assert evaluate.TABLES.index(evaluate.LABEL_FREE) < evaluate.TABLES.index(evaluate.SUMMARY)
    assert evaluate.TABLES[-1] == evaluate.SUMMARY


def test_monitor_sets_need_held_out_calibration_images(run):
    cfg, output = run
    no_heldout = cfg.model_copy(update={
        "evaluate": cfg.evaluate.model_copy(update={"include_heldout": False})})
    paths = RunPaths(output, model_fingerprint(cfg.model))
    with pytest.raises(ValueError, match=r"held-out calibration images for the monitor sets "
                       r"\['cal_monitor', 'dark'\].*`evaluate.include_heldout: true`"):
        evaluate.plan_targets(no_heldout, paths)


@pytest.mark.ray
def test_ray_evaluation_of_monitor_sets_equals_the_in_process_one(ray_local, run, tmp_path,
                                                                  monkeypatch):
    import shutil

    cfg, local_output = run
    monkeypatch.setattr(evaluate, "_use_gpu", lambda cfg: "false")
    ray_cfg = cfg.model_copy(update={
        "output": str(tmp_path / "run"),
        "evaluate": cfg.evaluate.model_copy(update={"num_actors": 1}),
    })
    shutil.copytree(local_output / "shards", tmp_path / "run" / "shards")
    shutil.copytree(local_output / "artifacts", tmp_path / "run" / "artifacts")
    output = evaluate.run(ray_cfg)  # rows come back in another order: label_free sorts them
    keys = ["dataset", "calibrator"]
    got = pd.read_csv(output / evaluate.LABEL_FREE).sort_values(keys, ignore_index=True)
    want = pd.read_csv(local_output / evaluate.LABEL_FREE).sort_values(keys, ignore_index=True)
    pd.testing.assert_frame_equal(got, want, rtol=1e-12)
    order = ["dataset", "calibrator", "image_id"]
    got = pd.read_parquet(output / evaluate.PER_IMAGE).sort_values(order, ignore_index=True)
    want = pd.read_parquet(local_output / evaluate.PER_IMAGE).sort_values(order, ignore_index=True)
    columns = ["role", "img_ece", "n_images", "lf_n_pixels", "lf_conf_sum", "lf_entropy_sum"]
    pd.testing.assert_frame_equal(got[columns], want[columns], rtol=1e-12)
