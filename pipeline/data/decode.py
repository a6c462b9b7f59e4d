"""Decoding and validating one image/label pair (runs inside Ray read tasks).

Every failure raises :class:`~pipeline.data.readers.DataError` naming the file, so the
extract stage can stop on it or, with ``on_error: skip``, record it and carry on.
"""

from __future__ import annotations

import io

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import DatasetConfig
from pipeline.data.corruptions import corrupt
from pipeline.data.readers import DataError, Sample

# Cityscapes labelIds 0..33 -> the 19 trainIds (cityscapesScripts labels.py); -1 marks void,
# which becomes the dataset's ignore_index.
CITYSCAPES_TRAIN_IDS = np.array(
    [-1, -1, -1, -1, -1, -1, -1, 0, 1, -1, -1, 2, 3, 4, -1, -1, -1, 5, -1, 6, 7, 8, 9, 10,
     11, 12, 13, 14, 15, -1, -1, 16, 17, 18],
    dtype=np.int64,
)


def label_dtype(num_classes: int, ignore_index: int) -> np.dtype:
    """The smallest stored label dtype (uint8 or uint16) holding every class and the ignore index.

    Raises:
        ValueError: ``ignore_index`` or the class count does not fit uint16.
    """
    top = max(num_classes - 1, ignore_index)
    if ignore_index < 0 or top > np.iinfo(np.uint16).max:
        raise ValueError(
            f"Expected `ignore_index` and classes to lie in 0..65535, but got ignore_index "
            f"{ignore_index} with {num_classes} classes"
        )
    return np.dtype(np.uint8) if top <= np.iinfo(np.uint8).max else np.dtype(np.uint16)


