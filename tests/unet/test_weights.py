"""unet.weights: fast border-weight map vs the brute force, hand-computed values, input checks."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import ndimage as ndi

from octseg.unet import weights as weights_module
from octseg.unet.weights import (
    BORDER_TOLERANCE,
    border_weight_map,
    border_weight_map_reference,
    border_weight_map_volume,
)

MAX_ERROR = 0.01  # the spec: fast within 0.01 of the reference


def border(d1: float, d2: float, w0: float = 10.0, sigma: float = 5.0) -> float:
    """Eq. 2's border term for given distances (pixels)."""
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def random_disks(shape: tuple[int, int], n: int, seed: int, radii: tuple[float, float]) -> np.ndarray:
    """Seeded (H, W) int32 instance map of ``n`` disks; centres may lie off the image, later disks
    overwrite earlier ones (so instances touch, get cut, or split into pieces)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inst = np.zeros(shape, dtype=np.int32)
    for ident in range(1, n + 1):
        cy, cx = rng.uniform(-3, shape[0] + 3), rng.uniform(-3, shape[1] + 3)
        r = rng.uniform(*radii)
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = ident
    return inst


def assert_matches_reference(labels: np.ndarray, instances: np.ndarray | None, **kw: object) -> None:
    fast = border_weight_map(labels, instances, **kw)
    ref = border_weight_map_reference(labels, instances, **kw)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    err = np.abs(fast - ref)
    assert err.max() <= MAX_ERROR
    assert err.max() < BORDER_TOLERANCE + 1e-5  # the documented bound, 10x tighter than the spec
    no_border = border_weight_map_reference(labels, instances, **{**kw, "w0": 0.0})
    kept = ref - no_border >= BORDER_TOLERANCE  # where d1 + d2 <= R the fast map is exact
    np.testing.assert_allclose(fast[kept], ref[kept], rtol=1e-5, atol=1e-5)


RANDOM_CASES = [
    # shape,     disks, seed, radii,    w0,   sigma
    ((37, 53), 6, 0, (2, 8), 10.0, 5.0),  # odd size, a few disks
    ((64, 64), 25, 1, (2, 6), 10.0, 5.0),  # crowded: many touching instances
    ((31, 90), 12, 2, (3, 10), 10.0, 5.0),  # wide strip, disks cut by the border
    ((50, 50), 40, 3, (0.5, 2), 10.0, 5.0),  # many tiny instances, some single pixels
    ((45, 61), 10, 4, (2, 8), 10.0, 2.0),  # narrow sigma: small cut-off radius
    ((45, 61), 10, 5, (2, 8), 25.0, 12.0),  # wide sigma: cut-off radius larger than the image
    ((40, 40), 8, 6, (2, 8), 0.5, 5.0),  # w0 below 1
    ((1, 57), 5, 7, (1, 3), 10.0, 5.0),  # a single row
    ((57, 1), 5, 8, (1, 3), 10.0, 5.0),  # a single column
]


@pytest.mark.parametrize(("shape", "n", "seed", "radii", "w0", "sigma"), RANDOM_CASES)
def test_random_explicit_instances_match_reference(shape, n, seed, radii, w0, sigma):
    inst = random_disks(shape, n, seed, radii)
    assert_matches_reference((inst > 0).astype(np.uint8), inst, w0=w0, sigma=sigma)


@pytest.mark.parametrize("seed", range(10))
def test_random_derived_instances_match_reference(seed):
    # three classes; instances = 8-connected components per class
    inst = random_disks((43, 59), 14, 100 + seed, (1.5, 7))
    classes = np.random.default_rng(seed).integers(1, 4, size=inst.max() + 1)
    labels = np.where(inst > 0, classes[inst], 0)
    assert_matches_reference(labels, None)
    assert_matches_reference(labels, None, class_weights="balanced")


NO_BORDER_CASES = [
    # labels, instances
    (np.zeros((9, 11), np.uint8), None),  # no instance at all
    (np.pad(np.ones((3, 3), np.uint8), ((2, 4), (3, 5))), None),  # one instance inside
    (np.pad(np.ones((3, 3), np.uint8), ((0, 6), (0, 8))), None),  # one instance in a corner
    (np.eye(6, dtype=np.uint8), None),  # a diagonal line: one 8-connected instance
]


@pytest.mark.parametrize(("labels", "instances"), NO_BORDER_CASES)
def test_fewer_than_two_instances_have_no_border_term(labels, instances):
    for fn in (border_weight_map, border_weight_map_reference):
        np.testing.assert_array_equal(fn(labels, instances), np.ones(labels.shape, np.float32))


def two_bars() -> np.ndarray:
    """(5, 9): class 1 in columns 0-2 and 4-6, one background column (3) between, 7-8 free."""
    labels = np.zeros((5, 9), np.uint8)
    labels[:, 0:3] = 1
    labels[:, 4:7] = 1
    return labels


HAND_CASES = [
    # pixel,  d1, d2: distances from that background pixel to the two bars
    ((2, 3), 1.0, 1.0),  # the one-pixel gap between the bars
    ((0, 3), 1.0, 1.0),  # the gap, at the image border
    ((2, 7), 1.0, 5.0),  # right of the right bar
    ((4, 8), 2.0, 6.0),  # far corner
]


@pytest.mark.parametrize(("pixel", "d1", "d2"), HAND_CASES)
def test_two_bars_hand_computed(pixel, d1, d2):
    w = border_weight_map(two_bars())
    assert w[pixel] == pytest.approx(1.0 + border(d1, d2), abs=1e-5)  # gap: 1 + 10 exp(-4/50) = 10.23
    assert np.all(w[two_bars() > 0] == 1.0)  # no border term on the instances themselves


DERIVED_CASES = [
    # right-hand class, expected weight at (2, 6): next to the right region, 4 px from the left
    (1, 1.0),  # same class, touching: one 8-connected instance, no border term
    (2, 1.0 + border(1.0, 4.0)),  # different classes touch: two instances
]


@pytest.mark.parametrize(("right_class", "expected"), DERIVED_CASES)
def test_touching_regions_split_by_class(right_class, expected):
    labels = np.zeros((5, 9), np.uint8)
    labels[:, 0:3] = 1
    labels[:, 3:6] = right_class
    assert border_weight_map(labels)[2, 6] == pytest.approx(expected, abs=1e-5)


CUTOFF_CASES = [
    # column of the second instance; the pixel between is at d1 = 1 from the first (column 0)
    (20, 0.0),  # d1 + d2 = 1 + 19 = 20 < R = 21.46: exact
    (21, 0.0),  # d1 + d2 = 21 < R, with d2 = floor(R - 1): the widest window still exact
    (22, BORDER_TOLERANCE),  # d1 + d2 = 22 > R: the term (6.2e-4) may be dropped
    (30, BORDER_TOLERANCE),  # d1 + d2 = 30 > R: far beyond the cut-off
]


@pytest.mark.parametrize(("col", "allowed"), CUTOFF_CASES)
def test_cutoff_radius_edge_on_a_row(col, allowed):
    labels = np.zeros((1, 40), np.uint8)
    labels[0, 0] = labels[0, col] = 1
    w = border_weight_map(labels)
    assert abs(w[0, 1] - (1.0 + border(1.0, col - 1.0))) <= allowed + 1e-5


def test_very_wide_image_uses_64_bit_squared_distances():
    labels = np.zeros((1, 46342), np.uint8)  # (W - 1)^2 no longer fits in int32
    labels[0, [0, 2, 46341]] = 1
    w = border_weight_map(labels)
    assert w[0, 1] == pytest.approx(1.0 + border(1.0, 1.0), abs=1e-5)
    assert np.abs(w - border_weight_map_reference(labels)).max() < BORDER_TOLERANCE


def test_eight_connected_diagonal_is_one_instance_unless_given():
    labels = np.array([[1, 0], [0, 1]], np.uint8)
    np.testing.assert_array_equal(border_weight_map(labels), np.ones((2, 2), np.float32))
    split = border_weight_map(labels, np.array([[1, 0], [0, 2]]))
    assert split[0, 1] == pytest.approx(1.0 + border(1.0, 1.0), abs=1e-5)


ID_CASES = [
    # ids given to the (left, right) bars
    (7, 3),  # arbitrary order
    (2**40, 5),  # huge sparse ids (renumbered internally)
]


@pytest.mark.parametrize(("left", "right"), ID_CASES)
def test_explicit_instances_equal_derived_components(left, right):
    labels = two_bars()
    inst = np.zeros(labels.shape, np.int64)
    inst[:, 0:3], inst[:, 4:7] = left, right
    np.testing.assert_array_equal(border_weight_map(labels, inst), border_weight_map(labels))


def test_border_term_peaks_in_thin_gap():
    yy, xx = np.mgrid[:40, :60]
    left = (yy - 20) ** 2 + (xx - 20) ** 2 <= 64
    right = (yy - 20) ** 2 + (xx - 39) ** 2 <= 64
    labels = (left | right).astype(np.uint8)
    term = border_weight_map(labels) - 1.0
    row, col = np.unravel_index(np.argmax(term), term.shape)
    assert row == 20 and col in (29, 30)  # disks span columns 12-28 and 31-47 on row 20
    assert term[row, col] == pytest.approx(border(1.0, 2.0), abs=1e-5)


def test_class_weights_balanced_hand_computed():
    labels = np.zeros((3, 7), np.uint8)  # counts: class 0 -> 12, class 1 -> 6, class 2 -> 3
    labels[0, :6] = 1
    labels[2, 4:7] = 2
    w = border_weight_map(labels, w0=0.0, class_weights="balanced")
    expected = np.choose(labels, [1.0, 12 / 6, 12 / 3]).astype(np.float32)
    np.testing.assert_allclose(w, expected, rtol=1e-6)


def test_class_weights_mapping_and_border_term_add_up():
    labels = two_bars()
    labels[:, 4:7] = 2
    w = border_weight_map(labels, class_weights={0: 0.5, 1: 2.0, 2: 3.0, 9: 7.0})  # unused key 9 is fine
    assert w[0, 0] == 2.0 and w[0, 5] == 3.0
    assert w[2, 3] == pytest.approx(0.5 + border(1.0, 1.0), abs=1e-5)


def test_accepted_input_dtypes_give_the_same_map():
    labels = two_bars()
    expected = border_weight_map(labels)
    variants = (labels.astype(bool), labels.astype(np.float64), labels.astype(np.uint64), labels.tolist())
    for variant in variants:
        np.testing.assert_array_equal(border_weight_map(variant), expected)


BAD_INPUTS = [
    # labels, kwargs, error, message fragment
    (np.zeros(7, np.uint8), {}, ValueError, "2-D"),  # 1-D labels
    (np.zeros((2, 3, 4), np.uint8), {}, ValueError, "2-D"),  # a volume: use the _volume form
    (np.zeros((0, 5), np.uint8), {}, ValueError, "empty"),  # no pixels
    (np.full((3, 3), 0.5), {}, TypeError, "integer"),  # non-integral floats
    (np.full((3, 3), "a"), {}, TypeError, "dtype"),  # strings
    (-np.ones((3, 3), np.int8), {}, ValueError, ">= 0"),  # negative class ids
    (np.ones((3, 3), np.uint8), {"instances": np.ones((3, 4), int)}, ValueError, "shape"),  # mismatch
    (np.zeros((3, 3), np.uint8), {"instances": np.eye(3, dtype=int)}, ValueError, "labels == 0"),  # on bg
    (np.ones((3, 3), np.uint8), {"sigma": 0.0}, ValueError, "sigma"),  # zero width
    (np.ones((3, 3), np.uint8), {"sigma": float("nan")}, ValueError, "sigma"),  # nan width
    (np.ones((3, 3), np.uint8), {"w0": -1.0}, ValueError, "w0"),  # negative amplitude
    (np.ones((3, 3), np.uint8), {"w0": "ten"}, TypeError, "real numbers"),  # not a number
    (np.ones((3, 3), np.uint8), {"class_weights": "inverse"}, ValueError, "balanced"),  # unknown mode
    (np.ones((3, 3), np.uint8), {"class_weights": [1.0, 2.0]}, TypeError, "mapping"),  # a list
    (np.eye(3, dtype=np.uint8) * 2, {"class_weights": {0: 1.0}}, ValueError, "[2]"),  # class 2 missing
    (np.ones((3, 3), np.uint8), {"class_weights": {1: -2.0}}, ValueError, ">= 0"),  # negative weight
]


@pytest.mark.parametrize("fn", [border_weight_map, border_weight_map_reference])
@pytest.mark.parametrize(("labels", "kwargs", "error", "fragment"), BAD_INPUTS)
def test_bad_input_raises(fn, labels, kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        fn(labels, **kwargs)


def test_cutoff_radius_follows_tolerance():
    for w0, sigma in [(10.0, 5.0), (3.0, 1.5), (100.0, 20.0)]:
        r = weights_module._cutoff_radius(w0, sigma)
        assert w0 * math.exp(-(r**2) / (2 * sigma**2)) == pytest.approx(BORDER_TOLERANCE)
    assert weights_module._cutoff_radius(BORDER_TOLERANCE / 2, 5.0) == 0.0  # whole term below tolerance


def test_volume_equals_per_slice_loop():
    inst = np.stack([random_disks((23, 31), 6, seed, (2, 6)) for seed in range(3)])
    labels = (inst > 0).astype(np.uint8)
    labels[1, :, 15:] *= 2  # a second class in one B-scan
    settings = [
        (None, {}),  # derived instances, defaults
        (None, {"class_weights": "balanced", "w0": 5.0}),  # per-B-scan class frequencies
        (inst, {"sigma": 3.0}),  # explicit instances
    ]
    for instances, kw in settings:
        vol = border_weight_map_volume(labels, instances, **kw)
        loop = [border_weight_map(labels[z], None if instances is None else instances[z], **kw)
                for z in range(3)]
        assert vol.dtype == np.float32
        np.testing.assert_array_equal(vol, np.stack(loop))


VOLUME_BAD = [
    # labels, instances, fragment
    (np.zeros((4, 5), np.uint8), None, "3-D"),  # a single B-scan
    (np.zeros((2, 4, 5), np.uint8), np.zeros((2, 4, 6), int), "shape"),  # mismatched instances
]


@pytest.mark.parametrize(("labels", "instances", "fragment"), VOLUME_BAD)
def test_volume_bad_input(labels, instances, fragment):
    with pytest.raises(ValueError, match=fragment):
        border_weight_map_volume(labels, instances)


def test_more_instances_than_one_pair_search_block():
    # > 256 instances: _needed_windows searches pairs block by block within a band of rows
    inst = random_disks((160, 170), 700, 9, (0.5, 3))
    assert np.count_nonzero(np.unique(inst)) > 2 * weights_module._PAIR_BLOCK
    assert_matches_reference((inst > 0).astype(np.uint8), inst)


def test_public_feature_transform_fallback(monkeypatch):
    # the private scipy routine and the public wrapper give the same feature transform and map
    outside = np.random.default_rng(0).random((23, 31)) > 0.05
    expected = ndi.distance_transform_edt(outside, return_distances=False, return_indices=True)
    np.testing.assert_array_equal(weights_module._feature_transform(outside), expected)
    inst = random_disks((40, 50), 12, 11, (1.5, 6))
    labels = (inst > 0).astype(np.uint8)
    fast = border_weight_map(labels, inst)
    monkeypatch.setattr(weights_module, "_feature_transform_c", None)
    np.testing.assert_array_equal(border_weight_map(labels, inst), fast)
