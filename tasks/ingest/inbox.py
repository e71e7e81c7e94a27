"""The drop folder: which files in an inbox are new to the archive, and which are still being written.

A candidate is a file or folder directly in the inbox that a registered reader takes
(:func:`~octseg.tasks.readers.registry.is_volume_source`), unless another source there covers it (the
images a HEYEX XML export names).
It is *settled* when its modification time (which every write, growth or replacement moves) is at least
``settle_seconds`` old (for a folder: that of every file in it); a file still being copied in is left
for the next run. A settled candidate
is *new* when no volume of the archive was ingested from content with its sha256 (what ingest records
as ``source_sha256``), so a renamed or re-delivered copy of a known file is not ingested twice.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from octseg.tasks.archive.store import open_archive
from octseg.tasks.readers.registry import is_volume_source, reader_for, source_files, source_sha256
from octseg.tasks.readers.sources import shown, source_problem

__all__ = ["InboxScan", "scan_inbox"]


@dataclass
class InboxScan:
    new: list[str] = field(default_factory=list)  # settled and not in the archive: to ingest
    known: list[str] = field(default_factory=list)  # already in the archive (same content)
    unsettled: list[str] = field(default_factory=list)  # changed within settle_seconds: next run
    unreadable: list[str] = field(default_factory=list)  # "path: why" (cannot be hashed)


def _covered_by_others(entries: list[Path]) -> set[str]:
    """Names of the inbox's files that another source there covers (the images a HEYEX XML export names):
    part of that volume, not volumes of their own."""
    names: set[str] = set()
    for p in entries:
        if p.is_dir() or source_problem(p):  # never opened: a FIFO would block
            continue
        try:
            reader = reader_for(p)
            files = reader.fingerprint_files(p) if reader is not None else []
        except OSError:
            continue
        names.update(f.name for f in files if f != p and f.parent == p.parent)
    return names


def _candidates(inbox: Path, labels: Path | None) -> list[Path]:
    entries = [p for p in sorted(inbox.iterdir())
               if not p.name.startswith(".") and not (labels is not None and p.resolve() == labels.resolve())]
    covered = _covered_by_others(entries)
    found = []
    for p in entries:
        if p.name in covered:
            continue
        if source_problem(p) or is_volume_source(p):  # a problem is reported by the scan, never opened
            found.append(p)
    return found


def _last_change(path: Path) -> float:
    """Latest modification time of the file, or of the folder and its files (a file being written, grown
    or replaced changes it)."""
    paths = [path, *(source_files(path) if path.is_dir() else [])]
    return max(p.stat().st_mtime for p in paths)


def scan_inbox(inbox: str | Path, archive: str | Path, *, settle_seconds: float = 60.0,
               labels: str | Path | None = None, now: float | None = None) -> InboxScan:
    """Sort the inbox's candidates into new, known, unsettled and unreadable (see the module doc)."""
    inbox, now = Path(inbox), time.time() if now is None else now
    if not inbox.is_dir():
        raise ValueError(f"{inbox}: the inbox is not a folder")
    labels = Path(labels) if labels else None
    scan = InboxScan()
    known_sha: set[str] = set()
    if (Path(archive) / "zarr.json").is_file():
        arc = open_archive(archive, create=False)
        known_sha = {arc.volume_meta(v).get("source_sha256") for v in arc.volume_ids()}
    for path in _candidates(inbox, labels):
        problem = source_problem(path)
        if problem:
            scan.unreadable.append(problem)
            continue
        try:
            if now - _last_change(path) < settle_seconds:
                scan.unsettled.append(str(path))
                continue
            sha = source_sha256(path)
        except (OSError, ValueError) as e:  # vanished meanwhile, unreadable, an empty folder
            scan.unreadable.append(f"{shown(path)}: {e}")
            continue
        (scan.known if sha in known_sha else scan.new).append(str(path))
    return scan
