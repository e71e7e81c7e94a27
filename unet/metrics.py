"""Segmentation metrics (NumPy) for evaluating the U-Net (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597).

``pixel_error`` and ``adapted_rand_error`` are the ISBI 2012 EM challenge measures the paper reports;
``dice_per_class`` and ``iou_per_class`` are the usual overlap scores for layer segmentation.

Dice and IoU are computed over the POOLED pixels of everything passed in (e.g. a whole (N, H, W) test
set), i.e. from one confusion matrix, not as the mean of per-image scores; the two differ whenever
images have different amounts of a class. Rule for a class absent from both prediction and target
(0 / 0): the score is ``empty`` (default NaN, so ``np.nanmean`` skips it; pass ``empty=1.0`` to count
"nothing predicted, nothing there" as perfect).
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from skimage.metrics import adapted_rand_error as _skimage_adapted_rand_error

__all__ = [
    "adapted_rand_error",
    "confusion_matrix",
    "dice_per_class",
    "iou_per_class",
    "pixel_error",
    "scores_from_confusion",
]


def _as_label_pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both as integer arrays of the same shape, else TypeError/ValueError."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    for name, a in (("pred", pred), ("target", target)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise TypeError(f"{name} must hold integer labels, got dtype {a.dtype}")
    return pred, target


def confusion_matrix(pred: ArrayLike, target: ArrayLike, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts over all pixels; row = predicted class, column = true class."""
    pred, target = _as_label_pair(pred, target)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    for name, a in (("pred", pred), ("target", target)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}), got [{a.min()}, {a.max()}]")
    flat = pred.astype(np.int64).ravel() * num_classes + target.astype(np.int64).ravel()
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _tp_fp_fn(pred: ArrayLike, target: ArrayLike, num_classes: int) -> tuple[np.ndarray, ...]:
    """Per-class true positives, false positives and false negatives, each (num_classes,) float64."""
    cm = confusion_matrix(pred, target, num_classes).astype(np.float64)
    tp = np.diag(cm)
    return tp, cm.sum(axis=1) - tp, cm.sum(axis=0) - tp


def dice_per_class(
    pred: ArrayLike, target: ArrayLike, num_classes: int, empty: float = float("nan")
) -> np.ndarray:
    """Dice 2TP / (2TP + FP + FN) per class over the pooled pixels: (num_classes,) float64.

    pred, target: integer label arrays of the same, any shape. A class absent from both gets ``empty``.
    """
    tp, fp, fn = _tp_fp_fn(pred, target, num_classes)
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, empty)


def iou_per_class(
    pred: ArrayLike, target: ArrayLike, num_classes: int, empty: float = float("nan")
) -> np.ndarray:
    """IoU (Jaccard) TP / (TP + FP + FN) per class over the pooled pixels: (num_classes,) float64.

    pred, target: integer label arrays of the same, any shape. A class absent from both gets ``empty``.
    """
    tp, fp, fn = _tp_fp_fn(pred, target, num_classes)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, empty)


def pixel_error(pred: ArrayLike, target: ArrayLike) -> float:
    """Fraction of pixels whose label differs, in [0, 1] (the ISBI 2012 "pixel error")."""
    pred, target = _as_label_pair(pred, target)
    if pred.size == 0:
        raise ValueError("pixel_error needs at least one pixel, got empty arrays")
    return float(np.mean(pred != target))


def adapted_rand_error(pred: ArrayLike, target: ArrayLike) -> float:
    """Adapted Rand error (SNEMI3D / ISBI 2012) of label images, in [0, 1]; 0 for identical segmentations.

    Wraps ``skimage.metrics.adapted_rand_error(image_true=target, image_test=pred)`` and returns only the
    error. As in skimage, label 0 is background: pixels labelled 0 in ``target`` are ignored. Inputs are
    instance label images (e.g. connected components), not one-hot maps.
    """
    pred, target = _as_label_pair(pred, target)
    error, _precision, _recall = _skimage_adapted_rand_error(target, pred)
    return float(error)


def scores_from_confusion(cm: np.ndarray, empty: float = float("nan")) -> dict[str, np.ndarray | float]:
    """Pooled scores from a confusion matrix ``cm[pred, target]`` (summed over images or volumes).

    Returns per-class ``dice``, ``iou``, ``precision`` TP / (TP + FP) and ``recall`` TP / (TP + FN),
    each (K,) float64 with ``empty`` where the denominator is 0 (the rule above), and the scalar
    ``pixel_error`` (off-diagonal share; NaN for an empty matrix).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=1) - tp, cm.sum(axis=0) - tp

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, empty)

    total = cm.sum()
    return {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "pixel_error": float((total - tp.sum()) / total) if total > 0 else float("nan"),
    }
