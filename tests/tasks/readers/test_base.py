"""The colour-to-grey rule every reader shares (plain images, DICOM, vendor exports), against a pixel loop."""
from __future__ import annotations

import numpy as np
import pytest

from octseg.tasks.readers.base import luminance


def _slow_luminance(arr: np.ndarray) -> np.ndarray:
    """One pixel at a time: channels equal -> the first, else round(0.299 R + 0.587 G + 0.114 B) clipped."""
    out = np.empty(arr.shape[:-1], dtype=arr.dtype)
    colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    same = all(np.array_equal(colour[..., 0], colour[..., c]) for c in range(colour.shape[-1]))
    for idx in np.ndindex(*arr.shape[:-1]):
        px = [float(v) for v in colour[idx]]
        if same:
            out[idx] = colour[idx][0]
            continue
        y = 0.299 * px[0] + 0.587 * px[1] + 0.114 * px[2]
        if arr.dtype.kind in "iu":
            info = np.iinfo(arr.dtype)
            y = min(max(round(y), info.min), info.max)
        out[idx] = y
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("channels", [2, 3, 4])
def test_luminance_matches_a_pixel_loop(dtype, channels) -> None:
    rng = np.random.default_rng(channels)
    top = 250 if dtype == np.uint8 else 30000
    arr = rng.integers(0, top, size=(5, 7, channels)).astype(dtype)
    np.testing.assert_allclose(luminance(arr, "image"), _slow_luminance(arr), rtol=1e-6)
    assert luminance(arr, "image").dtype == dtype


def test_equal_channels_are_kept_and_nothing_is_said() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    said: list[str] = []
    out = luminance(np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1), "B-scan", said)
    np.testing.assert_array_equal(out, grey)
    assert said == [] and out.flags.c_contiguous


def test_colour_and_see_through_alpha_are_said_with_what_was_read() -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[0, 0, 3] = 10
    said: list[str] = []
    assert luminance(rgba, "fundus image", said)[1, 1] == round(0.299 * 200)
    assert len(said) == 2 and all(s.startswith("fundus image") for s in said)
    assert "alpha" in said[0] and "luminance" in said[1]
