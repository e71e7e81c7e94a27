"""Data augmentation of the U-Net paper (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597), seeded.

Section 3.1 of the paper: "we generate smooth deformations using random displacement vectors on a
coarse 3 by 3 grid. The displacements are sampled from a Gaussian distribution with 10 pixels
standard deviation. Per-pixel displacements are then computed using bicubic interpolation." The paper
also lists shifts, rotations and gray value variations; here these are a horizontal flip (a left eye
looks like a mirrored right eye; a vertical flip would put the choroid above the vitreous and is off by
default) and brightness / contrast / gamma jitter.

Every function takes ``rng``: a ``np.random.Generator`` or an int seed, so a seed reproduces the
result. Images are (H, W) or (C, H, W); labels (integer class map) and weights (float loss weights)
are (H, W) and receive the same geometric transform as the image.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "augment",
    "displacement_field",
    "elastic_deform",
    "intensity_jitter",
    "noise_and_blur",
    "random_affine",
    "random_flip",
]


Arrays = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    """``rng`` itself, or a new generator seeded with the int ``rng``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def _check_arrays(image: np.ndarray, labels: np.ndarray | None, weights: np.ndarray | None) -> None:
    """Raise unless image is (H, W) or (C, H, W) and labels / weights are (H, W) of the same size."""
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError(f"image must be a non-empty (H, W) or (C, H, W) array, got shape {image.shape}")
    for name, arr in (("labels", labels), ("weights", weights)):
        if arr is not None and arr.shape != image.shape[-2:]:
            raise ValueError(f"{name} must have shape (H, W) = {image.shape[-2:]}, got {arr.shape}")
    if labels is not None and not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must have an integer or bool dtype, got {labels.dtype}")


def _float_dtype(arr: np.ndarray) -> np.dtype:
    """``arr``'s dtype when it is floating, else float32 (interpolation produces fractions)."""
    return arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float32)


