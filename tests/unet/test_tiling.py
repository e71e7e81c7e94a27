"""Tests of octseg.unet.tiling: tile layout, blending weights, mirror padding and the stitched prediction.

The predictors are plain functions (identity with a centre crop, ``x * 2``), as in MONAI's tests:
the stitched result of an identity predictor must equal the input, exact up to float rounding.
"""
from __future__ import annotations

import doctest

import numpy as np
import pytest

import octseg.unet.tiling as tiling
from octseg.unet.tiling import gaussian_weight, halo_from_shapes, mirror_pad, plan_tiles, predict_tiled, tile_starts


def crop_identity(halo: tuple[int, int]):
    """A 'valid' network that returns the centre of its input: output = input minus ``halo`` per side."""
    hy, hx = halo

    def predictor(batch: np.ndarray) -> np.ndarray:
        return batch[:, :, hy : batch.shape[2] - hy, hx : batch.shape[3] - hx]

    return predictor


class Recorder:
    """Wraps a predictor and records the batches it was called with."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.batches: list[np.ndarray] = []

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [b.shape for b in self.batches]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32
        self.batches.append(batch.copy())
        return self.predictor(batch)


def test_doctests():
    assert doctest.testmod(tiling).failed == 0


@pytest.mark.parametrize(
    "length, tile_out, step, expected",
    [
        (10, 4, 3, [0, 3, 6]),  # last tile flush with the end: 6..10
        (11, 4, 3, [0, 3, 6, 7]),  # last start moved back from 9 to 7
        (8, 4, 4, [0, 4]),  # no overlap, exact fit
        (9, 4, 4, [0, 4, 5]),  # no overlap, one pixel left over -> extra flush tile
        (4, 4, 2, [0]),  # exactly one tile
        (3, 4, 2, [0]),  # shorter than one tile: single tile, caller pads
        (1, 1, 1, [0]),  # 1-pixel image, 1-pixel tile
        (5, 1, 1, [0, 1, 2, 3, 4]),  # 1-pixel tiles
    ],
)
def test_tile_starts(length, tile_out, step, expected):
    starts = tile_starts(length, tile_out, step)
    assert starts == expected
    covered = np.zeros(max(length, tile_out), bool)
    for s in starts:
        covered[s : s + tile_out] = True
    assert covered[:length].all()
    assert starts[-1] + tile_out == max(length, tile_out)


@pytest.mark.parametrize(
    "length, tile_out, step, match",
    [
        (0, 4, 2, "length and tile_out must be >= 1"),  # empty axis
        (10, 0, 1, "length and tile_out must be >= 1"),  # empty tile
        (10, 4, 0, "step must be >= 1"),  # no progress
        (10, 4, 5, "got 5"),  # step > tile would leave gaps
    ],
)
def test_tile_starts_rejects(length, tile_out, step, match):
    with pytest.raises(ValueError, match=match):
        tile_starts(length, tile_out, step)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 1),  # single pixel
        (2, 3),  # even/odd, tiny
        (7, 12),  # odd x even
        (64, 64),  # typical output tile
    ],
)
def test_gaussian_weight_positive_peak_centre(shape):
    w = gaussian_weight(shape)
    assert w.shape == shape and w.dtype == np.float64
    assert (w > 0).all() and w.max() <= 1.0
    centre = tuple((s - 1) // 2 for s in shape)
    assert w[centre] == w.max()
    np.testing.assert_allclose(w, w[::-1, ::-1])  # symmetric about the centre


def test_gaussian_weight_never_underflows():
    w = gaussian_weight((101, 101), sigma_scale=0.005)  # corners would be exp(-5000) = 0.0
    assert (w > 0).all()


def test_gaussian_weight_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma_scale must be > 0, got 0"):
        gaussian_weight((4, 4), sigma_scale=0)


@pytest.mark.parametrize(
    "image, pad, expected",
    [
        ([[1, 2, 3]], ((0, 0), (1, 1)), [[2, 1, 2, 3, 2]]),  # border pixel not repeated
        ([[1, 2]], ((0, 0), (3, 0)), [[2, 1, 2, 1, 2]]),  # pad wider than the image: reflect again
        ([[5]], ((1, 1), (1, 1)), [[5] * 3] * 3),  # 1x1 image: repeats its value
        ([[1], [2]], ((1, 2), (0, 0)), [[2], [1], [2], [1], [2]]),  # rows
    ],
)
def test_mirror_pad(image, pad, expected):
    np.testing.assert_array_equal(mirror_pad(np.array(image), pad), np.array(expected))


def test_mirror_pad_keeps_leading_axes():
    x = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = mirror_pad(x, ((1, 2), (3, 4)))
    assert out.shape == (2, 6, 11)
    np.testing.assert_array_equal(out[:, 1:4, 3:7], x)


@pytest.mark.parametrize(
    "tile_in, tile_out, halo",
    [
        ((572, 572), (388, 388), (92, 92)),  # the paper's network
        ((32, 48), (32, 48), (0, 0)),  # same padding
        ((30, 21), (10, 1), (10, 10)),  # non-square
    ],
)
def test_halo_from_shapes(tile_in, tile_out, halo):
    assert halo_from_shapes(tile_in, tile_out) == halo


@pytest.mark.parametrize(
    "tile_in, tile_out",
    [
        ((20, 20), (11, 12)),  # odd difference in y
        ((20, 20), (12, 21)),  # output larger than input
    ],
)
def test_halo_from_shapes_rejects(tile_in, tile_out):
    with pytest.raises(ValueError, match="even number of pixels"):
        halo_from_shapes(tile_in, tile_out)


# Identity predictors must reproduce the input exactly up to float rounding (rtol = atol = 1e-6).
@pytest.mark.parametrize(
    "shape, tile, halo, overlap",
    [
        ((37, 53), (20, 20), (4, 4), 0.25),  # odd sizes, not multiples of the step
        ((37, 53), (20, 20), (4, 4), 0.0),  # no overlap
        ((37, 53), (20, 20), (4, 4), 0.5),  # half overlap
        ((37, 53), (16, 16), (0, 0), 0.25),  # halo 0: "same" padding network
        ((100, 1), (12, 12), (3, 3), 0.5),  # one column, far narrower than a tile
        ((1, 1), (9, 9), (4, 4), 0.25),  # single pixel, output tile 1x1
        ((1, 1), (20, 20), (2, 2), 0.25),  # single pixel, pad far wider than the image
        ((5, 7), (24, 24), (4, 4), 0.25),  # smaller than one output tile in both axes
        ((61, 29), (25, 19), (6, 3), 0.3),  # non-square tile and halo
        ((128, 192), (36, 36), (10, 10), 0.9),  # heavy overlap: many tiles
    ],
)
def test_identity_reproduces_input(shape, tile, halo, overlap):
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape).astype(np.float32)
    out = predict_tiled(image, crop_identity(halo), tile, overlap=overlap, batch_size=3)
    assert out.shape == (1, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], image, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_identity_multichannel_and_blends(blend):
    image = np.random.default_rng(1).uniform(size=(3, 45, 31))
    out = predict_tiled(image, crop_identity((5, 5)), 22, overlap=0.5, blend=blend)
    assert out.shape == (3, 45, 31)
    np.testing.assert_allclose(out, image, rtol=1e-6, atol=1e-6)


def test_borders_are_not_darkened():
    """A constant image stays constant to the last row and column: weights are normalised."""
    image = np.full((33, 47), 7.0)
    out = predict_tiled(image, crop_identity((4, 4)), 20, overlap=0.25)
    np.testing.assert_allclose(out[0], 7.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, [0, -1], :], 7.0, rtol=1e-6)
    np.testing.assert_allclose(out[0, :, [0, -1]], 7.0, rtol=1e-6)


def test_scaling_predictor_and_channel_change():
    """``x * 2`` per channel plus a new channel: the output channels come from the predictor."""

    def predictor(batch):
        core = batch[:, :, 3:-3, 3:-3] * 2
        return np.concatenate([core, -core], axis=1)

    image = np.random.default_rng(2).normal(size=(2, 29, 41))
    out = predict_tiled(image, predictor, 18, overlap=0.25, output_tile=12)
    assert out.shape == (4, 29, 41)
    np.testing.assert_allclose(out[:2], 2 * image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[2:], -2 * image, rtol=1e-5, atol=1e-5)


def test_mirror_padding_seen_by_predictor():
    """The first tile's context is the mirrored image (reflect: border pixel not repeated)."""
    image = np.arange(6 * 6, dtype=np.float32).reshape(6, 6)
    rec = Recorder(crop_identity((2, 2)))
    predict_tiled(image, rec, 10, output_tile=6)
    assert rec.shapes == [(1, 1, 10, 10)]  # 6x6 image = one 6x6 output tile
    np.testing.assert_array_equal(rec.batches[0][0, 0], np.pad(image, ((2, 2), (2, 2)), mode="reflect"))


