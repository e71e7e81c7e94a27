"""unet.weights on real masks (Duke DME fluid, ISBI 2012 EM): fast map == brute force within 0.01."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from octseg.unet.weights import border_weight_map, border_weight_map_reference

MAX_ERROR = 0.01


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


DUKE_MASKS = [
    2,  # 13 pockets, some joined only diagonally
    40,  # 10 pockets of 8-connected fluid (16 if 4-connected)
    45,  # one large pocket: no border term
    9,  # empty mask: no fluid, weights all 1
]


@pytest.mark.parametrize("n", DUKE_MASKS)
def test_duke_fluid_masks_match_reference(shared_data, n):
    rgb = read_png(shared_data / "duke_dme_fluid" / "masks" / f"img_{n}.png")  # (496, 768, 3)
    labels = (rgb.max(axis=-1) > 0).astype(np.uint8)  # fluid where max(rgb) > 0
    fast = border_weight_map(labels)  # instances: 8-connected fluid pockets
    ref = border_weight_map_reference(labels)
    assert fast.shape == labels.shape
    assert np.abs(fast - ref).max() <= MAX_ERROR


ISBI_LABELS = [
    # slice, crop (rows, cols)
    (0, (slice(None), slice(None))),  # the full 512x512 slice, 136 cells
    (7, (slice(100, 357), slice(50, 371))),  # odd 257x321 crop: cells cut by the border
]


@pytest.mark.parametrize(("n", "crop"), ISBI_LABELS)
def test_isbi_cells_match_reference(shared_data, n, crop):
    raw = read_png(shared_data / "isbi2012_em" / "labels" / f"{n}.png")[crop]  # {0 membrane, 255 cell}
    labels = (raw == 255).astype(np.uint8)  # cells = class 1, membranes = background 0
    # Cells as 4-connected components: 8-connectivity merges neighbouring cells through diagonal
    # one-pixel gaps in the membrane (e.g. slice 1: 130 cells 4-connected, 129 8-connected).
    instances, count = ndi.label(labels)
    assert count > 20
    fast = border_weight_map(labels, instances)
    ref = border_weight_map_reference(labels, instances)
    assert np.abs(fast - ref).max() <= MAX_ERROR
    assert fast[labels == 0].max() > 5.0  # thin membranes between cells carry a large border term
