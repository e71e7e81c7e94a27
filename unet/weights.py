"""Pixel-wise loss weights of the U-Net (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

``w_c`` balances the class frequencies; the second ("border") term makes the network learn the thin
background gaps that separate touching instances (cells in EM, fluid pockets in OCT). ``d1``/``d2``
are the Euclidean distances, in pixels, from ``x`` to the closest pixel of the nearest and of the
second-nearest instance. As in the paper, the border term is added on background pixels only.

:func:`border_weight_map` is the fast, exact-to-a-tolerance version used by the pipeline;
:func:`border_weight_map_reference` is the obvious brute force (one full-image distance transform
per instance) that tests and ``benchmarks/weights.py`` compare it against.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
from octseg.unet.config import WeightMapConfig
from scipy import ndimage as ndi

try:  # the C routine behind ndi.distance_transform_edt(..., return_indices=True), see _feature_transform
    from scipy.ndimage._nd_image import (
        euclidean_feature_transform as _feature_transform_c,
    )
except ImportError:  # pragma: no cover - private scipy module moved: use the public wrapper
    _feature_transform_c = None

__all__ = [
    "BORDER_TOLERANCE",
    "border_weight_map",
    "border_weight_map_reference",
    "border_weight_map_volume",
]

_PAPER = WeightMapConfig()  # w0 = 10, sigma = 5 px
log = logging.getLogger(__name__)

BORDER_TOLERANCE = 1e-3
"""Largest border term (same unit as the weights) that :func:`border_weight_map` may drop."""

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_BINCOUNT_LIMIT = 1 << 16  # class ids up to this use np.bincount, larger ones np.unique
_PAIR_BLOCK = 256  # boxes per block of the pair search in _needed_windows

ClassWeights = str | Mapping[int, float] | None
Boxes = list[tuple[int, tuple[slice, ...]]]  # (instance id, bounding box) per present instance
TwoNearest = Callable[[np.ndarray, Boxes, float], tuple[np.ndarray, np.ndarray]]


def _as_id_map(array: object, name: str, ndim: int) -> np.ndarray:
    """Validate an id map (class or instance ids >= 0); returns an integer array castable to int64."""
    arr = np.asarray(array)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise TypeError(f"{name} must hold integer ids, got non-integral {arr.dtype} values")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer (or integral float) array, got dtype {arr.dtype}")
    if arr.min() < 0:
        raise ValueError(f"{name} must be >= 0 (0 = background/none), got minimum {arr.min()}")
    if arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} ids must fit in int64, got maximum {arr.max()}")
    if np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint64:
        return arr  # kept as is: bincount, label and find_objects take any such integer dtype
    return arr.astype(np.int64)


def _check_params(w0: float, sigma: float) -> tuple[float, float]:
    """Validate the border-term amplitude w0 (>= 0) and width sigma (> 0, pixels)."""
    try:
        w0, sigma = float(w0), float(sigma)
    except (TypeError, ValueError) as e:
        raise TypeError(f"w0 and sigma must be real numbers, got {w0!r} and {sigma!r}") from e
    if not (math.isfinite(w0) and w0 >= 0):
        raise ValueError(f"w0 must be finite and >= 0, got {w0}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0 (pixels), got {sigma}")
    return w0, sigma


def _present_classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted class ids present in ``labels`` and their pixel counts, both shape (K,)."""
    if labels.max() <= _BINCOUNT_LIMIT:
        counts = np.bincount(labels.ravel())
        classes = np.flatnonzero(counts)
        return classes, counts[classes]
    return np.unique(labels, return_counts=True)


