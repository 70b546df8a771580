"""Evaluation metrics for classifiers and segmenters, and their scikit-learn scorers.

Classification metrics take class probabilities ``proba`` of shape ``(n_samples, n_classes)``
whose columns follow ``classes`` (the estimator's ``classes_``). ``y_true`` holds labels from
``classes``; when ``classes`` is not given it defaults to ``np.arange(n_classes)``, so ``y_true``
then holds column indices.

Segmentation metrics take integer masks of shape ``(N, H, W)`` or ``(H, W)`` holding class
indices in ``[0, n_classes)``; pixels whose truth is ``ignore_index`` are skipped.

All functions accept numpy arrays, array-likes and torch tensors (on any device) and return
plain Python floats or numpy arrays.

The scorers are callables ``scorer(estimator, X, y) -> float`` for ``GridSearchCV`` (greater is
better: losses are negated). They are not built with :func:`sklearn.metrics.make_scorer`, because
a ``make_scorer`` scorer neither hands the estimator's ``classes_`` to the metric nor keeps both
columns of a binary ``predict_proba``; ours read ``classes_`` from the estimator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from ._io import atomic_write
from ._validation import as_numpy
from .exceptions import ConfigError, DataError

__all__ = [
    "CalibrationBins",
    "SCORERS",
    "accuracy",
    "accuracy_scorer",
    "brier_score",
    "brier_scorer",
    "calibration_bins",
    "comparison_chart",
    "ece_scorer",
    "expected_calibration_error",
    "get_scorer",
    "mean_iou",
    "miou_scorer",
    "negative_log_likelihood",
    "nll_scorer",
    "per_class_iou",
    "pixel_accuracy",
    "pixel_accuracy_scorer",
    "reliability_diagram",
    "segmentation_confusion_matrix",
    "IGNORE_TARGET",
    "encode_masks",
    "iou_from_confusion",
    "mean_iou_from_confusion",
    "pixel_accuracy_from_confusion",
]

#: Index of ignored pixels in encoded masks: ``nn.CrossEntropyLoss``'s default ``ignore_index``.
IGNORE_TARGET = -100

# Rows of float16/float32 softmax outputs sum to 1 only up to rounding; logits or unnormalised
# scores are off by far more than this.
_ROW_SUM_ATOL = 1e-3
_NUMERIC_KINDS = "biuf"


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _preview(values: np.ndarray, limit: int = 10) -> str:
    items = [repr(v) for v in values[:limit].tolist()]
    return "[" + ", ".join(items) + (", ..." if len(values) > limit else "") + "]"


def _check_proba(proba: Any) -> np.ndarray:
    p = as_numpy(proba)
    if p.ndim != 2:
        raise DataError(
            f"proba must be 2-D of shape (n_samples, n_classes), got shape {p.shape}; "
            "for a binary problem pass both columns of predict_proba"
        )
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise DataError(f"proba must have at least one sample and one class, got shape {p.shape}")
    if p.dtype.kind not in "iuf":
        raise DataError(f"proba must hold numbers, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if not np.isfinite(p).all():
        row = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise DataError(f"proba holds non-finite values (first in row {row}: {p[row].tolist()})")
    if (p < 0).any():
        row = int(np.flatnonzero((p < 0).any(axis=1))[0])
        raise DataError(
            f"proba holds negative values (first in row {row}: {p[row].tolist()}); "
            "expected probabilities, e.g. from predict_proba or a softmax"
        )
    sums = p.sum(axis=1)
    off = np.abs(sums - 1.0) > _ROW_SUM_ATOL
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise DataError(
            f"proba rows must sum to 1 (within {_ROW_SUM_ATOL:g}); row {row} sums to {sums[row]:.6g}. "
            "Pass probabilities (apply a softmax to logits), not scores"
        )
    return p


def _check_classes(classes: Any, n_classes: int) -> np.ndarray:
    if classes is None:
        return np.arange(n_classes)
    c = as_numpy(classes)
    if c.ndim != 1:
        raise DataError(f"classes must be 1-D, got shape {c.shape}")
    if len(c) != n_classes:
        raise DataError(
            f"classes has {len(c)} labels but proba has {n_classes} columns (proba shape (n, {n_classes}), "
            f"classes shape {c.shape}); pass the estimator's classes_, one label per column"
        )
    if len(set(c.tolist())) != len(c):
        raise DataError(f"classes must not repeat a label, got {_preview(c)}")
    return c


def _positions(y: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The index in ``classes`` of every value of ``y``, and whether the value is in ``classes`` at all."""
    if y.dtype.kind in _NUMERIC_KINDS and classes.dtype.kind in _NUMERIC_KINDS:
        # Sorted look-up: fast enough for segmentation masks with millions of pixels.
        order = np.argsort(classes, kind="stable")
        ordered = classes[order]
        pos = np.minimum(np.searchsorted(ordered, y), len(ordered) - 1)
        return order[pos], ordered[pos] == y
    lookup = {c: i for i, c in enumerate(classes.tolist())}
    flat = np.fromiter((lookup.get(v, -1) for v in y.ravel().tolist()), dtype=np.int64, count=y.size)
    idx = flat.reshape(y.shape)
    return idx, idx >= 0


