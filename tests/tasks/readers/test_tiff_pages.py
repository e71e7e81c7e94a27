"""Multi-page TIFFs: every page is a B-scan, in file order, or the file is refused; truncated files never
give a part of themselves (issue 17, item 1). Files are written here with tifffile in the layouts tools use."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers.image_files import GREY

STACK5 = (np.random.default_rng(17).random((5, 12, 16)) * 250).astype(np.uint8)


def _per_page(path: Path, stack: np.ndarray = STACK5, **kwargs) -> Path:
    """One ``TiffWriter.write`` per page: each page its own series (how many acquisition tools write)."""
    with tifffile.TiffWriter(path, bigtiff=kwargs.pop("bigtiff", False)) as tif:
        for bscan in stack:
            tif.write(bscan, **GREY, **kwargs)
    return path


@pytest.mark.parametrize("write", [
    pytest.param(lambda p: _per_page(p), id="per-page"),
    pytest.param(lambda p: _per_page(p, compression="zlib"), id="per-page-zlib"),
    pytest.param(lambda p: _per_page(p, bigtiff=True), id="per-page-bigtiff"),
    pytest.param(lambda p: _per_page(p, tile=(16, 16)), id="per-page-tiled"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, imagej=True), id="imagej"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, **GREY), id="tifffile-stack"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, **GREY, compression="zlib"), id="tifffile-stack-zlib"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, ome=True, **GREY), id="ome"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, **GREY, metadata=None), id="no-metadata"),
])
def test_every_page_is_a_bscan(tmp_path: Path, write) -> None:
    path = tmp_path / "scan.tif"
    write(path)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 5
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.image, STACK5)


def test_per_page_series_are_read_in_file_order(tmp_path: Path) -> None:
    path = _per_page(tmp_path / "p.tif")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series) == 5 and tif.series[0].shape == (12, 16)  # what gave one B-scan before
    vol = read_volume(path)
    assert vol.image.shape == (5, 12, 16)
    assert [int(b[0, 0]) for b in vol.image] == [int(b[0, 0]) for b in STACK5]


def test_planar_pages_are_bscans_and_interleaved_samples_colour(tmp_path: Path) -> None:
    planar = tmp_path / "planar.tif"
    six = np.concatenate([STACK5, STACK5[:1]]).reshape(2, 3, 12, 16)
    tifffile.imwrite(planar, six, photometric="rgb", planarconfig="separate")  # 2 pages of 3 planar samples
    vol = read_volume(planar)
    np.testing.assert_array_equal(vol.image, six.reshape(6, 12, 16))
    assert any("planar colour samples" in w and "read as 6 B-scans" in w for w in vol.warnings)  # said, not silent
    rgb = tmp_path / "rgb.tif"
    with tifffile.TiffWriter(rgb) as tif:
        for bscan in STACK5[:2]:
            tif.write(np.stack([bscan] * 3, axis=-1), photometric="rgb")  # grey stored as RGB: equal channels
    np.testing.assert_array_equal(read_volume(rgb).image, STACK5[:2])


@pytest.mark.parametrize(("write", "phrase"), [
    (lambda p: tifffile.imwrite(p, STACK5[:4].reshape(2, 2, 12, 16), imagej=True, metadata={"axes": "ZCYX"}),
     "hyperstack of 2 channels \\(the ImageJ header's channels\\)"),
    (lambda p: tifffile.imwrite(p, STACK5[:4].reshape(2, 2, 12, 16), ome=True, metadata={"axes": "ZCYX"}),
     "hyperstack of 2 channels \\(the OME header's SizeC\\)"),
])
def test_channel_hyperstacks_are_refused_not_read_as_bscans(tmp_path: Path, write, phrase: str) -> None:
    path = tmp_path / "hyper.tif"
    write(path)
    with pytest.raises(ReadError, match=phrase):
        read_volume(path)


def test_pages_of_different_shapes_are_refused_naming_the_page(tmp_path: Path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(STACK5[0], **GREY)
        tif.write(STACK5[1], **GREY)
        tif.write(STACK5[2, :, :10], **GREY)
    with pytest.raises(ReadError, match=r"page 2 is 12 x 10 uint8, page 0 is 12 x 16 uint8: every page of a TIFF "
                                        r"is a B-scan") as err:
        read_volume(path)
    assert "\n" not in str(err.value)
    dtypes = tmp_path / "dtypes.tif"
    with tifffile.TiffWriter(dtypes) as tif:
        tif.write(STACK5[0], **GREY)
        tif.write(STACK5[1].astype(np.uint16), **GREY)
    with pytest.raises(ReadError, match=r"page 1 is 12 x 16 uint16, page 0 is 12 x 16 uint8"):
        read_volume(dtypes)


def test_reduced_resolution_preview_pages_are_left_out_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "preview.tif"
    with tifffile.TiffWriter(path) as tif:
        for bscan in STACK5[:3]:
            tif.write(bscan, **GREY)
        tif.write(STACK5[0, ::2, ::2], **GREY, subfiletype=1)  # a thumbnail
    vol = read_volume(path)
    np.testing.assert_array_equal(vol.image, STACK5[:3])
    assert any("reduced-resolution or mask page" in w and "3" in w for w in vol.warnings)


@pytest.mark.parametrize("write", [
    pytest.param(lambda p: _per_page(p), id="per-page"),
    pytest.param(lambda p: _per_page(p, compression="zlib"), id="per-page-zlib"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, imagej=True), id="imagej"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, **GREY), id="tifffile-stack"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5, ome=True, **GREY), id="ome"),
    pytest.param(lambda p: tifffile.imwrite(p, STACK5[:3]), id="planar-default"),
])
def test_every_truncation_is_refused_never_stored_in_part(tmp_path: Path, write) -> None:
    """Cut at every third length from 8 bytes, and at each of the last 40: refused as truncated or corrupt whenever the cut
    removes a byte that an IFD, a tag value or pixel data occupies (tifffile leaves a few bytes no structure
    refers to at the end of some files: a cut there leaves the file whole, and it reads whole)."""
    full = tmp_path / "full.tif"
    write(full)
    expected = read_volume(full).image
    data, cut, end = full.read_bytes(), tmp_path / "cut.tif", _structural_end(full)
    accepted, reasons = [], set()
    for n in sorted({*range(8, len(data), 3), *range(len(data) - 40, len(data))}):
        cut.write_bytes(data[:n])
        try:
            vol = read_volume(cut)
        except ReadError as e:
            assert "\n" not in str(e) and "cut.tif" in str(e)
            reasons.add(e.reason.split(":")[0])
            continue
        if n < end:
            accepted.append((n, vol.image.shape))
        else:
            np.testing.assert_array_equal(vol.image, expected)
    assert not accepted, f"truncated files were read: {accepted[:5]}"
    assert any("truncated" in r for r in reasons), reasons


def _structural_end(path: Path) -> int:
    """The end of the last byte an IFD, a tag's values or a page's pixel data occupies (tifffile's view)."""
    end = 0
    with tifffile.TiffFile(path) as tif:
        t = tif.tiff
        for page in tif.pages:
            end = max(end, page.offset + t.tagnosize + len(page.tags) * t.tagsize + t.offsetsize)
            for tag in page.tags:
                end = max(end, tag.valueoffset + tag.valuebytecount)
            end = max([end] + [o + c for o, c in zip(page.dataoffsets, page.databytecounts)])
    return end


def test_truncated_multi_page_tiff_says_where_it_ends(tmp_path: Path) -> None:
    full = _per_page(tmp_path / "full.tif", compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    with pytest.raises(ReadError, match=r"truncated TIFF: .*(page \d+|the file has)"):
        read_volume(cut)


def test_imagej_header_promising_more_images_than_pages_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "ij.tif"
    with tifffile.TiffWriter(path, imagej=True) as tif:
        tif.write(STACK5[:3], metadata={"axes": "ZYX"})
    with tifffile.TiffFile(path) as tif:
        text = tif.pages[0].description
    assert "images=3" in text
    tifffile.tiffcomment(path, text.replace("images=3", "images=7").replace("slices=3", "slices=7").encode())
    with pytest.raises(ReadError, match=r"truncated TIFF: the ImageJ header's images=7 describe"):
        read_volume(path)


def test_an_ifd_chain_that_loops_is_refused(tmp_path: Path) -> None:
    path = _per_page(tmp_path / "loop.tif", STACK5[:2])
    with tifffile.TiffFile(path) as tif:
        first, second = tif.pages[0].offset, tif.pages[1].offset
        tags = len(tif.pages[1].tags)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, second + 2 + 12 * tags, first)  # page 1's next IFD: page 0 again
    path.write_bytes(bytes(data))
    with pytest.raises(ReadError, match="points back to an earlier page"):
        read_volume(path)


def test_voxel_limit_counts_every_page_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _per_page(tmp_path / "many.tif")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(ReadError, match=r"5 x 12 x 16 = 960 voxels exceeds the limit of 800"):
        read_volume(path, max_voxels=800)
    with pytest.raises(ReadError, match=r"exceeds the limit of 300"):
        read_volume(path, max_voxels=300)  # stops walking the chain at the limit