def displacement_field(
    shape: tuple[int, int], rng: np.random.Generator | int, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """Smooth per-pixel displacements (2, H, W) in pixels: (dy, dx).

    A (2, grid, grid) array of N(0, sigma^2) vectors is drawn and up-sampled to (H, W) with a cubic
    spline through the grid values (``scipy.ndimage.zoom(order=3)``, grid corners on the image
    corners), so the node pixels keep the drawn vectors and the field in between is smooth.
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 2:
        raise ValueError(f"grid must be an int >= 2, got {grid!r}")
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 pixels, got {sigma!r}")
    h, w = shape
    coarse = _as_rng(rng).normal(0.0, sigma, size=(2, grid, grid))
    # the 2-D cubic spline zoom is separable: field = Ry @ coarse @ Rx^T, Ry (h, grid) the 1-D zoom of the unit
    # vectors; a thousand times cheaper than zooming the (2, grid, grid) array itself, the same values
    ry, rx = _spline_rows(h, grid), _spline_rows(w, grid)
    field = np.einsum("hi,cij,wj->chw", ry, coarse, rx, optimize=True)
    assert field.shape == (2, h, w), f"spline produced {field.shape}, expected {(2, h, w)}"
    return field


@functools.lru_cache(maxsize=64)
def _spline_rows(n: int, grid: int) -> np.ndarray:
    """(n, grid): the cubic spline through ``grid`` nodes sampled at n points (``scipy.ndimage.zoom``,
    order 3, nodes on the end points), applied to each unit vector: row i weighs the nodes for pixel i."""
    from scipy import ndimage  # here: importing the package (every command does) stays light
    rows = ndimage.zoom(np.eye(grid), (n / grid, 1), order=3, mode="mirror", grid_mode=False)
    assert rows.shape == (n, grid), f"zoom produced {rows.shape}, expected {(n, grid)}"
    rows.flags.writeable = False
    return rows


def elastic_deform(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    rng: np.random.Generator | int,
    image_order: int = 3,
    window: tuple[slice, slice] | None = None,
    backend: str = "torch",
    affine: np.ndarray | None = None,
) -> Arrays:
    """The paper's elastic deformation, applied identically to image, labels and weights.

    Each output pixel p takes the value at p + d(p), d from :func:`displacement_field`, sampled with
    ``torch.nn.functional.grid_sample`` (``backend="torch"``: bicubic convolution, bilinear, nearest;
    several times faster on a CPU, multi-threaded) or ``scipy.ndimage.map_coordinates``
    (``backend="scipy"``, cubic B-splines; any ``image_order``; the reference the tests compare with):

    - image: order ``image_order`` (3 = bicubic); a float dtype is kept, integers become float32; cubic
      interpolation may overshoot the input range slightly;
    - labels: order 0 (nearest), so the dtype is kept and only values present in the input appear;
    - weights: order 1 (linear), so non-negative weights stay non-negative.

    Pixels sampled outside the image are mirrored with SciPy's ``mode="mirror"`` (NumPy's "reflect",
    the mirror of :mod:`octseg.unet.tiling`). SciPy's own "reflect" is not used: its spline prefilter is
    approximate on axes of a few pixels, whereas "mirror" makes sigma = 0 the identity.

    ``window`` (a pair of slices of the output) returns labels and weights for that window only: a
    valid-padding U-Net's loss sees the centre crop of its tile, so the rest need not be warped.

    ``affine`` (2 x 2, acting on (y, x) about the image centre) adds a rotation / zoom to the same warp:
    output pixel p samples ``c + affine @ (p - c) + d(p)``, one interpolation for both.

    Returns:
        (image, labels, weights): the image of the input shape, labels and weights of the input shape or
        of ``window``; None stays None.
    """
    from scipy import ndimage  # here: importing the package (every command does) stays light
    image = np.asarray(image)
    _check_arrays(image, labels, weights)
    if image_order not in range(6):
        raise ValueError(f"image_order must be a spline order in 0..5, got {image_order!r}")
    h, w = image.shape[-2:]
    field = displacement_field((h, w), rng, grid=grid, sigma=sigma)
    coords = np.indices((h, w), dtype=np.float64)  # (2, H, W): where each pixel samples
    if affine is not None:
        centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])[:, None, None]
        coords = centre + np.einsum("ij,jhw->ihw", np.asarray(affine, dtype=np.float64), coords - centre)
    coords += field

    if backend not in ("torch", "scipy"):
        raise ValueError(f"backend must be 'torch' or 'scipy', got {backend!r}")

    def warp(arr: np.ndarray, order: int, dtype: np.dtype, at: np.ndarray = coords) -> np.ndarray:
        if backend == "torch" and order in _GRID_MODES and (order or np.issubdtype(arr.dtype, np.floating)
                                                            or np.abs(arr).max(initial=0) < 2**24):
            return _grid_sample(arr, at, order).astype(dtype, copy=False)
        return ndimage.map_coordinates(arr, at, output=dtype, order=order, mode="mirror")

    crop = coords if window is None else np.ascontiguousarray(coords[(slice(None), *window)])

    dtype = _float_dtype(image)
    planes = image if image.ndim == 3 else image[None]
    out_image = np.stack([warp(p, image_order, dtype) for p in planes])
    out_image = out_image if image.ndim == 3 else out_image[0]
    out_labels = None
    if labels is not None:
        as_int = labels.astype(np.uint8) if labels.dtype == bool else labels
        out_labels = warp(as_int, 0, as_int.dtype, crop).astype(labels.dtype, copy=False)
    out_weights = None if weights is None else warp(weights, 1, _float_dtype(weights), crop)
    return out_image, out_labels, out_weights


_GRID_MODES = {0: "nearest", 1: "bilinear", 3: "bicubic"}


def _grid_sample(arr: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """``arr`` (H, W) sampled at ``coords`` (2, h, w) pixel positions (y, x) -> float32 (h, w) (positions to
    ~1e-5 px: sigma = 0 gives the identity to float32 precision); outside the
    image mirrored about the edge pixels (SciPy's "mirror": grid_sample's "reflection" with aligned corners)."""
    import torch
    import torch.nn.functional as F

    h, w = arr.shape
    grid = np.empty((1, *coords.shape[1:], 2), dtype=np.float32)
    grid[0, ..., 0] = coords[1] * (2.0 / max(w - 1, 1)) - 1.0  # x first, in [-1, 1] from pixel centre to centre
    grid[0, ..., 1] = coords[0] * (2.0 / max(h - 1, 1)) - 1.0
    source = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    out = F.grid_sample(source, torch.from_numpy(grid), mode=_GRID_MODES[order], padding_mode="reflection",
                        align_corners=True)
    return out[0, 0].numpy()


def random_flip(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    *,
    rng: np.random.Generator | int,
    horizontal: float = 0.5,
    vertical: float = 0.0,
) -> Arrays:
    """Flip left-right with probability ``horizontal`` and up-down with probability ``vertical``.

    The same flips are applied to image, labels and weights. Both random draws are always made, so
    the generator advances the same way whatever the outcome.

    Returns:
        (image, labels, weights), contiguous copies; None stays None.
    """
    image = np.asarray(image)
    _check_arrays(image, labels, weights)
    for name, p in (("horizontal", horizontal), ("vertical", vertical)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} flip probability must be in [0, 1], got {p!r}")
    gen = _as_rng(rng)
    flip_h, flip_v = gen.random() < horizontal, gen.random() < vertical
    axes = tuple(a for a, flip in ((-2, flip_v), (-1, flip_h)) if flip)

    def apply(arr: np.ndarray | None) -> np.ndarray | None:
        if arr is None:
            return None
        return np.ascontiguousarray(np.flip(arr, axis=axes) if axes else arr.copy())

    return apply(image), apply(labels), apply(weights)


def intensity_jitter(
    image: np.ndarray,
    rng: np.random.Generator | int,
    brightness: float = 0.1,
    contrast: float = 0.1,
    gamma: float = 0.1,
) -> np.ndarray:
    """Random gray-value variation of an (H, W) or (C, H, W) image; one draw for all channels.

    Intensities are measured in units of the image's range r = max - min (1 when constant):

    1. gamma: ``min + r * ((x - min) / r) ** g`` with ``log(g) ~ U(-gamma, gamma)``;
    2. contrast: deviations from the mean are scaled by ``U(1 - contrast, 1 + contrast)``;
    3. brightness: ``U(-brightness, brightness) * r`` is added.

    No clipping. Returns a float array (float dtype kept, integers become float32).
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError(f"image must be a non-empty (H, W) or (C, H, W) array, got shape {image.shape}")
    limits = (("brightness", brightness, np.inf), ("contrast", contrast, 1.0), ("gamma", gamma, np.inf))
    for name, value, upper in limits:
        if not 0 <= value < upper:
            raise ValueError(f"{name} must be >= 0 and < {upper}, got {value!r}")
    gen = _as_rng(rng)
    g = float(np.exp(gen.uniform(-gamma, gamma)))
    c = gen.uniform(1 - contrast, 1 + contrast)
    b = gen.uniform(-brightness, brightness)
    x = image.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    r = hi - lo if hi > lo else 1.0
    x = lo + r * ((x - lo) / r) ** g
    x = x.mean() + c * (x - x.mean()) + b * r
    return x.astype(_float_dtype(image))