def _label_indices(y: np.ndarray, classes: np.ndarray, *, what: str = "y_true", default: bool = False) -> np.ndarray:
    """Map labels to column indices; raise naming the first label not in ``classes``."""
    y = as_numpy(y)
    idx, found = _positions(y, classes)
    if not found.all():
        first = y[~found].ravel()[0]
        first = first.item() if hasattr(first, "item") else first
        if default:
            hint = (f"without classes=, {what} must hold column indices 0..{len(classes) - 1}; "
                    "pass classes= (e.g. the estimator's classes_) to use labels")
        else:
            hint = f"known labels are {_preview(classes)}"
        raise DataError(f"{what} contains label {first!r} that is not in classes; {hint}")
    return idx.astype(np.int64, copy=False)


def _prepare_proba_inputs(y_true: Any, proba: Any, classes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(true column index per sample, proba as float64)``."""
    p = _check_proba(proba)
    y = as_numpy(y_true)
    if y.ndim != 1 or len(y) != p.shape[0]:
        raise DataError(
            f"y_true must be 1-D with one label per row of proba; got y_true shape {y.shape} "
            f"and proba shape {p.shape}"
        )
    c = _check_classes(classes, p.shape[1])
    return _label_indices(y, c, default=classes is None), p


def _check_n_bins(n_bins: Any) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ConfigError(f"n_bins={n_bins!r} is not valid; expected an integer >= 1 (15 is usual)")
    return int(n_bins)


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of predictions equal to the truth.

    Parameters
    ----------
    y_true, y_pred : array-like or torch.Tensor of the same shape
        Labels of any type (numbers or strings).

    Returns
    -------
    float
        ``mean(y_true == y_pred)``, in ``[0, 1]``.

    Raises
    ------
    DataError
        If the shapes differ or the inputs are empty.

    Examples
    --------
    >>> accuracy(["cat", "dog", "dog"], ["cat", "dog", "cat"])
    0.6666666666666666
    """
    t, p = as_numpy(y_true), as_numpy(y_pred)
    if t.shape != p.shape:
        raise DataError(f"y_true and y_pred must have the same shape, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise DataError("y_true and y_pred are empty; accuracy needs at least one sample")
    return float(np.mean(t == p))


def negative_log_likelihood(y_true: Any, proba: Any, *, classes: Any = None, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (cross-entropy, natural log) of the true labels.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, taken from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities; each row sums to 1, columns follow ``classes``.
    classes : array-like of shape (n_classes,), default=None
        The label of each column of ``proba`` (an estimator's ``classes_``). ``None`` means
        ``np.arange(n_classes)``: ``y_true`` then holds column indices.
    eps : float, default=1e-12
        The probability of the true class is clipped to ``[eps, 1]`` so that a confident
        mistake costs ``-log(eps)`` (about 27.6 nats) rather than infinity.

    Returns
    -------
    float
        ``mean_i -log(max(proba[i, y_i], eps))``, in nats.

    Raises
    ------
    DataError
        If shapes disagree, ``proba`` is not a probability matrix, or ``y_true`` holds a label
        not in ``classes``.
    ConfigError
        If ``eps`` is not in ``(0, 1)``.

    Examples
    --------
    >>> proba = [[0.9, 0.1], [0.2, 0.8]]
    >>> round(negative_log_likelihood(["a", "b"], proba, classes=["a", "b"]), 6)
    0.164252
    """
    if isinstance(eps, bool) or not (isinstance(eps, (int, float, np.floating)) and 0.0 < eps < 1.0):
        raise ConfigError(f"eps={eps!r} is not valid; expected a float in (0, 1), e.g. 1e-12")
    idx, p = _prepare_proba_inputs(y_true, proba, classes)
    p_true = np.clip(p[np.arange(len(idx)), idx], eps, 1.0)
    return float(-np.mean(np.log(p_true)))


def brier_score(y_true: Any, proba: Any, *, classes: Any = None) -> float:
    """Multi-class Brier score: mean over samples of the squared error summed over classes.

    ``mean_i sum_k (proba[i, k] - [y_i == k])**2``, in ``[0, 2]``. This is the original
    definition (Brier, 1950). For two classes it is twice the usual binary Brier score
    ``mean_i (p_i - y_i)**2`` (what :func:`sklearn.metrics.brier_score_loss` reports by default
    for binary targets); for three or more classes it equals sklearn's.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, taken from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities; columns follow ``classes``.
    classes : array-like of shape (n_classes,), default=None
        The label of each column; ``None`` means ``np.arange(n_classes)``.

    Returns
    -------
    float

    Raises
    ------
    DataError
        As :func:`negative_log_likelihood`.

    Examples
    --------
    >>> round(brier_score([0, 1], [[0.9, 0.1], [0.2, 0.8]]), 6)
    0.05
    """
    idx, p = _prepare_proba_inputs(y_true, proba, classes)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(idx)), idx] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


class CalibrationBins(NamedTuple):
    """Per-bin summary of top-label confidence, as returned by :func:`calibration_bins`.

    Attributes
    ----------
    edges : ndarray of shape (n_bins + 1,)
        ``np.linspace(0, 1, n_bins + 1)``.
    confidence : ndarray of shape (n_bins,)
        Mean top-label probability of the samples in each bin (NaN for empty bins).
    accuracy : ndarray of shape (n_bins,)
        Fraction of those samples whose top-label prediction is right (NaN for empty bins).
    count : ndarray of shape (n_bins,)
        Number of samples in each bin.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def calibration_bins(y_true: Any, proba: Any, *, classes: Any = None, n_bins: int = 15) -> CalibrationBins:
    """Group samples by top-label confidence into equal-width bins.

    The prediction is the column of largest probability (the first one on ties) and its
    probability is the confidence. Bin ``b`` covers ``(edges[b], edges[b + 1]]`` with
    ``edges = np.linspace(0, 1, n_bins + 1)``; the first bin also includes 0. A confidence
    equal to an edge therefore falls in the bin below it (comparisons use the float edges).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, taken from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities; columns follow ``classes``.
    classes : array-like of shape (n_classes,), default=None
        The label of each column; ``None`` means ``np.arange(n_classes)``.
    n_bins : int, default=15
        Number of bins, at least 1.

    Returns
    -------
    CalibrationBins
        ``(edges, confidence, accuracy, count)``.

    Raises
    ------
    ConfigError
        If ``n_bins`` is not an integer >= 1.
    DataError
        As :func:`negative_log_likelihood`.

    Examples
    --------
    >>> bins = calibration_bins([0, 1, 1], [[0.9, 0.1], [0.7, 0.3], [0.5, 0.5]], n_bins=2)
    >>> bins.count.tolist(), bins.accuracy.tolist()
    ([1, 2], [0.0, 0.5])
    """
    n_bins = _check_n_bins(n_bins)
    idx, p = _prepare_proba_inputs(y_true, proba, classes)
    pred = np.argmax(p, axis=1)
    conf = p[np.arange(len(pred)), pred]
    correct = (pred == idx).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" puts a value equal to an edge in the bin below: bins are (lo, hi].
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(which, weights=correct, minlength=n_bins) / count
    return CalibrationBins(edges, mean_conf, mean_acc, count)


def _ece_from_bins(bins: CalibrationBins) -> float:
    filled = bins.count > 0
    weights = bins.count[filled] / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy[filled] - bins.confidence[filled])))


def expected_calibration_error(y_true: Any, proba: Any, *, classes: Any = None, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width confidence bins.

    ``ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|`` over the non-empty bins of
    :func:`calibration_bins` (bins ``(lo, hi]``, the first one including 0), as in Guo et al.,
    "On Calibration of Modern Neural Networks" (2017).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, taken from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities; columns follow ``classes``.
    classes : array-like of shape (n_classes,), default=None
        The label of each column; ``None`` means ``np.arange(n_classes)``.
    n_bins : int, default=15
        Number of equal-width bins over ``[0, 1]``, at least 1.

    Returns
    -------
    float
        In ``[0, 1]``; 0 is perfectly calibrated.

    Raises
    ------
    ConfigError
        If ``n_bins`` is not an integer >= 1.
    DataError
        As :func:`negative_log_likelihood`.

    Examples
    --------
    >>> proba = [[0.9, 0.1], [0.7, 0.3], [0.5, 0.5]]
    >>> round(expected_calibration_error([0, 1, 1], proba, n_bins=2), 6)
    0.366667
    """
    return _ece_from_bins(calibration_bins(y_true, proba, classes=classes, n_bins=n_bins))


def _load_figure_class() -> tuple[type, type]:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            'reliability diagrams need matplotlib; install it with: pip install "sklearn-bayes-transfer[plot]"'
        ) from None
    return Figure, FigureCanvasAgg


def comparison_chart(names: Sequence[str], means: Sequence[float], spreads: Sequence[float],
                     path: str | os.PathLike, *, xlabel: str = "test accuracy (mean and std over seeds)",
                     overwrite: bool = True) -> Path:
    """A horizontal bar chart of ``means`` with ``spreads`` as error bars, one bar per name, as PNG.

    Needs matplotlib (``pip install "sklearn-bayes-transfer[plot]"``); the file is written atomically.

    Examples
    --------
    >>> comparison_chart(["standard", "prior"], [0.80, 0.83], [0.02, 0.01], "chart.png")   # doctest: +SKIP
    """
    figure_class, canvas_class = _load_figure_class()
    fig = figure_class(figsize=(7, 0.45 * len(names) + 1.2))
    canvas_class(fig)
    ax = fig.add_subplot(1, 1, 1)
    positions = list(range(len(names)))
    ax.barh(positions, list(means), xerr=list(spreads), color="#4c72b0", capsize=3)
    ax.set_yticks(positions, list(names))
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    low = min(means, default=0.0)
    ax.set_xlim(max(0.0, low - 0.1), 1.0)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite=overwrite)


def reliability_diagram(
    y_true: Any,
    proba: Any,
    path: str | os.PathLike,
    *,
    classes: Any = None,
    n_bins: int = 15,
    title: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a reliability diagram (accuracy against confidence per bin) as a PNG file.

    The top panel shows each bin's accuracy as a bar, the gap to its mean confidence, and the
    diagonal of perfect calibration; the bottom panel shows how many samples fall in each bin.
    The bins are those of :func:`calibration_bins`, and the ECE shown is
    :func:`expected_calibration_error` of the same bins. The file is written atomically.
    Matplotlib is imported only here, and drawn with its Agg canvas (no display, no global
    backend change).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels, taken from ``classes``.
    proba : array-like of shape (n_samples, n_classes)
        Predicted probabilities; columns follow ``classes``.
    path : str or os.PathLike
        Output file; PNG is written whatever its suffix.
    classes : array-like of shape (n_classes,), default=None
        The label of each column; ``None`` means ``np.arange(n_classes)``.
    n_bins : int, default=15
        Number of equal-width bins, at least 1.
    title : str, default=None
        Figure title; ``None`` gives "Reliability diagram".
    overwrite : bool, default=True
        If False and ``path`` exists, raise :class:`OutputExistsError`.

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    ConfigError
        If matplotlib is not installed (``pip install "sklearn-bayes-transfer[plot]"``) or
        ``n_bins`` is invalid.
    DataError
        As :func:`negative_log_likelihood`.

    Examples
    --------
    >>> reliability_diagram([0, 1], [[0.8, 0.2], [0.3, 0.7]], "reliability.png")  # doctest: +SKIP
    PosixPath('reliability.png')
    """
    bins = calibration_bins(y_true, proba, classes=classes, n_bins=n_bins)
    ece = _ece_from_bins(bins)
    Figure, FigureCanvasAgg = _load_figure_class()

    fig = Figure(figsize=(5.0, 6.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_count = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    left, width = bins.edges[:-1], np.diff(bins.edges)
    filled = bins.count > 0
    acc, conf = bins.accuracy[filled], bins.confidence[filled]
    ax.bar(left[filled], acc, width=width[filled], align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar(left[filled], conf - acc, bottom=acc, width=width[filled], align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to mean confidence")
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("accuracy")
    ax.set_title(title if title is not None else "Reliability diagram")
    ax.legend(loc="upper left", title=f"ECE = {ece:.4f} ({bins.count.sum()} samples)")
    ax_count.bar(left, bins.count, width=width, align="edge", color="grey", edgecolor="black", linewidth=0.5)
    ax_count.set_xlabel("confidence (top-label probability)")
    ax_count.set_ylabel("samples")

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


def _check_mask_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = as_numpy(y_true), as_numpy(y_pred)
    if t.shape != p.shape:
        raise DataError(f"y_true and y_pred masks must have the same shape, got {t.shape} and {p.shape}")
    if t.ndim not in (2, 3):
        raise DataError(f"masks must have shape (N, H, W) or (H, W), got shape {t.shape}")
    if t.size == 0:
        raise DataError(f"masks are empty (shape {t.shape})")
    return t, p


def _check_integer_mask(mask: np.ndarray, what: str) -> np.ndarray:
    if mask.dtype.kind not in "biu":
        raise DataError(
            f"{what} must hold integer class indices, got dtype {mask.dtype}; "
            "cast it with .astype(np.int64) (or pass predicted indices, e.g. proba.argmax(1))"
        )
    return mask.astype(np.int64, copy=False)


def _check_segmentation_config(n_classes: Any, ignore_index: Any) -> int:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ConfigError(f"n_classes={n_classes!r} is not valid; expected an integer >= 1")
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise ConfigError(f"ignore_index={ignore_index!r} is not valid; expected an integer or None")
        if 0 <= ignore_index < n_classes:
            raise ConfigError(
                f"ignore_index={ignore_index} is also a class index (n_classes={n_classes}); "
                "use a value outside [0, n_classes), e.g. 255, or None to count every pixel"
            )
    return int(n_classes)


def _first_out_of_range(values: np.ndarray, n_classes: int, what: str) -> None:
    bad = (values < 0) | (values >= n_classes)
    if bad.any():
        raise DataError(
            f"{what} contains value {int(values[bad][0])}, outside the class indices [0, {n_classes}); "
            "check n_classes, or set ignore_index to the value that marks pixels to skip"
        )


def _confusion_from_indices(t: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    flat = t * n_classes + p
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def encode_masks(masks: Any, classes: Any, ignore_index: int | None = None, *,
                 where: Callable[[int], str] = lambda n: f"mask {n}") -> np.ndarray:
    """Mask values -> indices of ``classes``, ``ignore_index`` -> :data:`IGNORE_TARGET`.

    Any other value is refused with a :class:`DataError` naming it, where it first occurs
    (``where(n)`` describes mask ``n``: ``"y[3]"``, a file name) and what to do.

    Examples
    --------
    >>> encode_masks(np.array([[[0, 7, 255]]]), [0, 7], ignore_index=255).tolist()
    [[[0, 1, -100]]]
    """
    masks, classes = as_numpy(masks), as_numpy(classes)
    index, known = _positions(masks, classes)
    ignored = masks == ignore_index if ignore_index is not None else np.zeros(masks.shape, dtype=bool)
    unknown = ~known & ~ignored
    if unknown.any():
        n, *position = (int(v) for v in np.argwhere(unknown)[0])
        at = f" (row {position[-2]}, column {position[-1]})" if len(position) >= 2 else ""
        value = masks[unknown].ravel()[0]
        nor = f" nor ignore_index={ignore_index}" if ignore_index is not None else ""
        raise DataError(f"{where(n)} holds the value {value.item() if hasattr(value, 'item') else value}{at}, which "
                        f"is not one of the classes {_preview(classes)}{nor}; list every class id in classes, or "
                        "mark such pixels with ignore_index")
    return np.where(ignored, IGNORE_TARGET, index).astype(np.int64)


def segmentation_confusion_matrix(
    y_true: Any, y_pred: Any, n_classes: int, *, ignore_index: int | None = 255
) -> np.ndarray:
    """Pixel confusion matrix of two integer masks.

    Parameters
    ----------
    y_true : array-like or torch.Tensor of shape (N, H, W) or (H, W)
        True class indices in ``[0, n_classes)``, or ``ignore_index``.
    y_pred : array-like or torch.Tensor of the same shape
        Predicted class indices in ``[0, n_classes)``.
    n_classes : int
        Number of classes.
    ignore_index : int or None, default=255
        Pixels whose truth equals it are skipped entirely (their prediction is not read).
        ``None`` counts every pixel. Must lie outside ``[0, n_classes)``.

    Returns
    -------
    ndarray of shape (n_classes, n_classes), dtype int64
        ``C[i, j]`` = number of counted pixels of true class ``i`` predicted as ``j``.

    Raises
    ------
    DataError
        If the shapes differ, a mask is not integer, or a counted pixel of either mask lies
        outside ``[0, n_classes)`` (the message names the value).
    ConfigError
        If ``n_classes`` or ``ignore_index`` is invalid.

    Examples
    --------
    >>> segmentation_confusion_matrix([[0, 1, 255]], [[0, 0, 1]], 2).tolist()
    [[1, 0], [1, 0]]
    """
    n = _check_segmentation_config(n_classes, ignore_index)
    t, p = _check_mask_pair(y_true, y_pred)
    t = _check_integer_mask(t, "y_true").ravel()
    p = _check_integer_mask(p, "y_pred").ravel()
    if ignore_index is not None:
        counted = t != ignore_index
        t, p = t[counted], p[counted]
    _first_out_of_range(t, n, "y_true")
    _first_out_of_range(p, n, "y_pred")
    return _confusion_from_indices(t, p, n)


def iou_from_confusion(cm: Any) -> np.ndarray:
    """Per-class IoU ``C[i, i] / (row i + column i - C[i, i])`` of a confusion matrix; NaN for a
    class absent from both truth and prediction.

    Examples
    --------
    >>> iou_from_confusion(np.array([[2, 1], [0, 0]])).round(3).tolist()
    [0.667, 0.0]
    """
    cm = as_numpy(cm)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou_from_confusion(cm: Any) -> float:
    """Mean of :func:`iou_from_confusion` over the classes present in truth or prediction.

    Raises
    ------
    DataError
        If the matrix counts no pixel.
    """
    iou = iou_from_confusion(cm)
    if np.isnan(iou).all():
        raise DataError("no pixel was counted (every pixel of y_true is ignore_index); mean IoU is undefined")
    return float(np.nanmean(iou))


def pixel_accuracy_from_confusion(cm: Any) -> float:
    """Fraction of the counted pixels on the diagonal of a confusion matrix.

    Raises
    ------
    DataError
        If the matrix counts no pixel.
    """
    cm = as_numpy(cm)
    total = cm.sum()
    if total == 0:
        raise DataError("no pixel was counted (every pixel of y_true is ignore_index); pixel accuracy is undefined")
    return float(np.trace(cm) / total)


def per_class_iou(y_true: Any, y_pred: Any, n_classes: int, *, ignore_index: int | None = 255) -> np.ndarray:
    """Intersection over union of each class, ``TP / (TP + FP + FN)`` over counted pixels.

    Parameters
    ----------
    y_true, y_pred, n_classes, ignore_index
        As :func:`segmentation_confusion_matrix`.

    Returns
    -------
    ndarray of shape (n_classes,), dtype float64
        NaN for a class absent from both truth and prediction (after ignoring pixels), whose
        IoU is undefined.

    Raises
    ------
    DataError, ConfigError
        As :func:`segmentation_confusion_matrix`.

    Examples
    --------
    >>> per_class_iou([[0, 0, 1]], [[0, 1, 1]], 3).tolist()
    [0.5, 0.5, nan]
    """
    return iou_from_confusion(segmentation_confusion_matrix(y_true, y_pred, n_classes, ignore_index=ignore_index))


def mean_iou(y_true: Any, y_pred: Any, n_classes: int, *, ignore_index: int | None = 255) -> float:
    """Mean intersection over union over classes (mIoU).

    The mean is taken over classes present in the truth or the prediction (after ignoring
    pixels): classes absent from both have an undefined IoU (NaN in :func:`per_class_iou`) and
    are excluded, rather than counted as 0 or 1. The IoU of each class pools all pixels of all
    ``N`` masks (it is not a mean of per-image IoUs).

    Parameters
    ----------
    y_true, y_pred, n_classes, ignore_index
        As :func:`segmentation_confusion_matrix`.

    Returns
    -------
    float
        In ``[0, 1]``.

    Raises
    ------
    DataError
        As :func:`segmentation_confusion_matrix`, or if every pixel is ignored.
    ConfigError
        As :func:`segmentation_confusion_matrix`.

    Examples
    --------
    >>> mean_iou([[0, 0, 1]], [[0, 1, 1]], 3)
    0.5
    """
    return mean_iou_from_confusion(segmentation_confusion_matrix(y_true, y_pred, n_classes, ignore_index=ignore_index))


def pixel_accuracy(y_true: Any, y_pred: Any, n_classes: int, *, ignore_index: int | None = 255) -> float:
    """Fraction of counted pixels (truth not ``ignore_index``) predicted correctly.

    Parameters
    ----------
    y_true, y_pred, n_classes, ignore_index
        As :func:`segmentation_confusion_matrix`.

    Returns
    -------
    float
        In ``[0, 1]``.

    Raises
    ------
    DataError
        As :func:`segmentation_confusion_matrix`, or if every pixel is ignored.
    ConfigError
        As :func:`segmentation_confusion_matrix`.

    Examples
    --------
    >>> pixel_accuracy([[0, 0, 1, 255]], [[0, 1, 1, 0]], 2)
    0.6666666666666666
    """
    return pixel_accuracy_from_confusion(
        segmentation_confusion_matrix(y_true, y_pred, n_classes, ignore_index=ignore_index)
    )


# --------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------


class _PredictScorer:
    """``scorer(estimator, X, y)`` comparing ``estimator.predict(X)`` with ``y`` by label."""

    def __init__(self, metric: Callable[[Any, Any], float], name: str):
        self._metric, self._name = metric, name

    def __call__(self, estimator: Any, X: Any, y_true: Any) -> float:
        return self._metric(y_true, as_numpy(estimator.predict(X)))

    def __repr__(self) -> str:
        return f"{self._name}_scorer"


class _ProbaScorer:
    """``scorer(estimator, X, y) = -metric(y, estimator.predict_proba(X), classes=estimator.classes_)``."""

    def __init__(self, metric: Callable[..., float], name: str):
        self._metric, self._name = metric, name

    def __call__(self, estimator: Any, X: Any, y_true: Any) -> float:
        classes = getattr(estimator, "classes_", None)
        if classes is None:
            raise ConfigError(
                f"{self!r} needs a fitted classifier with classes_ (the label of each predict_proba "
                f"column); {type(estimator).__name__} has none"
            )
        return -self._metric(y_true, as_numpy(estimator.predict_proba(X)), classes=classes)

    def __repr__(self) -> str:
        return f"{self._name}_scorer"


class _SegmentationScorer:
    """``scorer(estimator, X, y)`` for a segmenter whose ``predict`` returns label masks.

    Labels of ``y`` and of the predictions are mapped to indices through ``classes_``; pixels of
    ``y`` equal to the estimator's ``ignore_index`` (a raw value of ``y``, outside ``classes_``;
    ``None`` or absent means count every pixel) are skipped.
    """

    def __init__(self, from_confusion: Callable[[np.ndarray], float], name: str):
        self._from_confusion, self._name = from_confusion, name

    def __call__(self, estimator: Any, X: Any, y_true: Any) -> float:
        classes = getattr(estimator, "classes_", None)
        if classes is None:
            raise ConfigError(
                f"{self!r} needs a fitted segmenter with classes_ (the label values of the masks); "
                f"{type(estimator).__name__} has none"
            )
        classes = as_numpy(classes)
        ignore = getattr(estimator, "ignore_index", None)
        if ignore is not None and ignore in set(classes.tolist()):
            raise ConfigError(
                f"the estimator's ignore_index={ignore!r} is also one of its classes_ {_preview(classes)}; "
                "choose an ignore value that no class uses"
            )
        t, p = _check_mask_pair(y_true, estimator.predict(X))
        counted = np.ones(t.shape, dtype=bool) if ignore is None else (t != ignore)
        t_idx = _label_indices(t[counted], classes, what="y (true masks)")
        p_idx = _label_indices(p[counted], classes, what="the predicted masks")
        return self._from_confusion(_confusion_from_indices(t_idx, p_idx, len(classes)))

    def __repr__(self) -> str:
        return f"{self._name}_scorer"


accuracy_scorer = _PredictScorer(accuracy, "accuracy")
nll_scorer = _ProbaScorer(negative_log_likelihood, "neg_nll")
ece_scorer = _ProbaScorer(expected_calibration_error, "neg_ece")
brier_scorer = _ProbaScorer(brier_score, "neg_brier")
miou_scorer = _SegmentationScorer(mean_iou_from_confusion, "miou")
pixel_accuracy_scorer = _SegmentationScorer(pixel_accuracy_from_confusion, "pixel_accuracy")

#: Scorers by name, for ``GridSearchCV(scoring=...)`` and the CLI. Greater is better for all:
#: ``neg_*`` are negated losses. Read-only.
SCORERS: Mapping[str, Callable[[Any, Any, Any], float]] = MappingProxyType({
    "accuracy": accuracy_scorer,
    "neg_nll": nll_scorer,
    "neg_ece": ece_scorer,
    "neg_brier": brier_scorer,
    "miou": miou_scorer,
    "pixel_accuracy": pixel_accuracy_scorer,
})


def get_scorer(name: str) -> Callable[[Any, Any, Any], float]:
    """Return the scorer called ``name`` (see :data:`SCORERS`).

    Parameters
    ----------
    name : str
        One of ``"accuracy"``, ``"neg_nll"``, ``"neg_ece"``, ``"neg_brier"`` (classifiers) or
        ``"miou"``, ``"pixel_accuracy"`` (segmenters).

    Returns
    -------
    callable
        ``scorer(estimator, X, y) -> float``, greater is better.

    Raises
    ------
    ConfigError
        If ``name`` is unknown (the message lists the known names).

    Examples
    --------
    >>> get_scorer("neg_nll")
    neg_nll_scorer
    """
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(k) for k in SCORERS)
        raise ConfigError(f"scoring={name!r} is not a known scorer; expected one of {known}") from None
