"""Adaptive temperature scaling: one temperature per image, predicted from label-free features.

``adaptive_ts`` divides each image's logits by ``T(x) = T0 * exp(f(z(x)))``, where ``z(x)``
are label-free features of that image's own logits at T = 1 (mean top-label confidence, mean
normalised entropy, mean log top-2 logit margin, spread of the confidence over pixels, mean
top logit, mean log-sum-exp), standardised by their mean and standard deviation over the clean
calibration images, ``T0`` is the temperature-scaling solution on those clean images, and
``f`` is a small MLP (``hidden`` tanh units; ``hidden: 0`` makes it linear) whose output
starts at 0. ``f`` is fitted by the NLL of every fit image, so trained on the clean
calibration set *and* its corrupted copies (``use_corrupted: true`` in the config) the
temperature follows the shift an unlabelled image shows in its own logits.

The features and the MLP were picked on calibration data only (CamVid val and its corrupted
copies at severities 2 and 4, fit half vs held-out half): with the four confidence features
and a linear ``f`` the clean held-out images got a far too high temperature (image-wise ECE
0.146 vs TS 0.019) and the mild copies lost to TS; the two raw-logit features and the MLP
brought the clean and mild held-out sets back to TS and the mean over the eleven held-out
sets from 0.114 to 0.078 (TS 0.206).

``adaptive_ts_gated`` keeps ``T0`` (plain TS) for images whose features lie inside the clean
calibration images' range (a per-feature quantile band, fixed on the clean images) and adapts
only outside it: ``log T(x) = log T0 + g(x) f(z(x))``, with the gate ``g`` 0 inside the
band and, outside, ``1 - exp(-d / width)`` (``gate: soft``, smooth) or 1 (``gate: hard``),
where ``d`` is the largest distance of a feature outside the band in standard deviations.
``f`` is fitted with the gate in place, so it is learnt on the images it will act on.

Clean reference: the fit stage (`pipeline.fit`) calls `reference_options` on the clean
calibration fit data and passes the result as the ``reference`` option, so that ``T0``, the
standardisation and the band come from the clean images even when the fit data holds
corrupted copies. Without it (a plain ``fit`` call) every fit image counts as clean.

A temperature is positive, so the argmax never changes. The fit reduces its sums, counts,
loss and gradients through the reduce hook (``distributed``), and subsamples each image's
valid pixels on a fixed grid (no randomness), so a sharded fit agrees with the in-process one
up to float summation order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_choice, check_float, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.temperature import fit_temperature
from pipeline.calibrators.training import optimise, require_maps
from pipeline.calibrators.wording import number

__all__ = [
    "FEATURES",
    "AdaptiveTemperatureScaling",
    "GatedAdaptiveTemperatureScaling",
    "image_features",
]

FEATURES = ("mean_confidence", "mean_entropy", "mean_log_margin", "std_confidence",
            "mean_max_logit", "mean_logsumexp")
_GATES = ("none", "soft", "hard")
# log-temperature bounds: T in [0.05, 150] whatever the features say.
_LOG_T_MIN, _LOG_T_MAX = math.log(0.05), math.log(150.0)
# The smallest standard deviation a feature is divided by (features of identical images).
_MIN_STD = 1e-4
_REFERENCE_KEYS = ("temperature", "mean", "std", "lo", "hi")


def image_features(logits: Tensor) -> Tensor:
    """Label-free features of each image's logits at T = 1, over all its pixels.

    Args:
        logits: (N, C, H, W) float logits.

    Returns:
        (N, 6) float32: mean top-label confidence, mean entropy / log C, mean
        ``log(1 + top1 - top2)`` logit margin, standard deviation of the confidence over
        pixels, mean top logit, mean log-sum-exp of the logits (the columns of `FEATURES`).

    Example:
        >>> [round(v, 4) for v in image_features(torch.zeros(2, 3, 4, 4))[0].tolist()]
        [0.3333, 1.0, 0.0, 0.0, 0.0, 1.0986]
    """
    c = logits.shape[1]
    lse = logits.float().logsumexp(1)
    log_p = logits.float() - lse[:, None]
    p = log_p.exp()
    confidence = p.amax(1)
    entropy = -(p * log_p).sum(1) / math.log(float(c))
    top2 = logits.float().topk(2, dim=1).values
    margin = torch.log1p(top2[:, 0] - top2[:, 1])
    mean_conf = confidence.mean((1, 2))
    spread = (confidence - mean_conf[:, None, None]).square().mean((1, 2)).sqrt()
    return torch.stack([mean_conf, entropy.mean((1, 2)), margin.mean((1, 2)), spread,
                        top2[:, 0].mean((1, 2)), lse.mean((1, 2))], 1)


def _check_reference(reference: Any) -> None:
    if reference is None:
        return
    if not isinstance(reference, dict) or set(reference) != set(_REFERENCE_KEYS):
        raise ValueError(
            f"Expected `reference` to be None or a dict with keys {list(_REFERENCE_KEYS)}, but "
            f"got {reference!r}"
        )
    check_float("reference.temperature", reference["temperature"], gt=0)
    for key in _REFERENCE_KEYS[1:]:
        value = reference[key]
        if not isinstance(value, (list, tuple)) or len(value) != len(FEATURES):
            raise ValueError(
                f"Expected `reference.{key}` to be a list of {len(FEATURES)} floats, but got "
                f"{value!r}"
            )
        for v in value:
            check_float(f"reference.{key}", v)
    if any(s <= 0 for s in reference["std"]):
        raise ValueError(f"Expected `reference.std` > 0, but got {reference['std']}")


def _features_chunked(logits: Tensor, chunk: int = 16) -> Tensor:
    """`image_features` of many maps, ``chunk`` at a time (bounds the softmax temporaries)."""
    return torch.cat([image_features(logits[i : i + chunk]) for i in range(0, len(logits), chunk)])


def _grid_pixels(
    data: FitData, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``n`` valid pixels per map on an even grid over its valid pixels (no randomness).

    Returns:
        (P, C) logits, (P,) labels and (P,) the map index of each pixel.
    """
    c = data.logits.shape[1]
    points, labels, owner = [], [], []
    for i in range(len(data.labels)):
        flat = data.labels[i].reshape(-1)
        valid = torch.arange(flat.numel(), device=flat.device)
        if data.ignore_index is not None:
            valid = valid[flat != data.ignore_index]
        if len(valid) > n:
            valid = valid[torch.linspace(0, len(valid) - 1, n, device=flat.device).round().long()]
        points.append(data.logits[i].reshape(c, -1)[:, valid].t())
        labels.append(flat[valid])
        owner.append(torch.full((len(valid),), i, dtype=torch.long, device=flat.device))
    return torch.cat(points), torch.cat(labels), torch.cat(owner)


