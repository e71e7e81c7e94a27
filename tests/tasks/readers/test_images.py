"""Plain image readers (TIFF, PNG/JPEG, .npy, folders of B-scans): tiny files under tmp_path, plus the real Duke data
when present."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume, source_sha256
from octseg.tasks.readers.sources import natural_key, shown
from tests.tasks.readers.image_files import GREY, RNG, STACK, U16, bscan_folder, png



@pytest.mark.parametrize(("name", "write", "expected"), [
    ("s.tif", lambda p: tifffile.imwrite(p, STACK, **GREY), STACK),                      # TIFF stack
    ("s.ome.tiff", lambda p: tifffile.imwrite(p, STACK, ome=True, **GREY), STACK),       # OME-TIFF
    ("one.tif", lambda p: tifffile.imwrite(p, STACK[0]), STACK[:1]),                     # 2-D TIFF
    ("u16.tif", lambda p: tifffile.imwrite(p, U16, **GREY), U16),                        # uint16 kept
    ("rgb.tif", lambda p: tifffile.imwrite(p, np.stack([STACK[0]] * 3, axis=-1), photometric="rgb"),
     STACK[:1]),                                                                         # interleaved RGB
    ("planar.tif", lambda p: tifffile.imwrite(p, STACK, photometric="rgb",
                                              planarconfig="separate"), STACK),          # planar: B-scans
    ("default3.tif", lambda p: tifffile.imwrite(p, STACK), STACK),                      # 3 B-scans, defaults
    ("default4.tif", lambda p: tifffile.imwrite(p, np.concatenate([STACK, STACK[:1]])),
     np.concatenate([STACK, STACK[:1]])),                                                # 4 B-scans, defaults
    ("one.png", lambda p: png(p, STACK[0]), STACK[:1]),                                 # 2-D PNG
    ("one.jpg", lambda p: Image.fromarray(np.full((8, 8), 77, np.uint8)).save(p, quality=100),
     np.full((1, 8, 8), 77, np.uint8)),                                                  # 2-D JPEG
    ("v.npy", lambda p: np.save(p, STACK), STACK),                                       # 3-D npy
    ("b.npy", lambda p: np.save(p, STACK[0]), STACK[:1]),                                # 2-D npy
    ("f.npy", lambda p: np.save(p, STACK.astype(np.float64)), STACK.astype(np.float32)),  # float -> f32
    ("i.npy", lambda p: np.save(p, STACK.astype(np.int32)), STACK),                      # int32 0..249 -> u8
    ("i16.npy", lambda p: np.save(p, U16.astype(np.int64)), U16),                        # int64 -> u16, exact
    ("neg.npy", lambda p: np.save(p, -STACK.astype(np.int16)), -STACK.astype(np.float32)),  # negative -> f32
])
def test_formats_round_trip(tmp_path: Path, name: str, write, expected: np.ndarray) -> None:
    path = tmp_path / name
    write(path)
    vol = read_volume(path)
    assert vol.image.dtype == expected.dtype
    np.testing.assert_array_equal(vol.image, expected)
    assert vol.source == path and vol.files == [path] and vol.scale_um is None
    assert vol.sha256 == source_sha256(path) and len(vol.sha256) == 64


def test_ome_tiff_physical_size_gives_scale(tmp_path: Path) -> None:
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, STACK, ome=True, **GREY, metadata={
        "axes": "ZYX", "PhysicalSizeZ": 120.0, "PhysicalSizeY": 3.87, "PhysicalSizeX": 5.7})
    assert read_volume(path).scale_um == (120.0, 3.87, 5.7)


def test_folder_in_natural_order(tmp_path: Path) -> None:
    names = [f"Subject_01_{i}.png" for i in (1, 2, 10)]
    folder = bscan_folder(tmp_path / "vol", STACK, names)
    (folder / "notes.txt").write_text("ignored")
    (folder / ".DS_Store").write_bytes(b"ignored")
    vol = read_volume(folder)
    assert [f.name for f in vol.files] == names  # 2 before 10
    assert vol.warnings == []
    bscan_folder(folder / "nested", STACK[:1], ["Subject_01_3.png"])
    nested = read_volume(folder)
    assert [f.name for f in nested.files] == names  # the subfolder's B-scan is not one of this volume's ...
    assert any("1 subfolder(s) not read as B-scans of this volume (nested)" in w for w in nested.warnings)  # ... and that is said
    np.testing.assert_array_equal(vol.image, STACK)
    assert (vol.reader, vol.source) == ("folder", folder)
    assert sorted(["x_10", "x_2", "X_1"], key=natural_key) == ["X_1", "x_2", "x_10"]


def test_folder_sha_covers_names_and_bytes(tmp_path: Path) -> None:
    folder = bscan_folder(tmp_path / "vol")
    before = read_volume(folder).sha256
    (folder / "b_2.png").rename(folder / "b_3.png")  # same bytes, other name
    assert read_volume(folder).sha256 != before


@pytest.mark.parametrize(("rgb", "expected"), [
    (np.repeat(STACK[0][..., None], 3, axis=-1), STACK[0]),                         # R=G=B -> that channel
    (np.dstack([STACK[0], STACK[0], STACK[0], np.full_like(STACK[0], 255)]), STACK[0]),  # RGBA, equal
    (np.dstack([np.full((4, 4), 100), np.zeros((4, 4)), np.zeros((4, 4))]).astype(np.uint8),
     np.full((4, 4), 30, np.uint8)),                                                 # true colour: 0.299*100
])
def test_colour_becomes_grey(tmp_path: Path, rgb: np.ndarray, expected: np.ndarray) -> None:
    vol = read_volume(png(tmp_path / "c.png", rgb))
    assert vol.image.shape == (1, *expected.shape) and vol.image.dtype == np.uint8
    np.testing.assert_array_equal(vol.image[0], expected)


def _truncated_png(p: Path) -> None:
    png(p, STACK[0])
    p.write_bytes(p.read_bytes()[:200])


def _truncated_tif(p: Path) -> None:
    tifffile.imwrite(p, STACK, **GREY)
    p.write_bytes(p.read_bytes()[:1000])


def _truncated_npy(p: Path) -> None:
    np.save(p, STACK)
    p.write_bytes(p.read_bytes()[:500])


@pytest.mark.parametrize(("name", "make", "phrase"), [
    ("empty.png", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    ("empty.tif", lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    ("trunc.png", _truncated_png, "truncated"),
    ("trunc.tif", _truncated_tif, "truncated"),
    ("trunc.npy", _truncated_npy, "truncated"),
    ("text.png", lambda p: p.write_text("not an image"), "not an image"),
    ("text.tif", lambda p: p.write_text("not an image"), "not a TIFF image"),
    ("text.npy", lambda p: p.write_text("not an array"), "not a NumPy .npy file"),
    ("4d.npy", lambda p: np.save(p, np.zeros((2, 2, 3, 4), np.uint8)), "wrong number of dimensions"),
    ("1d.npy", lambda p: np.save(p, np.zeros(5, np.uint8)), "wrong number of dimensions"),
    ("obj.npy", lambda p: np.save(p, np.array([None, {"a": 1}], dtype=object), allow_pickle=True),
     "object arrays (object) are refused"),
    ("cplx.npy", lambda p: np.save(p, np.ones((2, 3, 4), np.complex64)), "unsupported pixel type complex64"),
    ("zero.npy", lambda p: np.save(p, np.zeros((0, 8, 8), np.uint8)), "empty image of shape (0, 8, 8)"),
    ("scan.xyz", lambda p: p.write_bytes(b"DICM"), "unsupported suffix '.xyz'"),
    ("missing.tif", lambda p: None, "does not exist"),
])
def test_bad_input_names_file_and_reason(tmp_path: Path, name: str, make, phrase: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(ReadError) as err:
        read_volume(path)
    assert name in str(err.value) and phrase in str(err.value)
    assert err.value.path == path and phrase in err.value.reason


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "readme.txt").write_text("no images")
    with pytest.raises(ReadError, match=r"vol: empty folder"):
        read_volume(tmp_path / "vol")


def test_folder_with_two_names_for_one_place_in_the_order_is_refused(tmp_path: Path) -> None:
    """``b_01.png`` and ``b_1.png``: no natural order says which B-scan comes first."""
    folder = bscan_folder(tmp_path / "vol", STACK, ["b_0.png", "b_01.png", "b_1.png"])
    with pytest.raises(ReadError, match=r"b_01.png and b_1.png name the same place in the B-scan order"):
        read_volume(folder)
    cased = bscan_folder(tmp_path / "vol2", STACK, ["b_0.png", "B_1.png", "b_1.png"])
    with pytest.raises(ReadError, match=r"B_1.png and b_1.png name the same place .* or letter case"):
        read_volume(cased)


@pytest.mark.parametrize(("odd", "phrase"), [
    (np.zeros((20, 31), np.uint8), r"\(20, 31\) uint8 differs from b_0.png"),    # other shape
    (np.zeros((20, 30), np.uint16), r"\(20, 30\) uint16 differs from b_0.png"),  # other dtype
])
def test_folder_with_odd_bscan_names_it(tmp_path: Path, odd: np.ndarray, phrase: str) -> None:
    folder = bscan_folder(tmp_path / "vol")
    png(folder / "b_1.png", odd)
    with pytest.raises(ReadError, match=phrase) as err:
        read_volume(folder)
    assert err.value.path == folder / "b_1.png"


def test_folder_with_bad_bscan_names_it(tmp_path: Path) -> None:
    folder = bscan_folder(tmp_path / "vol")
    (folder / "b_2.png").write_bytes(b"")
    with pytest.raises(ReadError, match=r"b_2.png: empty file"):
        read_volume(folder)


# ----- real data (skipped when ../shared/data is absent) -----
def test_duke_volume_in_natural_order(shared_data: Path) -> None:
    vol = read_volume(shared_data / "duke_dme_subject01_volume")
    assert vol.image.shape == (61, 496, 768) and vol.image.dtype == np.uint8
    assert vol.files[9].name == "Subject_01_10.png"  # B-scan 10 (1-based) follows 9, not 1
    assert [f.name for f in vol.files[:3]] == ["Subject_01_1.png", "Subject_01_2.png", "Subject_01_3.png"]
    np.testing.assert_array_equal(vol.image[9], np.asarray(Image.open(vol.files[9])))


# ---- hostile files: refused from the header, or read with a warning ------------------------------------------

def test_compressed_tiff_bomb_refused_from_header(tmp_path: Path) -> None:
    """A 0.9 MB zlib TIFF of 30720 x 30720 zeros is refused before any tile is decoded."""
    path = tmp_path / "bomb.tif"
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(path, (tile for _ in range(900)), shape=(30720, 30720), dtype=np.uint8,
                     compression="zlib", tile=(1024, 1024))
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ReadError, match="943,718,400 voxels exceeds the limit") as err:
        read_volume(path)
    assert str(path) in str(err.value)
    assert read_volume(path, max_voxels=None).image.shape == (1, 30720, 30720)  # genuine: the limit is settable


@pytest.mark.parametrize("name", ["big.npy", "big.png", "big.tif", "folder"])
def test_voxel_limit_applies_to_every_reader(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "folder":
        bscan_folder(path)  # 3 B-scans of 20 x 30 = 1800 voxels
    elif name.endswith(".npy"):
        np.save(path, STACK)
    elif name.endswith(".png"):
        png(path, STACK[0])
    else:
        tifffile.imwrite(path, STACK, **GREY)
    limit = 500 if name.endswith(".png") else 1000
    with pytest.raises(ReadError, match=f"limit of {limit:,}"):
        read_volume(path, max_voxels=limit)
    assert read_volume(path, max_voxels=STACK.size).image.size <= STACK.size


def test_npy_header_claiming_a_huge_array_is_refused_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "forged.npy"
    with path.open("wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (100_000, 100_000, 100)})
        fh.write(b"\0" * 64)
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(path)


@pytest.mark.parametrize("n", [3, 4])
def test_tifffile_default_stack_of_3_or_4_bscans_is_not_colour(tmp_path: Path, n: int) -> None:
    stack = (RNG.random((n, 16, 24)) * 250).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", stack)  # tifffile's defaults: planar "RGB(A)"
    np.testing.assert_array_equal(read_volume(tmp_path / "s.tif").image, stack)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_refused_naming_the_bscans(tmp_path: Path, bad: float) -> None:
    arr = STACK.astype(np.float32)
    arr[1, 3, 4] = bad
    np.save(tmp_path / "nan.npy", arr)
    with pytest.raises(ReadError, match=r"1 NaN or infinite voxels \(B-scan 1\)"):
        read_volume(tmp_path / "nan.npy")


def test_int64_beyond_float32_precision_is_said(tmp_path: Path) -> None:
    arr = STACK.astype(np.int64) * (1 << 30) + 1
    np.save(tmp_path / "big.npy", arr)
    vol = read_volume(tmp_path / "big.npy")
    assert vol.image.dtype == np.float32
    assert any("exceed float32's exact integers" in w for w in vol.warnings)
    np.save(tmp_path / "small.npy", STACK.astype(np.int64) - 100)  # negative but exact in float32
    assert read_volume(tmp_path / "small.npy").warnings == []


@pytest.mark.parametrize("size", ["nan", "0", "-1", "abc"])
def test_invalid_ome_physical_size_keeps_pixels_drops_scale(tmp_path: Path, size: str) -> None:
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, STACK, ome=True, **GREY, metadata={"PhysicalSizeX": 5.0, "PhysicalSizeY": 3.9,
                                                             "PhysicalSizeZ": 120.0})
    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    xml = xml.replace('PhysicalSizeX="5.0"', f'PhysicalSizeX="{size}"')
    assert f'PhysicalSizeX="{size}"' in xml
    tifffile.tiffcomment(path, xml.encode())
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.image, STACK)
    assert vol.scale_um is None
    assert any("PhysicalSizeX" in w and "without a voxel size" in w for w in vol.warnings)


def test_shown_escapes_terminal_control_sequences() -> None:
    assert shown("plain name.tif") == "plain name.tif"
    hostile = "scan\x1b[31mRED\x1b]0;title\x07\n.tif"
    out = shown(hostile)
    assert out.isprintable() and "\x1b" not in out and "\\x1b[31mRED" in out
    undecodable = "caf\udce9.tif"  # b"caf\xe9.tif" read under a UTF-8 file system encoding
    assert shown(undecodable) == "caf\\xe9.tif"
    err = ReadError(hostile, "bad")
    assert str(err).isprintable()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_tags_turn_pixels_as_viewers_show_them(tmp_path: Path, orientation: int) -> None:
    """TIFF Orientation (tag 274) and EXIF Orientation in PNG / JPEG: the pixels as Pillow's
    ``ImageOps.exif_transpose`` (the reference) shows them, with a warning when they were turned."""
    from PIL import ImageOps

    pixels = (np.random.default_rng(orientation).random((12, 20)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "b.png", exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "b.png")))
    tifffile.imwrite(tmp_path / "s.tif", np.stack([pixels, pixels[::-1]]), photometric="minisblack",
                     extratags=[(274, "H", 1, orientation, True)])
    stack, png_volume = read_volume(tmp_path / "s.tif"), read_volume(tmp_path / "b.png")
    np.testing.assert_array_equal(png_volume.image[0], expected)
    np.testing.assert_array_equal(stack.image[0], expected)
    expected_second = np.asarray(ImageOps.exif_transpose(_with_orientation(pixels[::-1], orientation)))
    np.testing.assert_array_equal(stack.image[1], expected_second)
    turned = orientation != 1
    assert any("Orientation" in w for w in stack.warnings) == turned
    assert any("Orientation" in w for w in png_volume.warnings) == turned


def _with_orientation(pixels: np.ndarray, orientation: int) -> Image.Image:
    image = Image.fromarray(np.ascontiguousarray(pixels))
    image.getexif()[0x0112] = orientation
    return image


def test_min_is_white_tiff_is_inverted_with_a_warning(tmp_path: Path) -> None:
    pixels = (np.random.default_rng(3).random((2, 12, 20)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "w.tif", pixels, photometric="miniswhite")
    volume = read_volume(tmp_path / "w.tif")
    np.testing.assert_array_equal(volume.image, 255 - pixels)
    assert any("MinIsWhite" in w for w in volume.warnings)


def test_colour_turned_grey_and_dropped_transparency_are_said(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    colour = (rng.random((12, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(np.repeat(colour[..., :1], 3, axis=-1)).save(tmp_path / "grey.png")  # R = G = B
    see_through = np.dstack([colour, np.full((12, 20), 255, np.uint8)])
    see_through[:3, :, 3] = 0
    Image.fromarray(see_through, "RGBA").save(tmp_path / "alpha.png")
    assert any("luminance" in w for w in read_volume(tmp_path / "colour.png").warnings)
    assert read_volume(tmp_path / "grey.png").warnings == []
    assert any("alpha" in w for w in read_volume(tmp_path / "alpha.png").warnings)
