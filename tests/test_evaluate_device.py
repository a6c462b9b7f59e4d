"""Evaluation on a GPU: the torch statistics path against the CPU (numba) path.

On the CPU the two paths see the very same probabilities, so their rows must agree as the
statistics do (tests/metrics/test_torch_stats.py): int64 fields identical, float64 fields to
``rtol=1e-9`` (``atol = 1e-15 * pixels``). On CUDA, upsampling, the calibrators and softmax are
float32 kernels that round differently from the CPU's, so a pixel within an ulp of a bin edge
may change bins: there the summary metrics must agree to ``1e-4`` (relative, about 1000 float32
ulps) and the pixel counts exactly.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.calibrators import build_calibrator
from pipeline.evaluate import image_rows
from pipeline.metrics import ImageStats
from pipeline.shards import ImageRecord

C, H, W, STRIDE = 5, 24, 32, 2
META = {"dataset": "d", "domain": "day", "reference": None, "role": "test"}


@pytest.fixture(scope="module")
def calibrators():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, C, 12, 16, generator=g) * 3
    labels = torch.where(torch.rand(3, 12, 16, generator=g) < 0.7, logits.argmax(1),
                         torch.randint(0, C, (3, 12, 16), generator=g))
    points = logits.permute(0, 2, 3, 1).reshape(-1, C), labels.reshape(-1)
    images = torch.rand(3, 3, 12, 16, generator=g)
    return {
        "uncalibrated": None,
        "temperature": build_calibrator("temperature", C).fit(*points),
        "selective": build_calibrator("selective", C, t_mis=1e10, t_cor=1.0, gate="hard",
                                      features="logprobs", epochs=1).fit(*points),
        "lts": build_calibrator("lts", C, epochs=1).fit(logits, labels, images=images),
    }


def record(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, (H, W)).astype(np.uint8)
    labels[rng.random((H, W)) < 0.1] = 255
    return ImageRecord(
        dataset="d", domain="day", role="test", image_id=f"img{seed}", uri="x.png", height=H,
        width=W, model_fingerprint="f", labels=labels,
        logits=(rng.standard_normal((C, H // STRIDE, W // STRIDE)) * 4).astype(np.float16),
        image=rng.integers(0, 256, (H // STRIDE, W // STRIDE, 3), dtype=np.uint8),
    )


def rows(calibrators, seed, **kw):
    return image_rows(record(seed), calibrators, meta=META, n_bins=15, boundary_width=2,
                      ignore_index=255, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_torch_statistics_path_equals_numba_path_on_cpu(calibrators, seed):
    want = rows(calibrators, seed, stats_backend="numba")
    got = rows(calibrators, seed, stats_backend="torch")
    assert [r["calibrator"] for r in got] == list(calibrators)
    for g, w in zip(got, want, strict=True):
        for key, value in w.items():
            exact = isinstance(value, str | int) or value is None
            if exact or (isinstance(value, list) and isinstance(value[0], int)):
                assert g[key] == value, key
            else:
                # The CPU path's entropy comes from the logits in one fused pass
                # (pipeline.metrics.confidence), the torch path's from p log p in float32.
                rtol = 1e-6 if key == "lf_entropy_sum" else 1e-9
                np.testing.assert_allclose(g[key], value, rtol=rtol, atol=1e-15 * H * W,
                                           err_msg=key)


def test_numba_backend_refuses_another_device(calibrators):
    with pytest.raises(ValueError, match=r"the CPU for `stats_backend`='numba'"):
        rows(calibrators, 0, device="meta", stats_backend="numba")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_match_cpu_rows(calibrators):
    # Module.to moves in place: copies, so the CPU reference keeps its calibrators on the CPU.
    on_gpu = {k: None if v is None else copy.deepcopy(v).to("cuda")
              for k, v in calibrators.items()}
    for seed in range(3):
        want = rows(calibrators, seed)
        got = rows(on_gpu, seed, device="cuda")
        for g, w in zip(got, want, strict=True):
            sg, sw = ImageStats.from_row(g), ImageStats.from_row(w)
            assert sg.n_pixels == sw.n_pixels
            for name, value in sw.summary().items():
                if np.isnan(value):
                    assert np.isnan(sg.summary()[name]), name
                else:
                    assert sg.summary()[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
            # The label-free features: same pixels, sums to float32 rounding; a pixel within an
            # ulp of a confidence edge may change bins, so at most 1% of them move.
            assert g["lf_n_pixels"] == w["lf_n_pixels"] == H * W
            for name in ("lf_conf_sum", "lf_entropy_sum"):
                assert g[name] == pytest.approx(w[name], rel=1e-4), name
            moved = np.abs(np.subtract(g["lf_conf_hist"], w["lf_conf_hist"])).sum() / 2
            assert moved <= 0.01 * H * W


def test_rows_table_equals_the_table_of_row_dicts(calibrators):
    """The column-wise table the actors build is the table of :func:`image_rows`' dicts."""
    import pyarrow as pa

    from pipeline.evaluate import ROW_SCHEMA, image_stats_per_calibrator, rows_table

    keys, stats, features, dicts = [], [], [], []
    for seed in range(2):
        rec = record(seed)
        triples = image_stats_per_calibrator(rec, calibrators, n_bins=15, boundary_width=2,
                                             ignore_index=255)
        for label, s, f in triples:
            keys.append({**META, "image_id": rec.image_id, "calibrator": label})
            stats.append(s)
            features.append(f)
        dicts += rows(calibrators, seed)
    got = rows_table(keys, stats, features)
    assert got.equals(pa.Table.from_pylist(dicts, schema=ROW_SCHEMA))
    assert rows_table([], [], []).equals(ROW_SCHEMA.empty_table())


def test_labels_of_another_size_are_refused(calibrators):
    import dataclasses

    bad = dataclasses.replace(record(0), labels=np.zeros((H, W + 1), np.uint8))
    with pytest.raises(ValueError, match=r"labels of image 'img0' of shape \(24, 32\)"):
        image_rows(bad, calibrators, meta=META, n_bins=15, boundary_width=2, ignore_index=255)
