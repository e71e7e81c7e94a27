"""The structure of a TIFF file, walked before any pixel is decoded (see :mod:`octseg.tasks.readers.tiff`).

A small walker over the chain of image file directories (IFDs, one a page): each page's kind (shape,
pixel type, samples, preview or image), where its pixel data lies, and whether the chain ends where the
file ends. Truncated or looping chains, pixel data beyond the end of the file and more voxels than the
limit are refused here with a :class:`~octseg.tasks.readers.base.ReadError` naming the page.
"""
from __future__ import annotations

import math
import mmap
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from octseg.tasks.readers.base import ReadError, VoxelLimitError, check_voxels

__all__ = ["Page", "TiffLayout", "walk_pages"]

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


def walk_pages(path: Path, max_voxels: int | None) -> list[Page]:
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
