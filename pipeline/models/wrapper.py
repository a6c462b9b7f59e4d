"""The model as the pipeline sees it: uint8 RGB images in, checked float32 logits out.

:class:`SegmentationModel` wraps any network from :mod:`pipeline.models.adapters` with the
config's input recipe, output selection, class-count and finiteness checks and optional
multi-scale / flip test-time augmentation. :func:`model_fingerprint` names the logits a config
produces, so shards from different models or recipes never mix.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.models.adapters import OUTPUT_STRIDE, build_network, python_source, weights_path
from pipeline.models.download import sha256_file

# Every config field that changes the logits; the rest (class names, sha256) do not.
_LOGIT_FIELDS = (
    "kind", "arch", "num_classes", "input_size", "channel_order", "scale", "mean", "std",
    "scales", "flip", "output_index",
)
# Keys tried, in order, when the network returns a mapping and `output_index` is not set:
# torchvision returns {"out", "aux"}, transformers a ModelOutput with "logits".
_OUTPUT_KEYS = ("out", "logits")


def _folder_digest(folder: Path) -> str:
    # Hidden entries (e.g. a `.cache` left by huggingface_hub) do not change the model.
    files = sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    listing = "".join(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _weights_digest(cfg: ModelConfig) -> str:
    if cfg.kind == "python":
        # Only the factory's source file is hashed; weights it loads from elsewhere are not.
        source = python_source(cfg.path)
        return f"{cfg.path}\0{sha256_file(source) if source else ''}"
    path = weights_path(cfg)
    return sha256_file(path) if path.is_file() else _folder_digest(path)


def model_fingerprint(cfg: ModelConfig) -> str:
    """A sha256 hex digest naming the logits that ``cfg`` produces.

    It covers the weights (file bytes; every file of a model folder; the source file of a
    ``python`` factory) and the config fields that change logits (kind, arch, num_classes,
    input_size, channel_order, scale, mean, std, scales, flip, output_index, and drop_channels
    unless it drops only the last channels). File hashes are cached per (path, size, mtime), so
    repeated calls are cheap.

    Args:
        cfg: the model config.

    Returns:
        64 lowercase hex characters.

    Raises:
        FileNotFoundError: the weights path does not exist.
        ValueError: a sha256 mismatch or a malformed python factory path.
    """
    fields = {name: getattr(cfg, name) for name in _LOGIT_FIELDS}
    # Dropping the last channels keeps the first num_classes, as without drop_channels: the same
    # logits, so the same fingerprint (and a config that adds `drop_channels: [11]` keeps its
    # shards); any other drop names other logits.
    drop = sorted(cfg.drop_channels or ())
    if drop != list(range(cfg.num_classes, cfg.num_classes + len(drop))):
        fields["drop_channels"] = drop
    blob = json.dumps({"weights": _weights_digest(cfg), **fields}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


class SegmentationModel(nn.Module):
    """A segmentation network with its input recipe: uint8 RGB batches to checked logits.

    ``forward`` resizes the images to ``input_size`` (bilinear, align_corners=False, no
    antialiasing; None keeps their size), reorders channels (``channel_order``, with ``mean`` and
    ``std`` given in that order), computes ``(x * scale - mean) / std``, runs the network, picks
    the logits from a dict/tuple output, drops the ``drop_channels`` (e.g. a void channel; the
    output must then have exactly ``num_classes + len(drop_channels)`` channels) or else keeps
    the first ``num_classes`` channels, and checks that they are finite. With several ``scales``
    and/or ``flip`` the logits of every scale and its mirror image are resized bilinearly to the
    scale-1 output size and averaged.

    Args:
        net: the bare network (from :func:`pipeline.models.adapters.build_network`).
        cfg: the model config holding the recipe.
        fingerprint: :func:`model_fingerprint` of ``cfg``.
        output_stride_hint: input size / output size when the model kind fixes it, else None.

    Raises:
        ValueError: ``scales`` has a non-positive entry or lacks 1.0.

    Example:
        >>> cfg = ModelConfig(kind="python", path="torch.nn:Identity", num_classes=3, scale=1.0,
        ...                   mean=(1.0, 2.0, 3.0), channel_order="bgr")
        >>> model = SegmentationModel(nn.Identity(), cfg, fingerprint="")
        >>> model(torch.full((1, 2, 2, 3), 10, dtype=torch.uint8))[0, :, 0, 0]
        tensor([9., 8., 7.])
    """

    def __init__(
        self, net: nn.Module, cfg: ModelConfig, *, fingerprint: str,
        output_stride_hint: int | None = None,
    ) -> None:
        super().__init__()
        if any(s <= 0 for s in cfg.scales) or 1.0 not in cfg.scales:
            raise ValueError(
                f"Expected `model.scales` to be positive and to contain 1.0 (the scale whose "
                f"output size the logits are averaged at), but got {cfg.scales}"
            )
        self.net = net
        self.name = cfg.path
        self.num_classes = cfg.num_classes
        self.input_size = tuple(cfg.input_size) if cfg.input_size is not None else None
        self.bgr = cfg.channel_order == "bgr"
        self.scale = cfg.scale
        # Scale 1 first: its output size is the one every other scale is resized to.
        self.scales = sorted(cfg.scales, key=lambda s: s != 1.0)
        self.flip = cfg.flip
        self.output_index = cfg.output_index
        self.drop_channels = tuple(cfg.drop_channels or ())
        self.fingerprint = fingerprint
        self.output_stride_hint = output_stride_hint
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @property
    def device(self) -> torch.device:
        """The device the network runs on (move it with ``.to(device)``)."""
        return self.mean.device

    def preprocess(self, images: Tensor) -> Tensor:
        """Apply the input recipe.

        Args:
            images: (N, H, W, 3) uint8 RGB.

        Returns:
            (N, 3, h, w) float32 network input on :attr:`device`, channels-last in memory;
            (h, w) is ``input_size`` or (H, W).

        Raises:
            TypeError: ``images`` is not a uint8 tensor.
            ValueError: ``images`` is not shaped (N, H, W, 3).
        """
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            got = images.dtype if isinstance(images, Tensor) else type(images).__name__
            raise TypeError(f"Expected `images` to be a uint8 tensor, but got {got}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"Expected `images` of shape (N, H, W, 3), but got {tuple(images.shape)}"
            )
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.bgr:
            x = x.flip(1)
        # In place: the same operations in the same order as (x * scale - mean) / std, so the
        # same values, without three full-size temporaries.
        x = x.mul_(self.scale).sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last)

    def _select(self, out: Any) -> Tensor:
        if isinstance(out, Tensor):
            return out
        if isinstance(out, Mapping):
            keys = [self.output_index] if self.output_index is not None else _OUTPUT_KEYS
            for key in keys:
                if key in out:
                    return out[key]
            raise ValueError(
                f"Expected the output of model `{self.name}` to hold one of the keys {list(keys)} "
                f"(set `model.output_index`), but got keys {list(out)}"
            )
        if isinstance(out, Sequence):
            index = 0 if self.output_index is None else self.output_index
            if not isinstance(index, int) or not -len(out) <= index < len(out):
                raise ValueError(
                    f"Expected `model.output_index` to index the {len(out)} outputs of model "
                    f"`{self.name}`, but got {index!r}"
                )
            return out[index]
        raise TypeError(
            f"Expected model `{self.name}` to return a tensor, dict or tuple, "
            f"but got {type(out).__name__}"
        )

    def _logits(self, x: Tensor) -> Tensor:
        out = self._select(self.net(x))
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"Expected the logits of model `{self.name}` to be shaped "
                f"({x.shape[0]}, C, h, w), but got {got}"
            )
        if self.drop_channels:
            expected = self.num_classes + len(self.drop_channels)
            if out.shape[1] != expected:
                raise ValueError(
                    f"Expected model `{self.name}` to output num_classes + len(drop_channels) = "
                    f"{expected} channels, but got {out.shape[1]}"
                )
            keep = [c for c in range(expected) if c not in self.drop_channels]
            return out[:, keep].float()
        if out.shape[1] < self.num_classes:
            raise ValueError(
                f"Expected model `{self.name}` to output at least num_classes="
                f"{self.num_classes} channels, but got {out.shape[1]}"
            )
        return out[:, : self.num_classes].float()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Segment a batch of images.

        Args:
            images: (N, H, W, 3) uint8 RGB, on any device.

        Returns:
            (N, num_classes, h, w) float32 logits at the network's output resolution for the
            scale-1 input, on :attr:`device`.

        Raises:
            TypeError: ``images`` is not a uint8 tensor, or the network returns something
                other than a tensor, dict or tuple.
            ValueError: bad image shape; an output with fewer than ``num_classes`` channels,
                not (N, C, h, w), or containing NaN/inf (the message names the model path).
        """
        x = self.preprocess(images)
        h, w = x.shape[-2:]
        total: Tensor | None = None
        for s in self.scales:
            xs = x if s == 1.0 else F.interpolate(
                x, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False
            )
            y = self._logits(xs)
            if self.flip:
                y = y + self._logits(xs.flip(-1)).flip(-1)
            if total is None:
                total = y
            else:
                size = total.shape[-2:]
                total += F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        logits = total / (len(self.scales) * (2 if self.flip else 1))
        # One reduction: a finite sum means finite values (barring overflow of the sum itself,
        # which the exact count below then settles).
        bad = 0 if bool(torch.isfinite(logits.sum())) else int((~torch.isfinite(logits)).sum())
        if bad:
            raise ValueError(
                f"Expected finite logits from model `{self.name}`, but got {bad} NaN/inf values"
            )
        return logits


def load_model(cfg: ModelConfig) -> SegmentationModel:
    """Build the model a config names, ready for inference on the CPU (move it with ``.to``).

    Args:
        cfg: the model config (``pipeline.config.ModelConfig``).

    Returns:
        The :class:`SegmentationModel` in eval mode, with ``fingerprint`` set.

    Raises:
        FileNotFoundError: the weights path does not exist.
        ValueError: a bad path, kind, file content, scales or sha256 mismatch.
        ImportError: the kind needs torchvision or transformers and it is not installed.
    """
    return SegmentationModel(
        build_network(cfg), cfg, fingerprint=model_fingerprint(cfg),
        output_stride_hint=OUTPUT_STRIDE.get(cfg.kind),
    )