def _class_weight_map(labels: np.ndarray, class_weights: ClassWeights) -> np.ndarray:
    """w_c as float32 (H, W): 1, inverse frequency ("balanced") or a {class: weight} lookup."""
    if class_weights is None:
        return np.ones(labels.shape, dtype=np.float32)
    classes, counts = _present_classes(labels)
    if isinstance(class_weights, str):
        if class_weights != "balanced":
            raise ValueError(f"class_weights must be None, 'balanced' or a mapping, got {class_weights!r}")
        values = counts.max() / counts.astype(np.float64)
    elif isinstance(class_weights, Mapping):
        given = {int(k): float(v) for k, v in class_weights.items()}
        missing = sorted(set(classes.tolist()) - set(given))
        if missing:
            raise ValueError(f"class_weights has no weight for classes {missing} present in labels "
                             f"(got keys {sorted(given)})")
        values = np.array([given[c] for c in classes.tolist()], dtype=np.float64)
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise ValueError(f"class weights must be finite and >= 0, got {given}")
    else:
        raise TypeError("class_weights must be None, 'balanced' or a mapping, "
                        f"got {type(class_weights).__name__}")
    return values.astype(np.float32)[np.searchsorted(classes, labels)]


def _connected_instances(labels: np.ndarray) -> np.ndarray:
    """8-connected components of each non-background class, numbered 1..N across classes."""
    classes, _ = _present_classes(labels)
    classes = classes[classes > 0]
    if classes.size == 1:
        return ndi.label(labels == classes[0], structure=_EIGHT_CONNECTED)[0]
    instances = np.zeros(labels.shape, dtype=np.int32)
    offset = 0
    for c in classes:
        components, n = ndi.label(labels == c, structure=_EIGHT_CONNECTED)
        inside = components > 0
        instances[inside] = components[inside] + offset
        offset += n
    return instances


def _instance_map(labels: np.ndarray, instances: object) -> np.ndarray:
    """Validated integer instance map (H, W), ids <= H * W (0 = none)."""
    if instances is None:
        return _connected_instances(labels)
    inst = _as_id_map(instances, "instances", 2)
    if inst.shape != labels.shape:
        raise ValueError(f"instances shape {inst.shape} must equal labels shape {labels.shape}")
    if np.any((labels == 0) & (inst != 0)):
        raise ValueError("instances must be 0 wherever labels == 0 (instances are foreground objects; "
                         "the border term lives on background pixels)")
    if inst.max() > inst.size:  # sparse, huge ids: renumber so find_objects stays small
        inst = np.unique(inst, return_inverse=True)[1].reshape(inst.shape)
    return inst


def _cutoff_radius(w0: float, sigma: float, tol: float = BORDER_TOLERANCE) -> float:
    """R (pixels) with w0 * exp(-R**2 / (2 sigma**2)) == tol; 0 when w0 <= tol."""
    return sigma * math.sqrt(2.0 * math.log(w0 / tol)) if w0 > tol else 0.0


def _instance_boxes(instances: np.ndarray) -> Boxes:
    """(id, bounding box) of each instance present in ``instances``."""
    return [(ident, box) for ident, box in enumerate(ndi.find_objects(instances), start=1) if box is not None]


def _feature_transform(outside: np.ndarray) -> np.ndarray:
    """``ndi.distance_transform_edt(outside, return_distances=False, return_indices=True)``.

    (2, h, w) int32: coordinates of the nearest False pixel of the bool (h, w) ``outside``, which
    must hold one. Calls scipy's C routine directly when it is importable: the public wrapper first
    copies the mask to int64 and then int8, which costs as much as the transform on small crops.
    """
    if _feature_transform_c is None:
        return ndi.distance_transform_edt(outside, return_distances=False, return_indices=True)
    ft = np.zeros((2, *outside.shape), dtype=np.int32)
    _feature_transform_c(outside.view(np.int8), None, ft)  # int8 mask: nonzero = not a feature
    return ft


