"""Selective scaling: a selector flags likely-wrong pixels and only those get their logits softened.

The published method (Wang, Gong and Wang, CVPR 2023) trains a per-pixel MLP on the log-softmax
vector to tell mispredicted from correct pixels and divides the logits of the flagged pixels by
a large temperature T_mis, leaving the others at T_cor = 1. Because each pixel's logits are
divided by one positive number, the argmax (and so mIoU) never changes.

Beyond the paper, each an option of `SelectiveScaling` and measured against the published form
in ``tests/calibrators/test_selective.py``:

- ``t_mis="fit"`` / ``t_cor="fit"``: the group temperatures are fitted by NLL on held-out pixels
  (T_cor may fall below 1 and sharpen); ``per_class_t_cor`` fits one T_cor per predicted class;
- ``gate="soft"``: temperature = p_mis * T_mis + (1 - p_mis) * T_cor instead of a hard flag;
- ``base``: another calibrator (e.g. ``"temperature"``) applied before the selective step;
- ``features="rich"``: max probability, margin and entropy beside the log-probabilities;
- ``refine``: after the temperatures are fitted, the soft gate is fine-tuned on the calibrated
  NLL, so that when the fit data mixes domains it interpolates per domain instead of
  compromising between them;
- `SpatialSelectiveScaling` (``selective_spatial``): a small conv net over the logit map (and the
  image) as the selector, so that disagreement with neighbours and boundaries count; with
  ``context`` it also sees the map-wide means of its inputs (image-level evidence of a shift,
  e.g. a dark, foggy or noisy frame), and with ``local=False`` nothing but the pixel and those
  means, which makes it independent of the resolution it is scored at.

The recipe the demo recommends is the preset ``selective_plus`` (`pipeline.presets`: a soft
gate on rich features over temperature scaling, measured by ``benchmarks/selective_ablation.py``).
The shared options of the family live in one place, `SHARED_OPTIONS`; the selector's features
and MLP and the group temperature fit are in `pipeline.calibrators.selector`.

The published form is ``build_calibrator("selective", C, t_mis=1e10)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

try:  # Python 3.11+
    from typing import Self
except ImportError:  # pragma: no cover - Python 3.10
    from typing_extensions import Self

from pipeline.calibrators.base import Calibrator, FitData, from_points, to_points
from pipeline.calibrators.checks import (
    check_bool,
    check_choice,
    check_float,
    check_images,
    check_int,
    check_logits,
)
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import build_calibrator, describe, register
from pipeline.calibrators.selector import (
    N_RICH,
    fit_group_temperatures,
    mlp_selector,
    selector_features,
)
from pipeline.calibrators.training import (
    batch_plan,
    chunked_mean,
    map_batches,
    pixel_batches,
    train_with_early_stopping,
    with_valid_pixels,
)
from pipeline.calibrators.wording import number, spread

__all__ = ["SHARED_OPTIONS", "SelectiveScaling"]

SHARED_OPTIONS: dict[str, Any] = {
    "t_mis": "fit",
    "t_cor": 1.0,
    "per_class_t_cor": False,
    "t_min": 0.05,
    "gate": "hard",
    "features": "logprobs",
    "base": None,
    "base_options": None,
    "lr": 1e-3,
    "weight_decay": 1e-6,
    "patience": 3,
    "oversample": True,
    "refine": False,
}
"""The options every selective calibrator takes, with their defaults: the one definition of
the family's temperatures, gate, features, base, optimiser and refinement (documented on
`SelectiveScaling`). Each class adds its own (``epochs``, ``batch_size``, the selector's shape).
"""


# --------------------------------------------------------------------------------------------
# The calibrator.


@register
class SelectiveScaling(Calibrator):
    """Selective scaling: logits of pixels a selector flags as wrong are divided by T_mis.

    Each pixel's logits (after the optional ``base`` calibrator) are divided by
    T = g * T_mis + (1 - g) * T_cor[k], where k is the predicted class and g the gate: 1 where
    the selector's "wrong" output beats its "correct" output (``gate="hard"``), or the
    selector's P(mispredicted) (``gate="soft"``). The selector is trained with AdamW on
    cross-entropy against correct/incorrect targets (ignored pixels excluded), the minority
    group duplicated each epoch (``oversample``); with ``heldout`` data it is picked by the
    held-out (class-balanced) selector loss, and the temperatures marked ``"fit"`` are fitted
    on held-out pixels. The argmax of the selective step's input never changes.

    Args (``epochs`` and ``batch_size`` are this class's own; the rest are the family's
    `SHARED_OPTIONS`, passed as keywords):
        num_classes: The class count C.
        t_mis: T_mis, or ``"fit"`` to fit it by held-out NLL. The paper uses a large fixed
            value (1e10: flagged pixels become uniform). Defaults to ``"fit"``.
        t_cor: T_cor, or ``"fit"``. Defaults to ``1.0`` (the paper).
        per_class_t_cor: One T_cor per predicted class (needs ``t_cor="fit"``).
        t_min: Floor of the fitted temperatures (see `fit_group_temperatures`). Defaults to
            ``0.05``.
        gate: ``"hard"`` (the paper) or ``"soft"``.
        features: ``"logprobs"`` (the paper) or ``"rich"`` (plus max prob, margin, entropy).
        base: Registry name of a calibrator applied first (e.g. ``"temperature"``), or None.
        base_options: Options for ``base``.
        epochs: Most selector training epochs. Defaults to ``10``.
        batch_size: Pixels per AdamW step. Defaults to ``4096``.
        lr: AdamW learning rate. Defaults to ``1e-3`` (the paper).
        weight_decay: AdamW weight decay. Defaults to ``1e-6`` (the paper).
        patience: Epochs without held-out improvement before stopping. Defaults to ``3``.
        oversample: Balance the two groups by duplicating the minority. Defaults to True.
        refine: After the temperatures are fitted, fine-tune the selector on the NLL of the
            calibrated logits (temperatures fixed; held-out early stopping, so it is kept only
            if the held-out NLL falls), then refit the temperatures. The gate then becomes the
            interpolation weight that calibrates best, which matters when the fit data mixes
            domains (e.g. corrupted copies) that a fixed T_cor/T_mis pair must compromise
            between. Needs ``gate="soft"``. Defaults to False.

    Raises:
        TypeError, ValueError: On bad options, e.g. ``per_class_t_cor`` with a fixed T_cor,
            or an unknown or spatial ``base``.

    References:
        Wang, Gong and Wang, "On Calibrating Semantic Segmentation Models: Analyses and An
        Algorithm", CVPR 2023 (arXiv 2212.12053).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(4000, 3, generator=g) * 4
        >>> y = torch.multinomial((z / 2).softmax(1), 1, generator=g).squeeze(1)
        >>> sel = SelectiveScaling(3, t_mis=1e10, epochs=2).fit(z, y)
        >>> bool((sel(z).argmax(1) == z.argmax(1)).all())
        True
    """

    name = "selective"
    distributed = True
    # Rows per chunk when scoring held-out data.
    _chunk = 65536

    shared_options = SHARED_OPTIONS

    def __init__(
        self, num_classes: int, *, epochs: int = 10, batch_size: int = 4096, **options: Any
    ) -> None:
        check_int("batch_size", batch_size, ge=2)
        self._setup(num_classes, {"epochs": epochs, "batch_size": batch_size}, options)

    def _setup(self, num_classes: int, own: dict[str, Any], shared: dict[str, Any]) -> None:
        """Check the shared options, store all options, build the base and the selector.

        ``own`` holds the class's own (already checked) options, ``shared`` the
        `SHARED_OPTIONS` given, which are checked here.
        """
        unknown = sorted(set(shared) - set(SHARED_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for calibrator {self.name!r}: expected some of "
                f"{sorted({*SHARED_OPTIONS, *own})}"
            )
        opts = {**SHARED_OPTIONS, **shared}
        t_mis, t_cor, per_class_t_cor, gate, features, base, base_options, refine = (
            opts[k] for k in ("t_mis", "t_cor", "per_class_t_cor", "gate", "features", "base",
                              "base_options", "refine")
        )
        for name, value in (("t_mis", t_mis), ("t_cor", t_cor)):
            if value != "fit":
                check_float(name, value, gt=0)
        check_bool("per_class_t_cor", per_class_t_cor)
        if per_class_t_cor and t_cor != "fit":
            raise ValueError(
                f"Expected `t_cor` to be 'fit' when `per_class_t_cor` is set, but got {t_cor!r}"
            )
        check_float("t_min", opts["t_min"], gt=0, lt=1)
        check_choice("gate", gate, ["hard", "soft"])
        check_choice("features", features, ["logprobs", "rich"])
        if base_options is not None and not isinstance(base_options, dict):
            raise TypeError(f"Expected `base_options` to be a dict, but got {base_options!r}")
        if base is None and base_options:
            raise ValueError(
                f"Expected `base` to name a calibrator when `base_options` are given, but got "
                f"None with {base_options!r}"
            )
        check_int("epochs", own["epochs"], ge=1)
        check_float("lr", opts["lr"], gt=0)
        check_float("weight_decay", opts["weight_decay"], ge=0)
        check_int("patience", opts["patience"], ge=1)
        check_bool("oversample", opts["oversample"])
        check_bool("refine", refine)
        if refine and gate != "soft":
            raise ValueError(
                f"Expected `gate` to be 'soft' when `refine` is set (a hard gate has no "
                f"gradient), but got {gate!r}"
            )
        Calibrator.__init__(self, num_classes, **opts, **own)
        self.soft = gate == "soft"
        self.rich = features == "rich"
        self.per_class_t_cor = per_class_t_cor
        self.base = None if base is None else self._build_base(base, base_options or {})
        if self.base is not None and not self.base.distributed:
            self.distributed = False  # the base's fit runs inside ours
        self.selector = self._build_selector()
        # Buffers, not parameters: they are fitted by `fit_temperatures`, never by `loss`.
        self.register_buffer("t_cor", torch.full((num_classes,), 1.0 if t_cor == "fit" else t_cor))
        self.register_buffer("t_mis", torch.tensor(1.0 if t_mis == "fit" else float(t_mis)))

    def _build_base(self, name: str, options: dict[str, Any]) -> Calibrator:
        base = build_calibrator(name, self.num_classes, **options)
        if type(base).spatial and not self.spatial:
            raise ValueError(
                f"Expected `base` to be a pointwise calibrator for {self.name!r} (use "
                f"'selective_spatial' for spatial ones), but got {name!r}"
            )
        return base

    def _feature_dim(self) -> int:
        return self.num_classes + (N_RICH if self.rich else 0)

    def _build_selector(self) -> nn.Sequential:
        return mlp_selector(self._feature_dim())

    # -- inference ---------------------------------------------------------------------------

    def _base_logits(self, logits: Tensor, image: Tensor | None) -> Tensor:
        if self.base is not None:
            return self.base._calibrate(logits, image)
        return logits

    def _selector_logits(self, logits: Tensor, image: Tensor | None) -> Tensor:
        """(P, C) or (N, C, H, W) base-calibrated logits -> (P, 2) or (N, 2, H, W) scores."""
        features = selector_features(logits, self.rich)
        if features.dim() == 4:
            return from_points(self.selector(to_points(features)), features)
        return self.selector(features)

    def _gate(self, scores: Tensor) -> Tensor:
        """(P, 2) or (N, 2, H, W) selector scores -> (P,) or (N, H, W) weight of T_mis."""
        if self.soft:
            return scores.softmax(1)[:, 1]
        return (scores[:, 1] > scores[:, 0]).to(scores.dtype)

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        return self._calibrate_and_score(logits, image)[0]

    def _calibrate_and_score(self, logits: Tensor, image: Tensor | None) -> tuple[Tensor, Tensor]:
        """Calibrated logits and the selector's P(mispredicted), from one selector pass.

        Works along dim 1 in either layout ((P, C) or (N, C, H, W)): no copy to points.
        """
        logits = self._base_logits(logits, image)
        scores = self._selector_logits(logits, image)
        p_mis = scores.softmax(1)[:, 1]
        gate = p_mis if self.soft else self._gate(scores)
        top = logits.amax(1, keepdim=True)
        # One shared T_cor skips the argmax, the slowest op here on CPU.
        t_cor = self.t_cor[logits.argmax(1)] if self.per_class_t_cor else self.t_cor[0]
        temperature = gate * self.t_mis + (1 - gate) * t_cor
        # Subtracting the max first makes the top logit exactly 0 and every other one
        # negative, so even a huge T_mis cannot round a runner-up into a tie with the winner.
        return (logits - top) / temperature.unsqueeze(1), p_mis

    def mis_score(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """The selector's P(mispredicted) per pixel.

        Args:
            logits: (N, C, H, W) or (P, C) float logits.
            image: Optional (N, 3, H, W) float image in [0, 1].

        Returns:
            (N, H, W) or (P,) float32 probabilities.

        Raises:
            RuntimeError: When called before ``fit``.
            TypeError, ValueError: On malformed inputs.
        """
        self._check_call(logits, image, "mis_score")
        with torch.no_grad():
            logits = self._base_logits(logits.float(), image)
            return self._selector_logits(logits, image).softmax(1)[:, 1]

    def calibrate_with_score(
        self, logits: Tensor, image: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Calibrated logits and P(mispredicted) per pixel, running the selector once.

        Same inputs, checks and results as ``(self(logits, image), self.mis_score(logits,
        image))``.
        """
        self._check_call(logits, image, "calibrate_with_score")
        return self._calibrate_and_score(logits.float(), image)

    def _check_call(self, logits: Tensor, image: Tensor | None, method: str) -> None:
        if not bool(self.fitted):
            raise RuntimeError(
                f"Expected a fitted calibrator, but `{method}` was called before `fit`"
            )
        check_logits(logits, self.num_classes)
        if image is not None:
            check_images(image, logits, "image")

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        logits: Tensor,
        labels: Tensor,
        image: Tensor | None = None,
        *,
        ignore_index: int | None = None,
    ) -> Tensor:
        """The selector's objective: cross-entropy against mispredicted (1) / correct (0).

        Mispredicted means the base-calibrated argmax differs from the label; the base must
        already be fitted. The temperatures are not trained by this loss: call
        `fit_temperatures` after training the selector.

        Args:
            logits: (N, C, H, W) or (P, C) float logits.
            labels: (N, H, W) or (P,) integer labels.
            image: Optional (N, 3, H, W) float image in [0, 1].
            ignore_index: Label value to skip, or None.

        Returns:
            A scalar tensor.
        """
        return self._selector_loss(logits.float(), labels.long(), image, ignore_index, None)

    def _selector_loss(
        self,
        logits: Tensor,
        labels: Tensor,
        image: Tensor | None,
        ignore_index: int | None,
        weight: Tensor | None,
    ) -> Tensor:
        if ignore_index is not None and logits.dim() == 2:
            # Ignored pixels must not enter the BatchNorm statistics either.
            valid = labels != ignore_index
            logits, labels = logits[valid], labels[valid]
        with torch.no_grad():
            logits = self._base_logits(logits, image)
        targets = (logits.argmax(1) != labels).long()
        if ignore_index is not None:
            targets[labels == ignore_index] = -100
        return F.cross_entropy(self._selector_logits(logits, image), targets, weight=weight)

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        # Each worker shuffles its own shard: the same seed, offset by rank (0 in-process).
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())) + reduce.rank)
        if self.base is not None:
            self.base.fit(
                data.logits, data.labels, ignore_index=data.ignore_index, images=data.images,
                heldout=heldout, seed=int(torch.randint(2**62, ())), reduce=reduce,
            )
        # A fresh selector under the fit's seed: the fit must not depend on the global RNG
        # state when the module was built.
        self.selector = self._build_selector().to(self.t_cor.device)
        self._train_selector(data, heldout, generator, reduce)
        if heldout is None and "fit" in (self.options["t_cor"], self.options["t_mis"]):
            warnings.warn(
                "No held-out data: fitting selective scaling's temperatures on the selector's "
                "own training pixels, where it is over-confident; pass `heldout`",
                stacklevel=3,
            )
        # Held-out data is whole on every worker; fit data is a shard and needs the hook.
        refit = (lambda: self.fit_temperatures(data, reduce)) if heldout is None else (
            lambda: self.fit_temperatures(heldout)
        )
        refit()
        if self.options["refine"]:
            self._refine(data, heldout, generator, reduce)
            refit()

    def _nll(
        self, logits: Tensor, labels: Tensor, image: Tensor | None, ignore_index: int | None
    ) -> Tensor:
        """Mean NLL of the calibrated logits over pixels not labelled ``ignore_index``."""
        return F.cross_entropy(
            self._calibrate(logits, image), labels,
            ignore_index=-100 if ignore_index is None else ignore_index,
        )

    def _refine(
        self, data: FitData, heldout: FitData | None, generator: torch.Generator,
        reduce: Reduce = LOCAL,
    ) -> None:
        """Fine-tune the selector on the calibrated NLL, temperatures fixed (see ``refine``)."""
        opts = self.options
        data = with_valid_pixels(data) if self.spatial else data
        if self.spatial:
            size, steps, weight = batch_plan(len(data.labels), opts["batch_size"], reduce)
            batches = map_batches(len(data.labels), size, generator, data.labels.device)
        else:
            batches, steps, weight = pixel_batches(
                data.labels, opts["batch_size"], False, generator, reduce
            )

        def batch_loss() -> Tensor:
            index = next(batches)
            image = None if data.images is None else data.images[index]
            return self._nll(data.logits[index], data.labels[index], image, data.ignore_index)

        heldout_loss = None if heldout is None else lambda: chunked_mean(
            heldout, self._chunk, lambda z, y, im: self._nll(z, y, im, heldout.ignore_index)
        )
        train_with_early_stopping(
            self.selector, batch_loss, steps_per_epoch=steps, epochs=opts["epochs"],
            lr=opts["lr"], weight_decay=opts["weight_decay"], heldout_loss=heldout_loss,
            patience=opts["patience"], weight=weight, reduce=reduce,
        )

    def _train_selector(
        self, data: FitData, heldout: FitData | None, generator: torch.Generator,
        reduce: Reduce = LOCAL,
    ) -> None:
        opts = self.options
        with torch.no_grad():
            logits = self._base_logits(data.logits, None)
            features = selector_features(logits, self.rich)
            targets = (logits.argmax(1) != data.labels).long()
        weight = self._class_weight(targets, reduce)
        batches, steps, share = pixel_batches(
            targets, opts["batch_size"], opts["oversample"], generator, reduce
        )

        def batch_loss() -> Tensor:
            index = next(batches)
            return F.cross_entropy(self.selector(features[index]), targets[index])

        train_with_early_stopping(
            self.selector, batch_loss, steps_per_epoch=steps, epochs=opts["epochs"],
            lr=opts["lr"], weight_decay=opts["weight_decay"],
            heldout_loss=self._heldout_loss(heldout, weight), patience=opts["patience"],
            weight=share, reduce=reduce,
        )

    def _heldout_loss(
        self, heldout: FitData | None, weight: Tensor | None
    ) -> Callable[[], float] | None:
        """The held-out selector loss (class-weighted like training), chunked; None if no data."""
        if heldout is None:
            return None
        return lambda: chunked_mean(
            heldout, self._chunk,
            lambda z, y, im: self._selector_loss(z, y, im, heldout.ignore_index, weight),
        )

    def _class_weight(self, targets: Tensor, reduce: Reduce = LOCAL) -> Tensor | None:
        """Weights that balance the groups in a loss (None without ``oversample``).

        Counts are global (summed over workers' shards).

        Raises:
            ValueError: When all valid pixels are correct or all are wrong.
        """
        valid = targets[targets >= 0]
        n_wrong, n_valid = (int(v) for v in reduce.sum_floats(float(valid.sum()), len(valid)))
        if n_wrong == 0 or n_wrong == n_valid:
            kind = "correctly" if n_wrong == 0 else "wrongly"
            raise ValueError(
                "Expected both correctly and wrongly predicted pixels to train the selector, "
                f"but all {n_valid} valid pixels are predicted {kind}"
            )
        if not self.options["oversample"]:
            return None
        counts = torch.tensor([n_valid - n_wrong, n_wrong], dtype=torch.float32)
        return (counts.sum() / (2 * counts)).to(targets.device)

    def fit_temperatures(self, data: FitData, reduce: Reduce = LOCAL) -> Self:
        """Fit the temperatures marked ``"fit"`` by NLL on ``data`` with the trained selector.

        ``fit`` calls it on the held-out data (on the fit data when there is none). Nothing
        changes when both temperatures are fixed.

        Args:
            data: Pointwise: (P, C) float32 logits and (P,) int64 labels of valid pixels;
                spatial: whole maps, images and ``ignore_index`` (see `FitData`).
            reduce: The reduce hook, when ``data`` is this worker's shard.

        Returns:
            ``self``, in eval mode.
        """
        self.eval()
        fit_cor, fit_mis = self.options["t_cor"] == "fit", self.options["t_mis"] == "fit"
        if not (fit_cor or fit_mis):
            return self
        points, gates, labels = [], [], []
        with torch.no_grad():
            for start in range(0, len(data.labels), self._chunk):
                part = slice(start, start + self._chunk)
                image = None if data.images is None else data.images[part]
                logits = self._base_logits(data.logits[part], image)
                gate = self._gate(to_points(self._selector_logits(logits, image)))
                label = data.labels[part].reshape(-1)
                keep = slice(None) if data.ignore_index is None else label != data.ignore_index
                points.append(to_points(logits)[keep])
                gates.append(gate[keep])
                labels.append(label[keep])
        t_cor, t_mis = fit_group_temperatures(
            torch.cat(points), torch.cat(labels), torch.cat(gates),
            t_cor=None if fit_cor else float(self.t_cor[0]),
            t_mis=None if fit_mis else float(self.t_mis),
            per_class_t_cor=self.options["per_class_t_cor"], t_min=self.options["t_min"],
            reduce=reduce,
        )
        self.t_cor.copy_(t_cor)
        self.t_mis.fill_(t_mis)
        return self

    # -- description -------------------------------------------------------------------------

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """The gate, the features, T_mis and T_cor, and the base calibrator's own words."""
        if "t_mis" not in summary:
            return None
        t_cor = summary.get("t_cor")
        t_cor_text = f"{spread(t_cor)} (per class)" if isinstance(t_cor, list) else number(t_cor)
        t_mis = summary["t_mis"]
        parts = [f"a selector flags likely-wrong pixels ({options.get('gate', '?')} gate, "
                 f"features {options.get('features', '?')}); flagged pixels get "
                 f"T_mis = {number(t_mis)}"
                 + (" (the uniform distribution)" if float(t_mis) >= 1e6 else "")
                 + f", the others T_cor = {t_cor_text}"]
        if isinstance(summary.get("base"), dict) and options.get("base"):
            base = describe(options["base"], summary["base"], num_classes=num_classes)
            parts.append(f"on top of {options['base']} ({base})")
        return "; ".join(parts)

    def summary(self) -> dict[str, Any]:
        """T_cor (a list when per class) and T_mis, plus the base calibrator's summary."""
        t_cor = self.t_cor.tolist() if self.options["per_class_t_cor"] else float(self.t_cor[0])
        out: dict[str, Any] = {"t_cor": t_cor, "t_mis": float(self.t_mis)}
        if self.base is not None:
            out["base"] = self.base.summary()
        return out