def _open_image(uri: str, what: str) -> Image.Image:
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: truncated files only fail here
    except FileNotFoundError as err:
        raise DataError(f"Expected {what} {uri} to exist, but it is missing") from err
    except Image.DecompressionBombError as err:
        raise DataError(
            f"Expected {what} {uri} to be at most {Image.MAX_IMAGE_PIXELS} pixels (Pillow's "
            f"decompression-bomb limit), but got: {err}"
        ) from err
    except UnidentifiedImageError as err:
        raise DataError(
            f"Expected {what} {uri} to be a readable image, but its format is not recognised"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Expected {what} {uri} to be a readable image, but got: {err}") from err
    return img


_GREY16 = ("I;16", "I;16B", "I;16L", "I;16N")


def load_image(uri: str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB.

    Grey, palette and RGBA images are converted by Pillow (alpha dropped). 16-bit grey images
    are scaled to 8 bits over their full range, ``round(v * 255 / 65535)`` (so 65535 -> 255,
    257 -> 1), then repeated to three channels: Pillow alone would clip every value above 255
    to white. 32-bit integer and float images have no agreed range and are refused.

    Raises:
        DataError: missing, unreadable or corrupt file, or a 32-bit image.
    """
    img = _open_image(uri, "image")
    if img.mode in _GREY16:
        values = np.asarray(img).astype(np.uint32)
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode in ("I", "F"):
        kind = "integer" if img.mode == "I" else "float"
        raise DataError(
            f"Expected image {uri} to have 8 or 16 bits per channel, but got 32-bit {kind} "
            f"values (mode {img.mode}): convert it to 8- or 16-bit first"
        )
    return np.array(img.convert("RGB"), dtype=np.uint8)


def load_label(uri: str) -> np.ndarray:
    """Read a single-channel label map as (H, W) int64 values.

    Raises:
        DataError: missing, unreadable, corrupt or multi-channel file.
    """
    img = _open_image(uri, "label")
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
        raise DataError(
            f"Expected label {uri} to be a single-channel image (mode L, P, I or I;16), but got "
            f"mode {img.mode}"
        )
    return np.asarray(img).astype(np.int64)


def _remap(values: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    lut = np.arange(max(int(values.max(initial=0)), *mapping) + 1, dtype=np.int64)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[values]


def prepare_labels(
    raw: np.ndarray, cfg: DatasetConfig, num_classes: int, *, uri: str = "<labels>"
) -> np.ndarray:
    """Remap raw label values and check them against the classes.

    Cityscapes labelIds become trainIds (void -> ``ignore_index``), then ``label_map`` applies.

    Args:
        raw: (H, W) integer label values as read from the file.
        cfg: the dataset's config (format, ``label_map``, ``ignore_index``).
        num_classes: classes the model scores.
        uri: file named in errors.

    Returns:
        (H, W) uint8 or uint16 labels (see :func:`label_dtype`).

    Raises:
        DataError: a value outside ``0..num_classes-1`` other than ``ignore_index``, or a
            Cityscapes labelId outside 0..33.
    """
    values = raw.astype(np.int64, copy=False)
    if values.size and values.min() < 0:
        raise DataError(f"Expected non-negative label values in {uri}, but got {values.min()}")
    if cfg.format == "cityscapes":
        if values.size and values.max() >= len(CITYSCAPES_TRAIN_IDS):
            raise DataError(
                f"Expected Cityscapes labelIds 0..{len(CITYSCAPES_TRAIN_IDS) - 1} in {uri}, "
                f"but got {values.max()}"
            )
        train = CITYSCAPES_TRAIN_IDS[values]
        values = np.where(train < 0, cfg.ignore_index, train)
    if cfg.label_map:
        values = _remap(values, cfg.label_map)
    bad = ((values >= num_classes) | (values < 0)) & (values != cfg.ignore_index)
    if bad.any():
        found = np.unique(values[bad])[:10].tolist()
        raise DataError(
            f"Expected label values in {uri} to lie in 0..{num_classes - 1} or equal "
            f"ignore_index {cfg.ignore_index}, but got {found}"
        )
    return values.astype(label_dtype(num_classes, cfg.ignore_index))


def unlabelled_plane(shape: tuple[int, int], cfg: DatasetConfig, num_classes: int) -> np.ndarray:
    """The label map stored for an image without labels (a ``monitor`` set): all ``ignore_index``.

    It keeps the shard schema one schema (every row has an (H, W) label plane at label
    resolution, so ``height``/``width`` and upsampling work as for labelled rows) and costs
    nothing on disk: zstd compresses a constant plane to a few hundred bytes. Every label metric
    of such an image is empty (all its pixels are ignored).

    Example:
        >>> from pipeline.config import DatasetConfig
        >>> ds = DatasetConfig(name="n", role="monitor", domain="night", images="i")
        >>> unlabelled_plane((2, 3), ds, 11)
        array([[255, 255, 255],
               [255, 255, 255]], dtype=uint8)
    """
    return np.full(shape, cfg.ignore_index, label_dtype(num_classes, cfg.ignore_index))


def load_sample(
    sample: Sample, cfg: DatasetConfig, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read, corrupt (when configured) and validate one image/label pair.

    A ``monitor`` set's images have no labels: their label map is :func:`unlabelled_plane`.

    Args:
        sample: the listed image.
        cfg: the dataset's config.
        num_classes: classes the model scores.

    Returns:
        The (H, W, 3) uint8 RGB image and its (H, W) uint8/uint16 labels.

    Raises:
        DataError: no label (except for a ``monitor`` set), unreadable/corrupt files, size
            mismatch or bad label values; the message names the file.
    """
    if cfg.role == "monitor":
        image = load_image(sample.uri)
        labels = unlabelled_plane(image.shape[:2], cfg, num_classes)
    elif sample.label_uri is None:
        raise DataError(f"Expected a label file for image {sample.uri}, but found none")
    else:
        image = load_image(sample.uri)
        labels = prepare_labels(load_label(sample.label_uri), cfg, num_classes,
                                uri=sample.label_uri)
        if image.shape[:2] != labels.shape:
            raise DataError(
                f"Expected label {sample.label_uri} to match image {sample.uri} in size "
                f"{image.shape[:2]}, but got {labels.shape}"
            )
    if cfg.corruption is not None:
        c = cfg.corruption
        image = corrupt(image, c.kind, c.severity, seed=c.seed, key=sample.image_id)
    return image, labels
