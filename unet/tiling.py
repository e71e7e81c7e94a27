"""Overlap-tile segmentation of images of any size (Ronneberger, Fischer, Brox 2015, arXiv 1505.04597).

The paper's U-Net uses unpadded ("valid") convolutions, so its output is smaller than its input by a
border of ``halo`` pixels on each side. Fig. 2 of the paper ("overlap-tile strategy") segments a large
image seamlessly by predicting it tile by tile, each input tile carrying that much extra context, and
by extrapolating the context missing at the image border by mirroring the image.

This module keeps each step small and pure; the network is injected as a plain callable
(``predictor``) so the tiling can be tested with ``lambda b: b * 2`` instead of a model:

1. :func:`halo_from_shapes`: halo = (input tile - output tile) / 2 per axis.
2. :func:`tile_starts`: where the output tiles start so they cover the image, last one flush.
3. :func:`mirror_pad`: mirror the image by the halo (``np.pad(mode="reflect")``).
4. :func:`gaussian_weight`: blending weights, so overlapping tiles fade into each other.
5. :func:`predict_tiled`: cut, predict in batches, blend in float64, normalise.

Axis order is (C, H, W) for images and (N, C, H, W) for batches; all sizes are in pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from octseg.unet.config import InferenceConfig

__all__ = [
    "BLENDS",
    "Predictor",
    "TilePlan",
    "gaussian_weight",
    "halo_from_shapes",
    "mirror_pad",
    "plan_tiles",
    "predict_tiled",
    "tile_starts",
]

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
"""Maps a float32 batch (N, C_in, th, tw) to (N, C_out, oh, ow) with th - oh and tw - ow even."""

BLENDS: tuple[str, ...] = ("gaussian", "constant")


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """``value`` as an (h, w) pair of positive ints; an int means a square."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1 in both axes, got {value!r}")
    return int(pair[0]), int(pair[1])


