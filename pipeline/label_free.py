"""Label-free estimates for unlabelled (``role: monitor``) sets: drift, accuracy and calibration.

New images arrive every night with labels for almost none of them. From the logits alone this
module answers three questions about a set, against the labelled held-out part of the
calibration set (the *reference*):

- has the data moved? :func:`drift`, a two-sample statistic on per-image confidence and entropy
  with an alarm threshold bootstrapped from the reference alone;
- how accurate is the model there? :func:`estimate`'s ``est_pixel_acc`` (ATC, average
  thresholded confidence, Garg et al. 2022, capped by how far the shares of the predicted
  classes moved when the optional :data:`PRED_HIST_COLUMN` is there) and
  ``est_pixel_acc_doc`` (DoC, difference of confidences, Guillory et al. 2021);
- how miscalibrated is a calibrator there? :func:`estimate`'s ``est_img_ece``.

Everything works on per-image sums (:func:`image_features`, the columns
:data:`FEATURE_COLUMNS` of ``per_image.parquet``), so sets aggregate exactly and no per-pixel
value is ever kept. Pure numpy/pandas/torch; nothing here imports a pipeline stage. Every
choice below was made on calibration data only (the held-out calibration images and corrupted
copies of them); ``benchmarks/label_free.py`` measures the result on a run's test sets.

References:
    Garg et al., "Leveraging Unlabeled Data to Predict Out-of-Distribution Performance",
    ICLR 2022. Guillory et al., "Predicting with Confidence on Unseen Distributions",
    ICCV 2021.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch


def _conf_edges() -> np.ndarray:
    # Equal steps of 1/60 up to 14/15 (so every edge k/15 of the default 15-bin ECE is an
    # edge here), then steps of 0.1 in -log10(1 - c) up to 1 - 1e-6: a segmentation model puts
    # most pixels above 0.9, where ATC's threshold and the ECE's top bins need resolution.
    linear = np.arange(57) / 60.0
    x = np.linspace(math.log10(15.0), 6.0, 50)[1:]
    return np.concatenate([linear, 1.0 - 10.0 ** (-x), [1.0]])


CONF_EDGES: np.ndarray = _conf_edges()
"""Edges (float64, increasing, from 0 to 1) of the top-label confidence histogram. Bin ``k``
holds confidences in ``(CONF_EDGES[k], CONF_EDGES[k + 1]]`` (0 goes to the first bin)."""

N_CONF_BINS = len(CONF_EDGES) - 1

FEATURE_COLUMNS = ("lf_n_pixels", "lf_conf_sum", "lf_entropy_sum", "lf_conf_hist")
"""Per-image label-free features (columns of ``per_image.parquet``): pixel count, sum of
top-label confidences, sum of predictive entropies (nats) and the confidence histogram over
:data:`CONF_EDGES` (int64 counts)."""

PRED_HIST_COLUMN = "lf_pred_hist"
"""Optional per-image feature: pixels per predicted class (int64 counts, length C), returned by
:func:`image_features` when given the predictions. With it on the reference and the set,
:func:`estimate` caps the accuracy by the shift of the predicted class shares."""

LABEL_FREE_COLUMNS = (
    "dataset", "domain", "reference", "role", "calibrator", "n_images", "drift_score",
    "drift_threshold", "drift_alarm", "est_pixel_acc", "est_pixel_acc_doc", "est_img_ece",
    "true_pixel_acc", "true_img_ece",
)
"""Columns of ``label_free.csv``: one row per (test or monitor set, calibrator)."""

# The histogram's interior edges as a float64 tensor, one per device.
_EDGES_T: dict[tuple[str, torch.dtype], torch.Tensor] = {}


# ---------------------------------------------------------------------------------------------
# Per image: probabilities -> sums


def _interior_edges(device: torch.device) -> torch.Tensor:
    key = (str(device), torch.float64)
    if key not in _EDGES_T:
        _EDGES_T[key] = torch.as_tensor(CONF_EDGES[1:-1], dtype=torch.float64, device=device)
    return _EDGES_T[key]


def image_features(probs: torch.Tensor, *, preds: torch.Tensor | None = None) -> dict[str, Any]:
    r"""One image's label-free features from its softmax probabilities, over every pixel.

    There is no label mask: monitor sets have no labels, and labelled sets are treated the
    same way so that the two are comparable. Sums rather than means, so that the features of
    a set are the sums of its images'.

    .. math:: c_p = \max_k p_{kp}, \qquad H_p = -\sum_k p_{kp} \log p_{kp} \quad (0 \log 0 = 0)

    Args:
        probs: Probabilities (C, H, W), float, on any device; each pixel's sum to 1.
        preds: Optional predicted classes (H, W), integer, on the same device (the argmax of
            the logits, as evaluation scores them); when given, the result also has
            :data:`PRED_HIST_COLUMN`.

    Returns:
        ``{"lf_n_pixels": int, "lf_conf_sum": float, "lf_entropy_sum": float,
        "lf_conf_hist": np.ndarray}``, the histogram int64 of length ``len(CONF_EDGES) - 1``;
        plus ``"lf_pred_hist"``, int64 of length C, when ``preds`` is given.

    Raises:
        TypeError: If ``probs`` is not a floating-point tensor or ``preds`` not an integer one.
        ValueError: If ``probs`` is not 3-d with at least one class and pixel, or ``preds``
            is not (H, W) with values in ``[0, C)``.

    Example:
        >>> f = image_features(torch.tensor([[[1.0, 0.5]], [[0.0, 0.5]]]))
        >>> f["lf_n_pixels"], f["lf_conf_sum"], round(f["lf_entropy_sum"], 4)
        (2, 1.5, 0.6931)
    """
    if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
        got = probs.dtype if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise TypeError(f"Expected `probs` to be a floating-point torch.Tensor, but got {got}")
    if probs.ndim != 3 or 0 in probs.shape:
        raise ValueError(
            f"Expected `probs` of shape (C, H, W) with C, H, W > 0, but got {tuple(probs.shape)}"
        )
    flat = probs.reshape(probs.shape[0], -1)
    conf = flat.amax(0).double()
    plogp = torch.where(flat > 0, flat * torch.log(flat.clamp_min(torch.finfo(flat.dtype).tiny)),
                        torch.zeros((), dtype=flat.dtype, device=flat.device))
    entropy = -plogp.sum(0, dtype=torch.float64)
    index = torch.bucketize(conf.clamp(0.0, 1.0), _interior_edges(conf.device), right=False)
    hist = torch.bincount(index, minlength=N_CONF_BINS)
    sums = torch.stack([conf.sum(), entropy.sum()]).cpu().tolist()
    out = {
        "lf_n_pixels": int(conf.numel()),
        "lf_conf_sum": float(sums[0]),
        "lf_entropy_sum": float(sums[1]),
        "lf_conf_hist": hist.cpu().numpy().astype(np.int64),
    }
    if preds is not None:
        out[PRED_HIST_COLUMN] = _class_counts(preds, probs.shape)
    return out


def _class_counts(preds: torch.Tensor, shape: torch.Size) -> np.ndarray:
    if not isinstance(preds, torch.Tensor) or preds.is_floating_point() or preds.is_complex():
        got = preds.dtype if isinstance(preds, torch.Tensor) else type(preds).__name__
        raise TypeError(f"Expected `preds` to be an integer torch.Tensor, but got {got}")
    if tuple(preds.shape) != tuple(shape[1:]):
        raise ValueError(f"Expected `preds` of shape {tuple(shape[1:])} (H, W of `probs`), but "
                         f"got {tuple(preds.shape)}")
    flat = preds.reshape(-1).long()
    if int(flat.min()) < 0 or int(flat.max()) >= shape[0]:
        raise ValueError(f"Expected `preds` in [0, {shape[0]}), but got values in "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat, minlength=shape[0]).cpu().numpy().astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_frame(images: object, name: str, columns: tuple[str, ...] = FEATURE_COLUMNS) -> None:
    if not isinstance(images, pd.DataFrame):
        raise TypeError(f"Expected `{name}` to be a pandas DataFrame, but got "
                        f"{type(images).__name__}")
    missing = [c for c in columns if c not in images.columns]
    if missing:
        raise ValueError(f"Expected `{name}` to have the columns {list(columns)}, but "
                         f"{missing} are missing (got {list(images.columns)})")
    if len(images) == 0:
        raise ValueError(f"Expected `{name}` to have at least one image row, but got none")


def _hists(images: pd.DataFrame, name: str) -> np.ndarray:
    """The ``lf_conf_hist`` column as an (N, N_CONF_BINS) int64 array."""
    try:
        hist = np.stack([np.asarray(h, dtype=np.int64) for h in images["lf_conf_hist"]])
    except ValueError as err:
        raise ValueError(f"Expected every `lf_conf_hist` of `{name}` to have "
                         f"{N_CONF_BINS} bins, but got ragged lengths") from err
    if hist.ndim != 2 or hist.shape[1] != N_CONF_BINS:
        raise ValueError(f"Expected `lf_conf_hist` of `{name}` with {N_CONF_BINS} bins "
                         f"(len(CONF_EDGES) - 1), but got shape {hist.shape[1:]}")
    n = images["lf_n_pixels"].to_numpy(dtype=np.int64)
    if (n <= 0).any():
        raise ValueError(f"Expected `lf_n_pixels` of `{name}` to be positive, but got "
                         f"{int(n.min())}")
    if not np.array_equal(hist.sum(1), n):
        raise ValueError(f"Expected each `lf_conf_hist` of `{name}` to sum to its "
                         f"`lf_n_pixels`, but got {hist.sum(1)[:3]} vs {n[:3]} (first rows)")
    return hist


def _check_level(level: object) -> float:
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"Expected `level` to be a float in (0, 1), but got {level!r}")
    return float(level)


# ---------------------------------------------------------------------------------------------
# ATC threshold on the confidence histogram


def _position_above(hist: np.ndarray, fraction: float) -> float:
    """Fractional bin position ``k + f`` where the share of pixels above it equals ``fraction``.

    Pixels are taken as spread uniformly inside a bin, so the share above a position is
    piecewise linear in it and the position is found exactly.
    """
    total = hist.sum()
    above = np.concatenate([np.cumsum(hist[::-1])[::-1], [0]]) / total  # share above edge k
    fraction = min(max(fraction, 0.0), 1.0)
    # above is non-increasing from 1 (edge 0) to 0 (last edge): the first edge at or below.
    k = int(np.searchsorted(-above, -fraction, side="left"))
    if k == 0:
        return 0.0
    lo, hi = above[k - 1], above[k]  # lo >= fraction >= hi
    inside = 0.0 if lo == hi else (lo - fraction) / (lo - hi)
    return float(k - 1 + inside)


def _share_above(hist: np.ndarray, position: float) -> np.ndarray:
    """Share of pixels above a fractional bin position, per row of ``hist`` (N, bins)."""
    hist = np.atleast_2d(hist).astype(np.float64)
    k = min(int(position), hist.shape[1] - 1)
    inside = position - k
    above = hist[:, k + 1:].sum(1) + (1.0 - inside) * hist[:, k]
    return above / hist.sum(1)


def _position_value(position: float) -> float:
    k = min(int(position), N_CONF_BINS - 1)
    return float(CONF_EDGES[k] + (position - k) * (CONF_EDGES[k + 1] - CONF_EDGES[k]))


# ---------------------------------------------------------------------------------------------
# Reference and estimates


@dataclass(frozen=True)
class Reference:
    """What the estimators keep from one calibrator's labelled reference images.

    Attributes:
        pixel_acc: True pixel accuracy of the reference images.
        mean_conf: Mean top-label confidence over every reference pixel.
        atc_position: ATC's threshold as a fractional position in the histogram bins.
        atc_threshold: The same threshold as a confidence.
        n_images: Number of reference images.
        ece_floor: The reference's image-wise ECE that the label-free estimate cannot see
            (bin noise; 0 when the rows carry no true ``img_ece``), added in quadrature to
            each image's estimate by :func:`estimate`.
        pred_share: Share of the reference's pixels predicted as each class, when the rows
            carry :data:`PRED_HIST_COLUMN`; else None.
    """

    pixel_acc: float
    mean_conf: float
    atc_position: float
    atc_threshold: float
    n_images: int
    ece_floor: float = 0.0
    pred_share: tuple[float, ...] | None = None


def fit_reference(images: pd.DataFrame, pixel_acc: float) -> Reference:
    r"""Fit the label-free estimators on one calibrator's labelled reference images.

    ATC's threshold ``t`` is the confidence above which the share of the reference's pixels
    equals the reference pixel accuracy (interpolating inside a histogram bin); DoC keeps the
    reference accuracy and mean confidence. When the rows also carry each image's true
    ``img_ece`` (as ``per_image.parquet`` does for labelled images), the part of it that the
    label-free estimate misses on the reference (:math:`\sqrt{\max(0, \overline{e^2} -
    \overline{\hat e^2})}`, the in-domain noise floor) is kept as ``ece_floor``; when they
    carry :data:`PRED_HIST_COLUMN`, the share of pixels predicted as each class is kept as
    ``pred_share``.

    Args:
        images: Per-image rows with :data:`FEATURE_COLUMNS` (the calibration held-out images,
            under this calibrator), optionally with ``img_ece`` and :data:`PRED_HIST_COLUMN`.
        pixel_acc: Their true pixel accuracy, in [0, 1].

    Returns:
        The :class:`Reference`.

    Raises:
        ValueError: On missing columns, no rows, inconsistent histograms, or ``pixel_acc``
            outside [0, 1].
    """
    _check_frame(images, "images")
    if not isinstance(pixel_acc, (int, float, np.number)) or not 0.0 <= float(pixel_acc) <= 1.0:
        raise ValueError(f"Expected `pixel_acc` in [0, 1], but got {pixel_acc!r}")
    hists = _hists(images, "images")
    hist = hists.sum(0)
    position = _position_above(hist, float(pixel_acc))
    n = images["lf_n_pixels"].to_numpy(dtype=np.float64)
    floor = 0.0
    if "img_ece" in images.columns:
        true = images["img_ece"].to_numpy(dtype=np.float64)
        keep = np.isfinite(true)
        if keep.any():
            est = _image_eces(hists[keep], n[keep], _fit_shift(hist, float(pixel_acc)))
            floor = math.sqrt(max(float(np.mean(true[keep] ** 2) - np.mean(est**2)), 0.0))
    share = _pred_share(images, "images")
    return Reference(
        pixel_acc=float(pixel_acc),
        mean_conf=float(images["lf_conf_sum"].sum() / n.sum()),
        atc_position=position,
        atc_threshold=_position_value(position),
        n_images=len(images),
        ece_floor=floor,
        pred_share=None if share is None else tuple(float(v) for v in share),
    )


def _pred_share(images: pd.DataFrame, name: str) -> np.ndarray | None:
    """Share of the rows' pixels predicted as each class, or None without the column."""
    if PRED_HIST_COLUMN not in images.columns or images[PRED_HIST_COLUMN].isna().any():
        return None
    try:
        counts = np.stack([np.asarray(h, dtype=np.int64) for h in images[PRED_HIST_COLUMN]])
    except ValueError as err:
        raise ValueError(f"Expected every `{PRED_HIST_COLUMN}` of `{name}` to have one count "
                         f"per class, but got ragged lengths") from err
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"Expected `{PRED_HIST_COLUMN}` of `{name}` to count some pixels, but "
                         f"got {total}")
    return counts.sum(0) / total


