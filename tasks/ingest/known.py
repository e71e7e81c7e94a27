"""What the archive's catalogue remembers of source files, so a file is read once, not on every run.

A file octseg has read is remembered by its path (a salted hash of it) with its **stamp**: inode, size,
modification time (ns) and mode of the file, and of the other files that make up the source (a folder's
B-scans, the images a HEYEX XML names). The stamp is taken before the file is hashed and checked again
after, so a remembered SHA-256 always belongs to the bytes of that stamp. While a file's stamp is
unchanged its SHA-256 is known without opening it; any change (a rewrite, a copy over it, ``touch``,
``chmod``) makes it a file to hash again.

A file refused for a reason a retry cannot change (a :class:`~octseg.tasks.readers.base.ReadError` or
ValueError of a reader: not a scan, not OCT, too large, truncated; not an ``OSError`` such as EIO) is
remembered with the reason and the reading settings it was refused under (:func:`read_settings`: the voxel
limit, the reader options, the octseg version); the drop folder skips it while its stamp and those settings
are unchanged. Reasons are stored without the file's path (the catalogue is kept as clean as the archive).
"""
from __future__ import annotations

import errno
import functools
import importlib.metadata
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from octseg.tasks.archive.catalogue import Catalogue, SourceRecord, file_stamp
from octseg.tasks.readers.base import ReadError, VoxelLimitError
from octseg.tasks.readers.registry import reader_for
from octseg.tasks.runtime.retry import is_transient

__all__ = ["bad_reason", "is_bad_input", "known_sha256", "read_settings", "refused_under", "remember_bad",
           "remember_read", "resolved", "forget_folders", "source_parts", "source_stamp", "still_refused"]


def resolved(path: str | os.PathLike[str]) -> str:
    """The absolute, symlink-free path a source is remembered by: ``os.path.realpath``, with the folder's
    resolution cached (a drop folder of 100,000 files is one folder), so a file that is not itself a link
    costs one ``lstat``."""
    if _plain(path):
        path = os.path.abspath(path)
        folder, name = os.path.split(path)
        try:
            if name and not stat.S_ISLNK(os.lstat(path).st_mode):
                return os.path.join(_real_folder(folder), name)
        except OSError:
            pass
    return os.path.realpath(path)


def _plain(path: str | os.PathLike[str]) -> bool:
    """A name the folder shortcut resolves as ``realpath`` does: no ``..`` (``abspath`` would fold it before
    links are followed) and no trailing slash (``lstat`` would follow a link to a folder)."""
    text = os.fspath(path)
    return ".." not in text and not text.endswith("/")


@functools.lru_cache(maxsize=1024)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)


def forget_folders() -> None:
    """Forget the folders resolved so far: each plan and inbox scan starts afresh (a folder link may have been
    pointed elsewhere since the last one, in a process that lives for many)."""
    _real_folder.cache_clear()


def source_parts(path: Path) -> tuple[str, ...] | None:
    """The other files a source is made of, relative to its folder (or to itself, for a folder); None for a
    single file. Opens at most an export's index file (a HEYEX XML); never a plain file."""
    try:
        reader = reader_for(path)
        files = reader.fingerprint_files(path) if reader is not None else [path]
    except (OSError, ValueError):
        return None
    base = path if path.is_dir() else path.parent
    parts = tuple(os.path.relpath(f, base) for f in files if f != path)
    return parts or (() if path.is_dir() else None)


def source_stamp(path: str | Path, parts: tuple[str, ...] | None) -> str | None:
    """Inode, size, mtime and mode of ``path`` and of its ``parts``; None when any cannot be stat'ed."""
    try:
        st = os.stat(path)
        stamp = [f"{file_stamp(st)}:{st.st_mode:o}"]
        if parts:
            base = str(path) if os.path.isdir(path) else os.path.dirname(path)
            stamp += [f"{name}={file_stamp(os.stat(os.path.join(base, name)))}" for name in parts]
    except OSError:
        return None
    return "|".join(stamp)


