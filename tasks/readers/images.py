"""Plain image files and folders of them: TIFF stacks, PNG/JPEG B-scans, ``.npy`` arrays, folders of 2-D B-scans.

Every reader gives ``(Z, Y, X)`` = (B-scan, depth, A-scan); a 2-D file is one B-scan (Z = 1). Grey
levels keep uint8/uint16; other integer and float types become float32. RGB(A) images with equal
channels become one channel; true colour becomes luminance (ITU-R 601) in the same dtype. A folder's
B-scans are its files that a B-scan reader (:class:`~octseg.tasks.readers.base.BScanReader`) takes, in
natural order. Masks are read by :func:`read_pixels` with the same refusals.
"""
from __future__ import annotations

import math
import mmap
import struct
import zlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

from octseg.tasks.readers.base import (
    BScanReader,
    FileReader,
    Limits,
    ReadError,
    Scale,
    ScanVolume,
    VoxelLimitError,
    check_file,
    check_voxels,
    listed_suffixes,
    luminance,
    matches_suffix,
    one_line,
    to_volume_dtype,
)
from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.tasks.readers.sources import natural_key, shown
from octseg.tasks.readers.tiff import read_tiff_pages, tiff_layout

__all__ = ["IMAGE", "NPY", "PIXEL_READERS", "TIFF", "BScanFolderReader", "BScanImageReader", "PixelReader", "bscan_files", "read_pixels"]

_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}


def _tiff_scale(tif: tifffile.TiffFile, warnings: list[str]) -> Scale | None:
    """(z, y, x) voxel size in micrometres from OME-XML PhysicalSize*, when all three are given and valid.

    An invalid size (not a number, zero, negative, unknown unit) or unreadable OME-XML costs only the
    scale: the pixels are still read, and ``warnings`` says why the scale was dropped.
    """
    if not tif.is_ome or not tif.ome_metadata:
        return None
    try:
        pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
    except ET.ParseError as e:
        warnings.append(f"OME-XML unreadable ({e}): ingested without a voxel size")
        return None
    if pixels is None:
        return None
    sizes = []
    for axis in "ZYX":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None:
            return None
        try:
            size = float(value) * _UM[unit]
        except (KeyError, ValueError):
            size = math.nan
        if not (math.isfinite(size) and size > 0):
            warnings.append(f"OME PhysicalSize{axis}={value!r} {unit} is not a positive size: "
                            f"ingested without a voxel size")
            return None
        sizes.append(size)
    return (sizes[0], sizes[1], sizes[2])


def _read_tiff(path: Path, max_voxels: int | None, warnings: list[str]) -> tuple[np.ndarray, bool, Scale | None]:
    """TIFF pixels, whether the last axis is colour samples, and the OME scale.

    Every page is a B-scan, in file order (:mod:`octseg.tasks.readers.tiff` checks the file's pages,
    their shapes, their data and what the metadata declares before any pixel is decoded). Only
    interleaved samples (``...YXS``, what every RGB image writer makes) are colour. Planar samples
    (``SYX``) are what ``tifffile.imwrite`` makes of a 3- or 4-B-scan stack: B-scans.
    """
    try:
        layout = tiff_layout(path, max_voxels)
        if layout.skipped:
            warnings.append(f"{len(layout.skipped)} reduced-resolution or mask page(s) (previews of the B-scans, "
                            f"pages {', '.join(str(p.index) for p in layout.skipped[:5])}) left out")
        arr = read_tiff_pages(path, layout)
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[layout.first.index]
            orientation, photometric = np.ravel(page.tags.valueof(274, 1) or 1), page.photometric
            scale = _tiff_scale(tif, warnings) if layout.ome else None
        if orientation.size != 1 or int(orientation[0]) not in range(1, 9):
            warnings.append(f"Orientation tag {orientation.tolist()} is not one of 1..8: the pixels are kept as stored")
        elif int(orientation[0]) > 1:
            arr = oriented(arr, int(orientation[0]), layout.first.colour, warnings)
            if int(orientation[0]) >= 5 and scale is not None:  # rows and columns swapped: so are their sizes
                scale = (scale[0], scale[2], scale[1])
        if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            top = (1 << max(layout.first.bits)) - 1
            arr = (~arr if arr.dtype == bool else (top - arr).astype(arr.dtype) if arr.dtype.kind == "u"
                   else (float(arr.max()) + float(arr.min()) - arr.astype(np.float64)).astype(np.float32))
            warnings.append("MinIsWhite pixels inverted (bright = strong signal)")
        if layout.first.planar and layout.first.samples > 1:
            warnings.append(f"pages of {layout.first.samples} planar colour samples (how tifffile saves a stack of "
                            f"{layout.first.samples} B-scans) read as {arr.shape[0]} B-scans; if the file is a colour "
                            f"picture, convert it to grey first")
        return arr, layout.first.colour, scale
    except ReadError:
        raise
    except tifffile.TiffFileError as e:
        if "not a TIFF file" in str(e):
            raise ReadError(path, f"not a TIFF image ({e})") from e
        raise ReadError(path, f"truncated or corrupt TIFF ({e})") from e
    except MemoryError as e:
        raise ReadError(path, "out of memory while reading the TIFF") from e
    except Exception as e:  # noqa: BLE001 - tifffile on a damaged file: ValueError, TypeError, KeyError, struct.error...
        raise ReadError(path, f"truncated or corrupt TIFF ({one_line(e)})") from e


