"""LTS/IBTS start from a TS temperature anywhere up to ``t_max`` (1000), past expm1's range."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.calibrators.lts import (
    ImageBasedTemperatureScaling,
    LocalTemperatureScaling,
    _TemperatureNet,
)
from pipeline.calibrators.temperature import fit_temperature

C, S = 4, 8


@pytest.mark.parametrize("t_init", [0.1, 1.0, 30.0, 709.0, 711.0, 800.0, 1000.0])
def test_temperature_net_starts_exactly_at_t_init(t_init):
    # math.expm1(x) overflows above x ~ 709.78; the stable inverse softplus must not.
    net = _TemperatureNet(in_channels=3, hidden=2, per_image=False, t_init=t_init, t_min=0.05)
    with torch.no_grad():
        out = net(torch.randn(1, 3, S, S))
    torch.testing.assert_close(out, torch.full_like(out, t_init), rtol=1e-6, atol=1e-6)
    assert math.isfinite(float(net.head.bias.detach()))


@pytest.mark.parametrize("cls", [LocalTemperatureScaling, ImageBasedTemperatureScaling])
def test_fit_with_a_ts_start_beyond_710(cls):
    # Logits over-confident by a temperature of ~800: the TS start exceeds expm1's range.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, C, S, S, generator=g) * 800.0
    labels = torch.randint(0, C, (2, S, S), generator=g)
    points = logits.movedim(1, -1).reshape(-1, C)
    assert fit_temperature(points, labels.reshape(-1)) > 710
    cal = cls(C, use_image=False, epochs=1).fit(logits, labels)
    assert float(cal.t_init) > 710
    out = cal(logits)
    assert out.shape == logits.shape
    assert bool(torch.isfinite(out).all())