def _bin_conf() -> np.ndarray:
    # A bin's pixels are represented by its midpoint in -log(1 - c), the scale on which the
    # upper bins are equal; the first (linear) bins by their plain midpoint.
    lo, hi = CONF_EDGES[:-1], CONF_EDGES[1:]
    mid = (lo + hi) / 2
    log_part = lo >= 14 / 15
    hi_c = np.minimum(hi, 1.0 - 1e-7)
    mid[log_part] = 1.0 - np.sqrt((1.0 - lo[log_part]) * (1.0 - hi_c[log_part]))
    return mid


_BIN_CONF = _bin_conf()
_ECE_BIN = np.minimum((np.ceil(_BIN_CONF * 15) - 1).astype(np.int64), 14)  # default 15 bins
_LOGIT = np.log(_BIN_CONF) - np.log1p(-_BIN_CONF)


def _soft_accuracy(shift: float) -> np.ndarray:
    """phi_b(c) = sigmoid(logit(c) - b) at each histogram bin's confidence."""
    return 0.5 + 0.5 * np.tanh((_LOGIT - shift) / 2.0)  # the logistic, without overflow


def _fit_shift(hist: np.ndarray, accuracy: float) -> float:
    """The shift b whose map gives the pooled histogram ``hist`` the mean ``accuracy``.

    The mean of phi_b falls from 1 to 0 as b grows, so a bisection finds it.
    """
    weights = hist / hist.sum()
    lo, hi = -40.0, 40.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(weights @ _soft_accuracy(mid)) > accuracy:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _image_eces(hist: np.ndarray, n: np.ndarray, shift: float) -> np.ndarray:
    """Each image's 15-bin ECE with phi_b(c) expected correct pixels per histogram bin."""
    gap = np.zeros((len(hist), 15))  # per image and ECE bin: confidence minus expected correct
    np.add.at(gap.T, _ECE_BIN, (hist * (_BIN_CONF - _soft_accuracy(shift))).T)
    return np.abs(gap).sum(1) / n


