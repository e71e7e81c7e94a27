"""Quality-control pictures: B-scans with their labels painted on, as uint8 RGB arrays and PNG files.

Pure NumPy + Pillow (no Prefect, no MLflow), so training (MLflow image artifacts) and segmentation
(PNGs beside the archive) draw the same pictures. Class 0 (background) is transparent; class ``c > 0``
gets its palette colour from :mod:`octseg.tasks.archive.classes`, the same colour the archive writes into its OME
``image-label`` metadata.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from octseg.tasks.archive.classes import CLASS_COLORS, palette_color

__all__ = ["CLASS_COLORS", "class_color", "grayscale", "overlay", "side_by_side", "save_png"]

SEPARATOR_RGB = (255, 255, 255)


def class_color(value: int, colors: Mapping[int, tuple[int, int, int]] | None = None) -> tuple[int, int, int]:
    """Colour of class ``value`` > 0: ``colors[value]`` if given, else the palette, cycling past class 6."""
    if colors is not None and value in colors:
        return tuple(int(c) for c in colors[value])
    return palette_color(value)


def grayscale(bscan: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Contrast-stretch an (H, W) image of any real dtype to uint8: the percentiles map to 0 and 255.

    NaNs become 0; a constant image becomes all 0.
    """
    img = np.asarray(bscan, dtype=np.float64)
    if img.ndim != 2 or 0 in img.shape:
        raise ValueError(f"bscan must be a non-empty (H, W) array, got shape {img.shape}")
    finite = np.isfinite(img)
    if not finite.any():
        return np.zeros(img.shape, dtype=np.uint8)
    lo, hi = np.percentile(img[finite], percentiles)
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.uint8)
    scaled = (np.where(finite, img, lo) - lo) / (hi - lo)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay(
    bscan: np.ndarray,
    labels: np.ndarray,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
    alpha: float = 0.4,
) -> np.ndarray:
    """uint8 RGB (H, W, 3): the contrast-stretched B-scan (H, W) with classes > 0 tinted.

    A pixel of class c > 0 becomes ``(1 - alpha) * gray + alpha * class_color(c)``; pixels of class 0
    (and negative "ignore" labels) keep their gray value in all three channels.
    """
    labels = np.asarray(labels)
    if labels.shape != np.shape(bscan):
        raise ValueError(f"labels shape {labels.shape} != bscan shape {np.shape(bscan)}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must hold integer classes, got dtype {labels.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    gray = grayscale(bscan)
    rgb = np.repeat(gray[..., None], 3, axis=2)  # (H, W, 3)
    for value in np.unique(labels):
        if value <= 0:
            continue
        mask = labels == value
        tint = np.asarray(class_color(int(value), colors), dtype=np.float64)
        blended = (1.0 - alpha) * rgb[mask].astype(np.float64) + alpha * tint
        rgb[mask] = np.round(blended).astype(np.uint8)
    return rgb


def side_by_side(
    bscan: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
    alpha: float = 0.4,
    separator: int = 2,
) -> np.ndarray:
    """uint8 RGB (H, 2 W + separator, 3): ground truth overlay left, prediction right, a white bar between."""
    left = overlay(bscan, truth, colors, alpha)
    right = overlay(bscan, pred, colors, alpha)
    bar = np.empty((left.shape[0], separator, 3), dtype=np.uint8)
    bar[...] = SEPARATOR_RGB
    return np.concatenate([left, bar, right], axis=1)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 RGB (H, W, 3) array as PNG, creating parent folders; returns the path."""
    from PIL import Image

    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) array, got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path