def halo_from_shapes(tile_in: Sequence[int], tile_out: Sequence[int]) -> tuple[int, int]:
    """Context border (hy, hx) lost on each side by a valid-padding network.

    >>> halo_from_shapes((572, 572), (388, 388))  # the paper's Fig. 1 network
    (92, 92)
    >>> halo_from_shapes((64, 96), (64, 96))  # "same" padding: no halo
    (0, 0)
    """
    halo = []
    for axis, (i, o) in enumerate(zip(tile_in, tile_out)):
        if o > i or (i - o) % 2:
            raise ValueError(
                f"output tile must be smaller than the input tile by an even number of pixels per axis, "
                f"got input {tuple(tile_in)} and output {tuple(tile_out)} (axis {axis})"
            )
        halo.append((i - o) // 2)
    return halo[0], halo[1]


def tile_starts(length: int, tile_out: int, step: int, align: int = 1) -> list[int]:
    """Start offsets of output tiles covering ``[0, length)``, the last one flush with the end.

    Tiles start every ``step`` pixels; the last start is moved back to ``length - tile_out`` so no
    tile hangs over the image. A length shorter than one tile gives a single tile at 0, which the
    caller pads to fit.

    With ``align`` > 1 every start is a multiple of ``align`` (``step`` is rounded down to one, the
    last start up): the last tile may then hang over the end, into the mirror padding. A valid U-Net
    with ``depth`` poolings gives the same output for a pixel wherever a tile puts it, as long as tiles
    move by multiples of ``2 ** depth``: aligned tiles agree with each other and with one whole pass.

    >>> tile_starts(10, 4, 3)  # 0..3, 3..6, 6..9 and 6..10 -> last start moved back
    [0, 3, 6]
    >>> tile_starts(11, 4, 3)
    [0, 3, 6, 7]
    >>> tile_starts(8, 4, 4)  # no overlap, exact fit
    [0, 4]
    >>> tile_starts(3, 4, 2)  # shorter than one tile
    [0]
    >>> tile_starts(11, 4, 3, align=2)  # step 2, the last start 8 (its tile ends at 12 > 11)
    [0, 2, 4, 6, 8]
    """
    if length < 1 or tile_out < 1:
        raise ValueError(f"length and tile_out must be >= 1, got length={length}, tile_out={tile_out}")
    if not 1 <= step <= tile_out:
        raise ValueError(f"step must be >= 1 and <= tile_out={tile_out} (no gaps), got {step}")
    if not 1 <= align <= tile_out:
        raise ValueError(f"align must be >= 1 and <= tile_out={tile_out}, got {align}")
    if length <= tile_out:
        return [0]
    step = max(align, step - step % align)
    last = -(-(length - tile_out) // align) * align
    starts = list(range(0, last, step))
    return starts + [last]


def gaussian_weight(shape: Sequence[int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """Float64 blending weights of ``shape``: a Gaussian with its peak 1.0 at the centre.

    The standard deviation per axis is ``sigma_scale * size`` (as in nnU-Net); values that would
    underflow are raised to the smallest positive weight, so every pixel gets a weight > 0 and the
    normalisation in :func:`predict_tiled` never divides by zero.

    >>> w = gaussian_weight((5, 4))
    >>> w.shape, float(w.max()) < 1.0, bool((w > 0).all())  # centre (2, 1.5) falls between pixels
    ((5, 4), True, True)
    >>> float(gaussian_weight((3, 3))[1, 1])
    1.0
    """
    if not sigma_scale > 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    weight = np.ones((), dtype=np.float64)
    for size in shape:
        if size < 1:
            raise ValueError(f"shape must be >= 1 in every axis, got {tuple(shape)}")
        coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profile = np.exp(-0.5 * (coords / (sigma_scale * size)) ** 2)
        weight = np.multiply.outer(weight, profile)
    positive = weight[weight > 0]
    return np.maximum(weight, positive.min())


def mirror_pad(image: np.ndarray, pad: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mirror-pad the last two axes of ``image`` (..., H, W) by ``pad = ((top, bottom), (left, right))``.

    The paper extrapolates missing context "by mirroring the input image" without saying whether the
    border pixel is repeated. We use ``np.pad(mode="reflect")`` (``d c b | a b c d | c b a``, border
    pixel not repeated, like ``torch``'s ``ReflectionPad2d``). NumPy reflects repeatedly when the pad
    is wider than the image and repeats the value of a 1-pixel axis, so any image size works.

    >>> mirror_pad(np.array([[1, 2, 3]]), ((0, 0), (2, 4)))
    array([[3, 2, 1, 2, 3, 2, 1, 2, 3]])
    """
    widths = [(0, 0)] * (image.ndim - 2) + [tuple(int(p) for p in axis) for axis in pad]
    if len(widths) != image.ndim or any(p < 0 for axis in widths for p in axis):
        raise ValueError(f"pad must be ((top, bottom), (left, right)) of ints >= 0, got {pad!r}")
    return np.pad(image, widths, mode="reflect")


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go; all offsets in pixels of the padded image.

    Output tile (i, j) covers rows ``starts_y[i] : starts_y[i] + tile_out[0]`` of the output; its
    input tile covers the same rows of the padded image plus ``tile_in[0] - tile_out[0]`` more.
    """

    image_hw: tuple[int, int]  # (H, W) of the image being segmented
    tile_in: tuple[int, int]  # network input tile (th, tw)
    tile_out: tuple[int, int]  # network output tile (oh, ow)
    halo: tuple[int, int]  # context lost per side (hy, hx)
    step: tuple[int, int]  # distance between tile starts (sy, sx)
    starts_y: tuple[int, ...]
    starts_x: tuple[int, ...]
    pad: tuple[tuple[int, int], tuple[int, int]]  # mirror pad ((top, bottom), (left, right))

    @property
    def n_tiles(self) -> int:
        """Number of tiles, ``len(starts_y) * len(starts_x)``."""
        return len(self.starts_y) * len(self.starts_x)

    def origins(self) -> Iterator[tuple[int, int]]:
        """Top-left corners (y, x) of the tiles, row by row."""
        for y in self.starts_y:
            for x in self.starts_x:
                yield y, x


def plan_tiles(
    image_hw: Sequence[int], tile_in: Sequence[int], tile_out: Sequence[int], overlap: float, align: int = 1
) -> TilePlan:
    """Lay out tiles over an (H, W) image; ``overlap`` is a fraction of the output tile in [0, 1).

    ``align``: tile starts are multiples of it (see :func:`tile_starts`); the padding grows to hold
    a last tile that hangs over the image.

    >>> p = plan_tiles((37, 53), (20, 20), (12, 12), overlap=0.25)  # halo 4, step 9
    >>> p.starts_y, p.starts_x, p.pad
    ((0, 9, 18, 25), (0, 9, 18, 27, 36, 41), ((4, 4), (4, 4)))
    >>> plan_tiles((5, 30), (20, 20), (12, 12), 0.0).pad  # 5 rows < 12: pad 7 more at the bottom
    ((4, 11), (4, 4))
    >>> plan_tiles((37, 53), (20, 20), (12, 12), 0.25, align=4).starts_y  # last tile ends at 40 > 37
    (0, 8, 16, 24, 28)
    """
    _check_overlap(overlap)
    h, w = (int(v) for v in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image must be at least 1x1 pixels, got (H, W)=({h}, {w})")
    tile_in, tile_out = tuple(tile_in), tuple(tile_out)
    halo = halo_from_shapes(tile_in, tile_out)
    step = tuple(max(1, int(o * (1.0 - overlap))) for o in tile_out)
    starts = tuple(tuple(tile_starts(n, o, s, min(align, o))) for n, o, s in zip((h, w), tile_out, step))
    pad = tuple((hl, hl + max(0, st[-1] + o - n)) for hl, o, n, st in zip(halo, tile_out, (h, w), starts))
    return TilePlan(
        image_hw=(h, w),
        tile_in=tile_in,
        tile_out=tile_out,
        halo=halo,
        step=step,
        starts_y=starts[0],
        starts_x=starts[1],
        pad=pad,
    )


def _as_chw(image: np.ndarray) -> np.ndarray:
    """A real-valued (H, W) or (C, H, W) array as float32 (C, H, W)."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise ValueError(f"image must be a non-empty (H, W) or (C, H, W) array, got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
        raise TypeError(f"image must be real-valued, got dtype {image.dtype}")
    return (image[None] if image.ndim == 2 else image).astype(np.float32, copy=False)


def _check_output(out: np.ndarray, n: int, tile_out: tuple[int, int], c_out: int | None) -> np.ndarray:
    """The predictor's output as an array, checked against the expected (n, C_out, oh, ow)."""
    out = np.asarray(out)
    ok = out.ndim == 4 and out.shape[0] == n and out.shape[2:] == tile_out
    if not ok or (c_out is not None and out.shape[1] != c_out):
        expected = f"({n}, {'C_out' if c_out is None else c_out}, {tile_out[0]}, {tile_out[1]})"
        raise ValueError(f"predictor must return shape {expected}, got {out.shape}")
    return out


def _probe_output_tile(predictor: Predictor, channels: int, tile_in: tuple[int, int]) -> tuple[int, int]:
    """Output tile size found by calling ``predictor`` once on a zero tile (1, C_in, th, tw)."""
    out = np.asarray(predictor(np.zeros((1, channels, *tile_in), dtype=np.float32)))
    if out.ndim != 4 or out.shape[0] != 1:
        raise ValueError(f"predictor must return (N, C_out, oh, ow) for a batch of 1, got shape {out.shape}")
    log.debug("probed predictor: input tile %s -> output tile %s", tile_in, out.shape[2:])
    return int(out.shape[2]), int(out.shape[3])


def _check_overlap(overlap: float) -> None:
    """Raise ValueError unless 0 <= overlap < 1."""
    if isinstance(overlap, bool) or not (isinstance(overlap, (int, float, np.integer, np.floating)) and 0 <= overlap < 1):
        raise ValueError(f"overlap must be >= 0 and < 1, got {overlap!r}")


def _check_call_args(batch_size: int, blend: str, progress: Callable[[int, int], None] | None) -> None:
    """Raise ValueError/TypeError for a bad batch_size, blend or progress callback."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable(done, total) or None, got {type(progress).__name__}")


def predict_tiled(
    image: np.ndarray,
    predictor: Predictor,
    tile: int | Sequence[int],
    overlap: float = InferenceConfig.overlap,
    batch_size: int = 4,
    output_tile: int | Sequence[int] | None = None,
    blend: str = "gaussian",
    progress: Callable[[int, int], None] | None = None,
    align: int = 1,
) -> np.ndarray:
    """Segment an image of any size tile by tile with the overlap-tile strategy.

    Args:
        image: (H, W) or (C_in, H, W) real array; cast to float32.
        predictor: maps a float32 batch (N, C_in, th, tw), N <= ``batch_size``, to (N, C_out, oh, ow).
        tile: the network's INPUT tile (th, tw), or an int for a square tile.
        overlap: fraction of the OUTPUT tile shared by neighbouring tiles, in [0, 1).
        batch_size: most tiles per predictor call.
        output_tile: the network's output tile (oh, ow); when None the predictor is called once on a
            zero tile to find it. Input minus output must be even: halo = (th - oh) / 2.
        blend: "gaussian" (centre of a tile counts most) or "constant" (plain average).
        progress: called as ``progress(done_tiles, total_tiles)`` after each batch.
        align: tile starts are multiples of this (``2 ** depth`` for a U-Net: see :func:`tile_starts`).

    Returns:
        float32 (C_out, H, W): the blended predictions, aligned pixel for pixel with ``image``.
    """
    chw = _as_chw(image)
    tile_in = _pair("tile", tile)
    _check_overlap(overlap)  # before the predictor is probed
    _check_call_args(batch_size, blend, progress)
    if output_tile is None:
        tile_out = _probe_output_tile(predictor, chw.shape[0], tile_in)
    else:
        tile_out = _pair("output_tile", output_tile)
    plan = plan_tiles(chw.shape[1:], tile_in, tile_out, overlap, align)
    padded = mirror_pad(chw, plan.pad)
    weight = gaussian_weight(tile_out) if blend == "gaussian" else np.ones(tile_out, dtype=np.float64)
    log.debug("tiling %s with %d tiles: %s", chw.shape, plan.n_tiles, plan)

    total, norm = _blend_tiles(padded, plan, predictor, weight, batch_size, progress)
    h, w = plan.image_hw
    return (total[:, :h, :w] / norm[:h, :w]).astype(np.float32)


def _blend_tiles(
    padded: np.ndarray,
    plan: TilePlan,
    predictor: Predictor,
    weight: np.ndarray,
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of tile predictions (C_out, Hc, Wc) and sum of weights (Hc, Wc), float64.

    The canvas (Hc, Wc) is the padded image without its halo: the image plus any bottom/right pad
    that made it at least one output tile large.
    """
    canvas_hw = (padded.shape[1] - 2 * plan.halo[0], padded.shape[2] - 2 * plan.halo[1])
    total: np.ndarray | None = None  # allocated once the predictor has told us C_out
    norm = np.zeros(canvas_hw, dtype=np.float64)
    origins = list(plan.origins())
    (th, tw), (oh, ow) = plan.tile_in, plan.tile_out
    for first in range(0, len(origins), batch_size):
        chunk = origins[first : first + batch_size]
        batch = np.stack([padded[:, y : y + th, x : x + tw] for y, x in chunk])
        c_out = None if total is None else total.shape[0]
        out = _check_output(predictor(batch), len(chunk), plan.tile_out, c_out)
        if total is None:
            total = np.zeros((out.shape[1], *canvas_hw), dtype=np.float64)
        for (y, x), pred in zip(chunk, out):
            total[:, y : y + oh, x : x + ow] += pred * weight
            norm[y : y + oh, x : x + ow] += weight
        if progress is not None:
            progress(first + len(chunk), len(origins))
    assert total is not None and (norm > 0).all(), "tiles must cover the whole canvas"
    return total, norm