def estimate(images: pd.DataFrame, ref: Reference) -> dict[str, float]:
    r"""Label-free pixel accuracy and image-wise ECE of one set under one calibrator.

    - ``est_pixel_acc`` (ATC): the share of the set's pixels whose confidence is above the
      reference's threshold; when the reference and the set carry :data:`PRED_HIST_COLUMN`,
      capped by the class-share bound ``ref.pixel_acc - TV``, where ``TV`` is the total
      variation distance between the shares of pixels predicted as each class in the set
      and in the reference (see below).
    - ``est_pixel_acc_doc`` (DoC): the reference accuracy minus the drop in mean confidence,
      clipped to [0, 1].
    - ``est_img_ece``: each pixel of confidence :math:`c` is taken to be correct with
      probability :math:`\phi_b(c) = \sigma(\mathrm{logit}(c) - b)`, one shift :math:`b` per
      set chosen so that the set's mean of :math:`\phi_b` equals its estimated accuracy;
      each image's ECE (15 equal-width bins) is then computed from its confidence histogram
      with these expected correct counts, and averaged over the images. A shift rather than
      a temperature (:math:`\sigma(\mathrm{logit}(c) / \tau)`, which cannot bring a pixel of
      confidence above 0.5 below 0.5): on the ten corrupted calibration copies named below
      the mean absolute error of the estimated image-wise ECE was 0.049 with the shift and
      0.062 (TS) / 0.067 (uncalibrated) with the temperature.

    This map has no per-image sampling noise, while a calibrated model's true image-wise ECE
    is not 0 (a bin of n pixels misses its accuracy by about :math:`1/\sqrt n`, and
    neighbouring pixels err together): each image's estimate is combined in quadrature with
    the reference's ``ece_floor``, measured where labels exist (without it, the estimate is
    biased low in-domain by that floor).
    Under shift it inherits the accuracy estimate's error, and it assumes one logit shift
    maps confidence to accuracy in every image of the set.

    Why the cap: confidence alone cannot see a model that is confidently wrong, and a
    corrupted image often makes it so (on the CamVid calibration held-out images under fog
    of severity 4, ESPNet's mean confidence rises to 0.98 while its accuracy falls to 0.38,
    and ATC says 0.98). Such a model predicts the wrong classes, so the shares of its
    predicted classes move: the share of pixels whose prediction differs from the label is at
    least the total variation distance between the predicted and the true class shares, and
    with the true shares taken as the reference's (no label shift) the accuracy falls by
    about that distance. On the ten corrupted copies of the CamVid calibration held-out
    images (blur, dark, fog, jpeg, noise at severities 2 and 4; calibration data only) the
    mean absolute error of the accuracy estimate was 0.191 for ATC, 0.049 for
    ``min(ATC, acc_ref - TV)``, 0.074 for ``min(ATC, 1 - TV)``. A set whose true class shares
    differ from the reference's (another route, more road) reads as less accurate than it
    is by up to that label shift.

    ATC scores pixels by their top-label confidence, not by negative entropy (which Garg et
    al. found slightly better): on the same ten copies ATC with negative entropy had a mean
    absolute error of 0.155 against 0.169 for confidence (uncalibrated), a gain too small to
    pay for a second per-pixel histogram in every per-image row, and neither comes near the
    class-share cap.

    Args:
        images: Per-image rows with :data:`FEATURE_COLUMNS` of one set under the calibrator.
        ref: The calibrator's :class:`Reference`.

    Returns:
        ``{"est_pixel_acc": float, "est_pixel_acc_doc": float, "est_img_ece": float}``.

    Raises:
        TypeError: If ``images`` is not a DataFrame or ``ref`` not a :class:`Reference`.
        ValueError: On missing columns, no rows or inconsistent histograms.
    """
    _check_frame(images, "images")
    if not isinstance(ref, Reference):
        raise TypeError(f"Expected `ref` to be a Reference, but got {type(ref).__name__}")
    hist = _hists(images, "images")
    n = images["lf_n_pixels"].to_numpy(dtype=np.float64)
    conf = images["lf_conf_sum"].to_numpy(dtype=np.float64)
    pooled = hist.sum(0)
    accuracy = float(_share_above(pooled, ref.atc_position)[0])
    share = _pred_share(images, "images") if ref.pred_share is not None else None
    if share is not None:
        if len(share) != len(ref.pred_share):
            raise ValueError(f"Expected `{PRED_HIST_COLUMN}` with {len(ref.pred_share)} classes "
                             f"as in the reference, but got {len(share)}")
        tv = 0.5 * float(np.abs(share - np.asarray(ref.pred_share)).sum())
        accuracy = min(accuracy, max(ref.pixel_acc - tv, 0.0))
    doc = ref.pixel_acc - (ref.mean_conf - conf.sum() / n.sum())
    eces = _image_eces(hist, n, _fit_shift(pooled, accuracy))
    return {
        "est_pixel_acc": accuracy,
        "est_pixel_acc_doc": float(min(max(doc, 0.0), 1.0)),
        "est_img_ece": float(np.mean(np.sqrt(eces**2 + ref.ece_floor**2))),
    }


