"""Label-free estimators on synthetic data whose truth is known (pipeline/label_free.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.label_free import (
    CONF_EDGES,
    FEATURE_COLUMNS,
    LABEL_FREE_COLUMNS,
    PRED_HIST_COLUMN,
    Drift,
    Reference,
    drift,
    estimate,
    fit_reference,
    image_features,
)

C = 5
SIDE = 48  # pixels per image side


def _image(g: torch.Generator, *, scale: float, temperature: float = 1.0, side: int = SIDE):
    """One synthetic image: (probs the model reports, true accuracy, true per-image ECE).

    Labels are drawn from softmax(logits): the logits are perfectly calibrated. The model
    reports softmax(logits / temperature): temperature < 1 sharpens them (over-confident).
    """
    logits = torch.randn(C, side, side, generator=g, dtype=torch.float64) * scale
    truth = torch.softmax(logits, 0).reshape(C, -1).T
    labels = torch.multinomial(truth, 1, generator=g)[:, 0]
    probs = torch.softmax(logits / temperature, 0)
    flat = probs.reshape(C, -1)
    conf, pred = flat.max(0)
    correct = (pred == labels).double()
    b = (torch.ceil(conf * 15).long() - 1).clamp(0, 14)
    gap = torch.bincount(b, conf, 15) - torch.bincount(b, correct, 15)
    return probs.float(), float(correct.mean()), float(gap.abs().sum() / conf.numel())


def _set(n: int, *, seed: int, scales=(1.0, 3.0), temperature: float = 1.0):
    """n images with logit scales drawn uniformly from ``scales``: (rows, accuracy, img ECE)."""
    g = torch.Generator().manual_seed(seed)
    rows, accs, eces = [], [], []
    for _ in range(n):
        scale = scales[0] + (scales[1] - scales[0]) * float(torch.rand((), generator=g))
        probs, acc, ece = _image(g, scale=scale, temperature=temperature)
        rows.append(image_features(probs))
        accs.append(acc)
        eces.append(ece)
    frame = pd.DataFrame(rows).assign(img_ece=eces)  # the true per-image ECE, as evaluate's
    return frame, float(np.mean(accs)), float(np.mean(eces))


@pytest.fixture(scope="module")
def reference():
    return _set(60, seed=0)


# ---------------------------------------------------------------------------------------------
# image_features


def _naive_features(probs: np.ndarray) -> dict:
    flat = probs.reshape(probs.shape[0], -1).astype(np.float64)
    conf = flat.max(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(flat > 0, flat * np.log(flat), 0.0)
    hist = np.zeros(len(CONF_EDGES) - 1, dtype=np.int64)
    for c in conf:  # bin k holds (edge k, edge k+1]; 0 in the first bin
        k = max(int(np.searchsorted(CONF_EDGES, c, side="left")) - 1, 0)
        hist[k] += 1
    return {"lf_n_pixels": conf.size, "lf_conf_sum": conf.sum(),
            "lf_entropy_sum": -plogp.sum(), "lf_conf_hist": hist}


def test_conf_edges_shape():
    assert CONF_EDGES[0] == 0.0
    assert CONF_EDGES[-1] == 1.0
    assert np.all(np.diff(CONF_EDGES) > 0)
    # Every edge of the default 15-bin ECE is an edge of the histogram.
    for k in range(16):
        assert np.isclose(CONF_EDGES, k / 15, rtol=0, atol=1e-12).any(), k
    # Finer near 1: the last bins are much narrower than the first.
    assert np.diff(CONF_EDGES)[-1] < 1e-5 < np.diff(CONF_EDGES)[0]


def test_image_features_matches_naive_numpy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(C, 17, 13, generator=g) * 4
    probs = torch.softmax(logits, 0)
    probs[:, 0, 0] = torch.tensor([1.0, 0, 0, 0, 0])  # exact zeros: 0 log 0 = 0
    probs[:, 0, 1] = 1.0 / C  # lowest possible confidence
    got, want = image_features(probs), _naive_features(probs.numpy())
    assert set(got) == set(FEATURE_COLUMNS)
    assert got["lf_n_pixels"] == want["lf_n_pixels"] == 17 * 13
    assert got["lf_conf_sum"] == pytest.approx(want["lf_conf_sum"], rel=1e-9)
    assert got["lf_entropy_sum"] == pytest.approx(want["lf_entropy_sum"], rel=1e-5)
    assert got["lf_conf_hist"].dtype == np.int64
    np.testing.assert_array_equal(got["lf_conf_hist"], want["lf_conf_hist"])
    assert math.isfinite(got["lf_entropy_sum"])


def test_image_features_sum_over_parts():
    """Features of an image equal the sums of its halves' (sets aggregate exactly)."""
    probs = torch.softmax(torch.randn(C, 8, 10, generator=torch.Generator().manual_seed(2)), 0)
    whole, a, b = (image_features(p) for p in (probs, probs[:, :, :4], probs[:, :, 4:]))
    assert whole["lf_n_pixels"] == a["lf_n_pixels"] + b["lf_n_pixels"]
    assert whole["lf_conf_sum"] == pytest.approx(a["lf_conf_sum"] + b["lf_conf_sum"])
    assert whole["lf_entropy_sum"] == pytest.approx(a["lf_entropy_sum"] + b["lf_entropy_sum"])
    np.testing.assert_array_equal(whole["lf_conf_hist"], a["lf_conf_hist"] + b["lf_conf_hist"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_image_features_cuda_matches_cpu():
    probs = torch.softmax(torch.randn(11, 64, 80, generator=torch.Generator().manual_seed(3)) * 5,
                          0)
    cpu, gpu = image_features(probs), image_features(probs.cuda())
    assert gpu["lf_n_pixels"] == cpu["lf_n_pixels"]
    assert gpu["lf_conf_sum"] == pytest.approx(cpu["lf_conf_sum"], rel=1e-9)
    assert gpu["lf_entropy_sum"] == pytest.approx(cpu["lf_entropy_sum"], rel=1e-5)
    np.testing.assert_array_equal(gpu["lf_conf_hist"], cpu["lf_conf_hist"])


@pytest.mark.parametrize(
    ("probs", "error", "match"),
    [
        pytest.param(np.ones((2, 3, 3)) / 2, TypeError, "torch.Tensor", id="numpy"),
        pytest.param(torch.ones(2, 3, 3, dtype=torch.long), TypeError, "floating", id="int"),
        pytest.param(torch.ones(2, 3), ValueError, r"\(C, H, W\)", id="2d"),
        pytest.param(torch.ones(2, 0, 3), ValueError, r"but got \(2, 0, 3\)", id="empty"),
    ],
)
def test_image_features_errors(probs, error, match):
    with pytest.raises(error, match=match):
        image_features(probs)


# ---------------------------------------------------------------------------------------------
# ATC, DoC and the estimated image-wise ECE


def test_atc_threshold_reproduces_reference_accuracy(reference):
    rows, acc, _ = reference
    ref = fit_reference(rows, acc)
    assert isinstance(ref, Reference)
    # On its own images ATC returns the reference accuracy (up to float rounding).
    assert estimate(rows, ref)["est_pixel_acc"] == pytest.approx(acc, abs=1e-9)
    assert 1.0 / C < ref.atc_threshold < 1.0
    conf = rows["lf_conf_sum"].sum() / rows["lf_n_pixels"].sum()
    assert ref.mean_conf == pytest.approx(conf)


def test_calibrated_same_distribution(reference):
    """Perfectly calibrated logits, a new draw: ATC and DoC within 0.01, estimated ECE small."""
    ref = fit_reference(reference[0], reference[1])
    rows, acc, true_ece = _set(40, seed=11)
    est = estimate(rows, ref)
    assert est["est_pixel_acc"] == pytest.approx(acc, abs=0.01)
    assert est["est_pixel_acc_doc"] == pytest.approx(acc, abs=0.01)
    # The true image-wise ECE of a calibrated model here is only bin noise (~0.02 at 48x48),
    # which the reference's floor (measured on its labelled images) restores.
    assert 0.01 < ref.ece_floor < 0.03
    assert est["est_img_ece"] == pytest.approx(true_ece, abs=0.01)
    # Without true per-image ECEs there is no floor, and the estimate is biased low.
    bare = fit_reference(reference[0].drop(columns="img_ece"), reference[1])
    assert bare.ece_floor == 0.0
    assert estimate(rows, bare)["est_img_ece"] < est["est_img_ece"]


def test_calibrated_harder_set_doc_exact(reference):
    """A harder but still calibrated set: DoC (exact under calibration) recovers it.

    ATC does not: with most confidences below its threshold it counts too few pixels as
    correct (the known failure of a threshold when the confidence distribution itself moves).
    """
    ref = fit_reference(reference[0], reference[1])
    rows, acc, _ = _set(40, seed=12, scales=(0.5, 1.5))
    assert acc < reference[1] - 0.1
    est = estimate(rows, ref)
    assert est["est_pixel_acc_doc"] == pytest.approx(acc, abs=0.01)
    assert est["est_pixel_acc"] < acc


@pytest.mark.parametrize("temperature", [0.5, 0.3])
def test_overconfident_model(temperature):
    """Logits sharpened by a known temperature (< 1): the model is over-confident.

    A pure change of temperature is invisible without labels (sharper logits on the same images
    look like easier images), so the labelled reference carries it too, as an uncalibrated
    model's held-out images do. On a new draw, the estimated accuracy falls below the mean
    confidence by the right amount and the estimated image-wise ECE follows the true one.
    """
    ref_rows, ref_acc, _ = _set(60, seed=20, temperature=temperature)
    ref = fit_reference(ref_rows, ref_acc)
    assert ref.mean_conf - ref_acc > 0.05  # the reference is over-confident
    rows, acc, true_ece = _set(40, seed=21, temperature=temperature)
    conf = rows["lf_conf_sum"].sum() / rows["lf_n_pixels"].sum()
    est = estimate(rows, ref)
    # 40 images of mixed difficulty against 60: the draws differ by ~0.01 in composition.
    assert est["est_pixel_acc"] == pytest.approx(acc, abs=0.025)
    assert est["est_pixel_acc_doc"] == pytest.approx(acc, abs=0.025)
    assert est["est_pixel_acc"] < conf - 0.1
    assert true_ece > 0.05
    assert est["est_img_ece"] == pytest.approx(true_ece, abs=0.03)


def _biased_set(n: int, *, seed: int, bias: float = 0.0):
    """An accurate model (logit scales 4..8) whose class-0 logit is raised by ``bias``.

    Labels follow the unbiased softmax, so the bias makes the model predict class 0, and
    confidently so, where it is wrong: confidence rises while accuracy falls. Returns the rows
    with :data:`PRED_HIST_COLUMN` and the true accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    rows, accs = [], []
    for _ in range(n):
        scale = 4.0 + 4.0 * float(torch.rand((), generator=g))
        logits = torch.randn(C, SIDE, SIDE, generator=g, dtype=torch.float64) * scale
        truth = torch.softmax(logits, 0).reshape(C, -1).T
        labels = torch.multinomial(truth, 1, generator=g)[:, 0]
        logits[0] += bias
        preds = logits.argmax(0)
        rows.append(image_features(torch.softmax(logits, 0).float(), preds=preds))
        accs.append(float((preds.reshape(-1) == labels).double().mean()))
    return pd.DataFrame(rows), float(np.mean(accs))


def test_image_features_pred_hist():
    g = torch.Generator().manual_seed(6)
    probs = torch.softmax(torch.randn(C, 6, 7, generator=g), 0)
    preds = probs.argmax(0)
    got = image_features(probs, preds=preds)
    np.testing.assert_array_equal(got[PRED_HIST_COLUMN],
                                  np.bincount(preds.reshape(-1).numpy(), minlength=C))
    assert got[PRED_HIST_COLUMN].dtype == np.int64
    assert PRED_HIST_COLUMN not in image_features(probs)
    with pytest.raises(TypeError, match="`preds` to be an integer torch.Tensor"):
        image_features(probs, preds=preds.float())
    with pytest.raises(ValueError, match=r"`preds` of shape \(6, 7\)"):
        image_features(probs, preds=preds[:5])
    with pytest.raises(ValueError, match=r"`preds` in \[0, 5\), but got values in \[5, 5\]"):
        image_features(probs, preds=torch.full((6, 7), C))


def test_class_share_cap_on_confidently_wrong_model():
    """Confidently wrong: ATC follows the confidence up, the class-share cap brings it down."""
    ref_rows, ref_acc = _biased_set(60, seed=30)
    with_counts = fit_reference(ref_rows, ref_acc)
    bare = fit_reference(ref_rows.drop(columns=PRED_HIST_COLUMN), ref_acc)
    assert with_counts.pred_share is not None
    assert sum(with_counts.pred_share) == pytest.approx(1.0)
    assert bare.pred_share is None
    # Without a shift the cap changes nothing.
    rows, acc = _biased_set(40, seed=31)
    assert estimate(rows, with_counts) == estimate(rows, bare)
    # With one (measured: accuracy 0.64, confidence 0.88, ATC 0.89, capped 0.55).
    rows, acc = _biased_set(40, seed=31, bias=6.0)
    atc = estimate(rows, bare)["est_pixel_acc"]
    capped = estimate(rows, with_counts)["est_pixel_acc"]
    assert atc - acc > 0.15
    assert abs(capped - acc) < 0.5 * abs(atc - acc)
    # The cap assumes every moved prediction was right before: for a model this far from
    # perfect it overstates the drop, so it errs low.
    assert capped < acc
    mismatched = rows.assign(**{PRED_HIST_COLUMN: [h[:-1] for h in rows[PRED_HIST_COLUMN]]})
    with pytest.raises(ValueError, match="with 5 classes as in the reference, but got 4"):
        estimate(mismatched, with_counts)


def test_estimate_errors(reference):
    rows = reference[0]
    ref = fit_reference(rows, reference[1])
    with pytest.raises(ValueError, match=r"`images` to have the columns .*'lf_conf_hist'"):
        estimate(rows.drop(columns="lf_conf_hist"), ref)
    with pytest.raises(ValueError, match="at least one image row, but got none"):
        estimate(rows.iloc[:0], ref)
    with pytest.raises(ValueError, match="at least one image row, but got none"):
        fit_reference(rows.iloc[:0], 0.5)
    with pytest.raises(ValueError, match=r"`pixel_acc` in \[0, 1\], but got 1.5"):
        fit_reference(rows, 1.5)
    with pytest.raises(TypeError, match="pandas DataFrame, but got dict"):
        estimate({"lf_n_pixels": [1]}, ref)
    bad = rows.copy()
    bad["lf_conf_hist"] = [h[:-1] for h in bad["lf_conf_hist"]]
    with pytest.raises(ValueError, match="bins"):
        estimate(bad, ref)
    bad = rows.copy()
    bad["lf_n_pixels"] = bad["lf_n_pixels"] + 1
    with pytest.raises(ValueError, match="to sum to its `lf_n_pixels`"):
        estimate(bad, ref)


# ---------------------------------------------------------------------------------------------
# Drift


def _drift_rows(n: int, rng: np.random.Generator, shift: float = 0.0) -> pd.DataFrame:
    """Per-image rows whose mean confidence and entropy are drawn from a known distribution."""
    pixels = 1000
    conf = np.clip(rng.normal(0.85 - shift, 0.05, n), 0.3, 1.0)
    entropy = np.clip(rng.normal(0.4 + 2 * shift, 0.1, n), 0.0, None)
    hist = np.zeros((n, len(CONF_EDGES) - 1), dtype=np.int64)
    hist[:, -1] = pixels  # the histogram is not used by the drift score
    return pd.DataFrame({"lf_n_pixels": pixels, "lf_conf_sum": conf * pixels,
                         "lf_entropy_sum": entropy * pixels, "lf_conf_hist": list(hist)})


def test_drift_false_alarm_rate_is_about_level():
    """Sets from the reference's own distribution raise the alarm about `level` of the time."""
    rng = np.random.default_rng(0)
    alarms = 0
    trials = 60
    for i in range(trials):
        ref, tgt = _drift_rows(80, rng), _drift_rows(30, rng)
        result = drift(ref, tgt, level=0.05, seed=i, n_boot=200)
        assert isinstance(result, Drift)
        alarms += result.alarm
    # Binomial(60, 0.05) has mean 3; 9 or more has probability < 0.3%.
    assert alarms <= 8


def test_drift_alarm_on_shift_and_deterministic():
    rng = np.random.default_rng(1)
    ref = _drift_rows(80, rng)
    for trial in range(5):
        tgt = _drift_rows(30, rng, shift=0.1)
        result = drift(ref, tgt, seed=trial, n_boot=200)
        assert result.alarm
        assert result.score > result.threshold
    assert drift(ref, tgt, seed=3, n_boot=200) == drift(ref, tgt, seed=3, n_boot=200)


def _video_rows(n: int, rng: np.random.Generator, rho: float) -> pd.DataFrame:
    """Frames of a video: per-image features follow an AR(1) series (lag-1 correlation rho)."""
    noise = rng.normal(size=(n, 2))
    x = np.zeros((n, 2))
    x[0] = noise[0]
    for t in range(1, n):
        x[t] = rho * x[t - 1] + math.sqrt(1 - rho**2) * noise[t]
    pixels = 1000
    return pd.DataFrame({"image_id": [f"f{t:05d}" for t in range(n)], "lf_n_pixels": pixels,
                         "lf_conf_sum": (0.9 + 0.02 * x[:, 0]) * pixels,
                         "lf_entropy_sum": (0.3 + 0.05 * x[:, 1]) * pixels})


def test_drift_correlated_frames_block_bootstrap():
    """Another stretch of the same video: i.i.d. draws alarm often, blocks about `level`.

    The rows are shuffled: the reference is put back in ``image_id`` (frame) order.
    """
    rng = np.random.default_rng(4)
    iid = blocks = 0
    trials = 30
    for i in range(trials):
        frames = _video_rows(300, rng, rho=0.8)
        reference = frames.iloc[:150].sample(frac=1.0, random_state=i)
        later = frames.iloc[200:240]
        iid += drift(reference, later, seed=i, n_boot=200, block=1).alarm
        blocks += drift(reference, later, seed=i, n_boot=200).alarm
    assert iid >= 0.4 * trials  # measured 0.65 over 40 trials
    assert blocks <= 0.25 * trials  # measured 0.10


def test_drift_errors():
    rng = np.random.default_rng(2)
    ref = _drift_rows(10, rng)
    with pytest.raises(ValueError, match=r"`images` to have the columns .*'lf_entropy_sum'"):
        drift(ref, ref.drop(columns="lf_entropy_sum"))
    with pytest.raises(ValueError, match="`reference` to have at least one image row"):
        drift(ref.iloc[:0], ref)
    with pytest.raises(ValueError, match=r"`level` to be a float in \(0, 1\), but got 1.5"):
        drift(ref, ref, level=1.5)
    with pytest.raises(ValueError, match="`block` to be a positive int or None, but got 0"):
        drift(ref, ref, block=0)


def test_label_free_columns():
    assert LABEL_FREE_COLUMNS[:5] == ("dataset", "domain", "reference", "role", "calibrator")
    assert {"drift_score", "drift_alarm", "est_pixel_acc", "est_img_ece", "true_pixel_acc",
            "true_img_ece"} <= set(LABEL_FREE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# benchmarks/label_free.py on a synthetic run folder


def _load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "label_free.py"
    spec = importlib.util.spec_from_file_location("benchmark_label_free", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic_run(tmp_path, *, adaptive: bool):
    rng = np.random.default_rng(5)
    per_image, label_free, summary = [], [], []
    sets = {"camvid-val-heldout": 0.0, "day": 0.0, "dusk": 0.0, "fog-1": 0.02, "fog-3": 0.3}
    reference = _drift_rows(40, rng).assign(dataset="camvid-val-heldout")
    for name, shift in sets.items():
        rows = reference if name == "camvid-val-heldout" else _drift_rows(40, rng, shift)
        per_image.append(rows.assign(dataset=name, calibrator="uncalibrated",
                                     image_id=[f"{name}{i}" for i in range(len(rows))]))
        if name == "camvid-val-heldout":
            continue
        result = drift(reference, rows, seed=0, n_boot=100)
        ts = 0.03 + shift / 2
        cals = {"uncalibrated": ts + 0.02, "temperature": ts, "oracle_ts": 0.02}
        if adaptive:
            cals["adaptive_ts_gated"] = ts if shift < 0.1 else 0.04
        for cal, ece in cals.items():
            summary.append({"dataset": name, "role": "test", "calibrator": cal, "img_ece": ece})
            if cal == "oracle_ts":
                continue
            label_free.append({
                "dataset": name, "domain": name, "reference": "day", "role": "test",
                "calibrator": cal, "n_images": len(rows), "drift_score": result.score,
                "drift_threshold": result.threshold, "drift_alarm": result.alarm,
                "est_pixel_acc": 0.8 - shift, "est_pixel_acc_doc": 0.82 - shift,
                "est_img_ece": ece + 0.01, "true_pixel_acc": 0.81 - shift, "true_img_ece": ece,
            })
    pd.concat(per_image).to_parquet(tmp_path / "per_image.parquet")
    pd.DataFrame(label_free, columns=LABEL_FREE_COLUMNS).to_csv(tmp_path / "label_free.csv",
                                                                index=False)
    pd.DataFrame(summary).to_csv(tmp_path / "summary.csv", index=False)
    return tmp_path


def test_benchmark_tables(tmp_path, capsys):
    bench = _load_benchmark()
    bench.main([str(_synthetic_run(tmp_path, adaptive=True)), "--splits", "5"])
    out = capsys.readouterr().out
    assert "PASS: ATC MAE 0.010 over 4 sets" in out
    assert "PASS: alarm on 1/1 severity >= 3 sets" in out
    assert "random 40-image subsets of 'day'" in out
    # fog-3: TS 0.18, gated 0.04, oracle 0.02 -> 0.875 of the gap closed.
    assert "PASS: adaptive_ts_gated beats TS on 1/1 severity >= 3 sets" in out
    assert "mean share of the TS-to-oracle gap closed on severity >= 3 sets 0.875" in out
    assert "PASS: adaptive_ts_gated - TS on day = +0.0000" in out


def test_benchmark_missing_parts_print_na(tmp_path, capsys):
    bench = _load_benchmark()
    run = _synthetic_run(tmp_path, adaptive=False)
    (run / "per_image.parquet").unlink()
    bench.main([str(run)])
    out = capsys.readouterr().out
    assert "n/a: " in out
    assert "per_image.parquet not found" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    bench.main([str(empty)])
    assert "label_free.csv not found" in capsys.readouterr().out
