"""Seeded synthetic corruptions for graded domain shift, in plain numpy and PIL.

Five kinds at severities 1..5, in the spirit of ImageNet-C (Hendrycks & Dietterich, ICLR 2019):
``dark`` (scaled-down brightness), ``fog`` (blend towards a smooth bright haze), ``blur``
(Gaussian), ``noise`` (additive Gaussian) and ``jpeg`` (re-encoding at low quality). Random
ones draw from a generator seeded by ``(seed, crc32(key))``, so each image gets its own but
reproducible corruption whichever worker decodes it.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image, ImageFilter

CORRUPTIONS = ("dark", "fog", "blur", "noise", "jpeg")
# One parameter per severity 1..5; each list moves monotonically away from the clean image.
_DARK_GAIN = (0.6, 0.45, 0.3, 0.2, 0.1)
_FOG_ALPHA = (0.25, 0.4, 0.55, 0.7, 0.85)
_BLUR_RADIUS = (1.0, 2.0, 3.0, 4.5, 6.0)
_NOISE_SIGMA = (10.0, 20.0, 30.0, 45.0, 65.0)  # 0..255 units
_JPEG_QUALITY = (25, 18, 15, 10, 7)  # ImageNet-C's qualities


def _fog(image: np.ndarray, alpha: float, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    # A coarse random grid upsampled bicubically gives a smooth, patchy haze.
    coarse = rng.uniform(0.0, 1.0, size=(max(2, h // 32), max(2, w // 32))).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    haze = 255.0 * (0.75 + 0.25 * np.clip(field, 0.0, 1.0))[..., None]
    return (1.0 - alpha) * image + alpha * haze


def corrupt(
    image: np.ndarray, kind: str, severity: int, *, seed: int = 0, key: str = ""
) -> np.ndarray:
    """Apply a synthetic corruption to one image.

    Args:
        image: (H, W, 3) uint8 RGB.
        kind: one of ``dark``, ``fog``, ``blur``, ``noise``, ``jpeg``.
        severity: 1 (mild) .. 5 (strong).
        seed: run-level seed.
        key: per-image key (the image id) mixed into the seed.

    Returns:
        (H, W, 3) uint8 RGB, the same shape as ``image``.

    Raises:
        ValueError: unknown ``kind``, ``severity`` outside 1..5, or an image of another shape.

    Example:
        >>> img = np.full((4, 4, 3), 200, np.uint8)
        >>> int(corrupt(img, "dark", 5).mean())
        20
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"Expected `kind` to be one of {list(CORRUPTIONS)}, but got {kind!r}")
    if not 1 <= severity <= 5:
        raise ValueError(f"Expected `severity` to be in 1..5, but got {severity}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"Expected `image` of shape (H, W, 3) and dtype uint8, but got {image.shape} "
            f"{image.dtype}"
        )
    i = severity - 1
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    if kind == "blur":
        pil = Image.fromarray(image).filter(ImageFilter.GaussianBlur(_BLUR_RADIUS[i]))
        return np.asarray(pil, dtype=np.uint8).copy()
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=_JPEG_QUALITY[i])
        return np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()
    x = image.astype(np.float32)
    if kind == "dark":
        out = x * _DARK_GAIN[i]
    elif kind == "fog":
        out = _fog(x, _FOG_ALPHA[i], rng)
    else:  # noise
        out = x + rng.normal(0.0, _NOISE_SIGMA[i], size=x.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
