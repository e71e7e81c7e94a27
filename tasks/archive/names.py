"""Names in the archive: which strings may name a volume or an array, and the volume id a source file gets.

Standard library and the readers' registry only (no Zarr, Dask or NumPy), so plans and the drop folder can
name volumes without loading the archive's writers; :mod:`~octseg.tasks.archive.layout` re-exports these.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from octseg.tasks.readers.registry import volume_suffixes

__all__ = ["ARCHIVE_VERSION", "ID_PATTERN", "RESERVED_NAMES", "valid_name", "volume_id_from_path"]

ARCHIVE_VERSION = 1  # the archive's layout, in its root group's ``octseg.archive_version``

RESERVED_NAMES = {"zarr.json"}
ID_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def valid_name(name: str) -> bool:
    """Whether ``name`` may name a volume or a derived array (``[A-Za-z0-9._-]``, no leading dot, not reserved)."""
    return isinstance(name, str) and bool(ID_PATTERN.fullmatch(name)) and name not in RESERVED_NAMES


def volume_id_from_path(path: str | os.PathLike[str], is_dir: bool | None = None) -> str:
    """Volume id of a source: file stem without a registered reader's suffix (``.ome.tif`` as a whole), or
    a folder's name, reduced to ``[A-Za-z0-9._-]`` with no leading dots; never empty. ``is_dir``: whether
    ``path`` is a folder, when the caller knows (else it is looked up, only for a name with a suffix)."""
    text = os.fspath(path)
    name = Path(text).name if text.endswith("/") or "/." in text else os.path.basename(text)  # as Path(...).name
    found = _suffix_pattern().match(name)  # the longest registered suffix, after at least one character
    if found and not (os.path.isdir(path) if is_dir is None else is_dir):
        name = name[: found.start(1)]
    vid = _UNSAFE.sub("_", name).lstrip(".")[:200] or "volume"
    return "_" + vid if vid in RESERVED_NAMES else vid


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_PATTERN: tuple[list[str], re.Pattern[str] | None] = ([], None)


def _suffix_pattern() -> re.Pattern[str]:
    """``.+?(suffix|...)$`` over the registered suffixes, longest first, case-insensitive; made once per
    registry (a plan names 100,000 files)."""
    global _PATTERN
    suffixes = volume_suffixes()
    if _PATTERN[0] is not suffixes or _PATTERN[1] is None:  # the registry's list, kept until it changes
        _PATTERN = (suffixes, re.compile(r".+?(" + "|".join(map(re.escape, suffixes)) + r")\Z",
                                             re.IGNORECASE | re.ASCII | re.DOTALL))
    return _PATTERN[1]