def random_affine(rng: np.random.Generator | int, rotation: float = 0.0, scaling: float = 0.0) -> np.ndarray:
    """A 2 x 2 sampling matrix (y, x): a rotation by U(-rotation, rotation) degrees and a zoom by
    ``exp(U(-log(1 + scaling), log(1 + scaling)))`` (so 0.25 zooms 0.8-1.25 times, in and out alike)."""
    if not (0 <= rotation <= 180 and scaling >= 0):
        raise ValueError(f"rotation must be in [0, 180] degrees and scaling >= 0, got {rotation!r}, {scaling!r}")
    gen = _as_rng(rng)
    angle = np.deg2rad(gen.uniform(-rotation, rotation))
    zoom = float(np.exp(gen.uniform(-np.log1p(scaling), np.log1p(scaling))))
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]]) / zoom  # sampling at p / zoom magnifies the image by zoom


def noise_and_blur(image: np.ndarray, rng: np.random.Generator | int, noise: float = 0.0, blur: float = 0.0,
                   p_noise: float = 0.15, p_blur: float = 0.2) -> np.ndarray:
    """nnU-Net's image-quality augmentation: with probability ``p_noise`` add Gaussian noise of standard
    deviation U(0, ``noise``) (image units), with probability ``p_blur`` blur with a Gaussian of sigma
    U(0.5, ``blur``) pixels (when ``blur`` > 0.5). Both draws are always made. Float image returned."""
    from scipy import ndimage  # here: importing the package (every command does) stays light
    gen = _as_rng(rng)
    noisy, std = gen.random() < p_noise, gen.uniform(0.0, noise) if noise > 0 else 0.0
    blurred, sigma = gen.random() < p_blur, gen.uniform(0.5, max(blur, 0.5))
    out = np.asarray(image, dtype=_float_dtype(np.asarray(image)))
    if blurred and blur > 0.5:
        axes = (-2, -1)
        out = ndimage.gaussian_filter(out, sigma=[sigma if a - out.ndim in axes else 0 for a in range(out.ndim)])
    if noisy and std > 0:
        out = out + gen.normal(0.0, std, size=out.shape).astype(out.dtype)
    return out


