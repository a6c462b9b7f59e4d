"""The numba kernel's evaluation path (given predictions, no value checks) against its full path.

With ``preds`` and ``validate_args=False`` the kernel's dense loop skips the per-pixel sum,
argmax and minimum; every statistic must stay bit for bit what the full path gives, but for
classwise bin 0's sums: they are class totals minus the other bins, and LLVM vectorises the two
paths' class-total loops with different partial sums (float64 reassociation), so they agree to
rounding (1e-12).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.metrics import ImageStats, image_stats


@pytest.mark.parametrize("c", [2, 5, 31, 32, 33, 64, 70, 150])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 1e10])
def test_evaluation_path_is_bitwise_the_full_path(c, temperature):
    g = torch.Generator().manual_seed(c)
    logits = torch.randn(c, 37, 41, generator=g) * 4
    probs = torch.softmax(logits / temperature, 0)
    labels = torch.randint(0, c, (37, 41), generator=g)
    labels[torch.rand(37, 41, generator=g) < 0.1] = 255
    preds = logits.argmax(0)
    score = torch.rand(37, 41, generator=g)
    kw = {"ignore_index": 255, "preds": preds, "mis_score": score}
    full = image_stats(probs, labels, validate_args=True, **kw)
    fast = image_stats(probs, labels, validate_args=False, **kw)
    for field in dataclasses.fields(ImageStats):
        a, b = np.asarray(getattr(full, field.name)), np.asarray(getattr(fast, field.name))
        if field.name == "cls_conf_sum":
            np.testing.assert_array_equal(a[:, 1:], b[:, 1:])
            np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-12, atol=1e-15 * 37 * 41)
        else:
            assert np.array_equal(a, b), field.name