@pytest.mark.parametrize(
    "shape, batch_size, overlap",
    [
        ((37, 53), 4, 0.25),  # several batches, last one partial
        ((37, 53), 1, 0.5),  # one tile per call
        ((10, 10), 16, 0.0),  # batch larger than the number of tiles
    ],
)
def test_batches_and_tile_count(shape, batch_size, overlap):
    rec = Recorder(crop_identity((4, 4)))
    predict_tiled(np.zeros(shape), rec, 20, overlap=overlap, batch_size=batch_size, output_tile=12)
    step = int(12 * (1 - overlap))
    n_tiles = len(tile_starts(shape[0], 12, step)) * len(tile_starts(shape[1], 12, step))
    assert all(s[0] <= batch_size and s[1:] == (1, 20, 20) for s in rec.shapes)
    assert sum(s[0] for s in rec.shapes) == n_tiles == plan_tiles(shape, (20, 20), (12, 12), overlap).n_tiles


def test_bad_overlap_rejected_before_probing():
    rec = Recorder(crop_identity((4, 4)))
    with pytest.raises(ValueError, match="overlap must be >= 0 and < 1, got 1.5"):
        predict_tiled(np.zeros((30, 30)), rec, 20, overlap=1.5)
    assert rec.batches == []


def test_numpy_scalar_overlap_accepted():
    out = predict_tiled(np.ones((9, 9)), crop_identity((2, 2)), 8, overlap=np.float32(0.5))
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_probe_adds_one_call_without_output_tile():
    rec = Recorder(crop_identity((4, 4)))
    predict_tiled(np.zeros((30, 30)), rec, 20, overlap=0.0, batch_size=100)
    assert rec.shapes == [(1, 1, 20, 20), (9, 1, 20, 20)]  # probe, then 3 x 3 tiles in one batch


