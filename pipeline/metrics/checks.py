"""Argument and input checks shared by the metric kernels.

Inputs may be torch tensors or NumPy arrays; :func:`_as_array` gives the NumPy view the
kernels run on (no copy for contiguous CPU tensors; float16/bfloat16 are widened to float32).
The ``as_*`` helpers check dtype, shape and range and return those views; ``check_*`` validate
plain arguments. Messages follow one template: the argument in backticks, what was expected,
then what was received. Per-pixel probability values are checked inside the compiled passes
(:mod:`pipeline.metrics.per_image`, :mod:`pipeline.metrics.top_label`), which report the first
bad pixel; :func:`_raise_bad_pixel` turns that pixel into the message.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SUM_TOLERANCE = 1e-3
"""Largest accepted ``|sum_c probs[c] - 1|`` per pixel (float16 storage needs about 1e-3)."""


def _as_array(x: object, name: str) -> np.ndarray:
    """NumPy view of a torch tensor (on the CPU) or a NumPy array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(
        f"Expected `{name}` to be a torch.Tensor or numpy.ndarray, but got {type(x).__name__}"
    )


def check_n_bins(n_bins: object, name: str = "n_bins") -> int:
    """Validate a bin count.

    Args:
        n_bins: The value to check.
        name: Argument name used in the error message.

    Returns:
        ``n_bins`` as an int.

    Raises:
        TypeError: If ``n_bins`` is not an int.
        ValueError: If ``n_bins`` is smaller than 1.
    """
    if not isinstance(n_bins, int) or isinstance(n_bins, bool):
        raise TypeError(f"Expected `{name}` to be an int, but got {type(n_bins).__name__}")
    if n_bins < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, but got {n_bins}")
    return n_bins


def check_ignore_index(ignore_index: object) -> int | None:
    """Validate ``ignore_index`` (None or an int).

    Raises:
        TypeError: If it is neither None nor an int.
    """
    if ignore_index is not None and (
        not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
    ):
        raise TypeError(
            f"Expected `ignore_index` to be None or an int, but got {ignore_index!r}"
        )
    return ignore_index


def as_probs(probs: object, ndims: tuple[int, ...], layout: str, name: str = "probs") -> np.ndarray:
    """NumPy float32/float64 view of ``probs``, with rank, class count and size checked.

    Values are checked pixel by pixel in the per-image pass (:func:`image_sums`).

    Args:
        probs: torch tensor or NumPy array of probabilities.
        ndims: Accepted numbers of dimensions.
        layout: Expected layout for messages, e.g. ``"(N, C, H, W) or (P, C)"``.
        name: Argument name used in messages.

    Returns:
        A float32 (float16/bfloat16 are widened) or float64 array.

    Raises:
        TypeError: If ``probs`` is not a floating tensor/array.
        ValueError: On a wrong rank, fewer than two classes or an empty input.
    """
    a = _as_array(probs, name)
    if a.dtype.kind != "f":
        raise TypeError(f"Expected `{name}` to be a floating tensor, but got dtype {a.dtype}")
    if a.ndim not in ndims:
        raise ValueError(f"Expected `{name}` of shape {layout}, but got {a.shape}")
    class_dim = 1 if a.ndim in (2, 4) else 0
    if a.shape[class_dim] < 2:
        raise ValueError(
            f"Expected `{name}` to have at least 2 classes (dim {class_dim}), but got shape "
            f"{a.shape}"
        )
    if a.size == 0:
        raise ValueError(f"Expected `{name}` to be non-empty, but got shape {a.shape}")
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float32)


def as_labels(labels: object, shape: tuple[int, ...], name: str = "labels") -> np.ndarray:
    """NumPy integer view of ``labels``, with the shape checked against ``shape``.

    Raises:
        TypeError: If ``labels`` is not an integer tensor/array.
        ValueError: If its shape differs from ``shape``.
    """
    a = _as_array(labels, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"Expected `{name}` to be an integer tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `{name}` of shape {tuple(shape)} to match `probs`, but got {a.shape}"
        )
    return a


