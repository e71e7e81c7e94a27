"""The readers, listed once in :data:`READERS`, and everything that follows from the list.

As nnU-Net v2 keeps its image readers in one list (``LIST_OF_IO_CLASSES``, each with its
``supported_file_endings``), octseg keeps one :class:`~octseg.tasks.readers.base.Reader` a format
here; nothing else in the package names a format. A new format is one module with its reader and one
line in :data:`READERS`. From the list follow: :func:`read_volume` (which reader takes a path),
:func:`is_volume_source` (the inbox's candidates), :func:`volume_suffixes` (what a volume id leaves out
of a file name), :func:`bscan_readers` (what a folder of B-scans may hold), :func:`format_summary` (the
formats in one line, for ``--help``) and :func:`unsupported_suffix` (the error for anything else).

Which reader takes a path (:func:`reader_for`):

* a folder: the first reader that recognises it (``sniff``): a HEYEX export, else a folder of B-scans;
* a file whose name ends with a plain image suffix (TIFF, PNG/JPEG, ``.npy``): that reader (a
  DICOM-TIFF dual file is a valid TIFF);
* any other file: the first reader that recognises its content (DICOM's "DICM" at byte 128, whatever
  the name), else the first whose suffix it has.

The format modules import their heavy libraries (eyepy, pydicom, h5py, SciPy, oct-converter) only when
a file of theirs is read, so importing this module stays cheap.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from octseg.tasks.readers import dicom, duke, heidelberg, heyex_xml, images, octconverter
from octseg.tasks.readers.base import (
    BScanReader,
    Limits,
    ReadError,
    Reader,
    ScanVolume,
    check_finite,
    listed_suffixes,
    matches_suffix,
)
from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.tasks.readers.sources import sha256_of_files, shown

__all__ = [
    "READERS", "SHA256_LATER", "bscan_readers", "format_summary", "is_volume_source", "read_volume", "reader_for",
    "reader_options_model",
    "reader_named", "source_files", "source_sha256", "unsupported_suffix", "volume_suffixes",
]

SHA256_LATER = "(set by the caller)"  # read_volume's sha256 when the caller hashes the file itself, meanwhile


def bscan_readers() -> list[BScanReader]:
    """The readers whose 2-D files may be the B-scans of a folder, in registry order."""
    return [r for r in READERS if isinstance(r, BScanReader)]


READERS: list[Reader] = [
    images.TIFF, images.NPY, images.IMAGE,  # plain images, by suffix
    heidelberg.VOL, heidelberg.E2E, heyex_xml.XML,  # HEYEX XML: a file, or an export's folder by its content
    dicom.DICOM,  # .dcm, or "DICM" at byte 128 whatever the name
    duke.MAT,
    octconverter.FDS, octconverter.FDA, octconverter.IMG, octconverter.BOCT,  # the 'vendor' extra
    images.BScanFolderReader(bscan_readers),  # any other folder: its 2-D B-scans
]


def reader_for(path: str | Path) -> Reader | None:
    """The reader that takes ``path`` (see the module docstring), or None. Opens regular files only."""
    p = Path(path)
    if p.is_dir():
        return next((r for r in READERS if r.sniff(p)), None)
    by_suffix = [r for r in READERS if matches_suffix(r, p)]
    if by_suffix and not by_suffix[0].vendor:
        return by_suffix[0]
    return next((r for r in READERS if r.sniff(p)), by_suffix[0] if by_suffix else None)


def reader_named(name: str | None) -> Reader | None:
    """The reader whose ``name`` a volume records (``volume.reader``), or None."""
    return next((r for r in READERS if r.name == name), None)


def is_volume_source(path: str | Path) -> bool:
    """Whether a reader takes ``path``: every folder, and the files of a registered format."""
    try:
        return reader_for(path) is not None
    except OSError:
        return True  # a folder that cannot be listed: let the caller report it as unreadable


def unsupported_suffix(path: str | Path) -> ReadError:
    """The error for a file no reader takes, listing what would be read."""
    p = Path(path)
    plain = listed_suffixes([r for r in READERS if not r.vendor])
    exports = listed_suffixes([r for r in READERS if r.vendor])
    return ReadError(p, f"unsupported suffix {shown(p.suffix.lower()) or '(none)'!r} (expected one of "
                        f"{', '.join(plain)}, a vendor export ({', '.join(exports)}) or a folder of B-scans)")


def volume_suffixes() -> list[str]:
    """Every registered suffix, longest first (``.ome.tif`` before ``.tif``): what a volume id leaves out.
    Sorted once per set of registered readers (a plan asks for each of 100,000 files)."""
    global _SUFFIXES
    key = tuple(map(id, READERS))
    if _SUFFIXES[0] != key:
        _SUFFIXES = (key, sorted({s for r in READERS for s in r.suffixes}, key=lambda s: (-len(s), s)))
    return _SUFFIXES[1]


_SUFFIXES: tuple[tuple[int, ...], list[str]] = ((), [])


def source_files(path: str | Path) -> list[Path]:
    """The image files of a source: a file itself, or a folder's B-scan files in natural order."""
    p = Path(path)
    return images.bscan_files(p, bscan_readers()) if p.is_dir() else [p]