def _octseg_version() -> str:
    try:
        return importlib.metadata.version("octseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def read_settings(options: Mapping[str, Any] | None, max_voxels: int | None) -> str:
    """The settings a refusal depends on: a file refused under others (another grader, a newer octseg; for a
    volume refused as too large, another voxel limit) is tried again."""
    return json.dumps({"max_voxels": max_voxels, "options": dict(options or {}), "octseg": _octseg_version()},
                      sort_keys=True, default=str)


def refused_under(settings: str, error: BaseException | None = None) -> str:
    """The part of ``settings`` a refusal depends on: all of it for a volume refused as too large, else all but
    the voxel limit (raising the limit retries only what was too large)."""
    if isinstance(error, VoxelLimitError):
        return settings
    found = json.loads(settings)
    found["max_voxels"] = None
    return json.dumps(found, sort_keys=True)


def still_refused(record: SourceRecord, settings: str | None) -> bool:
    """Whether a remembered refusal holds under this run's ``settings`` (see :func:`refused_under`)."""
    return (record.bad is not None and settings is not None
            and record.bad_settings in (settings, refused_under(settings)))


_FILE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG,
                errno.EFBIG, errno.EINVAL}


def is_bad_input(error: BaseException) -> bool:
    """A refusal of the file itself, which no retry changes: a reader's ReadError or ValueError, or a library's
    bare ``OSError`` without an errno (Pillow's truncated image, h5py's missing signature). Not a transient
    error (:func:`~octseg.tasks.runtime.retry.is_transient`), nor one of the system's (an errno that is not
    about the file, such as too many open files)."""
    if is_transient(error):
        return False
    cause, seen = error, 0
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno is not None and cause.errno not in _FILE_ERRNOS:
            return False
        cause, seen = cause.__cause__, seen + 1
    return isinstance(error, (ValueError, OSError))


def bad_reason(error: BaseException, path: Path) -> str:
    """Why a file was refused, without its path."""
    if isinstance(error, ReadError):
        return error.reason
    text = " ".join(str(error).split())
    for name in (str(path), str(path.resolve()), path.name):
        text = text.replace(name, "<file>")
    return f"{type(error).__name__}: {text}"


def remember_read(catalogue: Catalogue, path: Path, stamp: str | None, parts: tuple[str, ...] | None, sha256: str,
                  volume_id: str | None) -> None:
    """The file at ``path`` had ``stamp`` before and after it was hashed to ``sha256``; its content is held by
    ``volume_id`` (None: not ingested). Nothing is remembered when the stamp moved meanwhile."""
    if stamp is None or source_stamp(path, parts) != stamp:
        return
    catalogue.remember([SourceRecord(catalogue.source_key(resolved(path)), stamp, parts, sha256, volume_id)])


def remember_bad(catalogue: Catalogue, path: Path, stamp: str | None, parts: tuple[str, ...] | None,
                 sha256: str | None, reason: str, settings: str) -> None:
    """The file at ``path`` (``stamp`` when it was read) was refused for ``reason`` under ``settings``."""
    if stamp is None or source_stamp(path, parts) != stamp:
        return
    catalogue.remember([SourceRecord(catalogue.source_key(resolved(path)), stamp, parts, sha256, None, reason,
                                     settings)])


def known_sha256(catalogue: Catalogue, path: str | Path, remembered: Mapping[str, SourceRecord] | None = None,
                 lstat: os.stat_result | None = None) -> str | None:
    """The SHA-256 of the file at ``path`` when the catalogue remembers it with its present stamp (so it need
    not be read); else None. ``remembered``: :meth:`Catalogue.sources`, when the caller has it already;
    ``lstat``: the path's ``lstat`` just taken, when it is not a symbolic link (saves two system calls)."""
    if lstat is not None and _plain(path):
        folder, name = os.path.split(os.path.abspath(path))
        real = os.path.join(_real_folder(folder), name)
    else:
        real = resolved(path)
    record = (remembered.get(catalogue.source_key(real)) if remembered is not None
              else catalogue.sources().get(catalogue.source_key(real)))
    if record is None or not record.sha256:
        return None
    if lstat is not None and _plain(path) and not record.parts:
        stamp = f"{file_stamp(lstat)}:{lstat.st_mode:o}"  # what source_stamp makes of a single file
    else:
        stamp = source_stamp(Path(path), record.parts)
    return record.sha256 if stamp == record.stamp else None
