"""Manual masks beside a source: found by name, read as labels of its volume, refused with the mask file named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octseg.tasks.ingest.masks import read_masks
from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers.image_files import GREY, STACK, bscan_folder, png

MASK = np.zeros((3, 20, 30), np.uint8)
MASK[0, 2:5, 3:9] = 1
MASK[2, 10:12, :] = 1


@pytest.mark.parametrize(("stored", "expected"), [
    (MASK * 255, MASK),                                  # 0/255 -> binary
    (MASK * 7, MASK),                                    # 0 and one other value -> binary
    (MASK + (MASK * 2)[::-1], MASK + (MASK * 2)[::-1]),  # 0, 1, 2: small integer classes kept
    (MASK.astype(bool), MASK),                           # boolean
])
def test_stack_masks(tmp_path: Path, stored: np.ndarray, expected: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY)
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "scan.npy", stored)  # a mask with another suffix is not found
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", stored.astype(np.uint8), **GREY)
    labels, annotated = read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))
    assert labels.dtype == np.uint8 and annotated == [0, 1, 2]
    np.testing.assert_array_equal(labels, expected)


def test_rgb_mask_any_channel_is_foreground(tmp_path: Path) -> None:
    png(tmp_path / "one.png", STACK[0])
    (tmp_path / "labels").mkdir()
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[1, 1] = (0, 0, 9)
    rgb[2, 2] = (255, 255, 255)
    png(tmp_path / "labels" / "one.png", rgb)
    labels, annotated = read_masks(tmp_path / "labels", read_volume(tmp_path / "one.png"))
    assert annotated == [0] and labels.shape == (1, 20, 30)
    assert labels.sum() == 2 and labels[0, 1, 1] == labels[0, 2, 2] == 1


@pytest.mark.parametrize("subfolder", [True, False])  # labels_dir/<folder name>/... or labels_dir/...
def test_folder_masks_partial_annotation(tmp_path: Path, subfolder: bool) -> None:
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    mask_dir = tmp_path / "labels" / ("vol" if subfolder else "")
    mask_dir.mkdir(parents=True)
    for z in (0, 2):  # B-scan 1 is not annotated
        png(mask_dir / f"b_{z}.png", MASK[z] * 255)
    labels, annotated = read_masks(tmp_path / "labels", volume)
    assert annotated == [0, 2]
    np.testing.assert_array_equal(labels, MASK)


def test_no_masks_means_not_annotated(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    assert read_masks(tmp_path / "labels", read_volume(bscan_folder(tmp_path / "vol"))) is None
    assert read_masks(tmp_path / "absent", read_volume(bscan_folder(tmp_path / "vol2"))) is None


@pytest.mark.parametrize(("mask", "phrase"), [
    (np.zeros((20, 29), np.uint8), r"mask shape \(20, 29\) does not match image shape \(20, 30\) of b_1.png"),
    (np.arange(600, dtype=np.uint8).reshape(20, 30), "neither binary nor small-integer"),  # grey image
])
def test_bad_masks_name_the_mask_file(tmp_path: Path, mask: np.ndarray, phrase: str) -> None:
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    (tmp_path / "labels").mkdir()
    png(tmp_path / "labels" / "b_1.png", mask)
    with pytest.raises(ReadError, match=phrase) as err:
        read_masks(tmp_path / "labels", volume)
    assert err.value.path == tmp_path / "labels" / "b_1.png"


def test_stack_mask_of_wrong_shape(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY)
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", MASK[:2])
    with pytest.raises(ReadError, match=r"scan.tif: mask shape \(2, 20, 30\) does not match image shape \(3, 20, 30\)"):
        read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))


# ----- real data (skipped when ../shared/data is absent) -----
def test_duke_fluid_images_and_binary_masks(shared_data: Path) -> None:
    vol = read_volume(shared_data / "duke_dme_fluid" / "images")
    assert vol.image.shape == (66, 496, 768) and vol.image.dtype == np.uint8  # RGB with R=G=B -> grey
    labels, annotated = read_masks(shared_data / "duke_dme_fluid" / "masks", vol)
    assert labels.shape == vol.image.shape and annotated == list(range(66))
    assert set(np.unique(labels)) == {0, 1}
    rgb = np.asarray(Image.open(shared_data / "duke_dme_fluid" / "masks" / vol.files[5].name))
    np.testing.assert_array_equal(labels[5], rgb.max(axis=-1) > 0)
