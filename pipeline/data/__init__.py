"""Dataset readers (folder, Cityscapes, manifest), label remapping and synthetic corruptions.

Example:
    >>> from pipeline.data import CORRUPTIONS
    >>> CORRUPTIONS
    ('dark', 'fog', 'blur', 'noise', 'jpeg')
"""

from __future__ import annotations

from pipeline.data.corruptions import CORRUPTIONS, corrupt
from pipeline.data.decode import (
    CITYSCAPES_TRAIN_IDS,
    label_dtype,
    load_image,
    load_label,
    load_sample,
    prepare_labels,
    unlabelled_plane,
)
from pipeline.data.readers import (
    DataError,
    Sample,
    list_all_samples,
    list_samples,
    select_samples,
    source_fingerprint,
)

__all__ = [
    "CITYSCAPES_TRAIN_IDS",
    "CORRUPTIONS",
    "DataError",
    "Sample",
    "corrupt",
    "label_dtype",
    "list_all_samples",
    "list_samples",
    "load_image",
    "load_label",
    "load_sample",
    "prepare_labels",
    "select_samples",
    "source_fingerprint",
    "unlabelled_plane",
]
