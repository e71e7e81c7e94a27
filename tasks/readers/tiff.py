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
import mmap
import re
import struct
import zlib
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from octseg.tasks.readers.base import ReadError, VoxelLimitError, check_voxels

__all__ = ["Page", "TiffLayout", "read_tiff_pages", "tiff_layout"]

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TYPE_FORMATS = {1: "B", 2: "B", 3: "H", 4: "I", 6: "b", 7: "B", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
# tags read from every IFD: what a page's shape, pixel type and data extents follow from
_SUBFILETYPE, _WIDTH, _LENGTH, _BITS, _COMPRESSION, _DESCRIPTION = 254, 256, 257, 258, 259, 270
_STRIP_OFFSETS, _SAMPLES, _STRIP_COUNTS, _PLANAR, _TILE_WIDTH, _TILE_LENGTH = 273, 277, 279, 284, 322, 323
_TILE_OFFSETS, _TILE_COUNTS, _SAMPLE_FORMAT, _DEPTH = 324, 325, 339, 32997
_WANTED = {_SUBFILETYPE, _WIDTH, _LENGTH, _BITS, _COMPRESSION, _DESCRIPTION, _STRIP_OFFSETS, _SAMPLES,
           _STRIP_COUNTS, _PLANAR, _TILE_WIDTH, _TILE_LENGTH, _TILE_OFFSETS, _TILE_COUNTS, _SAMPLE_FORMAT, _DEPTH}
_MAX_TAGS = 4096  # as tifffile: more tags in one IFD is a corrupt file


@dataclass(frozen=True, eq=False)
class Page:
    """One IFD as the walker read it."""

    index: int  # in the IFD chain (tifffile's page index)
    offset: int
    subfiletype: int
    width: int
    length: int
    samples: int
    planar: bool  # samples stored as separate planes (PlanarConfiguration 2)
    bits: tuple[int, ...]
    sample_format: int
    depth: int
    compression: int
    description: str | None
    # every tag as tifffile would see it (code, type, count, value bytes), the data offsets' values left out:
    # two pages with one signature are parsed and decoded alike by tifffile, wherever their data lie
    signature: tuple = ()
    data: tuple[int, int] = (0, 0)  # (first byte, end) of the page's strips or tiles
    data_contiguous: bool = False  # strips or tiles follow each other in the file, in order

    @property
    def preview(self) -> bool:
        """A reduced-resolution image or a transparency mask of another page (NewSubfileType bits 0, 2)."""
        return bool(self.subfiletype & 0b101)

    @property
    def kind(self) -> tuple:
        """What must be equal across the B-scan pages: shape, sample layout and pixel type."""
        return (self.length, self.width, self.samples, self.planar, self.bits, self.sample_format, self.depth)

    @property
    def bscans(self) -> int:
        """B-scans in this page: its depth, times its samples when they are separate planes."""
        return self.depth * (self.samples if self.planar else 1)

    @property
    def voxels(self) -> int:
        return self.depth * self.length * self.width * self.samples

    @property
    def colour(self) -> bool:
        """Interleaved samples (``...YXS``): colour channels of one B-scan."""
        return self.samples > 1 and not self.planar

    def described(self) -> str:
        kinds = {1: "uint", 2: "int", 3: "float"}
        pixel = f"{kinds.get(self.sample_format, f'format {self.sample_format} ')}{self.bits[0] if self.bits else '?'}"
        extra = f", {self.samples} {'planar' if self.planar else 'interleaved'} samples" if self.samples > 1 else ""
        depth = f"{self.depth} x " if self.depth > 1 else ""
        return f"{depth}{self.length} x {self.width} {pixel}{extra}"


@dataclass(frozen=True)
class TiffLayout:
    """The B-scan pages of a TIFF file and what decoding them gives."""

    pages: tuple[Page, ...]  # the B-scan pages, file order
    skipped: tuple[Page, ...]  # previews and masks
    ifds: int  # pages in the chain, all kinds
    ome: bool
    virtual: int | None = None  # an ImageJ virtual stack: its images, stored after its one page

    @property
    def first(self) -> Page:
        return self.pages[0]

    @property
    def bscans(self) -> int:
        return self.virtual or sum(p.bscans for p in self.pages)

    @property
    def voxels(self) -> int:
        return self.bscans * self.first.voxels // self.first.bscans

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded array: (B-scans, Y, X) plus the colour samples; one plain B-scan is 2-D."""
        p = self.first
        tail = (p.length, p.width) + ((p.samples,) if p.colour else ())
        return tail if self.bscans == 1 else (self.bscans, *tail)


class _Reader:
    """Byte-order and offset-size aware reads from an open TIFF file of known size."""

    def __init__(self, path: Path, buf: mmap.mmap, size: int) -> None:
        self.path, self.buf, self.size = path, buf, size
        head = buf[:16]
        self.order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if self.order is None or len(head) < 8:
            raise ReadError(path, f"not a TIFF image (starts {head[:4]!r}, expected b'II*\\x00' or b'MM\\x00*')")
        version = struct.unpack(self.order + "H", head[2:4])[0]
        if version == 42:
            self.offset_format, self.count_format, self.tag_size = "I", "H", 12
            self.first = struct.unpack(self.order + "I", head[4:8])[0]
        elif version == 43 and len(head) == 16:
            self.offset_format, self.count_format, self.tag_size = "Q", "Q", 20
            self.first = struct.unpack(self.order + "Q", head[8:16])[0]
        else:
            raise ReadError(path, f"not a TIFF image (version {version}, expected 42 or BigTIFF's 43)")
        self.offset_size = struct.calcsize(self.offset_format)
        self.count_size = struct.calcsize(self.count_format)

    def truncated(self, what: str, end: int) -> ReadError:
        return ReadError(self.path, f"truncated TIFF: {what} ends at byte {end:,}, the file has {self.size:,}")

    def read_at(self, offset: int, n: int, what: str) -> bytes:
        if offset + n > self.size:
            raise self.truncated(what, offset + n)
        return self.buf[offset:offset + n]

    def signature(self, entry: bytes, index: int) -> tuple:
        """(code, type and count, the value bytes) of an entry; large values by length and CRC."""
        code, type_, count = struct.unpack_from(self.order + "HH" + self.offset_format, entry)
        nbytes = _TYPE_SIZES.get(type_, 0) * count
        field = entry[4 + self.offset_size:]
        if nbytes <= self.offset_size:
            return code, entry[2:4 + self.offset_size], field[:nbytes]
        where = struct.unpack(self.order + self.offset_format, field)[0]
        data = self.read_at(where, nbytes, f"page {index}'s tag {code} ({count:,} values)")
        return code, entry[2:4 + self.offset_size], data if nbytes <= 4096 else (nbytes, zlib.crc32(data))

    def values(self, entry: bytes, index: int) -> tuple[int, tuple]:
        """(tag code, values) of one IFD entry; the values inline or read from where the entry points."""
        o = self.order
        code, type_, count = struct.unpack_from(o + "HH" + self.offset_format, entry)
        size = _TYPE_SIZES.get(type_)
        if size is None:
            raise ReadError(self.path, f"page {index}: tag {code} has unknown type {type_}: corrupt TIFF")
        nbytes = size * count
        field = entry[4 + self.offset_size:]
        if nbytes <= self.offset_size:
            data = field[:nbytes]
        else:
            where = struct.unpack(o + self.offset_format, field)[0]
            data = self.read_at(where, nbytes, f"page {index}'s tag {code} ({count:,} values)")
        if type_ == 2:
            return code, (data.split(b"\0", 1)[0].decode("utf-8", "replace"),)
        if type_ in (5, 10):
            pairs = struct.unpack(f"{o}{2 * count}{'I' if type_ == 5 else 'i'}", data)
            return code, tuple(a / b if b else math.nan for a, b in zip(pairs[::2], pairs[1::2]))
        if type_ in (11, 12):
            return code, struct.unpack(f"{o}{count}{'f' if type_ == 11 else 'd'}", data)
        if count > 64:  # strip and tile tables: thousands of entries on large pages
            return code, tuple(np.frombuffer(data, np.dtype(o + _TYPE_FORMATS[type_])).tolist())
        return code, struct.unpack(f"{o}{count}{_TYPE_FORMATS[type_]}", data)


def _first(tags: dict, code: int, default: int | None = None) -> int | None:
    v = tags.get(code)
    return int(v[0]) if v else default


def _page(r: _Reader, index: int, offset: int, memo: dict[bytes, tuple]) -> tuple[Page, int]:
    """The page whose IFD is at ``offset``, and the offset of the next IFD (0: none). ``memo``: pages already
    read by their IFD bytes, the data offsets' value left out (a stack's pages differ only there)."""
    count = struct.unpack(r.order + r.count_format, r.read_at(offset, r.count_size, f"page {index}'s header (IFD)"))[0]
    if count == 0 or count > _MAX_TAGS:
        raise ReadError(r.path, f"page {index}: {count} tags in its header (IFD at byte {offset:,}): corrupt TIFF")
    raw = r.read_at(offset + r.count_size, count * r.tag_size + r.offset_size, f"page {index}'s header (IFD)")
    nxt = struct.unpack(r.order + r.offset_format, raw[-r.offset_size:])[0]
    entries = [raw[k * r.tag_size:(k + 1) * r.tag_size] for k in range(count)]
    codes = [struct.unpack_from(r.order + "H", e)[0] for e in entries]
    where = [k for k, c in enumerate(codes) if c in (_STRIP_OFFSETS, _TILE_OFFSETS)]
    key = b"".join(e[:4 + r.offset_size] if k in where else e for k, e in enumerate(entries))
    if key in memo:
        template, tags, signature = memo[key]
        tags = dict(tags)
    else:
        template, tags, signature = None, {}, []
        for entry, code in zip(entries, codes):
            if code in _WANTED and code not in (_STRIP_OFFSETS, _TILE_OFFSETS):
                tags[code] = r.values(entry, index)[1]
            signature.append(None if code in (_STRIP_OFFSETS, _TILE_OFFSETS) else r.signature(entry, index))
    for k in where:  # their values, wherever the page's data lie
        tags[codes[k]] = r.values(entries[k], index)[1]
    if template is None:
        width, length = _first(tags, _WIDTH), _first(tags, _LENGTH)
        if not width or not length:
            raise ReadError(r.path, f"page {index} has no image size (ImageWidth {width}, ImageLength {length}): "
                                    f"corrupt TIFF")
        samples = _first(tags, _SAMPLES, 1) or 1
        template = Page(index=index, offset=offset, subfiletype=_first(tags, _SUBFILETYPE, 0), width=width,
                        length=length, samples=samples, planar=samples > 1 and _first(tags, _PLANAR, 1) == 2,
                        bits=tuple(int(b) for b in tags.get(_BITS, (1,))),
                        sample_format=_first(tags, _SAMPLE_FORMAT, 1), depth=_first(tags, _DEPTH, 1) or 1,
                        compression=_first(tags, _COMPRESSION, 1),
                        description=tags[_DESCRIPTION][0] if _DESCRIPTION in tags else None)
        memo[key] = (template, {c: v for c, v in tags.items() if c not in (_STRIP_OFFSETS, _TILE_OFFSETS)}, signature)
    full = tuple((codes[k], entries[k][2:4 + r.offset_size], 0 in tags[codes[k]]) if k in where else item
                 for k, item in enumerate(signature))
    page = replace(template, index=index, offset=offset)
    data, contiguous = _check_data(r, page, tags)
    return replace(page, signature=full, data=data, data_contiguous=contiguous), nxt


def _check_data(r: _Reader, page: Page, tags: dict) -> tuple[tuple[int, int], bool]:
    """The page's strips or tiles lie inside the file; an uncompressed page holds all its bytes.
    Returns their (first byte, end) and whether they follow each other in the file."""
    tiled = _TILE_OFFSETS in tags
    offsets = tags.get(_TILE_OFFSETS if tiled else _STRIP_OFFSETS)
    counts = tags.get(_TILE_COUNTS if tiled else _STRIP_COUNTS)
    if not offsets:
        raise ReadError(r.path, f"page {page.index} has no pixel data (no strip or tile offsets): corrupt TIFF")
    bits = page.bits[0] if page.bits else 1
    planes = page.samples if page.planar else 1
    row = math.ceil(page.width * (1 if page.planar else page.samples) * bits / 8)
    need = planes * page.depth * page.length * row  # an uncompressed page's bytes (strips)
    if counts is None:  # allowed by TIFF 6 for one uncompressed strip; tifffile infers it
        if page.compression != 1 or len(offsets) != 1:
            raise ReadError(r.path, f"page {page.index} has no StripByteCounts: corrupt TIFF")
        counts = (need,)
    if len(counts) != len(offsets):
        raise ReadError(r.path, f"page {page.index}: {len(offsets)} data offsets but {len(counts)} byte counts: "
                                f"corrupt TIFF")
    ends = np.asarray(offsets, np.uint64) + np.asarray(counts, np.uint64)
    end = int(ends.max())
    if end > r.size:
        raise r.truncated(f"page {page.index}'s pixel data", end)
    if page.compression == 1 and not tiled and sum(counts) < need:
        raise ReadError(r.path, f"truncated TIFF: page {page.index} holds {sum(counts):,} bytes of pixel data, "
                                f"its {page.described()} pixels need {need:,}")
    starts = np.asarray(offsets, np.uint64)
    return (int(starts[0]), int(ends[-1])), bool((starts[1:] == ends[:-1]).all())


def _walk(path: Path, max_voxels: int | None) -> list[Page]:
    """Every page of the IFD chain, in file order; the chain must end inside the file and never loop."""
    size = path.stat().st_size
    pages: list[Page] = []
    voxels = 0
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(path, buf, size)
        offset, seen, memo = r.first, set(), {}
        while offset:
            if offset in seen:
                raise ReadError(path, f"page {len(pages)}'s header points back to an earlier page (byte {offset:,}): "
                                      f"corrupt TIFF")
            if offset >= size:
                what = "the first page's header" if not pages else f"page {len(pages)}'s header (IFD)"
                raise ReadError(path, f"truncated TIFF: {what} should start at byte {offset:,}, the file has "
                                      f"{size:,} (the file ends after {len(pages)} page{'s' * (len(pages) != 1)})")
            seen.add(offset)
            page, offset = _page(r, len(pages), offset, memo)
            pages.append(page)
            voxels += page.voxels
            if max_voxels is not None and voxels > max_voxels:
                if all(p.kind == page.kind for p in pages):
                    check_voxels(path, (sum(p.bscans for p in pages), page.length, page.width)
                                 + ((page.samples,) if page.colour else ()), max_voxels)
                raise VoxelLimitError(path, f"its first {len(pages):,} pages = {voxels:,} voxels exceeds the limit of "
                                            f"{max_voxels:,} (raise it with --max-voxels if the file is genuine)")
    if not pages:
        raise ReadError(path, "a TIFF without pages")
    return pages


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
    every = _walk(path, max_voxels)
    pages = [p for p in every if not p.preview] or every
    skipped = tuple(p for p in every if p.preview) if len(pages) < len(every) else ()
    first = pages[0]
    for p in pages[1:]:
        if p.kind != first.kind:
            raise ReadError(path, f"page {p.index} is {p.described()}, page {first.index} is {first.described()}: "
                                  f"every page of a TIFF is a B-scan, and they must share one shape and pixel type")
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