@register
class AdaptiveTemperatureScaling(Calibrator):
    """Per-image temperature ``T0 * exp(f(z(x)))`` from label-free logit features.

    See the module docstring for the model, the gate and the clean reference.

    Args:
        num_classes: The class count C.
        gate: ``"none"`` (adapt every image), ``"soft"`` or ``"hard"`` (keep ``T0`` inside
            the clean band). Defaults to ``"none"``.
        band: Quantile of the band: each feature's ``[q, 1 - q]`` quantiles over the clean
            images. Defaults to ``0.02``.
        width: Soft gate: the distance outside the band, in standard deviations, at which
            the gate reaches ``1 - 1/e``. Defaults to ``0.5``.
        pixels_per_image: Valid pixels per fit map in the NLL (an even grid). Defaults to
            ``4096``.
        hidden: Tanh units of the MLP ``f``; 0 makes ``f`` linear. Defaults to ``16``.
        weight_decay: L2 penalty on the weights of ``f``. Defaults to ``1e-3``.
        max_iter: L-BFGS iterations. Defaults to ``100``.
        reference: The clean reference (``temperature``, feature ``mean`` / ``std``, band
            ``lo`` / ``hi`` in standard units), as `reference_options` computes it; None
            takes it from the fit data. Defaults to None.

    Raises:
        TypeError, ValueError: On bad options.

    References:
        Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (the base
        temperature); Ding et al., "Local Temperature Scaling for Probability Calibration",
        ICCV 2021 (image-wise temperatures).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(6, 3, 8, 8, generator=g) * torch.arange(1.0, 7.0).view(6, 1, 1, 1)
        >>> y = torch.randn(6, 3, 8, 8, generator=g).argmax(1)
        >>> ats = AdaptiveTemperatureScaling(3).fit(z, y)
        >>> bool((ats(z).argmax(1) == z.argmax(1)).all()), ats.temperature(z).shape
        (True, torch.Size([6]))
    """

    name = "adaptive_ts"
    adapts_to_target = True
    spatial = True
    distributed = True

    def __init__(
        self,
        num_classes: int,
        *,
        gate: str = "none",
        band: float = 0.02,
        width: float = 0.5,
        pixels_per_image: int = 4096,
        hidden: int = 16,
        weight_decay: float = 1e-3,
        max_iter: int = 100,
        reference: dict[str, Any] | None = None,
    ) -> None:
        check_choice("gate", gate, _GATES)
        check_float("band", band, ge=0, lt=0.5)
        check_float("width", width, gt=0)
        check_int("pixels_per_image", pixels_per_image, ge=1)
        check_int("hidden", hidden, ge=0)
        check_float("weight_decay", weight_decay, ge=0)
        check_int("max_iter", max_iter, ge=1)
        _check_reference(reference)
        super().__init__(
            num_classes, gate=gate, band=band, width=width, pixels_per_image=pixels_per_image,
            hidden=hidden, weight_decay=weight_decay, max_iter=max_iter, reference=reference,
        )
        d = len(FEATURES)
        # TorchScript reads instance attributes, not class ones or the options dict.
        self.kind = self.name
        self.gate_mode = _GATES.index(gate)
        self.width = float(width)
        self.log_t_min, self.log_t_max = _LOG_T_MIN, _LOG_T_MAX
        self.net = self._build_net()
        self.register_buffer("log_t0", torch.zeros(()))
        self.register_buffer("feature_mean", torch.zeros(d))
        self.register_buffer("feature_std", torch.ones(d))
        self.register_buffer("band_lo", torch.full((d,), -math.inf))
        self.register_buffer("band_hi", torch.full((d,), math.inf))

    def _build_net(self) -> nn.Sequential:
        """``f``: features -> log-temperature offset, output layer zero (f = 0 at the start)."""
        d, hidden = len(FEATURES), self.options["hidden"]
        layers: list[nn.Module] = [nn.Linear(d, hidden), nn.Tanh()] if hidden else []
        layers.append(nn.Linear(hidden or d, 1))
        with torch.no_grad():
            layers[-1].weight.zero_()
            layers[-1].bias.zero_()
        return nn.Sequential(*layers)

    # -- inference ---------------------------------------------------------------------------

    def _gate(self, z: Tensor) -> Tensor:
        if self.gate_mode == 0:
            return torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
        outside = (F.relu(z - self.band_hi) + F.relu(self.band_lo - z)).amax(1)
        if self.gate_mode == 2:
            return (outside > 0).to(z.dtype)
        return 1.0 - torch.exp(-outside / self.width)

    def _log_temperature(self, features: Tensor) -> Tensor:
        z = (features - self.feature_mean) / self.feature_std
        adapt = self.net(z)[:, 0]
        return (self.log_t0 + self._gate(z) * adapt).clamp(self.log_t_min, self.log_t_max)

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        logits = require_maps(logits, self.kind)
        t = self._log_temperature(image_features(logits)).exp()
        return logits / t.view(-1, 1, 1, 1)

    def temperature(self, logits: Tensor) -> Tensor:
        """The (N,) per-image temperatures of (N, C, H, W) logits."""
        with torch.no_grad():
            return self._log_temperature(image_features(require_maps(logits.float(),
                                                                      self.kind))).exp()

    def gate(self, logits: Tensor) -> Tensor:
        """The (N,) gate of each image: 0 keeps ``T0``, 1 adapts fully (1 for ``gate: none``)."""
        with torch.no_grad():
            features = image_features(require_maps(logits.float(), self.kind))
            return self._gate((features - self.feature_mean) / self.feature_std)

    # -- reference ---------------------------------------------------------------------------

    def _reference(self, data: FitData, reduce: Reduce = LOCAL) -> dict[str, Any]:
        """``T0``, feature mean / std and the quantile band of (this shard of) clean maps."""
        # Every image counts, labelled pixels or not: the features need no labels.
        features = reduce.gather(_features_chunked(data.logits))  # every worker: all images
        mean = features.mean(0)
        std = features.std(0, unbiased=False).clamp_min(_MIN_STD) if len(features) > 1 \
            else torch.ones_like(mean)
        z = (features - mean) / std
        q = float(self.options["band"])
        lo = torch.quantile(z, q, dim=0) if q > 0 else z.amin(0)
        hi = torch.quantile(z, 1 - q, dim=0) if q > 0 else z.amax(0)
        points, labels, _ = _grid_pixels(data, self.options["pixels_per_image"])
        t0 = fit_temperature(points, labels, reduce=reduce)
        return {"temperature": float(t0), "mean": mean.tolist(), "std": std.tolist(),
                "lo": lo.tolist(), "hi": hi.tolist()}

    def reference_options(self, clean: FitData) -> dict[str, Any]:
        """The ``reference`` option from the clean calibration fit data (maps).

        The fit stage calls it on the clean calibration images before building and fitting
        the calibrator on clean + corrupted ones.

        Args:
            clean: (N, C, H, W) logits and (N, H, W) labels of the clean fit images.

        Returns:
            ``{"reference": {...}}``, json-able.
        """
        if clean.logits.dim() != 4:
            raise ValueError(
                "Expected clean reference maps of shape (N, C, H, W), but got "
                f"{tuple(clean.logits.shape)}"
            )
        data = FitData(clean.logits.float(), clean.labels.long(), None, clean.ignore_index)
        return {"reference": self._reference(data)}

    # -- training ----------------------------------------------------------------------------

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        opts = self.options
        reference = opts["reference"] or self._reference(data, reduce)
        device = self.log_t0.device
        with torch.no_grad():
            self.log_t0.fill_(math.log(reference["temperature"]))
            for name, key in (("feature_mean", "mean"), ("feature_std", "std"),
                              ("band_lo", "lo"), ("band_hi", "hi")):
                getattr(self, name).copy_(torch.tensor(reference[key], device=device))
        # Maps without a valid pixel add no pixel to the loss (and are not copied out).
        # A fresh f under the fit's seed: every worker starts from the same weights.
        self.net = self._build_net().to(device)
        features = _features_chunked(data.logits)
        points, labels, owner = _grid_pixels(data, opts["pixels_per_image"])
        (n_total,) = reduce.sum_floats(float(len(labels)))
        # The penalty counts once: on rank 0 (the gradients are summed over workers).
        decay = opts["weight_decay"] if reduce.rank == 0 else 0.0

        def loss() -> Tensor:
            t = self._log_temperature(features).exp()
            nll = F.cross_entropy(points / t[owner, None], labels, reduction="sum") / n_total
            penalty = sum(m.weight.square().sum() for m in self.net if isinstance(m, nn.Linear))
            return nll + decay * penalty

        optimise(loss, list(self.net.parameters()), max_iter=opts["max_iter"], reduce=reduce)

    # -- description -------------------------------------------------------------------------

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """TS's temperature times a per-image factor from the listed label-free features."""
        if "temperature" not in summary:
            return None
        features = ", ".join(map(str, summary.get("features") or []))
        return (f"a temperature per image, T = {number(summary['temperature'])} (temperature "
                f"scaling's) times a factor a small net predicts from the image's label-free "
                f"features ({features})")

    def summary(self) -> dict[str, Any]:
        """``T0``, the features, the size of ``f`` and the gate."""
        return {
            "temperature": float(self.log_t0.exp()),
            "features": list(FEATURES),
            "hidden": self.options["hidden"],
            "gate": self.options["gate"],
        }


