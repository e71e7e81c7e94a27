"""Scan files -> arrays: TIFF stacks, folders of 2-D B-scans, single PNG/JPEG/TIFF B-scans, ``.npy``.

Every reader returns the volume as ``(Z, Y, X)`` = (B-scan, depth, A-scan). Grey levels keep
uint8/uint16; other integer and float types become float32. RGB(A) images with equal channels
become one channel; true colour becomes luminance (ITU-R 601) in the same dtype. Bad input raises
:class:`ReadError`, whose message names the file and what was wrong.
"""
from __future__ import annotations

import hashlib
import os
import stat
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from octseg.tasks.limits import DEFAULT_MAX_VOXELS

__all__ = [
    "IMAGE_SUFFIXES",
    "ReadError",
    "VoxelLimitError",
    "is_heyex_xml",
    "SHA256_LATER",
    "DEFAULT_MAX_VOXELS",
    "ScanVolume",
    "check_voxels",
    "natural_key",
    "shown",
    "source_problem",
    "read_volume",
    "source_files",
    "source_sha256",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES  # B-scan files inside a folder
VOLUME_SUFFIXES = IMAGE_SUFFIXES + (".npy",)
_LUMA = np.array([0.299, 0.587, 0.114])
_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}
Scale = tuple[float, float, float]  # voxel size (z, y, x) in micrometres


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` safe for a terminal or a log line: control characters (escape sequences, newlines) and
    undecodable bytes of a file name are written as Python escapes, so a hostile name cannot drive the terminal."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.isprintable() and not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return text
    out = []
    for c in text:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte the file system encoding could not decode (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


class ReadError(ValueError):
    """A scan or mask file could not be read; ``str()`` is ``"<path>: <reason>"`` (path escaped by :func:`shown`)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{shown(self.path)}: {reason}")

    def __reduce__(self):  # picklable, so a Dask worker's error reaches the flow whole
        return (type(self), (self.path, self.reason))


class VoxelLimitError(ReadError):
    """A header's volume is larger than the voxel limit (``--max-voxels``)."""


@dataclass
class ScanVolume:
    """One OCT volume as read from its source."""

    image: np.ndarray  # (Z, Y, X) uint8, uint16 or float32
    scale_um: Scale | None  # voxel size (z, y, x) in micrometres, if known
    reader: str  # "tiff", "image", "npy" or "folder"
    source: Path
    sha256: str  # of the file; of a folder: of its image files' sorted names and bytes
    files: list[Path] = field(default_factory=list)  # the B-scan files of a folder source
    # What vendor files add (see octseg.tasks.vendor); plain image files leave them empty.
    layers: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (Z, X) float32 boundary row, NaN = none
    layers_source: str | None = None  # who drew ``layers``: "device", "grader 1", ...
    fundus: np.ndarray | None = None  # 2-D SLO / NIR localizer image, when the file has one
    fundus_scale_um: tuple[float, float] | None = None  # its (y, x) pixel size in micrometres
    meta: dict[str, Any] = field(default_factory=dict)  # laterality, scan_pattern, acquired, device: never PHI
    identifiers: dict[str, str] = field(default_factory=dict)  # names, ids, birth dates, free text: PHI
    manual_labels: np.ndarray | None = None  # (Z, Y, X) uint8 ground truth carried by the file (Duke .mat)
    annotated: list[int] = field(default_factory=list)  # the B-scans ``manual_labels`` annotates
    warnings: list[str] = field(default_factory=list)  # what was repaired or dropped while reading


def check_voxels(path: str | Path, shape: Iterable[int], max_voxels: int | None, what: str = "image") -> None:
    """Raise :class:`ReadError` when the header's ``shape`` holds more than ``max_voxels`` voxels (None: no limit)."""
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise ReadError(path, f"header gives a negative {what} size {tuple(dims)}")
    voxels = math.prod(dims)
    if max_voxels is not None and voxels > max_voxels:
        raise VoxelLimitError(path, f"{what} of {' x '.join(map(str, dims))} = {voxels:,} voxels exceeds the limit of "
                              f"{max_voxels:,} (raise it with --max-voxels if the file is genuine)")


def source_problem(path: str | Path) -> str | None:
    """Why a source given by name cannot be ingested at all, as ``"<path>: <why>"``; None when it can be
    tried. Catches what would otherwise abort or hang a whole batch: a name that is not UTF-8 (it cannot
    travel in Prefect's JSON parameters), a symbolic link loop, a missing path, a FIFO, socket or device."""
    p = Path(path)
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown(p)}: file name is not valid UTF-8; rename the file (e.g. with convmv) and ingest it again"
    try:
        p.resolve(strict=True)
        mode = p.stat().st_mode
    except FileNotFoundError:
        return f"{shown(p)}: does not exist"
    except (RuntimeError, OSError) as e:  # RuntimeError: pathlib's symlink loop before Python 3.13
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == 40:
            return f"{shown(p)}: symbolic link loop"
        return f"{shown(p)}: cannot be resolved ({getattr(e, 'strerror', None) or e})"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a FIFO would wait for a writer forever
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"{shown(p)}: not a regular file ({kind})"
    return None


def natural_key(name: str) -> list[int | str]:
    """Sort key in which digit runs compare as numbers: ``x_2`` < ``x_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def source_files(path: str | Path) -> list[Path]:
    """The image files of a source: a file itself, or a folder's B-scan files in natural order."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    files = [f for f in p.iterdir()
             if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda f: natural_key(f.name))


def _sha256(files: Iterable[Path], with_names: bool) -> str:
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)  # one buffer: no allocation (and page faults) per block
    view = memoryview(buffer)
    for f in files:
        if with_names:
            digest.update(f.name.encode() + b"\0")
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()


def source_sha256(path: str | Path) -> str:
    """SHA-256 of a source file, or of a folder's image files (names and bytes, natural order); of a HEYEX
    XML export, of the XML and the image files it names (names and bytes)."""
    p = Path(path)
    try:
        xml = p if not p.is_dir() and p.suffix.lower() == ".xml" else _heyex_xml(p) if p.is_dir() else None
        if xml is not None:  # a HEYEX export (its XML or its folder): the XML and the images it names
            from octseg.tasks.vendor import heyex_xml_files

            images = heyex_xml_files(xml)
            return _sha256([xml, *images], with_names=True) if images or p.is_dir() else _sha256([xml], with_names=False)
        return _sha256(source_files(p), with_names=p.is_dir())
    except OSError as e:
        raise ReadError(p, f"cannot read ({e.strerror or e})") from e


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

    Only interleaved samples (``...YXS``, what every RGB image writer makes) are colour. Planar
    samples (``SYX``) are what ``tifffile.imwrite`` makes of a 3- or 4-B-scan stack: B-scans. The
    size is checked from the header (series shape) before any pixel is decoded.
    """
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            check_voxels(path, series.shape, max_voxels)
            arr, axes = series.asarray(), series.axes
            return arr, axes.endswith("S"), _tiff_scale(tif, warnings)
    except ReadError:
        raise
    except tifffile.TiffFileError as e:
        if "not a TIFF file" in str(e):
            raise ReadError(path, f"not a TIFF image ({e})") from e
        raise ReadError(path, f"truncated or corrupt TIFF ({e})") from e
    except (OSError, ValueError, IndexError, ET.ParseError) as e:
        raise ReadError(path, f"truncated or corrupt TIFF ({type(e).__name__}: {e})") from e


def _read_pil(path: Path, keep_palette: bool, max_voxels: int | None) -> tuple[np.ndarray, bool]:
    """PNG/JPEG pixels and whether the last axis is colour channels (palette kept for masks); the size
    is checked from the header before decoding."""
    try:
        with Image.open(path) as img:
            check_voxels(path, (img.height, img.width, len(img.getbands())), max_voxels)
            img.load()
            if img.mode == "P" and not keep_palette:
                img = img.convert("RGBA")
            elif img.mode in ("LA", "PA"):
                img = img.getchannel(0)
            arr = np.asarray(img)
    except ReadError:
        raise  # the voxel limit, said as it is (a ReadError is a ValueError too)
    except UnidentifiedImageError as e:
        raise ReadError(path, "not an image (PIL cannot identify the file format)") from e
    except Image.DecompressionBombError as e:
        raise ReadError(path, f"refused as a decompression bomb ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ReadError(path, f"truncated or corrupt image ({type(e).__name__}: {e})") from e
    return arr, arr.ndim == 3


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
        except (ValueError, SyntaxError, EOFError, OSError) as e:
            raise ReadError(path, f"corrupt .npy header ({e})") from e
    if dtype.hasobject:
        raise ReadError(path, f"object arrays ({dtype}) are refused: reading them would unpickle code")
    check_voxels(path, shape, max_voxels)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ReadError(path, f"truncated or corrupt .npy ({e})") from e


def _read_raw(path: Path, mask: bool = False, max_voxels: int | None = DEFAULT_MAX_VOXELS,
              warnings: list[str] | None = None) -> tuple[np.ndarray, bool, str, Scale | None]:
    """Pixels of one file: (array, last axis is colour, reader name, scale or None)."""
    warnings = [] if warnings is None else warnings
    suffix = path.suffix.lower()
    if suffix not in VOLUME_SUFFIXES:
        raise ReadError(path, f"unsupported suffix {shown(suffix) or '(none)'!r} (expected one of "
                              f"{', '.join(VOLUME_SUFFIXES)}, a vendor export (.vol, .e2e, .xml, .mat, .dcm, "
                              f".fds, .fda, .img, .oct) or a folder of B-scans)")
    if not path.is_file():
        raise ReadError(path, "does not exist" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    if suffix in TIFF_SUFFIXES:
        arr, colour, scale = _read_tiff(path, max_voxels, warnings)
        return arr, colour, "tiff", scale
    if suffix == ".npy":
        return _read_npy(path, max_voxels), False, "npy", None
    arr, colour = _read_pil(path, keep_palette=mask, max_voxels=max_voxels)
    return arr, colour, "image", None


def _to_gray(arr: np.ndarray, colour: bool) -> np.ndarray:
    """Drop the colour axis: equal channels -> one, else luminance in the same dtype."""
    if not colour:
        return arr
    rgb = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    if all(np.array_equal(rgb[..., 0], rgb[..., c]) for c in range(1, rgb.shape[-1])):
        return rgb[..., 0]
    luma = rgb @ _LUMA
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(luma), info.min, info.max).astype(arr.dtype)
    return luma.astype(arr.dtype)


def _to_volume_dtype(arr: np.ndarray, path: Path, warnings: list[str]) -> np.ndarray:
    """uint8/uint16 kept; other integers go to the smallest of uint8, uint16 or float32 that holds every
    value exactly (a warning says when float32 rounds some); floats become float32."""
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        for exact in (np.uint8, np.uint16):
            if lo >= 0 and hi <= np.iinfo(exact).max:
                return arr.astype(exact)
        if max(abs(lo), abs(hi)) > 1 << 24:
            warnings.append(f"{arr.dtype} values {lo}..{hi} exceed float32's exact integers (2^24): "
                            f"stored as float32, rounded to 24 significant bits")
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        if arr.dtype.itemsize > 4:
            finite = np.abs(arr[np.isfinite(arr)])
            if finite.size and finite.max() > np.finfo(np.float32).max:
                raise ReadError(path, f"{arr.dtype} values up to {finite.max():.3g} overflow float32, the archive's float type")
        return arr.astype(np.float32)
    raise ReadError(path, f"unsupported pixel type {arr.dtype} (expected integers or floats)")


def _check_finite(image: np.ndarray, path: Path) -> None:
    """Refuse NaN or infinite voxels: they would poison normalisation and segmentation downstream."""
    if image.dtype.kind != "f":
        return
    bad = ~np.isfinite(image)
    if bad.any():
        bscans = np.flatnonzero(bad.any(axis=tuple(range(1, image.ndim))))
        listed = ", ".join(map(str, bscans[:5])) + (", ..." if bscans.size > 5 else "")
        raise ReadError(path, f"{int(bad.sum()):,} NaN or infinite voxels (B-scan{'s' if bscans.size > 1 else ''} "
                              f"{listed}); refused: re-export the scan without them")


def _read_gray(path: Path, ndims: tuple[int, ...], max_voxels: int | None,
               warnings: list[str]) -> tuple[np.ndarray, str, Scale | None]:
    """One file as grey levels with ``ndim`` in ``ndims`` (2 = a B-scan, 3 = a stack)."""
    arr, colour, reader, scale = _read_raw(path, max_voxels=max_voxels, warnings=warnings)
    if arr.ndim > 4:
        raise ReadError(path, f"wrong number of dimensions: expected 2-D or 3-D grey image, got shape {arr.shape}")
    gray = _to_volume_dtype(_to_gray(arr, colour), path, warnings)
    if 0 in gray.shape:
        raise ReadError(path, f"empty image of shape {arr.shape}")
    if gray.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ReadError(path, f"wrong number of dimensions: expected {want} grey image, got shape {arr.shape}")
    return gray, reader, scale


SHA256_LATER = "(set by the caller)"  # read_volume's sha256 when the caller hashes the file itself, meanwhile


def read_volume(path: str | Path, *, sha256: str | None = None, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                grader: int = 1) -> ScanVolume:
    """Read a scan file, a vendor export or a folder of B-scans as a (Z, Y, X) volume; 2-D files give Z = 1.

    ``sha256``: the caller's :func:`source_sha256` of ``path``, when it already has it (saves a
    second pass over the bytes), or :data:`SHA256_LATER` when the caller sets ``volume.sha256`` itself
    (it hashes the file meanwhile, in another thread); None computes it here. ``max_voxels``: refuse
    larger volumes from their headers (None: no limit). ``grader``: whose manual labels a Duke ``.mat`` gives.
    Vendor formats (``.vol``, ``.e2e``, HEYEX XML, Duke ``.mat``, DICOM, ...) go to
    :func:`octseg.tasks.vendor.read_vendor`. NaN or infinite voxels are refused.
    """
    p = Path(path)
    xml = _heyex_xml(p) if p.is_dir() else None
    if xml is not None:  # a HEYEX XML export folder: the XML names its B-scan images
        from octseg.tasks.vendor import read_vendor

        volume = read_vendor(xml, sha256=sha256 or source_sha256(p), max_voxels=max_voxels, grader=grader)
        volume.source = p
    elif p.is_dir():
        volume = _read_folder(p, sha256, max_voxels)
    elif _is_vendor(p):
        from octseg.tasks.vendor import read_vendor

        volume = read_vendor(p, sha256=sha256, max_voxels=max_voxels, grader=grader)
        if volume.image.ndim != 3 or 0 in volume.image.shape:  # e.g. a DICOM whose frame count disagrees
            raise ReadError(p, f"the {volume.reader} reader found an image of shape {volume.image.shape}, "
                               f"not (B-scans, depth, width): the header disagrees with the pixel data")
        volume.image = _to_volume_dtype(volume.image, p, volume.warnings)
        if volume.fundus is not None:
            volume.fundus = _to_volume_dtype(volume.fundus, p, volume.warnings)
    else:
        warnings: list[str] = []
        image, reader, scale = _read_gray(p, (2, 3), max_voxels, warnings)
        image = image[np.newaxis] if image.ndim == 2 else image
        volume = ScanVolume(image, scale, reader, p, sha256 or source_sha256(p), [p], warnings=warnings)
    _check_finite(volume.image, p)
    return volume


def is_heyex_xml(path: Path) -> bool:
    """Whether the regular file ``path`` is a HEYEX XML export (its root element, ``HEDX``, in the first 512 bytes)."""
    with path.open("rb") as fh:
        return b"<HEDX" in fh.read(512)


def _heyex_xml(folder: Path) -> Path | None:
    """The HEYEX XML file of an export folder (one ``.xml`` whose root element is ``HEDX``), else None."""
    xmls = [f for f in folder.iterdir() if f.suffix.lower() == ".xml" and f.is_file()]  # is_file: no FIFO
    return xmls[0] if len(xmls) == 1 and is_heyex_xml(xmls[0]) else None


def _is_vendor(path: Path) -> bool:
    """A vendor export (by suffix, or DICOM by its magic bytes) rather than a plain image file."""
    if path.suffix.lower() in VOLUME_SUFFIXES:
        return False
    from octseg.tasks.vendor import is_vendor_file

    return is_vendor_file(path)


def _read_folder(folder: Path, sha256: str | None, max_voxels: int | None) -> ScanVolume:
    files = source_files(folder)
    if not files:
        raise ReadError(folder, f"empty folder: no B-scan files ({', '.join(IMAGE_SUFFIXES)})")
    bscans, warnings, total = [], [], 0
    for f in files:
        left = None if max_voxels is None else max_voxels - total
        try:
            bscan = _read_gray(f, (2,), left, warnings)[0]
        except VoxelLimitError as e:
            if left is not None:
                raise ReadError(folder, f"its B-scans exceed the limit of {max_voxels:,} voxels at "
                                        f"{shown(f.name)} (raise it with --max-voxels if the scan is genuine)") from e
            raise
        total += bscan.size
        if bscans and (bscan.shape, bscan.dtype) != (bscans[0].shape, bscans[0].dtype):
            raise ReadError(f, f"B-scan {bscan.shape} {bscan.dtype} differs from {files[0].name} "
                               f"({bscans[0].shape} {bscans[0].dtype}) in the same folder")
        bscans.append(bscan)
    return ScanVolume(np.stack(bscans), None, "folder", folder, sha256 or source_sha256(folder), files,
                      warnings=sorted(set(warnings)))
