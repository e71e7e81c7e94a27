"""Normalisation that ignores the white fill of registered Spectralis B-scans."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.unet.normalize import fill_mask, normalize_bscan, normalize_volume


def _bscan_with_fill() -> np.ndarray:
    rng = np.random.default_rng(0)
    b = rng.integers(20, 120, size=(40, 60)).astype(np.uint8)
    b[:8, :10] = 255  # fill in the top-left corner, touching the border
    b[20:23, 30:33] = 255  # saturated tissue inside the image: not fill
    return b


def test_fill_mask_finds_border_fill_only():
    m = fill_mask(_bscan_with_fill())
    assert m[:8, :10].all()
    assert not m[20:23, 30:33].any()
    assert m.sum() == 80


def test_small_corner_fill_is_fill_but_small_saturated_border_tissue_is_not():
    b = _bscan_with_fill()
    b[-2:, -3:] = 255  # 6 px triangle-ish fill in the bottom-right corner
    b[30:32, 0] = 255  # 2 saturated px on the left border, not in a corner: tissue
    m = fill_mask(b)
    assert m[-2:, -3:].all() and not m[30:32, 0].any()


def test_12_bit_fill_in_uint16_is_found():
    b = (_bscan_with_fill().astype(np.uint16) * 16).clip(0, 4000)  # 12-bit range, tissue below 4095
    b[:8, :10] = 4095  # the fill of 12-bit data
    m = fill_mask(b)
    assert m[:8, :10].all() and m.sum() == 80


def test_normalized_tissue_has_zero_mean_unit_std_and_fill_is_zero():
    b = _bscan_with_fill()
    n = normalize_bscan(b)
    m = fill_mask(b)
    assert n.dtype == np.float32
    assert np.all(n[m] == 0)
    assert abs(n[~m].mean()) < 1e-5 and abs(n[~m].std() - 1) < 1e-4


def test_fill_does_not_shift_statistics():
    b = _bscan_with_fill()
    with_fill = normalize_bscan(b)
    without = normalize_bscan(b, mask=np.zeros_like(b, dtype=bool))
    assert not np.allclose(with_fill[20:, 20:], without[20:, 20:])  # the naive one is skewed by 255s


def test_constant_and_all_fill_images():
    assert np.all(normalize_bscan(np.full((8, 8), 255, np.uint8)) == 0)
    assert np.all(normalize_bscan(np.full((8, 8), 7, np.uint8)) == 0)


def test_volume_is_per_bscan_and_checks_dims():
    v = np.stack([_bscan_with_fill(), _bscan_with_fill() // 2])
    out = normalize_volume(v)
    np.testing.assert_array_equal(out[1], normalize_bscan(v[1]))
    with pytest.raises(ValueError, match="Z, H, W"):
        normalize_volume(v[0])


@pytest.mark.parametrize("scale", [3e38, 1e-30])
def test_float32_data_at_the_ends_of_its_range_normalise_like_ordinary_data(scale: float) -> None:
    """Statistics and arithmetic in float64: 3e38 does not overflow to NaN, 1e-30 is not flattened to 0."""
    rng = np.random.default_rng(0)
    ordinary = rng.random((32, 48)).astype(np.float32)
    extreme = (ordinary.astype(np.float64) * scale).astype(np.float32)
    got = normalize_bscan(extreme, np.zeros(extreme.shape, bool))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, normalize_bscan(ordinary, np.zeros(ordinary.shape, bool)), atol=1e-4)
