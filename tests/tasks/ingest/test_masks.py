"""Manual masks beside a source: found by name, read as labels of its volume, refused with the mask file named."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octseg.tasks.ingest.masks import read_masks, unmatched_masks
from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers.image_files import GREY, STACK, bscan_folder, png

MASK = np.zeros((3, 20, 30), np.uint8)
MASK[0, 2:5, 3:9] = 1
MASK[2, 10:12, :] = 1


@pytest.mark.parametrize(("stored", "expected"), [
    (MASK * 255, MASK),                                  # 0/255 -> binary
    (MASK.astype(np.uint16) * 65535, MASK),              # 0/65535 -> binary
    ((MASK * (241 + np.arange(30) % 15)).astype(np.uint8), MASK),  # near-white shades of lossy compression
    (MASK * 7, MASK * 7),                                # 0..31 are class labels, even one alone
    (MASK * 2, MASK * 2),                                # a volume holding class 2 only stays class 2
    (MASK + (MASK * 2)[::-1], MASK + (MASK * 2)[::-1]),  # 0, 1, 2: small integer classes kept
    (MASK.astype(bool), MASK),                           # boolean
])
def test_stack_masks(tmp_path: Path, stored: np.ndarray, expected: np.ndarray) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY)
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "scan.npy", stored)  # a mask with another suffix is not found
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", stored if stored.dtype != bool else stored.astype(np.uint8), **GREY)
    labels, annotated = read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))
    assert labels.dtype == np.uint8 and annotated == [0, 1, 2]
    np.testing.assert_array_equal(labels, expected)


def test_rgb_mask_of_one_colour_is_foreground(tmp_path: Path) -> None:
    png(tmp_path / "one.png", STACK[0])
    (tmp_path / "labels").mkdir()
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[1, 1] = (0, 0, 9)
    rgb[2, 2] = (0, 0, 9)
    png(tmp_path / "labels" / "one.png", rgb)
    labels, annotated = read_masks(tmp_path / "labels", read_volume(tmp_path / "one.png"))
    assert annotated == [0] and labels.shape == (1, 20, 30)
    assert labels.sum() == 2 and labels[0, 1, 1] == labels[0, 2, 2] == 1


def test_one_colour_and_opaque_alpha_masks_are_binary(tmp_path: Path) -> None:
    png(tmp_path / "one.png", STACK[0])
    (tmp_path / "labels").mkdir()
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 3] = 255  # opaque black background
    rgba[3:6, 4:9, 0] = 200
    Image.fromarray(rgba, "RGBA").save(tmp_path / "labels" / "one.png")
    labels, _ = read_masks(tmp_path / "labels", read_volume(tmp_path / "one.png"))
    np.testing.assert_array_equal(labels[0], rgba[..., 0] > 0)


def test_class_values_are_decided_for_the_whole_volume(tmp_path: Path) -> None:
    """B-scan 0 holds classes 1 and 2, B-scan 2 only class 2: it stays 2 (was read as binary, 1)."""
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    (tmp_path / "labels").mkdir()
    png(tmp_path / "labels" / "b_0.png", MASK[0] + (MASK[0] * 2)[::-1])
    png(tmp_path / "labels" / "b_2.png", MASK[2] * 2)
    labels, annotated = read_masks(tmp_path / "labels", volume)
    assert annotated == [0, 2]
    np.testing.assert_array_equal(labels[2], MASK[2] * 2)
    np.testing.assert_array_equal(labels[0], MASK[0] + (MASK[0] * 2)[::-1])


def test_binary_and_class_masks_mixed_in_a_volume_are_refused(tmp_path: Path) -> None:
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    (tmp_path / "labels").mkdir()
    png(tmp_path / "labels" / "b_0.png", MASK[0] * 255)
    png(tmp_path / "labels" / "b_2.png", MASK[2] * 3)
    with pytest.raises(ReadError, match="b_0.png: a binary mask .* whose mask b_2.png holds class labels up to 3"):
        read_masks(tmp_path / "labels", volume)


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
    (np.where(MASK[0] > 0, 100, 0).astype(np.uint8) + np.where(MASK[2] > 0, 200, 0).astype(np.uint8),
     "neither binary nor small-integer"),  # two grey levels above 31: classes, not one binary value
    (np.stack([MASK[0] * 255, MASK[2] * 255, np.zeros_like(MASK[0])], -1), "colour mask of several colours"),
    (np.pad(np.ones((3, 5), np.uint8), ((0, 17), (0, 25))) + np.pad(np.full((5, 10), 255, np.uint8), ((15, 0), (20, 0))),
     "neither binary nor small-integer"),  # class 1 away from 255 ("ignore"): not a lossy binary mask
])
def test_bad_masks_name_the_mask_file(tmp_path: Path, mask: np.ndarray, phrase: str) -> None:
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    (tmp_path / "labels").mkdir()
    png(tmp_path / "labels" / "b_1.png", mask)
    with pytest.raises(ReadError, match=phrase) as err:
        read_masks(tmp_path / "labels", volume)
    assert err.value.path == tmp_path / "labels" / "b_1.png"


@pytest.mark.parametrize(("values", "phrase"), [(np.nan, "NaN or infinite"), (-1.0, "negative or fractional"),
                                               (0.5, "negative or fractional")])
def test_float_masks_with_nan_or_fractions_are_refused(tmp_path: Path, values: float, phrase: str) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY)
    (tmp_path / "labels").mkdir()
    mask = MASK.astype(np.float32)
    mask[1, 0, 0] = values
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", mask, **GREY)
    with pytest.raises(ReadError, match=phrase):
        read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))


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


def test_mask_files_naming_no_bscan_are_listed(tmp_path: Path) -> None:
    bscan_folder(tmp_path / "vol")
    (tmp_path / "labels" / "vol").mkdir(parents=True)
    for name in ("b_0.png", "B_1.png", "b_9.png", "b_2.tif"):  # one match, another case, no such B-scan, suffix
        png(tmp_path / "labels" / "vol" / name, MASK[0]) if name.endswith(".png") else tifffile.imwrite(
            tmp_path / "labels" / "vol" / name, MASK[0])
    assert unmatched_masks(tmp_path / "labels", tmp_path / "vol") == ["B_1.png", "b_2.tif", "b_9.png"]
    assert unmatched_masks(tmp_path / "absent", tmp_path / "vol") == []


def _blobs(h: int = 120, w: int = 160) -> np.ndarray:
    from skimage.draw import ellipse

    mask = np.zeros((h, w), bool)
    for r, c, a, b in [(40, 50, 15, 30), (80, 110, 6, 9), (30, 130, 4, 5)]:
        mask[ellipse(r, c, a, b, mask.shape)] = True
    return mask


@pytest.mark.parametrize("colour", [None, (255, 255, 255), (230, 20, 10)])
def test_lossy_jpeg_masks_of_one_value_are_binary(tmp_path: Path, colour) -> None:
    """JPEG leaves faint ringing beside the edges and shades near white: still the mask it was made from.
    A red one comes back with half its pixels in mid shades (chroma subsampling), which a mask of two
    shades of one colour would also show: refused, not guessed."""
    truth = _blobs()
    png(tmp_path / "one.png", (np.random.default_rng(0).random(truth.shape) * 200).astype(np.uint8))
    (tmp_path / "labels").mkdir()
    pixels = truth.astype(np.uint8) * 255 if colour is None else truth[..., None] * np.array(colour, np.uint8)
    Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "labels" / "one.jpg", quality=85)
    shutil.move(tmp_path / "labels" / "one.jpg", tmp_path / "labels" / "one.png.jpg")
    raw = np.asarray(Image.open(tmp_path / "labels" / "one.png.jpg"))
    assert len(np.unique(raw)) > 2  # really lossy
    Image.fromarray(raw).save(tmp_path / "labels" / "one.png")  # the lossy values, kept losslessly (as Duke's)
    if colour is not None and colour[1] != colour[0]:
        with pytest.raises(ReadError, match="colour mask of several colours or shades"):
            read_masks(tmp_path / "labels", read_volume(tmp_path / "one.png"))
        return
    labels, _ = read_masks(tmp_path / "labels", read_volume(tmp_path / "one.png"))
    np.testing.assert_array_equal(labels[0], truth)


def test_an_all_black_colour_mask_is_an_empty_class_mask(tmp_path: Path) -> None:
    volume = read_volume(bscan_folder(tmp_path / "vol"))
    (tmp_path / "labels").mkdir()
    png(tmp_path / "labels" / "b_0.png", np.repeat((MASK[0] * 3)[..., None], 3, axis=-1))  # class 3 in grey RGB
    png(tmp_path / "labels" / "b_1.png", np.zeros((20, 30, 3), np.uint8))  # nothing to label, saved in RGB
    labels, annotated = read_masks(tmp_path / "labels", volume)
    assert annotated == [0, 1] and labels[1].max() == 0
    np.testing.assert_array_equal(labels[0], MASK[0] * 3)


def test_an_empty_mask_file_is_refused_naming_it(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY)
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "scan.npy", np.zeros((0, 20, 30), np.uint8))
    shutil.copy(tmp_path / "scan.tif", tmp_path / "scan.npy")
    np.save(tmp_path / "scan.npy", STACK)
    with pytest.raises(ReadError, match="scan.npy: empty mask"):
        read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.npy"))


def test_a_mask_is_turned_with_its_image_or_refused(tmp_path: Path) -> None:
    """An image turned by its Orientation tag takes a mask turned the same way; a mask drawn on the stored
    pixels without the tag would lie upside down on it, so it is refused."""
    tag = [(274, "H", 1, 3, True)]  # a half turn
    tifffile.imwrite(tmp_path / "scan.tif", STACK, **GREY, extratags=tag)
    (tmp_path / "labels").mkdir()
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", MASK, **GREY, extratags=tag)
    labels, _ = read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))
    np.testing.assert_array_equal(labels, MASK[:, ::-1, ::-1])
    tifffile.imwrite(tmp_path / "labels" / "scan.tif", MASK, **GREY)
    with pytest.raises(ReadError, match="scan.tif is turned by an Orientation tag and this mask is not"):
        read_masks(tmp_path / "labels", read_volume(tmp_path / "scan.tif"))


def test_ingest_says_which_mask_files_were_left_out(tmp_path: Path) -> None:
    from octseg.tasks.archive.store import open_archive
    from octseg.tasks.ingest.source import ingest_source

    bscan_folder(tmp_path / "vol")
    (tmp_path / "labels" / "vol").mkdir(parents=True)
    png(tmp_path / "labels" / "vol" / "b_0.png", MASK[0])
    png(tmp_path / "labels" / "vol" / "b_9.png", MASK[0])  # no such B-scan
    result = ingest_source(tmp_path / "vol", tmp_path / "a.zarr", tmp_path / "labels")
    assert result.status == "written"
    said = [w for w in result.warnings if "left out" in w]
    assert said == ["1 mask file(s) name no B-scan of this folder and were left out: b_9.png"]
    assert said[0] in open_archive(tmp_path / "a.zarr").volume_meta("vol")["warnings"]
