"""`SpatialSelectiveScaling` (``selective_spatial``): selective scaling with a conv-net selector.

The selector sees each pixel's neighbourhood of the logit map (and the image), and with
``context`` the map-wide means of its inputs (image-level evidence of a shift). Temperatures,
gate, features, base and refinement are `SelectiveScaling`'s (see `SHARED_OPTIONS`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.calibrators.base import FitData
from pipeline.calibrators.checks import check_bool, check_int
from pipeline.calibrators.reduce import LOCAL, Reduce
from pipeline.calibrators.registry import register
from pipeline.calibrators.selective import SelectiveScaling
from pipeline.calibrators.selector import selector_features
from pipeline.calibrators.training import (
    batch_plan,
    map_batches,
    require_images,
    require_maps,
    spatial_input,
    train_with_early_stopping,
    with_valid_pixels,
)

__all__ = ["SpatialSelectiveScaling"]


class _GlobalContext(nn.Module):
    """Appends the map-wide mean of every input channel to each pixel: (N, D, H, W) -> 2D.

    A map mean does not depend on the resolution the map is scored at, unlike a conv's
    neighbourhood, so it carries image-level evidence of a shift (a dark, foggy or noisy image
    changes the mean confidence, entropy and image statistics) from the strided fit maps to
    full-resolution inference unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        """(N, D, H, W) -> (N, 2D, H, W): the input, then its per-map channel means."""
        return torch.cat([x, x.mean((2, 3), keepdim=True).expand_as(x)], 1)


def _conv_selector(
    dim: int, hidden: int, context: bool = False, local: bool = True
) -> nn.Sequential:
    """A 1x1 conv at the identity (the MLP's first layer), then two 3x3 convs (one dilated).

    With ``context`` the map-wide channel means are appended first (`_GlobalContext`); without
    ``local`` the two 3x3 convs become 1x1 (no neighbourhood, so nothing depends on the scale
    the map is scored at).
    """
    head: list[nn.Module] = [_GlobalContext()] if context else []
    dim = 2 * dim if context else dim
    first = nn.Conv2d(dim, dim, 1)
    with torch.no_grad():
        first.weight.copy_(torch.eye(dim)[:, :, None, None])
        first.bias.zero_()
    size, pad = (3, 1) if local else (1, 0)
    return nn.Sequential(
        *head, first, nn.BatchNorm2d(dim), nn.ReLU(),
        nn.Conv2d(dim, hidden, size, padding=pad), nn.BatchNorm2d(hidden), nn.ReLU(),
        nn.Conv2d(hidden, hidden, size, padding=2 * pad, dilation=2), nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, 2, 1),
    )


@register
class SpatialSelectiveScaling(SelectiveScaling):
    """Selective scaling whose selector is a small conv net over the logit map (and image).

    Same temperatures, gate, features and base as `SelectiveScaling`, but the selector sees
    each pixel's neighbourhood (a 9x9 receptive field), so disagreement with neighbours and
    region boundaries count. It trains on whole maps; instead of duplicating pixels,
    ``oversample`` weights the cross-entropy so that both groups weigh the same.

    Args:
        num_classes: The class count C.
        use_image: Feed the image beside the features (``images`` / ``image`` are then
            required). Defaults to True.
        hidden: Conv channels. Defaults to ``32``.
        context: Append the map-wide mean of every input channel to each pixel, so the
            selector sees image-level evidence of a shift (see `_GlobalContext`). Defaults to
            False.
        local: Use 3x3 convs (a 9x9 neighbourhood); False makes them 1x1, so that only the
            pixel and (with ``context``) the map means count. Defaults to True.
        batch_size: Maps per AdamW step. Defaults to ``8``.
        epochs: Most training epochs. Defaults to ``30``.
        **options: The family's shared options (`pipeline.calibrators.selective.SHARED_OPTIONS`:
            t_mis, t_cor, per_class_t_cor, t_min, gate, features, base, base_options, lr,
            weight_decay, patience, oversample, refine), as for `SelectiveScaling`.

    Raises:
        TypeError, ValueError: On bad options.

    References:
        Wang, Gong and Wang, CVPR 2023 (the selector); Ding et al., "Local Temperature Scaling
        for Probability Calibration", ICCV 2021 (conv nets over logits and image).
    """

    name = "selective_spatial"
    spatial = True
    _chunk = 8

    def __init__(
        self,
        num_classes: int,
        *,
        use_image: bool = True,
        hidden: int = 32,
        context: bool = False,
        local: bool = True,
        batch_size: int = 8,
        epochs: int = 30,
        **options: Any,
    ) -> None:
        check_bool("use_image", use_image)
        check_int("hidden", hidden, ge=1)
        check_bool("context", context)
        check_bool("local", local)
        check_int("batch_size", batch_size, ge=1)
        own = {"epochs": epochs, "batch_size": batch_size, "use_image": use_image,
               "hidden": hidden, "context": context, "local": local}
        self._setup(num_classes, own, options)
        self.use_image = use_image

    def _build_selector(self) -> nn.Sequential:
        image_channels = 3 if self.options["use_image"] else 0
        return _conv_selector(
            self._feature_dim() + image_channels, self.options["hidden"],
            self.options["context"], self.options["local"],
        )

    def _selector_logits(self, logits: Tensor, image: Tensor | None) -> Tensor:
        # Literal names: TorchScript cannot read the class attribute `name`.
        features = spatial_input(
            selector_features(require_maps(logits, "selective_spatial"), self.rich), image,
            self.use_image, "selective_spatial",
        )
        return self.selector(features)

    def _fit(self, data: FitData, heldout: FitData | None, reduce: Reduce = LOCAL) -> None:
        require_images(data, heldout, self.use_image)
        super()._fit(data, heldout, reduce)

    def _train_selector(
        self, data: FitData, heldout: FitData | None, generator: torch.Generator,
        reduce: Reduce = LOCAL,
    ) -> None:
        opts = self.options
        data = with_valid_pixels(data)
        with torch.no_grad():
            logits = self._base_logits(data.logits, data.images)
            targets = (logits.argmax(1) != data.labels).long()
            if data.ignore_index is not None:
                targets[data.labels == data.ignore_index] = -100
        weight = self._class_weight(targets, reduce)
        size, steps, share = batch_plan(len(targets), opts["batch_size"], reduce)
        batches = map_batches(len(targets), size, generator, targets.device)

        def batch_loss() -> Tensor:
            index = next(batches)
            image = None if data.images is None else data.images[index]
            scores = self._selector_logits(logits[index], image)
            return F.cross_entropy(scores, targets[index], weight=weight)

        train_with_early_stopping(
            self.selector, batch_loss, steps_per_epoch=steps, epochs=opts["epochs"],
            lr=opts["lr"], weight_decay=opts["weight_decay"],
            heldout_loss=self._heldout_loss(heldout, weight), patience=opts["patience"],
            weight=share, reduce=reduce,
        )