def as_preds(preds: object, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Flat int64 copy of predicted classes, with dtype, shape and range checked.

    Args:
        preds: Integer tensor/array of predicted classes.
        shape: Expected shape (that of the labels).
        num_classes: Number of classes C.

    Returns:
        ``preds`` flattened, as int64.

    Raises:
        TypeError: If ``preds`` is not an integer tensor/array.
        ValueError: On a shape other than ``shape`` or a value outside ``[0, C)``.
    """
    a = _as_array(preds, "preds")
    if a.dtype.kind not in "iu":
        raise TypeError(f"Expected `preds` to be an integer tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `preds` of shape {tuple(shape)} to match `labels`, but got {a.shape}"
        )
    lo, hi = a.min(), a.max()
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"Expected `preds` to be in [0, {num_classes}), but got {lo if lo < 0 else hi}"
        )
    return a.reshape(-1).astype(np.int64, copy=False)


def as_scores(scores: object, shape: tuple[int, ...], name: str = "mis_score") -> np.ndarray:
    """NumPy float view of per-pixel scores in [0, 1], with shape and range checked.

    Raises:
        TypeError: If ``scores`` is not a floating tensor/array.
        ValueError: On a shape other than ``shape``, NaN/inf or values outside [0, 1].
    """
    a = _as_array(scores, name)
    if a.dtype.kind != "f":
        raise TypeError(f"Expected `{name}` to be a floating tensor, but got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(
            f"Expected `{name}` of shape {tuple(shape)} to match `labels`, but got {a.shape}"
        )
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(f"Expected `{name}` to be finite, but got {a[~finite][0]}")
    lo, hi = a.min(), a.max()
    if lo < 0 or hi > 1:
        raise ValueError(f"Expected `{name}` to be in [0, 1], but got {lo if lo < 0 else hi}")
    return a


def valid_mask(
    labels: np.ndarray, num_classes: int, ignore_index: int | None, name: str = "labels"
) -> np.ndarray:
    """Check the label range and return the mask of pixels to score.

    Args:
        labels: Integer labels of any shape.
        num_classes: Number of classes C.
        ignore_index: Label value excluded from every metric, or None.
        name: Argument name used in messages.

    Returns:
        Bool mask (same shape as ``labels``) of pixels not equal to ``ignore_index``.

    Raises:
        ValueError: If a label is outside ``[0, C)`` and is not ``ignore_index``.
    """
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = (labels < 0) | (labels >= num_classes)
        if ignore_index is not None:
            bad &= labels != ignore_index
        if bad.any():
            allowed = f"[0, {num_classes})"
            if ignore_index is not None:
                allowed += f" or ignore_index={ignore_index}"
            raise ValueError(f"Expected `{name}` to be in {allowed}, but got {labels[bad][0]}")
    if ignore_index is None:
        return np.ones(labels.shape, dtype=bool)
    return labels != ignore_index



def _raise_bad_pixel(column: np.ndarray, pixel: int, name: str) -> None:
    if not np.isfinite(column).all():
        raise ValueError(
            f"Expected `{name}` to be finite, but got {column[~np.isfinite(column)][0]} "
            f"at pixel {pixel}"
        )
    if column.min() < 0:
        raise ValueError(
            f"Expected `{name}` to be non-negative, but got {column.min()} at pixel {pixel}"
        )
    raise ValueError(
        f"Expected `{name}` to sum to 1 over the classes (tolerance {SUM_TOLERANCE}), but got "
        f"{float(column.sum(dtype=np.float64)):.6g} at pixel {pixel}"
    )


def _no_pixels(ignore_index: int | None) -> ValueError:
    return ValueError(
        f"Expected `labels` to have a pixel other than ignore_index={ignore_index}, "
        "but got none"
    )
