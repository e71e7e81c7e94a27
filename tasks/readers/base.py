"""What every reader shares: the :class:`Reader` protocol, the :class:`ScanVolume` it returns, its errors and limits.

A reader turns one source (a file, or a folder) into a :class:`ScanVolume` whose ``image`` is
``(Z, Y, X)`` = (B-scan, depth, A-scan) in the device's B-scan order, as uint8, uint16 or float32
(:func:`to_volume_dtype`). It checks the volume's size from the header (:func:`check_voxels`) before
decoding pixels and raises :class:`ReadError`, whose message names the file and what was wrong, for
anything it cannot read. Readers are listed once, in :mod:`octseg.tasks.readers.registry`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.tasks.readers.sources import shown

__all__ = [
    "BScanReader", "ExportReader", "FileReader", "Limits", "ReadError", "Reader", "Scale", "ScanVolume",
    "VoxelLimitError", "check_file", "check_finite", "check_voxels", "listed_suffixes", "matches_suffix", "luminance",
    "one_line", "to_volume_dtype",
]

Scale = tuple[float, float, float]  # voxel size (z, y, x) in micrometres


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


@dataclass(frozen=True)
class Limits:
    """What a reader may decode: ``max_voxels`` of a volume (Z*Y*X, colour samples included; None: no limit)."""

    max_voxels: int | None = DEFAULT_MAX_VOXELS


@dataclass
class ScanVolume:
    """One OCT volume as read from its source."""

    image: np.ndarray  # (Z, Y, X) uint8, uint16 or float32
    scale_um: Scale | None  # voxel size (z, y, x) in micrometres, if known
    reader: str  # the reader's name: "tiff", "image", "npy", "folder", "heyex-vol", "dicom", ...
    source: Path
    sha256: str  # of the file; of a folder: of its image files' sorted names and bytes
    files: list[Path] = field(default_factory=list)  # the files read (a folder's B-scans, an export's images)
    # What vendor exports add; plain image files leave them empty.
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


def check_file(path: Path) -> None:
    """Raise :class:`ReadError` unless ``path`` is an existing, regular, non-empty file."""
    if not path.is_file():
        raise ReadError(path, "does not exist" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ReadError(path, "empty file (0 bytes)")


def one_line(e: BaseException) -> str:
    """A third-party exception as ``"<Type>: <message>"`` on one line of at most ~300 characters."""
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:300]}"


def to_volume_dtype(arr: np.ndarray, path: Path, warnings: list[str]) -> np.ndarray:
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


_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601


def luminance(arr: np.ndarray, what: str, warnings: list[str] | None = None) -> np.ndarray:
    """Drop the last (colour) axis of 1-4 channels: equal colour channels -> one, else the luminance
    0.299 R + 0.587 G + 0.114 B, rounded, in the same dtype. ``warnings`` hears of a luminance conversion
    and of a transparency channel (2nd of 2, 4th of 4) that held anything but opaque."""
    said = [] if warnings is None else warnings
    if arr.shape[-1] in (2, 4) and np.any(arr[..., -1] != arr[..., -1].max(initial=0)):
        said.append(f"{what}: transparency (alpha) channel dropped: it was not opaque everywhere")
    rgb = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]
    if all(np.array_equal(rgb[..., 0], rgb[..., c]) for c in range(1, rgb.shape[-1])):
        return np.ascontiguousarray(rgb[..., 0])
    said.append(f"{what} in colour (its channels differ) stored as grey levels: the luminance 0.299 R + 0.587 G + 0.114 B")
    luma = rgb @ _LUMA
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        return np.clip(np.rint(luma), info.min, info.max).astype(arr.dtype)
    return luma.astype(arr.dtype)


def check_finite(image: np.ndarray, path: Path) -> None:
    """Refuse NaN or infinite voxels: they would poison normalisation and segmentation downstream."""
    if image.dtype.kind != "f":
        return
    bad = ~np.isfinite(image)
    if bad.any():
        bscans = np.flatnonzero(bad.any(axis=tuple(range(1, image.ndim))))
        listed = ", ".join(map(str, bscans[:5])) + (", ..." if bscans.size > 5 else "")
        raise ReadError(path, f"{int(bad.sum()):,} NaN or infinite voxels (B-scan{'s' if bscans.size > 1 else ''} "
                              f"{listed}); refused: re-export the scan without them")


@runtime_checkable
class Reader(Protocol):
    """One file format (or folder layout), as the registry sees it; :class:`FileReader` gives the defaults.

    ``name`` is recorded as the volume's reader; ``suffixes`` are the lower-case file endings it reads
    (``.ome.tif`` may sit beside ``.tif``); ``sniff(path)`` is True where the content alone identifies a
    source of this format whatever its name (DICOM's "DICM" at byte 128, a HEYEX export folder), and
    never opens anything but a regular file; ``read(path, limits, options)`` gives the volume.
    ``options`` are the reader options of the run (Duke's ``grader``); ``option_fields`` declares those
    this reader takes (name -> ``(type, Field(default, description=...))``: type, default, check and help
    sentence once), from which the registry builds ``IngestConfig.reader_options`` and the
    command its options; ``option_defaults`` are their defaults, so ingest can record and compare them. ``label`` names the format for people
    (``--help``); ``vendor`` is False for plain image formats; ``extra`` is the pip extra the reader needs.
    ``fingerprint_files(path)`` are the files whose bytes (and names, when several) identify the source.
    An optional ``reading`` (an int, 1 when absent) is the version of the reader's rules: raise it when a change
    reads the same bytes into other pixels, and ingest reads its volumes again (keeping those that come out the same).
    """

    name: str
    suffixes: tuple[str, ...]
    label: str
    vendor: bool
    extra: str | None
    option_fields: Mapping[str, tuple[Any, Any]]
    option_defaults: Mapping[str, Any]

    def sniff(self, path: Path) -> bool: ...

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume: ...

    def fingerprint_files(self, path: Path) -> list[Path]: ...


@runtime_checkable
class BScanReader(Protocol):
    """A reader of 2-D images that may also be the B-scans of a folder (one file = one B-scan)."""

    suffixes: tuple[str, ...]

    def read_bscan(self, path: Path, max_voxels: int | None, warnings: list[str]) -> np.ndarray: ...


class FileReader:
    """Defaults of the :class:`Reader` protocol: known by suffix only, one file is its own fingerprint."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = ""
    vendor: ClassVar[bool] = True
    extra: ClassVar[str | None] = None
    option_fields: ClassVar[Mapping[str, tuple[Any, Any]]] = {}  # name -> (type, pydantic Field(default, ...))
    reading: ClassVar[int] = 1  # the version of the reading rules (see Reader)

    @property
    def option_defaults(self) -> dict[str, Any]:
        """Each option's default, from its declaration."""
        return {name: field.default for name, (_, field) in self.option_fields.items()}

    def sniff(self, path: Path) -> bool:
        return False

    def fingerprint_files(self, path: Path) -> list[Path]:
        return [path]

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class ExportReader(FileReader):
    """A vendor export: :meth:`decode` reads its pixels and header; :meth:`read` adds what every export shares.

    That is: the file must be a regular, non-empty file; a third-party exception becomes a
    :class:`ReadError` ("unreadable <name> file (...)"), never escaping; ``reader``, ``source``,
    ``files`` and ``meta["format"]`` are filled in; the image must be 3-D and non-empty, and the image
    and fundus get the archive's dtypes (:func:`to_volume_dtype`).
    """

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        raise NotImplementedError

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        check_file(path)
        try:
            volume = self.decode(path, limits, options)
        except ReadError:
            raise
        except MemoryError as e:
            raise ReadError(path, f"out of memory while reading the {self.name} file") from e
        except Exception as e:  # noqa: BLE001 - construct, pydicom, h5py, scipy, PIL: all become ReadError
            raise ReadError(path, f"unreadable {self.name} file ({one_line(e)})") from e
        volume.reader, volume.source = self.name, path
        volume.files = volume.files or [path]
        volume.meta = {"format": self.name, **volume.meta}
        if volume.image.ndim != 3 or 0 in volume.image.shape:  # e.g. a DICOM whose frame count disagrees
            raise ReadError(path, f"the {self.name} reader found an image of shape {volume.image.shape}, "
                                  f"not (B-scans, depth, width): the header disagrees with the pixel data")
        volume.image = to_volume_dtype(volume.image, path, volume.warnings)
        if volume.fundus is not None:
            volume.fundus = to_volume_dtype(volume.fundus, path, volume.warnings)
        return volume


def matches_suffix(reader: Reader | BScanReader, path: Path) -> bool:
    """Whether ``path``'s name ends with one of the reader's suffixes (case-insensitive, a name longer than it)."""
    name = path.name.lower()
    return any(name.endswith(s) and len(name) > len(s) for s in reader.suffixes)


def listed_suffixes(readers: Sequence[Reader | BScanReader]) -> list[str]:
    """The readers' suffixes in order, for a message: those ending with another one (``.ome.tif``) left out."""
    every = [s for r in readers for s in r.suffixes]
    return [s for s in every if not any(s != o and s.endswith(o) for o in every)]

