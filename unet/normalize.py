"""Intensity normalisation of OCT B-scans that ignores the white fill region.

Registered and rotated Spectralis exports (and the Duke DME data) carry a saturated fill (255 in
uint8) where no tissue was imaged, typically in the top corners. It is not tissue: it must neither
shift the intensity statistics nor look like bright retina to the network.
"""
from __future__ import annotations


import numpy as np
from skimage import measure

__all__ = ["fill_mask", "normalize_bscan", "normalize_volume"]



def _saturation_value(bscan: np.ndarray) -> float:
    """The fill value: the dtype's maximum for integer B-scans, or the B-scan's own maximum when that
    sits in an image corner (12-bit data stored as uint16 fills with 4095) or the data are float."""
    if bscan.size == 0:
        return 0.0
    top = bscan.max()
    if not np.issubdtype(bscan.dtype, np.integer):
        return float(top)
    corners = bscan[[0, 0, -1, -1], [0, -1, 0, -1]]
    return float(top) if np.any(corners == top) else float(np.iinfo(bscan.dtype).max)


def fill_mask(bscan: np.ndarray, min_fraction: float = 0.001) -> np.ndarray:
    """Boolean (H, W) mask of the fill region: saturated pixels connected to the image border.

    A saturated component is fill when it contains an image corner (registration fill is a corner
    triangle, however small) or touches the border and covers at least ``min_fraction`` of the
    B-scan; bright tissue inside the image is never masked.
    """
    if bscan.ndim != 2:
        raise ValueError(f"expected a 2-D B-scan (H, W), got shape {bscan.shape}")
    saturated = bscan >= _saturation_value(bscan)
    if not saturated.any():
        return saturated
    components = measure.label(saturated, connectivity=1)
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    border = border[border > 0]
    corners = components[[0, 0, -1, -1], [0, -1, 0, -1]]
    sizes = np.bincount(components.ravel())
    keep = border[(sizes[border] >= min_fraction * bscan.size) | np.isin(border, corners)]
    return np.isin(components, keep)


def normalize_bscan(bscan: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Zero-mean, unit-variance float32 (H, W) over non-fill pixels; fill pixels become 0.

    ``mask`` is the fill mask (computed with :func:`fill_mask` when None).
    """
    mask = fill_mask(bscan) if mask is None else mask
    if mask.shape != bscan.shape:
        raise ValueError(f"fill mask shape {mask.shape} != B-scan shape {bscan.shape}")
    # float data in float64 (values near 3e38 or 1e-30 stay finite and resolved); integers in float32, faster
    x = bscan.astype(np.float64 if bscan.dtype.kind == "f" else np.float32)
    tissue = x[~mask]
    if tissue.size == 0:
        return np.zeros(x.shape, np.float32)
    mean = float(tissue.mean(dtype=np.float64))
    std = float(tissue.std(dtype=np.float64))
    x -= mean
    x /= std if std > 0 else 1.0  # a constant B-scan: all zeros
    x[mask] = 0.0
    return x.astype(np.float32, copy=False)


def normalize_volume(volume: np.ndarray) -> np.ndarray:
    """Normalise each B-scan of a (Z, H, W) volume independently -> float32 (Z, H, W)."""
    if volume.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) volume, got shape {volume.shape}")
    return np.stack([normalize_bscan(b) for b in volume]) if len(volume) else volume.astype(np.float32)
