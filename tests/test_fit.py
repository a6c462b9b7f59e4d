"""Stage 2 (local mode): splitting, pixel sampling, validation, artifacts, corrupted-data rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline import fit, shards
from pipeline.calibrators import CALIBRATORS, list_calibrators, load
from pipeline.config import JobConfig
from pipeline.paths import RunPaths
from pipeline.shards import (
    ImageRecord,
    Manifest,
    read_manifest,
    upsample_logits,
    write_manifest,
    write_shard,
)

C = 5
FP = "f" * 64
IGNORE = 255


# --------------------------------------------------------------------------------------------
# Synthetic shards


def make_records(
    dataset: str, n: int, *, size=(16, 16), stride=1, scale=3.0, seed=0, ignore_frac=0.1,
    ignore_index=IGNORE, image=False, channels=C,
) -> list[ImageRecord]:
    """Over-confident logits (true temperature ``scale``) with labels drawn from them."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    records = []
    for i in range(n):
        small = (torch.randn(channels, h // stride, w // stride, generator=g) * 2 * scale).half()
        full = upsample_logits(small, size)
        probs = torch.softmax(full / scale, 0).permute(1, 2, 0).reshape(-1, channels)
        labels = torch.multinomial(probs, 1, generator=g).reshape(h, w)
        labels[torch.rand(h, w, generator=g) < ignore_frac] = ignore_index
        rgb = None
        if image:
            rgb = (torch.rand(h // stride, w // stride, 3, generator=g) * 255).to(torch.uint8)
            rgb = rgb.numpy()
        records.append(ImageRecord(
            dataset, "day", "calibration", f"img{i:03d}", f"img{i}.png", h, w, FP,
            labels.to(torch.uint8).numpy(), small.numpy(), rgb,
        ))
    return records


def write_dataset(output, name, records, *, num_classes=C, ignore_index=IGNORE, per_shard=3):
    directory = RunPaths(output, FP).dataset_dir(name)
    shards = [
        write_shard(directory / f"part-{k:05d}.parquet", records[start : start + per_shard])
        for k, start in enumerate(range(0, len(records), per_shard))
    ]
    write_manifest(directory, Manifest(
        dataset=name, role="calibration", domain="day", reference=None, num_classes=num_classes,
        class_names=[f"c{i}" for i in range(num_classes)], ignore_index=ignore_index,
        model_fingerprint=FP, config_hash="test", shards=shards,
    ))
    return directory


def make_cfg(tmp_path, datasets=("cal",), calibrators=None, corrupted=(), **fit_options):
    entries = [
        {"name": n, "role": "calibration", "domain": "day", "images": "x", "labels": "y"}
        for n in datasets
    ]
    entries += [
        {"name": n, "role": "calibration", "domain": "day", "images": "x", "labels": "y",
         "corruption": {"kind": kind, "severity": severity}}
        for n, kind, severity in corrupted
    ]
    return JobConfig.model_validate({
        "output": str(tmp_path / "run"),
        "model": {"kind": "torchscript", "path": str(tmp_path / "m.pt"), "num_classes": C},
        "datasets": entries,
        "calibrators": calibrators or [{"name": "temperature"}],
        "fit": {"pixels_per_image": 128, "heldout_fraction": 0.3, **fit_options},
    })


@pytest.fixture(autouse=True)
def _fingerprint(monkeypatch):
    monkeypatch.setattr(fit, "model_fingerprint", lambda model: FP)


# --------------------------------------------------------------------------------------------
# Held-out split


def test_split_is_seeded_order_independent_and_sized():
    ids = [f"img{i:03d}" for i in range(40)]
    held = fit.split_heldout(ids, 0.25, seed=3)
    assert len(held) == 10
    assert held <= set(ids)
    assert held == fit.split_heldout(list(reversed(ids)) + ids[:5], 0.25, seed=3)
    assert held != fit.split_heldout(ids, 0.25, seed=4)


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        pytest.param(10, 0.0, 0, id="no-heldout"),
        pytest.param(1, 0.5, 0, id="single-image"),
        pytest.param(3, 0.01, 1, id="at-least-one-held"),
        pytest.param(3, 0.9, 2, id="at-least-one-fit"),
    ],
)
def test_split_edge_sizes(n, fraction, expected):
    assert len(fit.split_heldout([f"i{k}" for k in range(n)], fraction, seed=0)) == expected


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match=r"Expected `heldout_fraction` in \[0, 1\)"):
        fit.split_heldout(["a", "b"], 1.0, seed=0)


# --------------------------------------------------------------------------------------------
# Pixel sampling


def _labels_with_ignore(rng, h=20, w=30, ignore_frac=0.3):
    labels = rng.integers(0, C, (h, w))
    labels[rng.random((h, w)) < ignore_frac] = IGNORE
    return labels


@pytest.mark.parametrize("n", [pytest.param(50, id="fewer"), pytest.param(10_000, id="all")])
def test_pixel_indices_count_distinct_valid(n):
    labels = _labels_with_ignore(np.random.default_rng(0))
    n_valid = int((labels != IGNORE).sum())
    index = fit.sample_pixel_indices(labels, n, np.random.default_rng(1), ignore_index=IGNORE)
    assert len(index) == min(n, n_valid)
    assert len(np.unique(index)) == len(index)
    assert (labels.reshape(-1)[index] != IGNORE).all()


def test_pixel_indices_are_seeded():
    labels = _labels_with_ignore(np.random.default_rng(0))

    def draw(seed):
        return fit.sample_pixel_indices(
            labels, 40, np.random.default_rng(seed), ignore_index=IGNORE
        )

    np.testing.assert_array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


@pytest.mark.parametrize(
    ("wrong_frac", "n"),
    [
        pytest.param(0.1, 100, id="few-wrong-all-taken"),
        pytest.param(0.5, 100, id="half-half"),
        pytest.param(0.95, 100, id="few-right"),
        pytest.param(0.3, 51, id="odd-n"),
    ],
)
def test_pixel_indices_oversample_mispredicted(wrong_frac, n):
    rng = np.random.default_rng(0)
    labels = _labels_with_ignore(rng)
    mispredicted = rng.random(labels.shape) < wrong_frac
    valid = labels.reshape(-1) != IGNORE
    n_wrong = int((mispredicted.reshape(-1) & valid).sum())
    n_right = int(valid.sum()) - n_wrong
    index = fit.sample_pixel_indices(
        labels, n, np.random.default_rng(1), ignore_index=IGNORE, mispredicted=mispredicted
    )
    got_wrong = int(mispredicted.reshape(-1)[index].sum())
    # Half the draw from mispredicted pixels, all of them when fewer, more when right ones lack.
    expected_wrong = min(n_wrong, max(n // 2, n - n_right))
    assert len(index) == n
    assert got_wrong == expected_wrong
    assert got_wrong / n > min(wrong_frac, 0.5) - 0.05 or n_wrong == got_wrong
    assert (labels.reshape(-1)[index] != IGNORE).all()


def _position_records(n=3, h=12, w=10):
    """Logits that encode their own pixel: channel 0 = row, 1 = column, 2 = the label."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        labels = _labels_with_ignore(rng, h, w).astype(np.uint8)
        logits = np.zeros((C, h, w), np.float16)
        logits[0] = np.arange(h)[:, None]
        logits[1] = np.arange(w)[None, :]
        logits[2] = np.where(labels == IGNORE, -1, labels)
        records.append(ImageRecord("d", "day", "calibration", f"im{i}", "u", h, w, FP, labels,
                                   logits))
    return records


def test_sample_pixels_pairs_logits_with_labels_per_image():
    records = _position_records()
    out = fit.sample_pixels(records, pixels_per_image=30, seed=0, ignore_index=IGNORE,
                            num_classes=C)
    assert out.logits.shape == (90, C)
    assert out.logits.dtype == torch.float32
    assert out.labels.dtype == torch.int64
    assert not (out.labels == IGNORE).any()
    # The logits row of each sampled pixel is the one at its own position and label.
    assert torch.equal(out.logits[:, 2].long(), out.labels)
    for k, record in enumerate(records):
        rows = out.logits[30 * k : 30 * (k + 1)]
        r, c = rows[:, 0].long().numpy(), rows[:, 1].long().numpy()
        assert len(set(zip(r, c, strict=True))) == 30
        np.testing.assert_array_equal(record.labels[r, c], out.labels[30 * k : 30 * (k + 1)])


def test_sample_pixels_independent_of_record_order_and_seeded():
    records = _position_records(n=4)
    a = fit.sample_pixels(records, pixels_per_image=20, seed=1, ignore_index=IGNORE)
    b = fit.sample_pixels(records[::-1], pixels_per_image=20, seed=1, ignore_index=IGNORE)
    c = fit.sample_pixels(records, pixels_per_image=20, seed=2, ignore_index=IGNORE)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.logits, c.logits)


def test_sample_pixels_upsamples_to_label_resolution():
    records = make_records("d", 2, size=(16, 12), stride=4)
    assert records[0].logits.shape == (C, 4, 3)
    out = fit.sample_pixels(records, pixels_per_image=10_000, seed=0, ignore_index=IGNORE)
    assert len(out.labels) == sum(int((r.labels != IGNORE).sum()) for r in records)


@pytest.mark.parametrize(
    ("records", "match"),
    [
        pytest.param(make_records("d", 1, channels=4), r"model.num_classes=5 classes in "
                     r"dataset 'd', image 'img000', but got 4", id="class-count"),
        pytest.param(make_records("d", 2, ignore_frac=1.0), r"but got 2 images without any",
                     id="all-ignored"),
    ],
)
def test_sample_pixels_errors(records, match):
    with pytest.raises(ValueError, match=match):
        fit.sample_pixels(records, pixels_per_image=8, seed=0, ignore_index=IGNORE,
                          num_classes=C)


def test_record_map_strides_and_scales_image():
    record = make_records("d", 1, size=(16, 12), stride=2, image=True)[0]
    logits, labels, image = fit.record_map(record, stride=2)
    assert logits.shape == (C, 8, 6)
    assert labels.shape == (8, 6)
    assert image.shape == (3, 8, 6)
    torch.testing.assert_close(logits, upsample_logits(record.logits, (16, 12))[:, ::2, ::2])
    np.testing.assert_array_equal(labels.numpy(), record.labels[::2, ::2])
    assert float(image.min()) >= 0.0
    assert float(image.max()) <= 1.0


# --------------------------------------------------------------------------------------------
# Validation: before any data is fitted


@pytest.fixture
def no_fit(monkeypatch):
    """Fail loudly if a fit starts: validation errors must come first."""
    def boom(*args, **kwargs):
        raise AssertionError("a fit started before validation finished")

    monkeypatch.setattr(fit, "fit_specs", boom)


def test_error_without_calibration_dataset(tmp_path, no_fit):
    cfg = make_cfg(tmp_path)
    cfg = cfg.model_copy(update={"datasets": [
        d.model_copy(update={"role": "test"}) for d in cfg.datasets
    ]})
    with pytest.raises(ValueError, match=r"at least one dataset with role 'calibration'"):
        fit.run(cfg)


def test_error_when_only_corrupted_calibration_data(tmp_path, no_fit):
    cfg = make_cfg(tmp_path, datasets=(), corrupted=[("fog3", "fog", 3)])
    with pytest.raises(ValueError, match=r"without `corruption`.*\['fog3'\]"):
        fit.run(cfg)


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        pytest.param({"name": "nope"}, ValueError, r"`calibrators.0` \('nope'\).*Unknown "
                     r"calibrator 'nope'", id="unknown-name"),
        pytest.param({"name": "temperature", "options": {"bogus": 1}}, ValueError,
                     r"Unknown option\(s\) \['bogus'\]", id="unknown-option"),
        pytest.param({"name": "temperature", "options": {"t_min": "x"}}, TypeError,
                     r"Expected `t_min` to be a float", id="bad-option-type"),
        pytest.param({"name": "temperature", "options": {"use_corrupted": "yes"}}, TypeError,
                     r"`calibrators.0.options.use_corrupted` to be a bool", id="use-corrupted"),
        pytest.param({"name": "temperature", "options": {"use_corrupted": True}}, ValueError,
                     r"Expected calibration datasets with a `corruption`", id="no-corrupted"),
        pytest.param({"name": "temperature", "options": {"augment_corruptions": [{"kind": "fog"}]}},
                     ValueError, r"to be \{kind, severity\}", id="augment-malformed"),
    ],
)
def test_calibrator_errors_before_reading_data(tmp_path, no_fit, spec, error, match):
    # No shards exist: the calibrator is validated before any manifest is read.
    with pytest.raises(error, match=match):
        fit.run(make_cfg(tmp_path, calibrators=[spec]))


def test_error_on_class_count_mismatch_in_manifest(tmp_path, no_fit):
    write_dataset(tmp_path / "run", "cal", make_records("cal", 3, channels=4), num_classes=4)
    with pytest.raises(ValueError, match=r"`num_classes` in .*cal/manifest.json to equal "
                       r"model.num_classes=5 from the config, but got 4"):
        fit.run(make_cfg(tmp_path))


def test_error_on_class_count_mismatch_in_shard(tmp_path, no_fit):
    write_dataset(tmp_path / "run", "cal", make_records("cal", 3, channels=4), num_classes=C)
    with pytest.raises(ValueError, match=r"model.num_classes=5 classes in dataset 'cal'"):
        fit.run(make_cfg(tmp_path))


def test_error_on_calibration_set_without_valid_pixels(tmp_path, no_fit):
    write_dataset(tmp_path / "run", "cal", make_records("cal", 4, ignore_frac=1.0))
    with pytest.raises(ValueError, match=r"dataset 'cal' .* all 4 images are fully ignored"):
        fit.run(make_cfg(tmp_path))


def test_error_on_missing_extraction(tmp_path, no_fit):
    with pytest.raises(FileNotFoundError, match=r"extract the dataset first"):
        fit.run(make_cfg(tmp_path))


# --------------------------------------------------------------------------------------------
# Local fits and artifacts


def test_local_fit_writes_loadable_artifacts(tmp_path):
    output = tmp_path / "run"
    directory = write_dataset(output, "cal", make_records("cal", 10, size=(24, 24), scale=3.0))
    cfg = make_cfg(tmp_path, calibrators=[
        {"name": "temperature"},
        {"name": "vector", "label": "vs"},
    ], pixels_per_image=400)
    out = fit.run(cfg)
    assert out == {"temperature": output / "artifacts" / "temperature",
                   "vs": output / "artifacts" / "vs"}
    ts = load(out["temperature"])
    # The synthetic logits are over-confident by a temperature of 3.
    assert ts.temperature == pytest.approx(3.0, rel=0.15)
    card = json.loads((out["temperature"] / "calibrator.json").read_text())
    metrics = card["metrics"]
    assert metrics["split"] == "heldout"
    assert metrics["mode"] == "local"
    assert metrics["heldout"]["nll"] < metrics["uncalibrated"]["nll"]
    assert metrics["heldout"]["ece"] < metrics["uncalibrated"]["ece"]
    assert metrics["heldout"]["pixels"] == metrics["uncalibrated"]["pixels"] > 0
    assert card["data_fingerprint"] == shards.data_fingerprint([read_manifest(directory)])
    assert card["ignore_index"] == IGNORE
    assert card["class_names"] == [f"class_{i}" for i in range(C)]
    assert load(out["vs"]).num_classes == C
    # Held-out images are never fitted on: 3 of 10 images held out at 400 pixels per image.
    assert metrics["fit_pixels"] + metrics["heldout"]["pixels"] <= 10 * 400


def test_data_fingerprint_tracks_shard_checksums(tmp_path):
    a = read_manifest(write_dataset(tmp_path, "a", make_records("a", 3)))
    b = read_manifest(write_dataset(tmp_path, "b", make_records("b", 3, seed=1)))
    assert shards.data_fingerprint([a, b]) == shards.data_fingerprint([b, a])
    assert shards.data_fingerprint([a]) != shards.data_fingerprint([a, b])
    changed = read_manifest(write_dataset(tmp_path, "a", make_records("a", 3, seed=2)))
    assert shards.data_fingerprint([changed]) != shards.data_fingerprint([a])


def test_failed_fit_keeps_previous_artifacts(tmp_path, monkeypatch):
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 6))
    first = fit.run(make_cfg(tmp_path))["temperature"]
    before = {p.name: p.read_bytes() for p in first.iterdir()}

    def broken(self, data, heldout):
        raise RuntimeError("vector fit failed")

    monkeypatch.setattr(CALIBRATORS["vector"], "_fit", broken)
    cfg = make_cfg(tmp_path, calibrators=[{"name": "temperature"}, {"name": "vector"}], seed=7)
    with pytest.raises(RuntimeError, match="vector fit failed"):
        fit.run(cfg)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert not (output / "artifacts" / "vector").exists()


def test_oversampling_shapes_only_the_fit_sample(tmp_path):
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 8, scale=4.0))
    plain = json.loads((fit.run(make_cfg(tmp_path, pixels_per_image=64))["temperature"]
                        / "calibrator.json").read_text())["metrics"]
    over = json.loads((fit.run(make_cfg(tmp_path, pixels_per_image=64,
                                        oversample_mispredicted=True))["temperature"]
                       / "calibrator.json").read_text())["metrics"]
    assert over["uncalibrated"] == plain["uncalibrated"]  # the same held-out pixels
    assert over["fit_pixels"] == plain["fit_pixels"]


# --------------------------------------------------------------------------------------------
# Corrupted calibration data (issue 8): used only by calibrators that ask for it


def test_corrupted_sets_only_for_use_corrupted(tmp_path):
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 6, scale=2.0))
    # Same image ids, much more over-confident: a temperature fitted on it moves up.
    write_dataset(output, "cal_fog", make_records("cal_fog", 6, scale=6.0, seed=3))
    cfg = make_cfg(tmp_path, corrupted=[("cal_fog", "fog", 3)], calibrators=[
        {"name": "temperature"},
        {"name": "temperature", "label": "ts_fog", "options": {"use_corrupted": True}},
        {"name": "temperature", "label": "ts_aug",
         "options": {"augment_corruptions": [{"kind": "fog", "severity": 3}]}},
    ])
    out = fit.run(cfg)
    cards = {k: json.loads((v / "calibrator.json").read_text()) for k, v in out.items()}
    assert cards["temperature"]["metrics"]["datasets"] == ["cal"]
    assert cards["ts_fog"]["metrics"]["datasets"] == ["cal", "cal_fog"]
    assert cards["ts_aug"]["metrics"]["datasets"] == ["cal", "cal_fog"]
    assert "use_corrupted" not in cards["ts_fog"]["options"]
    assert cards["temperature"]["data_fingerprint"] != cards["ts_fog"]["data_fingerprint"]
    assert load(out["ts_fog"]).temperature > load(out["temperature"]).temperature + 0.3
    # Every calibrator is scored on the same clean held-out pixels.
    assert cards["ts_fog"]["metrics"]["uncalibrated"] == cards["temperature"]["metrics"][
        "uncalibrated"]


def test_adaptive_calibrators_get_the_clean_reference_from_the_fit_stage(tmp_path):
    # Clean images at T = 2, their corrupted copies at T = 6: the gated calibrator's T0 (and
    # band) must come from the clean images alone, its per-image temperatures from both.
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 8, scale=2.0))
    write_dataset(output, "cal_fog", make_records("cal_fog", 8, scale=6.0, seed=3))
    cfg = make_cfg(tmp_path, corrupted=[("cal_fog", "fog", 3)], calibrators=[
        {"name": "temperature"},
        {"name": "adaptive_ts_gated", "options": {"use_corrupted": True, "gate": "hard",
                                                  "band": 0.0}},
        {"name": "adaptive_ts", "label": "pinned", "options": {
            "reference": {"temperature": 1.5, "mean": [0.0] * 6, "std": [1.0] * 6,
                          "lo": [0.0] * 6, "hi": [0.0] * 6}}},
    ], map_stride=2, heldout_fraction=0.25)
    out = fit.run(cfg)
    cards = {k: json.loads((v / "calibrator.json").read_text()) for k, v in out.items()}
    reference = cards["adaptive_ts_gated"]["options"]["reference"]
    assert cards["adaptive_ts_gated"]["metrics"]["datasets"] == ["cal", "cal_fog"]
    # Fitted on the clean fit maps (stride 2) rather than 128 sampled pixels: close to TS.
    assert reference["temperature"] == pytest.approx(
        load(out["temperature"]).temperature, rel=0.1)
    assert reference["temperature"] < 3.0
    gated = load(out["adaptive_ts_gated"])
    assert gated.summary()["temperature"] == pytest.approx(reference["temperature"], rel=1e-6)
    # A reference given in the spec is kept as it is.
    assert cards["pinned"]["options"]["reference"]["temperature"] == 1.5


def test_augment_corruption_without_matching_dataset(tmp_path, no_fit):
    cfg = make_cfg(tmp_path, corrupted=[("cal_fog", "fog", 3)], calibrators=[
        {"name": "temperature", "options": {"augment_corruptions": [
            {"kind": "dark", "severity": 2}]}},
    ])
    with pytest.raises(ValueError, match=r"none has \[\('dark', 2\)\].*\('fog', 3\)"):
        fit.run(cfg)


# --------------------------------------------------------------------------------------------
# Selective and spatial calibrators (when registered)


def _needs(name):
    if name not in list_calibrators():
        pytest.skip(f"calibrator {name!r} is not registered")


def test_local_selective_fit(tmp_path):
    _needs("selective")
    write_dataset(tmp_path / "run", "cal", make_records("cal", 8, scale=3.0))
    cfg = make_cfg(tmp_path, calibrators=[{"name": "selective", "options": {"epochs": 2}}],
                   epochs=5)
    card = json.loads((fit.run(cfg)["selective"] / "calibrator.json").read_text())
    assert card["options"]["epochs"] == 2  # the spec wins over fit.epochs
    assert card["metrics"]["heldout"]["nll"] < card["metrics"]["uncalibrated"]["nll"]


def test_fit_epochs_is_the_default_epochs_option(tmp_path):
    _needs("selective")
    write_dataset(tmp_path / "run", "cal", make_records("cal", 6))
    cfg = make_cfg(tmp_path, calibrators=[{"name": "selective"}], epochs=1)
    card = json.loads((fit.run(cfg)["selective"] / "calibrator.json").read_text())
    assert card["options"]["epochs"] == 1


def test_local_spatial_fit_on_maps(tmp_path):
    _needs("selective_spatial")
    write_dataset(tmp_path / "run", "cal", make_records("cal", 6, size=(16, 16), image=True))
    cfg = make_cfg(tmp_path, calibrators=[{"name": "selective_spatial", "options": {
        "epochs": 1, "hidden": 4}}], map_stride=2)
    card = json.loads((fit.run(cfg)["selective_spatial"] / "calibrator.json").read_text())
    # Scored on the held-out maps at stride 2: 2 images x 8 x 8 pixels minus ignored ones.
    assert 0 < card["metrics"]["heldout"]["pixels"] <= 2 * 8 * 8


def test_ray_mode_fits_a_calibrator_without_a_sharded_fit_in_the_driver(tmp_path, monkeypatch,
                                                                       caplog):
    # The capability flag, not a name list, decides; no Train run starts for such a calibrator.
    monkeypatch.setattr(CALIBRATORS["temperature"], "distributed", False)
    cfg = make_cfg(tmp_path, mode="ray", num_workers=2)
    logits, labels = torch.randn(200, C) * 3, torch.randint(0, C, (200,))
    data = fit.FitData(logits, labels)
    with caplog.at_level("WARNING", logger="pipeline.fit"):
        calibrator, extra = fit.fit_spec(cfg, cfg.calibrators[0], data, data)
    assert extra["mode"] == "local"
    assert bool(calibrator.fitted)
    assert "no distributed fit" in caplog.text


@pytest.mark.parametrize("heldout_fraction", [0.3, 0.0], ids=["heldout", "scored-on-fit"])
def test_ray_mode_run_reads_the_fit_images_in_the_driver_for_such_a_calibrator(
    tmp_path, monkeypatch, heldout_fraction
):
    # In ray mode the driver keeps only references to the fit images; a calibrator fitted in
    # the driver reads them from the shards, and fits exactly what local mode fits (also
    # when nothing is held out and the fit images are scored).
    monkeypatch.setattr(CALIBRATORS["temperature"], "distributed", False)
    write_dataset(tmp_path / "run", "cal", make_records("cal", 6, size=(12, 12)))
    cards = {}
    for mode in ("local", "ray"):
        out = fit.run(make_cfg(tmp_path, mode=mode, num_workers=2,
                               heldout_fraction=heldout_fraction))
        cards[mode] = json.loads((out["temperature"] / "calibrator.json").read_text())
    assert cards["ray"]["metrics"]["mode"] == "local"
    assert cards["ray"]["sha256"] == cards["local"]["sha256"]
    assert cards["ray"]["metrics"]["split"] == cards["local"]["metrics"]["split"]
    assert cards["ray"]["metrics"]["fit_pixels"] == cards["local"]["metrics"]["fit_pixels"]


# --------------------------------------------------------------------------------------------
# fit.mode: auto


@pytest.mark.parametrize(("parallel", "pixels", "n", "expected"), [
    (1, 10**9, 8, "local"),   # no more room than this process: never Ray Train
    (8, 10_000, 2, "local"),  # a small fit: the start-up costs more than it saves
    (8, 50 * 10**6, 4, "ray"),  # a big fit on 8 parallel fits
])
def test_auto_mode_follows_the_measured_cost_model(tmp_path, monkeypatch, parallel, pixels, n,
                                                   expected):
    monkeypatch.setattr(fit, "_parallel_fits", lambda cfg, n: parallel)
    cfg = make_cfg(tmp_path, mode="auto")
    assert fit.resolve_mode(cfg, pixels, n) == expected
    # The rule itself: Ray Train when start-up plus the spread work beats the local sum.
    local = fit.LOCAL_SECONDS_PER_MPIXEL * pixels / 1e6 * n
    faster = fit.RAY_STARTUP_SECONDS + local / parallel < local
    assert (expected == "ray") == (parallel >= 2 and faster)
    # Explicit modes are kept whatever the sizes.
    for mode in ("local", "ray"):
        assert fit.resolve_mode(make_cfg(tmp_path, mode=mode), pixels, n) == mode


def test_auto_mode_fits_a_small_run_locally(tmp_path, monkeypatch):
    output = tmp_path / "run"
    write_dataset(output, "cal", make_records("cal", 6, size=(16, 16), scale=2.0))
    decided = []
    resolve = fit.resolve_mode
    monkeypatch.setattr(fit, "resolve_mode", lambda *a: decided.append(a[1:]) or resolve(*a))
    out = fit.run(make_cfg(tmp_path, mode="auto"))
    card = json.loads((out["temperature"] / "calibrator.json").read_text())
    assert card["metrics"]["mode"] == "local"
    # Decided once, before the shards are read, on the estimated fit pixels of 6 images.
    assert decided == [(int(6 * (1 - 0.3) * 128), 1)]


def test_parallel_fits_counts_the_local_machine_without_a_cluster(tmp_path, monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(fit.os, "cpu_count", lambda: 16)
    # 16 CPUs, 2 workers per run and one CPU kept free per run: 5 runs of 2 workers, and no
    # more runs than calibrators.
    assert fit._parallel_fits(make_cfg(tmp_path, mode="auto", num_workers=2), 8) == 10
    assert fit._parallel_fits(make_cfg(tmp_path, mode="auto", num_workers=2), 3) == 6
    # One run always starts (as in ray mode): 2 workers on 2 CPUs fit in parallel.
    monkeypatch.setattr(fit.os, "cpu_count", lambda: 2)
    assert fit._parallel_fits(make_cfg(tmp_path, mode="auto", num_workers=2), 8) == 2
    assert fit._parallel_fits(make_cfg(tmp_path, mode="auto"), 8) == 1
    # GPU fits on a machine without GPUs: the workers could not be placed.
    monkeypatch.setattr(fit.torch.cuda, "device_count", lambda: 0)
    assert fit._parallel_fits(make_cfg(tmp_path, mode="auto", use_gpu=True), 8) == 0