# ---------------------------------------------------------------------------------------------
# Drift


@dataclass(frozen=True)
class Drift:
    """A set's drift against the reference.

    Attributes:
        score: The two-sample statistic (see :func:`drift`), in reference standard deviations.
        threshold: Its alarm threshold, the ``1 - level`` bootstrap quantile under no drift.
        alarm: ``score > threshold``.
    """

    score: float
    threshold: float
    alarm: bool


def _drift_features(images: pd.DataFrame) -> np.ndarray:
    """Per-image drift features (N, 2): mean confidence and mean entropy."""
    n = images["lf_n_pixels"].to_numpy(dtype=np.float64)
    return np.stack([images["lf_conf_sum"].to_numpy(dtype=np.float64) / n,
                     images["lf_entropy_sum"].to_numpy(dtype=np.float64) / n], axis=1)


def _energy(d: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Energy distance between the points ``a`` and ``b`` (index arrays) of distance matrix d."""
    e = 2.0 * d[np.ix_(a, b)].mean() - d[np.ix_(a, a)].mean() - d[np.ix_(b, b)].mean()
    return math.sqrt(max(float(e), 0.0))


def _block_length(x: np.ndarray) -> int:
    """Bootstrap block length for the rows ``x`` (N, F) in frame order.

    From the largest lag-1 autocorrelation ``rho`` over the features, the effective number of
    independent images is ``N (1 - rho) / (1 + rho)`` (an AR(1) series' variance inflation);
    a block spans ``N / N_eff`` consecutive rows, at most half of them.
    """
    n = len(x)
    if n < 4:
        return 1
    rho = 0.0
    for column in x.T:
        a, b = column[:-1] - column[:-1].mean(), column[1:] - column[1:].mean()
        denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
        if denom > 0:
            rho = max(rho, float((a * b).sum()) / denom)
    rho = min(rho, 0.99)
    return int(min(max(round((1 + rho) / (1 - rho)), 1), n // 2))


def _blocks(rng: np.random.Generator, n: int, size: int, block: int) -> np.ndarray:
    """``size`` indices into ``range(n)``: circular runs of ``block`` consecutive rows."""
    starts = rng.integers(0, n, -(-size // block))
    return ((starts[:, None] + np.arange(block)) % n).reshape(-1)[:size]


def drift(
    reference: pd.DataFrame, images: pd.DataFrame, *, level: float = 0.05, seed: int = 0,
    n_boot: int = 1000, block: int | None = None,
) -> Drift:
    r"""Drift of a set against the reference, from uncalibrated per-image features.

    Each image is described by its mean confidence and mean entropy, both standardised by the
    reference images' spread. The score is the square root of the energy distance
    (Szekely and Rizzo) between the reference images and the set's,

    .. math:: D = \sqrt{2\,\mathbb E\lVert X - Y\rVert - \mathbb E\lVert X - X'\rVert
              - \mathbb E\lVert Y - Y'\rVert},

    which grows with the shift (about the mean shift in reference standard deviations) instead
    of saturating as a Kolmogorov-Smirnov distance does, so it also reads as a severity. The
    threshold is the ``1 - level`` quantile of the same statistic between two samples drawn
    with replacement from the reference alone, of the reference's and the set's sizes: a set of
    independent images from the reference's distribution raises the alarm about ``level`` of
    the time.

    Frames of a video are not independent images: neighbouring frames look alike (the CamVid
    calibration held-out frames' mean confidence has a lag-1 autocorrelation of 0.93), so
    an i.i.d. bootstrap would see far less variation than another stretch of the same drive
    shows, and set the threshold too low. The draws are therefore circular runs of ``block``
    consecutive reference rows (a moving-block bootstrap; rows in ``image_id`` order when
    that column exists), the block length by default from the reference's own
    autocorrelation (:func:`_block_length`). That covers the variation within the
    reference's sequences only: an in-domain set from another sequence (another route, other
    light) can still differ by more, and raises the alarm more often than ``level`` (its
    score then measures a difference that is real for the model, not a corruption). A
    reference spanning many sequences is the remedy.

    Args:
        reference: Uncalibrated per-image rows of the calibration held-out images.
        images: Uncalibrated per-image rows of the set.
        level: The false-alarm rate aimed at, in (0, 1).
        seed: Seed of the bootstrap; the result is deterministic given it.
        n_boot: Number of bootstrap draws.
        block: Rows per bootstrap block (1: independent images); None picks it from the
            reference's autocorrelation.

    Returns:
        The :class:`Drift`.

    Raises:
        ValueError: On missing columns, empty frames or a ``level`` outside (0, 1).
    """
    cols = ("lf_n_pixels", "lf_conf_sum", "lf_entropy_sum")
    _check_frame(reference, "reference", cols)
    _check_frame(images, "images", cols)
    level = _check_level(level)
    if "image_id" in reference.columns:
        reference = reference.sort_values("image_id", kind="stable")
    ref, tgt = _drift_features(reference), _drift_features(images)
    if block is None:
        block = _block_length(ref)
    elif not isinstance(block, int) or block < 1:
        raise ValueError(f"Expected `block` to be a positive int or None, but got {block!r}")
    block = min(block, len(ref))
    scale = ref.std(0, ddof=1) if len(ref) > 1 else np.ones(ref.shape[1])
    scale = np.where(scale > 0, scale, 1.0)
    points = np.concatenate([ref, tgt]) / scale
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    n, m = len(ref), len(tgt)
    score = _energy(d, np.arange(n), np.arange(n, n + m))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for i in range(n_boot):
        stats[i] = _energy(d, _blocks(rng, n, n, block), _blocks(rng, n, m, block))
    threshold = float(np.quantile(stats, 1.0 - level, method="higher"))
    return Drift(score=score, threshold=threshold, alarm=bool(score > threshold))
