"""Local and image-based temperature scaling: a small conv net predicts the temperature.

LTS predicts one positive temperature per pixel from the logit map (and the image), IBTS one
per image (the same net, globally pooled). Both start at the global temperature-scaling
solution (or at T = 1), train on the NLL of whole maps with Adam, and keep the state with the
lowest held-out NLL, so with held-out data they are never worse there than the global TS they
start from. Dividing by a positive temperature never changes the argmax.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.base import Calibrator, FitData
from pipeline.calibrators.checks import check_bool, check_float, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.temperature import fit_temperature
from pipeline.calibrators.training import (
    batch_plan,
    chunked_mean,
    map_batches,
    require_images,
    require_maps,
    spatial_input,
    train_with_early_stopping,
    with_valid_pixels,
)
from pipeline.calibrators.wording import number

__all__ = ["ImageBasedTemperatureScaling", "LocalTemperatureScaling"]


class _TemperatureNet(nn.Module):
    """Conv trunk (3x3, then 3x3 dilated 2) and a 1x1 head -> softplus + t_min temperatures.

    The head starts with zero weights and the bias that gives ``t_init``, so the net's first
    output is exactly ``t_init`` everywhere.
    """

    def __init__(
        self, in_channels: int, hidden: int, per_image: bool, t_init: float, t_min: float
    ) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.ReLU(),
        )
        self.head = nn.Conv2d(hidden, 1, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            # Inverse softplus, softplus(log(expm1(x))) = x, written as x + log(1 - exp(-x)):
            # math.expm1 overflows for x > ~709 (a TS start up to t_max = 1000 is allowed).
            x = t_init - t_min
            self.head.bias.fill_(x + math.log(-math.expm1(-x)))
        self.per_image = per_image
        self.t_min = t_min

    def forward(self, x: Tensor) -> Tensor:
        """(N, D, H, W) inputs -> (N, 1, H, W) or (N, 1, 1, 1) temperatures > t_min."""
        hidden = self.trunk(x)
        if self.per_image:
            hidden = hidden.mean((2, 3), keepdim=True)
        return F.softplus(self.head(hidden)) + self.t_min


@register
class LocalTemperatureScaling(Calibrator):
    """Local temperature scaling (LTS): ``logits / T(x, y)`` with T from a conv net.

    The net sees the log-softmax map (and the image) and predicts a positive temperature per
    pixel (receptive field 7x7). Trained with Adam on the NLL of valid pixels of whole maps,
    ``batch_size`` maps per step, from the global TS temperature (``ts_init``); with
    ``heldout`` data the state with the lowest held-out NLL is kept (early stopping).

    Args:
        num_classes: The class count C.
        use_image: Feed the image beside the log-probabilities (``images`` / ``image`` are
            then required). Defaults to True.
        hidden: Conv channels. Defaults to ``16``.
        ts_init: Start at the global TS temperature fitted on the training pixels, else at 1.
            Defaults to True.
        t_min: Smallest temperature the net can output. Defaults to ``0.05``.
        epochs: Most training epochs. Defaults to ``30``.
        batch_size: Maps per Adam step. Defaults to ``4``.
        lr: Adam learning rate. Defaults to ``1e-3``.
        patience: Epochs without held-out improvement before stopping. Defaults to ``5``.

    Raises:
        TypeError, ValueError: On bad options.

    References:
        Ding, Liu, Xiong and Shi, "Local Temperature Scaling for Probability Calibration",
        ICCV 2021.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(4, 3, 8, 8, generator=g) * 4
        >>> y = z.argmax(1)
        >>> lts = LocalTemperatureScaling(3, use_image=False, epochs=2).fit(z, y)
        >>> lts(z).shape, bool((lts(z).argmax(1) == y).all())
        (torch.Size([4, 3, 8, 8]), True)
    """

    name = "lts"
    temperature_per: ClassVar[str] = "pixel"  # what the net predicts a temperature for
    spatial = True
    distributed = True
    _per_image = False

    def __init__(
        self,
        num_classes: int,
        *,
        use_image: bool = True,
        hidden: int = 16,
        ts_init: bool = True,
        t_min: float = 0.05,
        epochs: int = 30,
        batch_size: int = 4,
        lr: float = 1e-3,
        patience: int = 5,
    ) -> None:
        check_bool("use_image", use_image)
        check_int("hidden", hidden, ge=1)
        check_bool("ts_init", ts_init)
        check_float("t_min", t_min, gt=0, lt=1)
        check_int("epochs", epochs, ge=1)
        check_int("batch_size", batch_size, ge=1)
        check_float("lr", lr, gt=0)
        check_int("patience", patience, ge=1)
        super().__init__(
            num_classes, use_image=use_image, hidden=hidden, ts_init=ts_init, t_min=t_min,
            epochs=epochs, batch_size=batch_size, lr=lr, patience=patience,
        )
        self.use_image = use_image
        # The registry name as an instance attribute: TorchScript cannot read the class one.
        self.kind = self.name
        self.net = self._build_net(1.0)
        # The global temperature the net starts from (for the card).
        self.register_buffer("t_init", torch.ones(()))

    def _build_net(self, t_init: float) -> _TemperatureNet:
        opts = self.options
        in_channels = self.num_classes + (3 if opts["use_image"] else 0)
        return _TemperatureNet(in_channels, opts["hidden"], self._per_image, t_init, opts["t_min"])

    def _temperature(self, logits: Tensor, image: Tensor | None) -> Tensor:
        logits = require_maps(logits, self.kind)
        return self.net(spatial_input(logits.log_softmax(1), image, self.use_image, self.kind))

    def temperature(self, logits: Tensor, image: Tensor | None = None) -> Tensor:
        """The predicted temperatures.

        Args:
            logits: (N, C, H, W) float logits.
            image: (N, 3, H, W) float image in [0, 1] (required with ``use_image``).

        Returns:
            (N, H, W) per-pixel (LTS) or (N,) per-image (IBTS) float32 temperatures.

        Raises:
            ValueError: On (P, C) logits or a missing image.
        """
        with torch.no_grad():
            t = self._temperature(logits.float(), image)
        return t[:, 0, 0, 0] if self._per_image else t[:, 0]

    def _calibrate(self, logits: Tensor, image: Tensor | None) -> Tensor:
        return logits / self._temperature(logits, image)

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        opts = self.options
        require_images(data, heldout, self.use_image)
        data = with_valid_pixels(data)
        t_init = 1.0
        if opts["ts_init"]:
            labels = data.labels.reshape(-1)
            valid = slice(None) if data.ignore_index is None else labels != data.ignore_index
            points = data.logits.movedim(1, -1).reshape(-1, self.num_classes)
            # The net's output always exceeds t_min, so it cannot start at or below it.
            t_init = max(
                fit_temperature(points[valid], labels[valid], reduce=reduce), 2 * opts["t_min"]
            )
        self.t_init.fill_(t_init)
        # A fresh net under the fit's seed (see `SelectiveScaling._fit`).
        self.net = self._build_net(t_init).to(self.t_init.device)
        size, steps, weight = batch_plan(len(data.labels), opts["batch_size"], reduce)
        # Each worker shuffles its own shard: the same seed, offset by rank (0 in-process).
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())) + reduce.rank)
        batches = map_batches(len(data.labels), size, generator, data.labels.device)

        def batch_loss() -> Tensor:
            index = next(batches)
            image = None if data.images is None else data.images[index]
            return self.loss(
                data.logits[index], data.labels[index], image, ignore_index=data.ignore_index
            )

        heldout_loss = None if heldout is None else lambda: chunked_mean(
            heldout, size, lambda z, y, im: self.loss(z, y, im, ignore_index=heldout.ignore_index)
        )

        # Adam: AdamW without weight decay.
        train_with_early_stopping(
            self.net, batch_loss, steps_per_epoch=steps, epochs=opts["epochs"], lr=opts["lr"],
            weight_decay=0.0, heldout_loss=heldout_loss, patience=opts["patience"],
            weight=weight, reduce=reduce,
        )

    @classmethod
    def describe(cls, summary: Mapping[str, Any], options: Mapping[str, Any],
                 num_classes: int | None) -> str | None:
        """What the net predicts (a temperature per pixel or per image) and where it started."""
        return (f"a small conv net predicts a temperature per {cls.temperature_per}, starting "
                f"from T = {number(summary.get('init_temperature'))}")

    def summary(self) -> dict[str, Any]:
        """The global temperature the net started from."""
        return {"init_temperature": float(self.t_init)}


@register
class ImageBasedTemperatureScaling(LocalTemperatureScaling):
    """Image-based temperature scaling (IBTS): one temperature per image from a conv net.

    As `LocalTemperatureScaling`, but the conv features are averaged over the map before the
    head, so each image gets a single temperature.

    Args:
        num_classes: The class count C.
        use_image, hidden, ts_init, t_min, epochs, batch_size, lr, patience: As for
            `LocalTemperatureScaling`.

    References:
        Ding, Liu, Xiong and Shi, "Local Temperature Scaling for Probability Calibration",
        ICCV 2021.
    """

    name = "ibts"
    temperature_per: ClassVar[str] = "image"
    _per_image = True