def test_progress_reports_done_and_total():
    calls = []

    def record(done: int, total: int) -> None:
        calls.append((done, total))

    predict_tiled(np.zeros((37, 53)), crop_identity((4, 4)), 20, batch_size=5, progress=record)
    total = plan_tiles((37, 53), (20, 20), (12, 12), 0.25).n_tiles
    assert calls == [(min(d, total), total) for d in range(5, total + 5, 5)]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(overlap=1.0), ValueError, "overlap must be >= 0 and < 1, got 1.0"),  # full overlap
        (dict(overlap=-0.1), ValueError, "overlap must be >= 0 and < 1, got -0.1"),  # negative
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),  # empty batches
        (dict(blend="linear"), ValueError, "blend must be one of"),  # unknown blend
        (dict(tile=0), ValueError, "tile must be >= 1"),  # empty tile
        (dict(tile=(20, 20, 20)), TypeError, "pair of ints"),  # 3-D tile
        (dict(output_tile=11), ValueError, "even number of pixels"),  # halo 4.5
        (dict(progress=3), TypeError, "progress must be callable"),  # not a callback
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    args = dict(image=np.zeros((30, 30)), predictor=crop_identity((4, 4)), tile=20) | kwargs
    with pytest.raises(error, match=match):
        predict_tiled(**args)


@pytest.mark.parametrize(
    "image, error, match",
    [
        (np.zeros((2, 3, 4, 5)), ValueError, "got shape \\(2, 3, 4, 5\\)"),  # 4-D
        (np.zeros((0, 5)), ValueError, "non-empty"),  # empty
        (np.zeros((5, 5), complex), TypeError, "real-valued"),  # complex
    ],
)
def test_rejects_bad_images(image, error, match):
    with pytest.raises(error, match=match):
        predict_tiled(image, crop_identity((4, 4)), 20)


@pytest.mark.parametrize(
    "predictor, match",
    [
        (lambda b: b[:, :, 3:-2, 3:-3], "even number of pixels"),  # probe finds an odd difference
        (lambda b: b[0, :, 4:-4, 4:-4], "batch of 1"),  # drops the batch axis
    ],
)
def test_rejects_bad_predictor_when_probing(predictor, match):
    with pytest.raises(ValueError, match=match):
        predict_tiled(np.zeros((30, 30)), predictor, 20)


def test_rejects_predictor_output_not_matching_output_tile():
    expected = r"predictor must return shape \(1, C_out, 12, 12\), got \(1, 1, 20, 20\)"
    with pytest.raises(ValueError, match=expected):
        predict_tiled(np.zeros((10, 10)), lambda b: b, 20, output_tile=12)