def source_sha256(path: str | Path) -> str:
    """SHA-256 of a source: of its file, or of the files its reader says make it up, names included when
    there are several or it is a folder (a folder's B-scans; a HEYEX export's XML and the images it names)."""
    p = Path(path)
    try:
        reader = reader_for(p)
        files = reader.fingerprint_files(p) if reader is not None else [p]
        return sha256_of_files(files, with_names=p.is_dir() or len(files) > 1)
    except OSError as e:
        raise ReadError(p, f"cannot read ({e.strerror or e})") from e


def read_volume(path: str | Path, *, sha256: str | None = None, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                options: Mapping[str, Any] | None = None) -> ScanVolume:
    """Read a scan file, a vendor export or a folder of B-scans as a (Z, Y, X) volume; 2-D files give Z = 1.

    ``sha256``: the caller's :func:`source_sha256` of ``path``, when it already has it (saves a
    second pass over the bytes), or :data:`SHA256_LATER` when the caller sets ``volume.sha256`` itself
    (it hashes the file meanwhile, in another thread); None computes it here. ``max_voxels``: refuse
    larger volumes from their headers (None: no limit). ``options``: reader options (Duke's
    ``grader``: whose manual labels a ``.mat`` gives); a reader ignores those it does not take.
    NaN or infinite voxels are refused.
    """
    p = Path(path)
    reader = reader_for(p)
    if reader is None:
        raise unsupported_suffix(p)
    volume = reader.read(p, Limits(max_voxels), options if options is not None else {})
    volume.source = p
    volume.sha256 = sha256 or source_sha256(p)
    check_finite(volume.image, p)
    return volume


def reader_options_model(**common: tuple[Any, Any]) -> type:
    """The one typed mapping of reader options (``IngestConfig.reader_options``): the ``common`` fields (e.g.
    ingest's ``keep_identifiers``, about the identifiers every reader returns) and each reader's
    ``option_fields``. A name declared twice, differently, is an error; built from :data:`READERS` on each call."""
    from pydantic import ConfigDict, create_model

    fields: dict[str, tuple[Any, Any]] = dict(common)
    owner: dict[str, str] = {}
    for reader in READERS:
        for name, declared in reader.option_fields.items():
            if name in fields and fields[name] != declared:
                raise ValueError(f"reader option {name!r} is declared by {owner.get(name, 'ingest')} and, "
                                 f"differently, by {reader.name}")
            fields[name], owner[name] = declared, reader.name
    return create_model("ReaderOptions", __config__=ConfigDict(frozen=True, extra="forbid"), **fields)


def _distinct(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def format_summary() -> str:
    """The formats that can be read, in one sentence (the SOURCE help of ``octseg ingest``)."""
    plain = _distinct(r.label for r in READERS if not r.vendor)
    exports = [", ".join(_distinct(r.label for r in READERS if r.vendor and r.extra is None))]
    for extra in _distinct(r.extra for r in READERS if r.vendor and r.extra is not None):
        *first, last = _distinct(r.label for r in READERS if r.extra == extra)
        exports.append(f"{', '.join(first)} and {last}" if first else last)
        exports[-1] += f" with the '{extra}' extra"
    return f"{', '.join(plain)}, or vendor exports: {'; '.join(e for e in exports if e)}."