@register
class GatedAdaptiveTemperatureScaling(AdaptiveTemperatureScaling):
    """`AdaptiveTemperatureScaling` with the gate on: plain TS inside the clean band.

    Args:
        num_classes: The class count C.
        gate: ``"soft"`` or ``"hard"``. Defaults to ``"soft"``.
        band, width, pixels_per_image, hidden, weight_decay, max_iter, reference: As for
            `AdaptiveTemperatureScaling`.
    """

    name = "adaptive_ts_gated"

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The adaptive temperature's words, and where the gate keeps TS."""
        words = super().describe(summary, options, num_classes)
        if words is None:
            return None
        return (f"{words}; kept at T inside the clean calibration images' feature band, adapted "
                f"outside it ({summary.get('gate', '?')} gate)")

    def __init__(
        self,
        num_classes: int,
        *,
        gate: str = "soft",
        band: float = 0.02,
        width: float = 0.5,
        pixels_per_image: int = 4096,
        hidden: int = 16,
        weight_decay: float = 1e-3,
        max_iter: int = 100,
        reference: dict[str, Any] | None = None,
    ) -> None:
        check_choice("gate", gate, _GATES[1:])
        super().__init__(
            num_classes, gate=gate, band=band, width=width, pixels_per_image=pixels_per_image,
            hidden=hidden, weight_decay=weight_decay, max_iter=max_iter, reference=reference,
        )