# TIFF / EXIF Orientation -> how the stored rows and columns become the picture (rows, columns):
# 2 mirror, 3 half turn, 4 upside down, 5 transpose, 6 quarter turn clockwise, 7 transverse, 8 anticlockwise
_ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, :, ::-1], 3: lambda a: a[:, ::-1, ::-1], 4: lambda a: a[:, ::-1, :],
    5: lambda a: a.swapaxes(1, 2), 6: lambda a: a.swapaxes(1, 2)[:, :, ::-1],
    7: lambda a: a.swapaxes(1, 2)[:, ::-1, ::-1], 8: lambda a: a.swapaxes(1, 2)[:, ::-1, :],
}


def was_turned(warnings: Sequence[str]) -> bool:
    """Whether a read's warnings say an Orientation tag turned its pixels (see :func:`oriented`)."""
    return any(w.startswith("Orientation ") for w in warnings)


def oriented(arr: np.ndarray, orientation: int, colour: bool, warnings: list[str]) -> np.ndarray:
    """Stored pixels (..., rows, columns[, samples]) turned as the file's Orientation tag says viewers show
    them (the tag's meaning as in Pillow's ``ImageOps.exif_transpose``), with a warning when it turns them."""
    turn = _ORIENTATIONS.get(orientation)
    if turn is None:
        return arr
    stack = arr.reshape((-1,) + arr.shape[arr.ndim - 2 - colour:])  # (B-scans, rows, columns[, samples])
    out = np.ascontiguousarray(turn(stack))
    warnings.append(f"Orientation {orientation} (TIFF tag) applied: stored {arr.shape[arr.ndim - 2 - colour:][:2]} "
                    f"pixels turned to {out.shape[1:3]} as viewers show them")
    return out.reshape(arr.shape[:arr.ndim - 2 - colour] + out.shape[1:])


