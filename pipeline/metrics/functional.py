"""The functional metric API in one namespace: pure kernels on tensors/arrays and on sums.

The kernels live in four modules; this one re-exports their public names so that
``from pipeline.metrics.functional import ece_from_bins`` (as ``pipeline/report.py`` does)
keeps working. Code inside ``pipeline/metrics`` imports from the defining module.

- :mod:`pipeline.metrics.checks`: argument and input checks (``check_n_bins``, ``as_probs``,
  ``valid_mask``, ...) and ``SUM_TOLERANCE``.
- :mod:`pipeline.metrics.per_image`: the per-image *update* pass (``image_sums``), the bin rule
  (``bin_of``), ``first_argmax``, ``adaptive_bins`` and ``boundary_mask``.
- :mod:`pipeline.metrics.compute`: *compute* kernels from sums (``ece_from_bins``,
  ``mce_from_bins``, ``sce_from_bins``, ``auroc_from_histograms``, ``miou_from_confusion``).
- :mod:`pipeline.metrics.top_label`: the one-call ``ece`` and ``image_ece`` on whole arrays.
"""

from __future__ import annotations

from pipeline.metrics.checks import (
    SUM_TOLERANCE,
    as_labels,
    as_preds,
    as_probs,
    as_scores,
    check_ignore_index,
    check_n_bins,
    valid_mask,
)
from pipeline.metrics.compute import (
    auroc_from_histograms,
    ece_from_bins,
    mce_from_bins,
    miou_from_confusion,
    sce_from_bins,
)
from pipeline.metrics.per_image import (
    ImageSums,
    adaptive_bins,
    bin_of,
    boundary_mask,
    first_argmax,
    image_sums,
)
from pipeline.metrics.top_label import ece, image_ece

__all__ = [
    "SUM_TOLERANCE", "ImageSums", "adaptive_bins", "as_labels", "as_preds", "as_probs",
    "as_scores", "auroc_from_histograms", "bin_of", "boundary_mask", "check_ignore_index",
    "check_n_bins", "ece", "ece_from_bins", "first_argmax", "image_ece", "image_sums",
    "mce_from_bins", "miou_from_confusion", "sce_from_bins", "valid_mask",
]
