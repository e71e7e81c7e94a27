"""TIFF files as B-scans: every page of the file is a B-scan, in file order, or the file is refused.

tifffile groups pages into "series" by the metadata it finds (tifffile's own JSON, ImageJ, OME, or
pages of one shape). A file whose pages were written one at a time (``TiffWriter.write`` per page)
is several series of one page each, and a truncated file is a series whose metadata promises more
than the file holds; reading ``series[0]`` alone stores one B-scan of such files. So the file's
structure is checked here first, with a small walker over the chain of image file directories
(IFDs, one a page), before any pixel is decoded:

* the chain must end where the file says it ends (the last IFD's next offset is 0): a chain that
  leads beyond the end of the file, or loops, is a truncated or corrupt file;
* every page's pixel data (strips or tiles) must lie inside the file, and an uncompressed page
  must hold all its bytes;
* every page that is an image (reduced-resolution previews and transparency masks are not) is a
  B-scan: one shape and pixel type for all, else the file is refused naming the odd page;
* the page count must cover what the file's own metadata declares (tifffile's ``shape``, ImageJ's
  ``images``, OME's ``Size*``), else the file is truncated;
* the voxels of all pages together stay under the limit (counted as the chain is walked, so a
  file of a million tiny pages stops early).

Planar samples (``photometric=rgb, planarconfig=separate``, what ``tifffile.imwrite`` makes of a 3-
or 4-B-scan stack) and volumetric pages (ImageDepth) are B-scans too; only interleaved samples are
colour. The pixels are then decoded by tifffile: ``series[0]`` in one read when that series is
exactly the file's pages (the common stack), else page by page in file order.
"""
from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from octseg.tasks.readers.base import ReadError, check_voxels
from octseg.tasks.readers.tiff_ifd import Page, TiffLayout, walk_pages

__all__ = ["Page", "TiffLayout", "read_tiff_pages", "tiff_layout"]
def _declared_voxels(path: Path, every: Sequence[Page], pages: Sequence[Page]) -> tuple[int, str] | None:
    """(voxels, which metadata) the file's own metadata declares for its B-scan ``pages``, where it says:
    ImageJ and OME in the first page's description, tifffile's ``shape`` in each series' first page."""
    text = every[0].description or ""
    if text.startswith("ImageJ="):
        m = re.search(r"^images=(\d+)", text, re.M)
        if m:
            first = every[0]
            return int(m.group(1)) * first.length * first.width * (1 if first.planar else first.samples), \
                f"the ImageJ header's images={m.group(1)}"
        return None
    if "<OME" in text[:2048]:
        return _ome_voxels(path, text)
    shaped = 0
    for p in pages:
        if p.description and p.description.lstrip().startswith("{"):
            try:
                shape = json.loads(p.description).get("shape")
                shaped += math.prod(int(n) for n in shape)
            except (ValueError, TypeError, AttributeError):
                continue
    return (shaped, "the tifffile header's shape") if shaped else None


def _declared_channels(text: str) -> tuple[int, str] | None:
    """(channels, which metadata) where the ImageJ or OME header declares several channels beside several
    slices or time points: a hyperstack. Channels alone are what tifffile's ImageJ and OME writers call the
    first axis of any 3-D stack, so those pages stay B-scans."""
    def size(pattern: str) -> int:
        return max([int(n) for n in re.findall(pattern, text, re.M)] or [1])

    if text.startswith("ImageJ="):
        channels, other, where = size(r"^channels=(\d+)"), max(size(r"^slices=(\d+)"), size(r"^frames=(\d+)")), \
            "the ImageJ header's channels"
    elif "<OME" in text[:2048]:
        channels, other, where = size(r'\bSizeC="(\d+)"'), max(size(r'\bSizeZ="(\d+)"'), size(r'\bSizeT="(\d+)"')), \
            "the OME header's SizeC"
    else:
        return None
    return (channels, where) if channels > 1 and other > 1 else None


