"""Scan files -> arrays: TIFF stacks, folders of 2-D B-scans, single PNG/JPEG/TIFF B-scans, ``.npy``.

Every reader returns the volume as ``(Z, Y, X)`` = (B-scan, depth, A-scan). Grey levels keep
uint8/uint16; other integer and float types become float32. RGB(A) images with equal channels
become one channel; true colour becomes luminance (ITU-R 601) in the same dtype. Bad input raises
:class:`ReadError`, whose message names the file and what was wrong.
"""
from __future__ import annotations

import hashlib
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

__all__ = [
    "IMAGE_SUFFIXES",
    "ReadError",
    "DEFAULT_MAX_VOXELS",
    "ScanVolume",
    "check_voxels",
    "mask_files",
    "natural_key",
    "read_masks",
    "read_volume",
    "source_files",
    "source_sha256",
]

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES  # B-scan files inside a folder
VOLUME_SUFFIXES = IMAGE_SUFFIXES + (".npy",)
MAX_LABEL = 31  # masks with values 0..31 keep them (class labels); binary masks become 0/1
_LUMA = np.array([0.299, 0.587, 0.114])
_UM = {"µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}
Scale = tuple[float, float, float]  # voxel size (z, y, x) in micrometres
# Largest volume a reader decodes, in voxels (Z*Y*X, colour samples included): 256 B-scans of 1024x1024.
# Readers check it from the file's header before decoding, so a small compressed "bomb" is refused at once.
DEFAULT_MAX_VOXELS = 1 << 28


class ReadError(ValueError):
    """A scan or mask file could not be read; ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


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
        raise ReadError(path, f"{what} of {' x '.join(map(str, dims))} = {voxels:,} voxels exceeds the limit of "
                              f"{max_voxels:,} (raise it with --max-voxels if the file is genuine)")


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
    digest = hashlib.sha256()
    for f in files:
        if with_names:
            digest.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def source_sha256(path: str | Path) -> str:
    """SHA-256 of a source file, or of a folder's image files (names and bytes, natural order)."""
    p = Path(path)
    try:
        return _sha256(source_files(p), with_names=p.is_dir())
    except OSError as e:
        raise ReadError(p, f"cannot read ({e.strerror or e})") from e


def _tiff_scale(tif: tifffile.TiffFile) -> Scale | None:
    """(z, y, x) voxel size in micrometres from OME-XML PhysicalSize*, when all three are given."""
    if not tif.is_ome or not tif.ome_metadata:
        return None
    pixels = next((e for e in ET.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
    if pixels is None:
        return None
    sizes = []
    for axis in "ZYX":
        value, unit = pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if value is None or unit not in _UM:
            return None
        sizes.append(float(value) * _UM[unit])
    return (sizes[0], sizes[1], sizes[2])


def _read_tiff(path: Path) -> tuple[np.ndarray, bool, Scale | None]:
    """TIFF pixels, whether the last axis is colour samples, and the OME scale."""
    try:
        with tifffile.TiffFile(path) as tif:
            arr, axes = tif.asarray(), tif.series[0].axes
            if "S" in axes:  # colour samples, interleaved (last) or planar: move them last
                return np.moveaxis(arr, axes.index("S"), -1), True, _tiff_scale(tif)
            return arr, False, _tiff_scale(tif)
    except tifffile.TiffFileError as e:
        if "not a TIFF file" in str(e):
            raise ReadError(path, f"not a TIFF image ({e})") from e
        raise ReadError(path, f"truncated or corrupt TIFF ({e})") from e
    except (OSError, ValueError, IndexError, ET.ParseError) as e:
        raise ReadError(path, f"truncated or corrupt TIFF ({type(e).__name__}: {e})") from e


def _read_pil(path: Path, keep_palette: bool) -> tuple[np.ndarray, bool]:
    """PNG/JPEG pixels and whether the last axis is colour channels (palette kept for masks)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and not keep_palette:
                img = img.convert("RGBA")
            elif img.mode in ("LA", "PA"):
                img = img.getchannel(0)
            arr = np.asarray(img)
    except UnidentifiedImageError as e:
        raise ReadError(path, "not an image (PIL cannot identify the file format)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ReadError(path, f"truncated or corrupt image ({type(e).__name__}: {e})") from e
    return arr, arr.ndim == 3


def _read_npy(path: Path) -> np.ndarray:
    with path.open("rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ReadError(path, "not a NumPy .npy file (bad magic bytes)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ReadError(path, f"truncated or corrupt .npy ({e})") from e


def _read_raw(path: Path, mask: bool = False) -> tuple[np.ndarray, bool, str, Scale | None]:
    """Pixels of one file: (array, last axis is colour, reader name, scale or None)."""
    suffix = path.suffix.lower()
    if suffix not in VOLUME_SUFFIXES:
        raise ReadError(path, f"unsupported suffix {suffix or '(none)'!r} (expected one of "
                              f"{', '.join(VOLUME_SUFFIXES)} or a folder of B-scans)")
    if not path.is_file():
        raise ReadError(path, "does not exist" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")
    if suffix in TIFF_SUFFIXES:
        arr, colour, scale = _read_tiff(path)
        return arr, colour, "tiff", scale
    if suffix == ".npy":
        return _read_npy(path), False, "npy", None
    arr, colour = _read_pil(path, keep_palette=mask)
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


def _to_volume_dtype(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iuf":
        return arr.astype(np.float32)
    raise ReadError(path, f"unsupported pixel type {arr.dtype} (expected integers or floats)")


def _read_gray(path: Path, ndims: tuple[int, ...]) -> tuple[np.ndarray, str, Scale | None]:
    """One file as grey levels with ``ndim`` in ``ndims`` (2 = a B-scan, 3 = a stack)."""
    arr, colour, reader, scale = _read_raw(path)
    gray = _to_volume_dtype(_to_gray(arr, colour), path)
    if gray.ndim not in ndims or 0 in gray.shape:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ReadError(path, f"wrong number of dimensions: expected {want} grey image, got shape {arr.shape}")
    return gray, reader, scale


def read_volume(path: str | Path, *, sha256: str | None = None) -> ScanVolume:
    """Read a scan file or a folder of B-scans as a (Z, Y, X) volume; 2-D files give Z = 1.

    ``sha256``: the caller's :func:`source_sha256` of ``path``, when it already has it (saves a
    second pass over the bytes); None computes it here.
    """
    p = Path(path)
    if p.is_dir():
        return _read_folder(p, sha256)
    image, reader, scale = _read_gray(p, (2, 3))
    image = image[np.newaxis] if image.ndim == 2 else image
    return ScanVolume(image, scale, reader, p, sha256 or source_sha256(p), [p])


def _read_folder(folder: Path, sha256: str | None = None) -> ScanVolume:
    files = source_files(folder)
    if not files:
        raise ReadError(folder, f"empty folder: no B-scan files ({', '.join(IMAGE_SUFFIXES)})")
    bscans = []
    for f in files:
        bscan = _read_gray(f, (2,))[0]
        if bscans and (bscan.shape, bscan.dtype) != (bscans[0].shape, bscans[0].dtype):
            raise ReadError(f, f"B-scan {bscan.shape} {bscan.dtype} differs from {files[0].name} "
                               f"({bscans[0].shape} {bscans[0].dtype}) in the same folder")
        bscans.append(bscan)
    return ScanVolume(np.stack(bscans), None, "folder", folder, sha256 or source_sha256(folder), files)


def mask_files(labels_dir: str | Path, source: str | Path) -> dict[int, Path]:
    """Existing mask files of a source, by B-scan index (a file source: index 0 = the whole stack).

    A file's mask is ``labels_dir/<file name>``. A folder's masks are
    ``labels_dir/<folder name>/<B-scan file name>`` when that sub-folder exists, else
    ``labels_dir/<B-scan file name>``.
    """
    labels_dir, source = Path(labels_dir), Path(source)
    if not source.is_dir():
        mask = labels_dir / source.name
        return {0: mask} if mask.is_file() else {}
    base = labels_dir / source.name if (labels_dir / source.name).is_dir() else labels_dir
    found = {z: base / f.name for z, f in enumerate(source_files(source))}
    return {z: m for z, m in found.items() if m.is_file()}


def _to_labels(arr: np.ndarray, colour: bool, path: Path) -> np.ndarray:
    """Binary masks (one nonzero value, or any nonzero colour channel) -> 0/1; 0..31 kept; else error."""
    if colour:
        return np.any(arr != 0, axis=-1).astype(np.uint8)
    values = np.unique(arr)
    if arr.dtype == bool or (values.size <= 2 and (values.size < 2 or values[0] == 0)):
        return (arr != 0).astype(np.uint8)
    if values[0] >= 0 and values[-1] <= MAX_LABEL and np.all(values == np.round(values)):
        return arr.astype(np.uint8)
    raise ReadError(path, f"mask is neither binary nor small-integer labels (0..{MAX_LABEL}): "
                          f"{values.size} distinct values in {values[0]}..{values[-1]}")


def _read_mask(path: Path, shape: tuple[int, ...], image_name: str) -> np.ndarray:
    """One mask file as labels of exactly ``shape`` (a 2-D mask fits a one-B-scan volume)."""
    arr, colour, _, _ = _read_raw(path, mask=True)
    labels = _to_labels(arr, colour, path)
    if len(shape) == 3 and shape[0] == 1 and labels.ndim == 2:
        labels = labels[np.newaxis]
    if labels.shape != tuple(shape):
        raise ReadError(path, f"mask shape {labels.shape} does not match image shape {tuple(shape)} of {image_name}")
    return labels


def read_masks(labels_dir: str | Path, volume: ScanVolume) -> tuple[np.ndarray, list[int]] | None:
    """Masks of ``volume`` as (Z, Y, X) uint8 plus the annotated B-scans; None when it has none.

    B-scans without a mask file are unannotated: 0, and not listed. See :func:`mask_files`.
    """
    found = mask_files(labels_dir, volume.source)
    if not found:
        return None
    if not volume.source.is_dir():
        return _read_mask(found[0], volume.image.shape, volume.source.name), list(range(volume.image.shape[0]))
    labels = np.zeros(volume.image.shape, dtype=np.uint8)
    for z, path in sorted(found.items()):
        labels[z] = _read_mask(path, volume.image.shape[1:], volume.files[z].name)
    return labels, sorted(found)