def _side_growth(room: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Pixels needed beyond one side of box i for pair (i, j): floor(min(L, (L + shift) / 2)).

    Take the top side (the others are mirror images), box i's first row a0, box j's rows
    [b0, b1], L = ``room`` = sqrt(R^2 - g^2) with g the boxes' column gap. At row a0 - k (k >= 1),
    d_i >= sqrt(k^2 + dx_i^2) and d_j >= sqrt(dy_j^2 + dx_j^2), with dx_i + dx_j >= g; by the
    triangle inequality d_i + d_j >= sqrt((k + dy_j)^2 + g^2), so d_i + d_j <= R needs
    k + dy_j <= L, and k + dy_j >= max(k, 2k + b0 - a0): k <= min(L, (L + a0 - b0) / 2) (``shift`` =
    a0 - b0). Rounding up by 1e-9 only widens the window.
    """
    return np.floor(np.minimum(room, (room + shift) / 2.0) + 1e-9)


def _block_growth(a: np.ndarray, b: np.ndarray, same: np.ndarray, radius: float) -> np.ndarray:
    """(4, n) float: growth of each box of ``a`` (n, 4) on top, bottom, left, right for its pairs
    among ``b`` (m, 4) (rows [r0, r1, c0, c1], inclusive); -1 where it has no pair. A pair (i, j)
    counts when the boxes lie within R (d_i + d_j >= box distance) and not ``same[i, j]``."""
    gy = np.maximum(np.maximum(b[:, 0] - a[:, 1, None], a[:, 0, None] - b[:, 1]), 0)  # (n, m)
    gx = np.maximum(np.maximum(b[:, 2] - a[:, 3, None], a[:, 2, None] - b[:, 3]), 0)
    close = gy * gy + gx * gx <= radius * radius
    close[same] = False
    i, j = np.nonzero(close)  # pairs, i ascending
    grow = np.full((4, len(a)), -1.0)
    if i.size == 0:
        return grow
    room_y = np.sqrt(radius * radius - gx[i, j] * gx[i, j])  # (P,) room along the rows
    room_x = np.sqrt(radius * radius - gy[i, j] * gy[i, j])
    sides = np.stack([_side_growth(room_y, a[i, 0] - b[j, 0]), _side_growth(room_y, b[j, 1] - a[i, 1]),
                      _side_growth(room_x, a[i, 2] - b[j, 2]), _side_growth(room_x, b[j, 3] - a[i, 3])])
    first = np.flatnonzero(np.r_[True, i[1:] != i[:-1]])  # each paired box's first pair
    grow[:, i[first]] = np.maximum.reduceat(np.maximum(sides, 0.0), first, axis=1)
    return grow


def _needed_windows(boxes: Boxes, radius: float, shape: tuple[int, int]) -> Boxes:
    """(id, window) of each instance that can be one of the two nearest where d1 + d2 <= R.

    An instance is needed only where d_i + d_j <= R for another instance j, so only instances
    whose box lies within R of another box are kept; each box grows side by side by the largest
    :func:`_side_growth` over its pairs, capped by floor(R - 1) (d_j >= 1 on background pixels).
    Pairs are searched in blocks of boxes sorted by first row, each against the band of rows it
    can reach, so memory and time stay near-linear for many scattered instances.
    """
    ids = np.array([ident for ident, _ in boxes])
    lims = np.array([[b[0].start, b[0].stop - 1, b[1].start, b[1].stop - 1] for _, b in boxes], dtype=np.int64)
    order = np.argsort(lims[:, 0], kind="stable")
    ids, lims = ids[order], lims[order]
    r0, r1 = lims[:, 0], lims[:, 1]
    reach = radius + float((r1 - r0).max())  # a box j within R of box i has r0_j >= r0_i - reach
    grow = np.empty((4, len(ids)))
    for s in range(0, len(ids), _PAIR_BLOCK):
        e = min(s + _PAIR_BLOCK, len(ids))
        lo = int(np.searchsorted(r0, r0[s] - reach))
        hi = int(np.searchsorted(r0, r1[s:e].max() + radius, side="right"))
        same = np.arange(s, e)[:, None] == np.arange(lo, hi)[None, :]
        grow[:, s:e] = _block_growth(lims[s:e], lims[lo:hi], same, radius)
    keep = np.flatnonzero(grow[0] >= 0)
    grow = np.minimum(grow[:, keep], max(math.floor(radius - 1.0), 0)).astype(np.int64)
    (r0, r1, c0, c1), h, w = lims[keep].T, *shape
    rows = zip(np.maximum(r0 - grow[0], 0).tolist(), np.minimum(r1 + 1 + grow[1], h).tolist())
    cols = zip(np.maximum(c0 - grow[2], 0).tolist(), np.minimum(c1 + 1 + grow[3], w).tolist())
    return [(ident, (slice(*rr), slice(*cc))) for ident, rr, cc in zip(ids[keep].tolist(), rows, cols)]


def _two_nearest_windowed(instances: np.ndarray, boxes: Boxes,
                          radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(d1, d2) float32 (H, W) in pixels, exact at background pixels where d1 + d2 <= radius.

    Keeps a running two-smallest of integer squared distances over the windows of
    :func:`_needed_windows`: where d1 + d2 <= radius, both nearest instances are needed and their
    windows hold the pixel. A window holds its whole instance, so the feature transform of the
    crop gives exact distances inside it. Where fewer than two windows reach, d2 (and d1 where
    none does) is the square root of the dtype's maximum, above any distance in the image.
    """
    h, w = instances.shape
    dtype = np.int32 if (h - 1) ** 2 + (w - 1) ** 2 < np.iinfo(np.int32).max else np.int64
    unreached = np.iinfo(dtype).max
    near_sq = np.full((h, w), unreached, dtype=dtype)  # squared d1, pixels^2
    far_sq = np.full((h, w), unreached, dtype=dtype)  # squared d2, pixels^2
    windows = _needed_windows(boxes, radius, (h, w))
    span = [max((s.stop - s.start for _, win in windows for s in win[k::2]), default=0) for k in (0, 1)]
    coords = np.indices(span, dtype=dtype)  # (2, rows, cols) window-local pixel coordinates
    for ident, win in windows:
        ft = _feature_transform(instances[win] != ident)
        ft = ft.astype(dtype, copy=False)  # (2, h_win, w_win): nearest instance pixel, window coordinates
        ft -= coords[:, : ft.shape[1], : ft.shape[2]]
        np.square(ft, out=ft)
        sq, tmp = ft
        sq += tmp
        near, far = near_sq[win], far_sq[win]  # views: updated in place
        np.minimum(far, np.maximum(near, sq, out=tmp), out=far)
        np.minimum(near, sq, out=near)
    return np.sqrt(near_sq, dtype=np.float32), np.sqrt(far_sq, dtype=np.float32)


def _two_nearest_brute(instances: np.ndarray, boxes: Boxes, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(d1, d2) float32 (H, W): full-image EDT per instance, stacked and sorted; ``radius`` unused."""
    stack = np.empty((len(boxes), *instances.shape), dtype=np.float32)  # (N, H, W), pixels
    for k, (ident, _) in enumerate(boxes):
        stack[k] = ndi.distance_transform_edt(instances != ident)
    stack.sort(axis=0)
    return stack[0], stack[1]


def _weight_map(labels: object, instances: object, w0: float, sigma: float,
                class_weights: ClassWeights, two_nearest: TwoNearest) -> np.ndarray:
    """Shared validation and assembly of eq. 2; ``two_nearest`` supplies (d1, d2)."""
    labels = _as_id_map(labels, "labels", 2)
    w0, sigma = _check_params(w0, sigma)
    weights = _class_weight_map(labels, class_weights)
    inst = _instance_map(labels, instances)
    boxes = _instance_boxes(inst)
    radius = _cutoff_radius(w0, sigma)
    log.debug("border weights: %d instances, cut-off radius %.2f px", len(boxes), radius)
    if len(boxes) < 2 or radius == 0.0:
        return weights
    d1, d2 = two_nearest(inst, boxes, radius)
    term = np.add(d1, d2, out=d1)  # (H, W) float32
    np.square(term, out=term)
    term *= -1.0 / (2.0 * sigma * sigma)
    np.exp(term, out=term)
    term *= w0
    np.multiply(term, labels == 0, out=term)  # border term on background pixels only
    weights += term
    return weights


def border_weight_map(labels: np.ndarray, instances: np.ndarray | None = None, w0: float = _PAPER.w0,
                      sigma: float = _PAPER.sigma, class_weights: ClassWeights = None) -> np.ndarray:
    """U-Net weight map w(x) (eq. 2 of arXiv 1505.04597) of one B-scan, float32 (H, W).

    Args:
        labels: (H, W) integer class map, 0 = background (bool or integral floats accepted).
        instances: (H, W) instance ids, 0 = none; must be 0 where ``labels == 0``. When None, the
            instances are the 8-connected components of each non-background class, taken per class
            (touching regions of different classes are different instances).
        w0: amplitude of the border term (weight units), >= 0.
        sigma: width of the border term in pixels, > 0.
        class_weights: None (w_c = 1), ``"balanced"`` (w_c = count of the most frequent class /
            count of the pixel's class, so the most frequent class weighs 1), or a mapping
            ``{class: weight}`` covering every class present in ``labels``.

    Returns:
        float32 (H, W): w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, w_c(x)
        elsewhere; d1, d2 in pixels. No border term with fewer than two instances.

    Exactness: with R = sigma sqrt(2 ln(w0 / t)), t = ``BORDER_TOLERANCE``, the border term is < t
    wherever d1 + d2 > R. Where d1 + d2 <= R on a background pixel, its two nearest instances i, j
    have d_i + d_j <= R with d_i, d_j >= 1. As d_i + d_j is at least the distance between the
    bounding boxes of i and j, an instance is needed only if its box lies within R of another box,
    and only on its box grown side by side by the pair bound of ``_side_growth`` (at most
    floor(R - 1)); one distance transform of that crop is exact there because the crop contains
    the whole instance. A running two-smallest over these windows is therefore exact where
    d1 + d2 <= R; elsewhere it can only overestimate d1 and d2 (smallest values over fewer
    instances, or a sentinel above any distance in the image), giving a term in [0, t). Hence
    ``|border_weight_map - border_weight_map_reference| < t`` (1e-3), up to float32 rounding; the
    cost is one distance transform per needed instance on at most (size + 2R)^2 pixels.
    """
    return _weight_map(labels, instances, w0, sigma, class_weights, _two_nearest_windowed)


def border_weight_map_reference(labels: np.ndarray, instances: np.ndarray | None = None, w0: float = _PAPER.w0,
                                sigma: float = _PAPER.sigma, class_weights: ClassWeights = None) -> np.ndarray:
    """Brute-force :func:`border_weight_map`: one full-image EDT per instance, sorted; float32 (H, W).

    Slow (O(N H W log N) time, N H W memory) and obviously right; for tests and benchmarks.
    """
    return _weight_map(labels, instances, w0, sigma, class_weights, _two_nearest_brute)


def border_weight_map_volume(labels: np.ndarray, instances: np.ndarray | None = None,
                             **kwargs: object) -> np.ndarray:
    """:func:`border_weight_map` of each B-scan of a (Z, H, W) volume; float32 (Z, H, W).

    ``instances`` is None or (Z, H, W); ``kwargs`` (w0, sigma, class_weights) apply per B-scan, so
    ``"balanced"`` class weights use each B-scan's own class frequencies.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be 3-D (Z, H, W), got shape {labels.shape}")
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != labels.shape:
            raise ValueError(f"instances shape {instances.shape} must equal labels shape {labels.shape}")
    out = np.empty(labels.shape, dtype=np.float32)
    for z in range(labels.shape[0]):
        out[z] = border_weight_map(labels[z], None if instances is None else instances[z], **kwargs)
    return out