def _ome_voxels(path: Path, text: str) -> tuple[int, str] | None:
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None  # the OME-XML costs only its scale (images.py says so); the pages are still the B-scans
    total = 0
    for pixels in (e for e in root.iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels"):
        for data in (e for e in pixels if e.tag.endswith("TiffData")):
            for uuid in (e for e in data if e.tag.endswith("UUID")):
                name = uuid.get("FileName")
                if name and name != path.name:
                    raise ReadError(path, f"a multi-file OME-TIFF (its planes continue in {name!r}): not read; "
                                          f"convert it to one file")
        try:
            total += math.prod(int(pixels.get(f"Size{a}", "1")) for a in "XYZCT")
        except ValueError:
            return None
    return (total, "the OME header's Size*") if total else None


def tiff_layout(path: Path, max_voxels: int | None) -> TiffLayout:
    """The B-scan pages of the TIFF at ``path``, checked as the module docstring says; no pixel decoded."""
    every = walk_pages(path, max_voxels)
    pages = [p for p in every if not p.preview] or every
    skipped = tuple(p for p in every if p.preview) if len(pages) < len(every) else ()
    first = pages[0]
    for p in pages[1:]:
        if p.kind != first.kind:
            raise ReadError(path, f"page {p.index} is {p.described()}, page {first.index} is {first.described()}: "
                                  f"every page of a TIFF is a B-scan, and they must share one shape and pixel type")
    channels = _declared_channels(every[0].description or "")
    if channels is not None and not first.colour:
        raise ReadError(path, f"a hyperstack of {channels[0]} channels ({channels[1]}): its pages hold the channels, "
                              f"and a B-scan is one grey channel; save one channel per file")
    layout = TiffLayout(tuple(pages), skipped, len(every), "<OME" in (every[0].description or "")[:2048])
    declared = _declared_voxels(path, every, pages)
    held = layout.voxels
    if declared is not None and declared[0] > held:
        if not _imagej_virtual(path, every, declared[0], max_voxels):
            raise ReadError(path, f"truncated TIFF: {declared[1]} describe {declared[0]:,} voxels, its {len(pages)} "
                                  f"page{'s' * (len(pages) != 1)} hold {held:,}")
        layout = TiffLayout(tuple(pages), skipped, len(every), False, declared[0] // first.voxels)
    check_voxels(path, (layout.bscans, first.length, first.width) + ((first.samples,) if first.colour else ()),
                 max_voxels)
    return layout


def _imagej_virtual(path: Path, pages: Sequence[Page], declared: int, max_voxels: int | None) -> bool:
    """An ImageJ "virtual stack" (over 4 GB) keeps one IFD and its images contiguous after it: tifffile
    reads it from the first page's data offset, having checked that the data lies inside the file."""
    if not ((pages[0].description or "").startswith("ImageJ=") and len(pages) == 1
            and declared % pages[0].voxels == 0 and not pages[0].planar and pages[0].depth == 1):
        return False
    check_voxels(path, (declared,), max_voxels)  # before tifffile maps the series
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return series.kind == "imagej" and int(series.size) == declared


def _decoding(page: Any) -> tuple:
    """What tifffile decodes a page with (a frame borrows these from its key frame): all must match for the
    pages of one series to be read as one block, as each would be read alone."""
    return (page.compression, page.predictor, page.photometric, page.planarconfig, page.bitspersample,
            page.sampleformat, page.rowsperstrip, page.tilewidth, page.tilelength, page.fillorder, page.extrasamples,
            page.shaped, page.dtype, page.databytecounts, page.jpegtables)


def _contiguous(pages: Sequence[Page]) -> bool:
    """Every strip of every page follows the previous one in the file: one read gives them all, in order."""
    return all(p.data_contiguous for p in pages) and all(b.data[0] == a.data[1] for a, b in zip(pages, pages[1:]))


def read_tiff_pages(path: Path, layout: TiffLayout) -> np.ndarray:
    """The pixels of ``layout``'s pages in file order, as ``layout.shape``: each page as tifffile reads it
    alone. tifffile parses one page of each signature whole (pages of one signature parse alike), so a
    page it cannot read refuses the file; the first series is read in one block only where that is the
    same as page by page: one signature for all but the first page, one decoding, contiguous data."""
    with tifffile.TiffFile(path) as tif:
        if layout.virtual:
            series = tif.series[0]
            if series.kind != "imagej" or series.size != layout.voxels:
                raise ReadError(path, "an ImageJ virtual stack that tifffile does not read as one series")
            return series.asarray().reshape(layout.shape)
        tif.pages.useframes = False
        parsed: dict[tuple, Any] = {}
        for mine in layout.pages:
            if mine.signature not in parsed:
                parsed[mine.signature] = page = tif.pages[mine.index]
                expected = (mine.samples if mine.planar else 1, mine.depth, mine.length, mine.width,
                            1 if mine.planar else mine.samples)
                if tuple(page.shaped) != expected:
                    raise ReadError(path, f"tifffile reads page {mine.index} as {tuple(page.shaped)} (planes, depth, "
                                          f"height, width, samples), its tags say {expected}: a layout this reader "
                                          f"does not take")
        arr = None
        decodings = {_decoding(p) for p in parsed.values()}
        one = parsed[layout.first.signature]
        if len(decodings) == 1 and _contiguous(layout.pages) and one.compression == 1 and one.fillorder == 1 \
                and one.predictor == 1 and one.bitspersample in (8, 16, 32, 64) and one.dtype is not None:
            # uncompressed whole-byte samples, one block in page order: what tifffile decodes, read at once
            dtype = np.dtype(one.dtype).newbyteorder(tif.byteorder)
            count = layout.voxels
            arr = np.empty(count, dtype)
            with path.open("rb", buffering=0) as fh:
                fh.seek(layout.first.data[0])
                got = fh.readinto(memoryview(arr).cast("B"))
            if got != arr.nbytes:
                raise ReadError(path, f"truncated TIFF: {got:,} of {arr.nbytes:,} bytes of pixel data")
            arr = arr.astype(dtype.newbyteorder("="), copy=False)
        elif not layout.skipped and not layout.ome and len(decodings) == 1 and _contiguous(layout.pages):
            series = tif.series
            if len(series) == 1 and series[0].kind in ("shaped", "imagej", "uniform", "generic") \
                    and series[0].size == layout.voxels and len(series[0].pages) == len(layout.pages):
                arr = series[0].asarray()
        if arr is None:  # page by page, each with its own tags (tifffile's asarray(key=...) borrows the first's)
            first = parsed[layout.first.signature]
            arr = np.empty((len(layout.pages), *first.shaped), first.dtype)
            for k, mine in enumerate(layout.pages):
                page = tif.pages[mine.index]
                decoded = page.asarray()
                if decoded.size != arr[k].size or decoded.dtype != arr.dtype:
                    raise ReadError(path, f"tifffile decodes page {mine.index} as {decoded.shape} {decoded.dtype}, "
                                          f"page {layout.first.index} as {first.shape} {first.dtype}")
                arr[k] = decoded.reshape(arr.shape[1:])
    want = layout.shape
    if arr.size != math.prod(want):
        raise ReadError(path, f"tifffile decoded {arr.shape} from pages of {layout.first.described()}: a TIFF layout "
                              f"this reader does not take")
    return arr.reshape(want)
