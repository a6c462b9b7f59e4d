"""Model adapters: load a segmentation model from config and name its logits.

Usage::

    model = load_model(cfg.model).to(device)    # SegmentationModel, eval mode
    logits = model(images)                      # (N, H, W, 3) uint8 RGB -> (N, C, h, w) float32
    fp = model_fingerprint(cfg.model)           # == model.fingerprint
"""

from __future__ import annotations

from pipeline.models.adapters import build_network
from pipeline.models.download import resolve, sha256_file
from pipeline.models.espnet import ESPNet
from pipeline.models.wrapper import SegmentationModel, load_model, model_fingerprint

__all__ = [
    "ESPNet",
    "SegmentationModel",
    "build_network",
    "load_model",
    "model_fingerprint",
    "resolve",
    "sha256_file",
]