def _read_pil(path: Path, keep_palette: bool, max_voxels: int | None,
              warnings: list[str]) -> tuple[np.ndarray, bool]:
    """PNG/JPEG pixels and whether the last axis is colour channels (palette kept for masks); the size
    is checked from the header before decoding."""
    try:
        with Image.open(path, formats=_PIL_FORMATS) as img:
            check_voxels(path, (img.height, img.width, len(img.getbands())), max_voxels)
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                raise ReadError(path, f"{img.format} image of {frames} frames (an animation or multi-picture file): "
                                      f"one file is one B-scan here; export the frames as a stack (TIFF) instead")
            if img.format == "PNG":
                _check_png_chunks(path)
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            if orientation in _ORIENTATIONS:
                img = ImageOps.exif_transpose(img)
                warnings.append(f"Orientation {orientation} (EXIF) applied: the image is stored turned")
            if img.mode == "P" and not keep_palette:
                img = img.convert("RGBA")
            elif img.mode in ("LA", "PA"):
                img = img.getchannel(0)
            arr = np.asarray(img)
    except ReadError:
        raise  # the voxel limit, said as it is (a ReadError is a ValueError too)
    except UnidentifiedImageError as e:
        raise ReadError(path, "not an image (neither PNG nor JPEG by its content)") from e
    except Image.DecompressionBombError as e:
        raise ReadError(path, f"refused as a decompression bomb ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ReadError(path, f"truncated or corrupt image ({type(e).__name__}: {e})") from e
    return arr, arr.ndim == 3


_PIL_FORMATS = ("PNG", "JPEG")  # what .png/.jpg/.jpeg files may hold: no other Pillow decoder is ever run


def _check_png_chunks(path: Path) -> None:
    """Every chunk of a PNG lies inside the file with its CRC intact, up to IEND: a PNG cut short after
    its pixel data (Pillow reads it without complaint) or with a damaged chunk is refused."""
    size = path.stat().st_size
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 8
        while True:
            if pos + 8 > size:
                raise ReadError(path, f"truncated PNG: the file ends at byte {size:,} before its IEND chunk")
            length, kind = struct.unpack_from(">I4s", buf, pos)
            end = pos + 12 + length
            if end > size:
                raise ReadError(path, f"truncated PNG: chunk {kind.decode('latin1')!r} at byte {pos:,} needs {end:,} "
                                      f"bytes, the file has {size:,}")
            crc = struct.unpack_from(">I", buf, end - 4)[0]
            if zlib.crc32(buf[pos + 4:end - 4]) != crc:
                raise ReadError(path, f"corrupt PNG: chunk {shown(kind.decode('latin1'))!r} at byte {pos:,} fails its CRC")
            if kind == b"IEND":
                return
            pos = end


def _read_npy(path: Path, max_voxels: int | None) -> np.ndarray:
    """A ``.npy`` array, never unpickled; its size checked from the header first."""
    with path.open("rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ReadError(path, "not a NumPy .npy file (bad magic bytes)")
        fh.seek(0)
        try:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(fh)
        except Exception as e:  # noqa: BLE001 - ValueError, SyntaxError, tokenize.TokenError, EOFError, ...
            raise ReadError(path, f"corrupt .npy header ({one_line(e)})") from e
        start = fh.tell()
    if dtype.hasobject:
        raise ReadError(path, f"object arrays ({dtype}) are refused: reading them would unpickle code")
    check_voxels(path, shape, max_voxels)
    need, size = start + math.prod(shape) * dtype.itemsize, path.stat().st_size
    if size < need:
        raise ReadError(path, f"truncated .npy: its header says {dtype} {tuple(shape)}, {need:,} bytes with the "
                              f"header, the file has {size:,}")
    if size > need:
        raise ReadError(path, f"{size - need:,} bytes after the array its header describes ({dtype} {tuple(shape)}): "
                              f"several arrays saved into one file, or a damaged header; refused rather than read in part")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ReadError(path, f"truncated or corrupt .npy ({e})") from e


class PixelReader(FileReader):
    """A plain image file read by its suffix: a volume (3-D) or one B-scan (2-D), in grey levels."""

    vendor = False

    def pixels(self, path: Path, keep_palette: bool, max_voxels: int | None,
               warnings: list[str]) -> tuple[np.ndarray, bool, Scale | None]:
        """(pixels as stored, whether the last axis is colour, the voxel size if the file gives one)."""
        raise NotImplementedError

    def grey(self, path: Path, ndims: tuple[int, ...], max_voxels: int | None,
             warnings: list[str]) -> tuple[np.ndarray, Scale | None]:
        """The file as grey levels with ``ndim`` in ``ndims`` (2 = a B-scan, 3 = a stack), and its voxel size."""
        check_file(path)
        arr, colour, scale = self.pixels(path, False, max_voxels, warnings)
        if arr.ndim > 4:
            raise ReadError(path, f"wrong number of dimensions: expected 2-D or 3-D grey image, got shape {arr.shape}")
        gray = to_volume_dtype(luminance(arr, "image", warnings) if colour else arr, path, warnings)
        if 0 in gray.shape:
            raise ReadError(path, f"empty image of shape {arr.shape}")
        if gray.ndim not in ndims:
            want = " or ".join(f"{n}-D" for n in ndims)
            raise ReadError(path, f"wrong number of dimensions: expected {want} grey image, got shape {arr.shape}")
        return gray, scale

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        warnings: list[str] = []
        image, scale = self.grey(path, (2, 3), limits.max_voxels, warnings)
        image = image[np.newaxis] if image.ndim == 2 else image
        return ScanVolume(image, scale, self.name, path, "", [path], warnings=warnings)


class BScanImageReader(PixelReader):
    """A plain image format whose 2-D files may also be the B-scans of a folder."""

    def read_bscan(self, path: Path, max_voxels: int | None, warnings: list[str]) -> np.ndarray:
        """One 2-D B-scan of a folder, in grey levels."""
        return self.grey(path, (2,), max_voxels, warnings)[0]


class TiffReader(BScanImageReader):
    name, label = "tiff", "TIFF stacks"
    suffixes = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
    reading = 2  # 2: Orientation tags turn the pixels, MinIsWhite is inverted, channel hyperstacks are refused

    def pixels(self, path, keep_palette, max_voxels, warnings):
        return _read_tiff(path, max_voxels, warnings)


class NpyReader(PixelReader):
    name, label, suffixes = "npy", ".npy files", (".npy",)

    def pixels(self, path, keep_palette, max_voxels, warnings):
        return _read_npy(path, max_voxels), False, None


class PilReader(BScanImageReader):
    name, label, suffixes = "image", "2-D images", (".png", ".jpg", ".jpeg")
    reading = 2  # 2: the EXIF Orientation tag turns the pixels

    def pixels(self, path, keep_palette, max_voxels, warnings):
        return (*_read_pil(path, keep_palette, max_voxels, warnings), None)


TIFF, NPY, IMAGE = TiffReader(), NpyReader(), PilReader()
PIXEL_READERS: tuple[PixelReader, ...] = (TIFF, NPY, IMAGE)  # what masks may be


def read_pixels(path: Path, keep_palette: bool = False, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                warnings: list[str] | None = None) -> tuple[np.ndarray, bool]:
    """Pixels of a plain image file as stored, and whether the last axis is colour (a mask keeps its
    palette with ``keep_palette``). The caller checks first that a :data:`PIXEL_READERS` reader takes it."""
    reader = next(r for r in PIXEL_READERS if matches_suffix(r, path))
    check_file(path)
    arr, colour, _ = reader.pixels(path, keep_palette, max_voxels, [] if warnings is None else warnings)
    return arr, colour


def bscan_files(folder: Path, readers: Sequence[BScanReader]) -> list[Path]:
    """The files of ``folder`` that one of ``readers`` takes (no hidden ones), in natural order."""
    files = [f for f in folder.iterdir()
             if f.is_file() and not f.name.startswith(".") and any(matches_suffix(r, f) for r in readers)]
    return sorted(files, key=lambda f: (natural_key(f.name), f.name))  # names alike but for zeros: a fixed order


def same_place(files: Sequence[Path]) -> tuple[Path, Path] | None:
    """Two of ``files`` (in :func:`bscan_files`' order) whose names differ only in leading zeros or letter case
    (``b_01.png``, ``B_1.png``): the natural order cannot say which B-scan comes first; None when there are none."""
    keys = [natural_key(f.name) for f in files]
    return next(((files[i], files[i + 1]) for i in range(len(files) - 1) if keys[i] == keys[i + 1]), None)


class BScanFolderReader(FileReader):
    """Any folder: one volume whose B-scans are its 2-D image files (one file = one B-scan), natural order.

    ``bscan_readers()`` gives the readers a folder's files may be read by (the registry's B-scan readers);
    all B-scans must have one shape and dtype, and their voxels together stay under the limit.
    """

    name, label, vendor = "folder", "folders of 2-D B-scans (one folder = one volume)", False

    def __init__(self, bscan_readers: Callable[[], Sequence[BScanReader]]) -> None:
        self.bscan_readers = bscan_readers

    @property
    def reading(self) -> int:
        """Its rules' version: its B-scan readers' own, so a folder is read again when theirs change."""
        return 1 + sum(int(getattr(r, "reading", 1)) - 1 for r in self.bscan_readers())

    def sniff(self, path: Path) -> bool:
        return path.is_dir()

    def fingerprint_files(self, path: Path) -> list[Path]:
        return bscan_files(path, self.bscan_readers())

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        readers = self.bscan_readers()
        files = bscan_files(path, readers)
        if not files:
            raise ReadError(path, f"empty folder: no B-scan files ({', '.join(listed_suffixes(readers))})")
        if (pair := same_place(files)) is not None:
            raise ReadError(path, f"{shown(pair[0].name)} and {shown(pair[1].name)} name the same place in the "
                                  f"B-scan order (they differ only in leading zeros or letter case): rename one")
        bscans, warnings, total, max_voxels = [], [], 0, limits.max_voxels
        for f in files:
            left = None if max_voxels is None else max_voxels - total
            reader = next(r for r in readers if matches_suffix(r, f))
            try:
                bscan = reader.read_bscan(f, left, warnings)
            except VoxelLimitError as e:
                if left is not None:
                    raise ReadError(path, f"its B-scans exceed the limit of {max_voxels:,} voxels at "
                                          f"{shown(f.name)} (raise it with --max-voxels if the scan is genuine)") from e
                raise
            total += bscan.size
            if bscans and (bscan.shape, bscan.dtype) != (bscans[0].shape, bscans[0].dtype):
                raise ReadError(f, f"B-scan {bscan.shape} {bscan.dtype} differs from {files[0].name} "
                                   f"({bscans[0].shape} {bscans[0].dtype}) in the same folder")
            bscans.append(bscan)
        inner = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if inner:  # a folder is one volume of the image files in it, never of those in its subfolders
            warnings.append(f"{len(inner)} subfolder(s) not read as B-scans of this volume ("
                            f"{', '.join(shown(n) for n in inner[:3])}{', ...' if len(inner) > 3 else ''})")
        return ScanVolume(np.stack(bscans), None, self.name, path, "", files, warnings=sorted(set(warnings)))
