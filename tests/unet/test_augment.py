"""Tests of unet.augment: the paper's elastic deformation, flips, gray-value jitter, all seeded."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.unet.augment import augment, displacement_field, elastic_deform, intensity_jitter, random_flip


def blobs(shape: tuple[int, int], seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A label map with classes 0, 1, 2, 5: a few rectangles of different classes."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype)
    h, w = shape
    for value in (1, 2, 5, 1):
        y, x = rng.integers(0, max(1, h - 8)), rng.integers(0, max(1, w - 8))
        labels[y : y + rng.integers(4, 16), x : x + rng.integers(4, 16)] = value
    return labels


@pytest.mark.parametrize(
    "shape, grid",
    [
        ((33, 47), 3),  # odd sizes, the paper's grid
        ((1, 1), 3),  # single pixel
        ((2, 5), 2),  # tiny, coarsest grid
        ((64, 40), 5),  # finer grid
    ],
)
def test_displacement_field_shape(shape, grid):
    field = displacement_field(shape, 0, grid=grid, sigma=10.0)
    assert field.shape == (2, *shape)
    assert np.isfinite(field).all()


def test_displacement_field_statistics():
    """At the grid nodes the displacements are N(0, sigma^2); in between they are smoothed (smaller)."""
    rng = np.random.default_rng(0)
    sigma = 10.0
    fields = np.stack([displacement_field((17, 17), rng, grid=3, sigma=sigma) for _ in range(500)])
    nodes = fields[:, :, ::8, ::8]  # 3 x 3 nodes at rows/columns 0, 8, 16
    assert abs(nodes.mean()) < 0.5
    assert 0.95 * sigma < nodes.std() < 1.05 * sigma
    rms = np.sqrt((fields**2).mean())
    assert 0.6 * sigma < rms <= 1.05 * sigma
    # smooth: neighbouring pixels move by much less than sigma
    assert np.abs(np.diff(fields, axis=-1)).max() < sigma


@pytest.mark.parametrize(
    "shape",
    [
        (33, 47),  # odd sizes
        (1, 1),  # single pixel
        (3, 64),  # thin strip
    ],
)
@pytest.mark.parametrize("backend, tol", [("scipy", 1e-12), ("torch", 2e-5)])  # torch: float32 sample positions
def test_sigma_zero_is_identity(shape, backend, tol):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    labels = rng.integers(0, 4, size=shape).astype(np.int16)
    weights = rng.uniform(size=shape)
    out_image, out_labels, out_weights = elastic_deform(image, labels, weights, sigma=0.0, rng=rng, backend=backend)
    np.testing.assert_allclose(out_image, image, rtol=max(tol, 1e-6), atol=max(tol, 1e-6))  # through its nodes
    np.testing.assert_array_equal(out_labels, labels)
    np.testing.assert_allclose(out_weights, weights, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "dtype",
    [
        np.uint8,  # typical class map
        np.int32,  # instance ids
        np.int64,  # torch's default for class targets
        np.bool_,  # binary masks
    ],
)
def test_labels_keep_dtype_and_values(dtype):
    labels = blobs((45, 61), dtype=dtype) if dtype is not np.bool_ else blobs((45, 61)) > 0
    image = labels.astype(np.float32)
    _, out, _ = elastic_deform(image, labels, rng=3)
    assert out.dtype == labels.dtype and out.shape == labels.shape
    assert set(np.unique(out)) <= set(np.unique(labels))
    assert not np.array_equal(out, labels)  # it did deform


def test_nearest_image_equals_deformed_labels():
    """The same coordinates are used for image and labels: with order 0 both must agree exactly."""
    labels = blobs((51, 37), seed=4)
    out_image, out_labels, _ = elastic_deform(labels.astype(np.float64), labels, rng=5, image_order=0)
    np.testing.assert_array_equal(out_image, out_labels.astype(np.float64))


def test_cubic_image_aligned_with_labels():
    """Bicubic image vs nearest labels: thresholding the image recovers the labels on >= 97 % of pixels."""
    labels = blobs((64, 80), seed=6)
    labels = (labels > 0).astype(np.uint8)
    image = labels * 100.0
    out_image, out_labels, out_weights = elastic_deform(image, labels, labels.astype(np.float32), rng=7)
    assert ((out_image > 50) == (out_labels == 1)).mean() >= 0.97
    assert ((out_weights > 0.5) == (out_labels == 1)).mean() >= 0.97


def test_weights_stay_in_range():
    weights = np.random.default_rng(8).uniform(0.5, 3.0, size=(40, 40)).astype(np.float32)
    _, _, out = elastic_deform(np.zeros((40, 40)), weights=weights, rng=9)
    assert out.dtype == np.float32
    assert out.min() >= 0.5 - 1e-6 and out.max() <= 3.0 + 1e-6


def test_integer_image_becomes_float32():
    out, _, _ = elastic_deform(np.full((20, 30), 7, np.uint8), rng=0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 7.0, rtol=1e-5)


def test_same_seed_same_output_different_seed_different():
    image = np.random.default_rng(0).normal(size=(3, 40, 50))
    labels = blobs((40, 50))
    a = augment(image, labels, None, rng=11)
    b = augment(image, labels, None, rng=11)
    c = augment(image, labels, None, rng=12)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] is None
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "horizontal, vertical, expected_axes",
    [
        (1.0, 0.0, (-1,)),  # always left-right
        (0.0, 1.0, (-2,)),  # always up-down
        (1.0, 1.0, (-2, -1)),  # both
        (0.0, 0.0, ()),  # never: plain copy
    ],
)
def test_flips_are_consistent(horizontal, vertical, expected_axes):
    image = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    labels = np.arange(35, dtype=np.int32).reshape(5, 7)
    weights = labels.astype(np.float64) / 10
    out = random_flip(image, labels, weights, rng=0, horizontal=horizontal, vertical=vertical)
    for arr, res in zip((image, labels, weights), out):
        expected = np.flip(arr, axis=expected_axes) if expected_axes else arr
        np.testing.assert_array_equal(res, expected)
        assert res is not arr and res.dtype == arr.dtype
    twice = random_flip(*out, rng=0, horizontal=horizontal, vertical=vertical)
    for arr, res in zip((image, labels, weights), twice):
        np.testing.assert_array_equal(res, arr)  # flipping twice is the identity


def test_flip_probability_roughly_half():
    rng = np.random.default_rng(0)
    x = np.arange(4.0).reshape(1, 4)
    flipped = [random_flip(x, rng=rng)[0][0, 0] == 3.0 for _ in range(1000)]
    assert 0.45 < np.mean(flipped) < 0.55


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # defaults
        dict(brightness=0.0, contrast=0.0, gamma=0.3),  # gamma only
        dict(brightness=0.3, contrast=0.0, gamma=0.0),  # brightness only
    ],
)
def test_intensity_jitter_changes_but_keeps_order(kwargs):
    image = np.linspace(0, 1, 5 * 9, dtype=np.float32).reshape(5, 9)
    out = intensity_jitter(image, 0, **kwargs)
    assert out.shape == image.shape and out.dtype == np.float32
    assert not np.allclose(out, image)
    assert (np.diff(out.ravel()) >= 0).all()  # monotone: gray-value order is kept


def test_intensity_jitter_zero_strength_is_identity():
    image = np.random.default_rng(0).normal(size=(2, 7, 11))
    np.testing.assert_allclose(intensity_jitter(image, 1, 0.0, 0.0, 0.0), image, rtol=1e-12)


def test_intensity_jitter_constant_image():
    out = intensity_jitter(np.full((4, 4), 3, np.uint8), 0, brightness=0.0, contrast=0.5)
    np.testing.assert_allclose(out, 3.0)  # no contrast to scale, range 0 is not a division by zero


def test_augment_keeps_geometry_shared():
    """Labels fed as the image: after flip + elastic (order 3) the image still thresholds to the labels."""
    labels = (blobs((48, 64), seed=2) > 0).astype(np.uint8)
    image, out_labels, weights = augment(labels * 100.0, labels, labels * 1.0, rng=4, jitter=False)
    assert ((image > 50) == (out_labels == 1)).mean() >= 0.97
    assert ((weights > 0.5) == (out_labels == 1)).mean() >= 0.97


def test_augment_all_off_returns_inputs():
    image, labels = np.ones((6, 6)), np.zeros((6, 6), np.uint8)
    out = augment(image, labels, None, rng=0, elastic=False, flip=False, jitter=False)
    assert out[0] is image and out[1] is labels and out[2] is None


ZEROS = np.zeros((4, 4))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: elastic_deform(ZEROS, rng=None), TypeError, "rng must be"),  # unseeded
        (lambda: elastic_deform(ZEROS, rng=0, sigma=-1), ValueError, "sigma must be >= 0 pixels, got -1"),
        (lambda: elastic_deform(ZEROS, rng=0, grid=1), ValueError, "grid must be an int >= 2, got 1"),
        (lambda: elastic_deform(ZEROS, rng=0, image_order=7), ValueError, "order in 0..5, got 7"),
        (lambda: elastic_deform(np.zeros((4,)), rng=0), ValueError, r"got shape \(4,\)"),  # 1-D image
        (lambda: elastic_deform(ZEROS, np.zeros((4, 5), int), rng=0), ValueError, "labels must have shape"),
        (lambda: elastic_deform(ZEROS, ZEROS, rng=0), TypeError, "integer or bool dtype"),  # float labels
        (lambda: random_flip(ZEROS, rng=0, horizontal=1.5), ValueError, r"in \[0, 1\], got 1.5"),
        (lambda: intensity_jitter(ZEROS, 0, contrast=1.0), ValueError, "contrast must be >= 0 and < 1.0"),
        (lambda: intensity_jitter(ZEROS, 0, gamma=-0.1), ValueError, "gamma must be >= 0"),
    ],
)
def test_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("shape, grid", [((572, 572), 3), ((33, 47), 3), ((1, 1), 3), ((64, 40), 5)])
def test_displacement_field_equals_the_2d_spline_zoom(shape, grid):
    """The separable form (Ry @ coarse @ Rx^T) against the obvious one: zoom the coarse grid itself."""
    from scipy import ndimage

    coarse = np.random.default_rng(7).normal(0.0, 10.0, size=(2, grid, grid))
    reference = ndimage.zoom(coarse, (1, shape[0] / grid, shape[1] / grid), order=3, mode="mirror", grid_mode=False)
    np.testing.assert_allclose(displacement_field(shape, 7, grid=grid, sigma=10.0), reference, atol=1e-9)


@pytest.mark.parametrize("elastic", [True, False])
def test_window_returns_the_crop_of_the_whole_warp(elastic):
    """Labels and weights warped for the loss's centre crop only equal that crop of the whole warp."""
    rng = np.random.default_rng(2)
    image = rng.normal(size=(60, 70)).astype(np.float32)
    labels, weights = blobs((60, 70), seed=3), rng.random((60, 70)).astype(np.float32)
    window = np.s_[10:50, 12:58]
    whole = augment(image, labels, weights, 11, elastic=elastic)
    part = augment(image, labels, weights, 11, elastic=elastic, window=window)
    np.testing.assert_array_equal(part[0], whole[0])
    np.testing.assert_array_equal(part[1], whole[1][window])
    np.testing.assert_array_equal(part[2], whole[2][window])


@pytest.mark.parametrize("order", [0, 1, 3])
def test_torch_warp_against_the_scipy_reference(order):
    """The fast backend samples where SciPy does: nearest and linear agree to float precision (nearest up to
    ties), cubic (Keys' convolution vs B-splines) closely on a smooth image; mirrored outside the image."""
    from scipy import ndimage

    from octseg.unet.augment import _grid_sample

    yy, xx = np.mgrid[0:60, 0:70]
    smooth = (np.sin(yy / 7.0) * np.cos(xx / 9.0)).astype(np.float32)
    coords = np.indices((60, 70), dtype=np.float64) + displacement_field((60, 70), 5, sigma=10.0)
    ref = ndimage.map_coordinates(smooth, coords, order=order, mode="mirror", output=np.float64)
    fast = _grid_sample(smooth, coords.astype(np.float32), order)
    if order == 0:
        assert (fast == ref).mean() > 0.999
    elif order == 1:
        np.testing.assert_allclose(fast, ref, atol=1e-4)
    else:
        np.testing.assert_allclose(fast, ref, atol=0.02)
        assert np.abs(fast - ref).mean() < 5e-3  # 0.3% of the amplitude: the two cubic kernels differ
