"""Post-processing of predicted labels, and nnU-Net's rule for choosing it on out-of-fold predictions.

The one post-processing step here: foreground components (8-connected, per B-scan) smaller than
``min_size`` pixels become background. Whether it is applied, and with which ``min_size``, is decided
from cross-validation predictions only: a candidate is kept only if it raises the pooled out-of-fold
Dice of the foreground class above what no post-processing gives (nnU-Net's rule). The chosen value is
saved with the model, so ``octseg segment`` applies exactly what was chosen.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from octseg.unet.config import PostprocessConfig

__all__ = ["MIN_SIZE_CANDIDATES", "choose_postprocess", "postprocess", "remove_small_components"]

MIN_SIZE_CANDIDATES = (0, 10, 25, 50, 100, 200, 400, 800)
"""Component sizes (pixels of the B-scan) tried by :func:`choose_postprocess`; 0 = no post-processing."""

_EIGHT = np.ones((3, 3), dtype=bool)


def remove_small_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels (H, W) or (Z, H, W) with every foreground component (8-connected within a B-scan, one class
    at a time) of fewer than ``min_size`` pixels set to background (0). A copy; ``min_size`` <= 1 keeps all."""
    labels = np.asarray(labels)
    if min_size <= 1:
        return labels.copy()
    out = labels.copy()
    for bscan in out.reshape(-1, *labels.shape[-2:]):  # views into ``out``
        for k in np.unique(bscan):
            if k == 0:
                continue
            comp, n = ndimage.label(bscan == k, structure=_EIGHT)
            if n:
                sizes = np.bincount(comp.ravel())
                small = sizes < min_size
                small[0] = False
                bscan[small[comp]] = 0
    return out


def postprocess(labels: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """``labels`` after the post-processing ``cfg`` describes (unchanged, not copied, when it is none)."""
    return remove_small_components(labels, cfg.min_size) if cfg.min_size > 1 else labels


def _pooled_dice(pairs: Iterable[tuple[np.ndarray, np.ndarray]], foreground: int) -> float:
    tp = fp = fn = 0
    for pred, truth in pairs:
        p, t = pred == foreground, truth == foreground
        tp += int((p & t).sum())
        fp += int((p & ~t).sum())
        fn += int((~p & t).sum())
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")


def choose_postprocess(predictions: Mapping[str, np.ndarray], truths: Mapping[str, np.ndarray],
                       candidates: Sequence[int] = MIN_SIZE_CANDIDATES,
                       foreground: int = 1) -> tuple[PostprocessConfig, dict[int, float]]:
    """The post-processing that maximises the pooled Dice of ``foreground`` over ``predictions`` (labels per
    volume, out of fold) against ``truths``; none unless a candidate does strictly better than none.

    Returns the choice and the pooled Dice of every candidate (``{min_size: dice}``).
    """
    scores = {int(m): _pooled_dice(((remove_small_components(predictions[v], m), truths[v]) for v in predictions),
                                   foreground) for m in candidates}
    base = scores.get(0, _pooled_dice(((predictions[v], truths[v]) for v in predictions), foreground))
    best = max(scores, key=lambda m: (scores[m], -m))
    return PostprocessConfig(min_size=best if scores[best] > base else 0), scores