def augment(
    image: np.ndarray,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    rng: np.random.Generator | int,
    elastic: bool = True,
    flip: bool = True,
    jitter: bool = True,
    *,
    grid: int = 3,
    sigma: float = 10.0,
    window: tuple[slice, slice] | None = None,
    backend: str = "torch",
    rotation: float = 0.0,
    scaling: float = 0.0,
    strength: float = 0.1,
    noise: float = 0.0,
    blur: float = 0.0,
) -> Arrays:
    """Flip, then rotate / zoom / elastically deform (one warp), then jitter grey values, then noise and blur;
    the geometry is shared by all three arrays.

    Uses one generator for all steps, so ``rng`` as an int seed reproduces the whole chain; the defaults
    are the paper's augmentation (and draw exactly what it drew). ``grid`` and ``sigma`` are passed to
    :func:`elastic_deform` (paper: 3 x 3 grid, 10 pixels); ``rotation`` (degrees) and ``scaling`` to
    :func:`random_affine`; ``strength`` is the brightness, contrast and gamma range of
    :func:`intensity_jitter`; ``noise`` and ``blur`` go to :func:`noise_and_blur`. ``window`` returns labels
    and weights for that window of the output only (see :func:`elastic_deform`).

    Returns:
        (image, labels, weights) as from the individual steps; None stays None.
    """
    gen = _as_rng(rng)
    image = np.asarray(image)
    _check_arrays(image, labels, weights)
    if flip:
        image, labels, weights = random_flip(image, labels, weights, rng=gen)
    affine = random_affine(gen, rotation, scaling) if rotation or scaling else None
    if elastic or affine is not None:
        image, labels, weights = elastic_deform(image, labels, weights, grid=grid, sigma=sigma if elastic else 0.0,
                                                rng=gen, window=window, backend=backend, affine=affine)
    elif window is not None:
        labels = None if labels is None else labels[window]
        weights = None if weights is None else weights[window]
    if jitter:
        image = intensity_jitter(image, gen, brightness=strength, contrast=min(strength, 0.99), gamma=strength)
    if noise or blur:
        image = noise_and_blur(image, gen, noise, blur)
    return image, labels, weights
