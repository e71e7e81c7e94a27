"""The drop folder: which files in an inbox are new to the archive, and which are still being written.

A candidate is a file or folder directly in the inbox that a registered reader takes
(:func:`~octseg.tasks.readers.registry.is_volume_source`), unless another source there covers it (the
images a HEYEX XML export names).
It is *settled* when its modification time (which every write, growth or replacement moves) is at least
``settle_seconds`` old (for a folder: that of every file in it); a file still being copied in is left
for the next run. A settled candidate
is *new* when no volume of the archive was ingested from content with its sha256 (what ingest records
as ``source_sha256``), so a renamed or re-delivered copy of a known file is not ingested twice.

The scan reads the archive's catalogue, not its volumes, and opens only what it has not seen: a file whose
path and stamp (inode, size, mtime, mode; :mod:`octseg.tasks.ingest.known`) match what the catalogue
remembers is known without being read; only new or changed files are hashed, and a renamed copy of known
content is recognised by its hash once (then remembered under its new path too). A file refused before
for a reason no retry changes, and unchanged since (same stamp, or the same content under another name,
under the same reading settings), is *known bad*: skipped, counted, never read again until it changes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from octseg.tasks.archive.catalogue import Catalogue, SourceRecord, catalogue_for
from octseg.tasks.ingest.known import (
    forget_folders,
    refused_under,
    remember_bad,
    remember_read,
    source_parts,
    source_stamp,
    still_refused,
)
from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import is_volume_source, reader_for, source_files, source_sha256
from octseg.tasks.readers.sources import shown, source_problem
from octseg.tasks.runtime.memory import paused_gc
from octseg.tasks.runtime.retry import is_transient

__all__ = ["InboxScan", "remember_problems", "scan_inbox"]


@dataclass
class InboxScan:
    new: list[str] = field(default_factory=list)  # settled and not in the archive: to ingest
    known: list[str] = field(default_factory=list)  # already in the archive (same content)
    unsettled: list[str] = field(default_factory=list)  # changed within settle_seconds: next run
    unreadable: list[str] = field(default_factory=list)  # "path: why" (cannot be hashed), new this time
    known_bad: list[str] = field(default_factory=list)  # refused before and unchanged since: skipped
    hashed: int = 0  # files this scan read (hashed): the new and changed ones
    problems: dict[str, str] = field(default_factory=dict)  # path -> why, of the unreadable ones no retry changes


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


def _entries(inbox: Path, labels: Path | None) -> list[tuple[str, str]]:
    """(path, resolved path) of the inbox's entries, sorted, leaving out hidden ones and the labels folder: strings
    (``str(inbox / name)``), as making 100,000 Paths costs a second. The inbox is resolved once; only an entry
    that is a symbolic link is resolved itself."""
    real = os.path.realpath(inbox)
    skip = os.path.realpath(labels) if labels is not None else None
    found = []
    with os.scandir(inbox) as listing:
        for e in listing:
            if e.name.startswith("."):
                continue
            resolved = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
            if resolved != skip:
                found.append((e.name, resolved))
    found.sort()  # by name (strings: sorting 100,000 Paths costs seconds), as sorting the paths would
    base = "" if str(inbox) == "." else str(inbox)  # str(Path(".") / name) is "name", not "./name"
    return [(os.path.join(base, name), resolved) for name, resolved in found]


def _candidates(entries: list[Path], covered: set[str]) -> list[Path]:
    covered = covered | _covered_by_others([p for p in entries if p.name not in covered])
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


def _held(catalogue: Catalogue | None) -> dict[str, str]:
    """SHA-256 of each volume's source -> the volume, from the catalogue, each row checked against its volume."""
    if catalogue is None:
        return {}
    return {e.source_sha256: vid for vid, e in catalogue.entries(verify=("volume",)).items() if e.source_sha256}


def scan_inbox(inbox: str | Path, archive: str | Path, *, settle_seconds: float = 60.0,
               labels: str | Path | None = None, now: float | None = None, settings: str | None = None) -> InboxScan:
    """Sort the inbox's candidates into new, known, known bad, unsettled and unreadable (see the module doc).
    ``settings``: the reading settings of this run (:func:`~octseg.tasks.ingest.known.read_settings`); a file
    refused under others is tried again."""
    forget_folders()
    inbox, now = Path(inbox), time.time() if now is None else now
    if not inbox.is_dir():
        raise ValueError(f"{inbox}: the inbox is not a folder")
    labels = Path(labels) if labels else None
    scan = InboxScan()
    catalogue = catalogue_for(archive) if (Path(archive) / "zarr.json").is_file() else None
    with paused_gc():  # 100,000 rows and names: no cycles among them (not around the hashing below)
        remembered = catalogue.sources() if catalogue is not None else {}
        held = _held(catalogue)
        entries = _entries(inbox, labels)
        resolved_of = dict(entries)
        # 1. what the catalogue knows by path and stamp: decided without opening anything
        quick: dict[str, SourceRecord] = {}
        covered: set[str] = set()
        for path, real in entries if remembered else ():
            record = remembered.get(catalogue.source_key(real))
            if record is not None and source_stamp(path, record.parts) == record.stamp:
                quick[path] = record
                if record.parts and not os.path.isdir(path):
                    covered.update(part for part in record.parts if os.sep not in part)
    for path, record in quick.items():
        if os.path.basename(path) in covered:
            continue
        if still_refused(record, settings):
            scan.known_bad.append(path)
        elif record.bad is None and record.sha256 in held:
            scan.known.append(path)
        elif now - _last_change(Path(path)) >= settle_seconds:  # content no volume holds now, or refused otherwise
            scan.new.append(path)
        else:
            scan.unsettled.append(path)
    # 2. the rest, as before: candidates, settling, hashing
    for path in _candidates([Path(p) for p, _ in entries if p not in quick], covered):
        problem = source_problem(path)
        if problem:
            scan.unreadable.append(problem)
            scan.problems[str(path)] = problem.removeprefix(f"{shown(path)}: ")
            continue
        try:
            if now - _last_change(path) < settle_seconds:
                scan.unsettled.append(str(path))
                continue
            parts = source_parts(path)
            stamp = source_stamp(path, parts)
            scan.hashed += 1
            sha = source_sha256(path)
        except (OSError, ValueError) as e:  # vanished meanwhile, unreadable, an empty folder
            scan.unreadable.append(f"{shown(path)}: {e}")
            if not is_transient(e):
                scan.problems[str(path)] = str(e.reason if isinstance(e, ReadError) else e)
            continue
        bad = catalogue.bad_by_sha(sha, settings) if catalogue is not None and settings is not None else None
        bad = bad or (catalogue.bad_by_sha(sha, refused_under(settings)) if bad is None and catalogue is not None
                      and settings is not None else None)
        if sha in held:
            scan.known.append(str(path))
            remember_read(catalogue, Path(resolved_of[str(path)]), stamp, parts, sha, held[sha])  # known by stamp next time
        elif bad is not None:
            scan.known_bad.append(str(path))  # a renamed copy of a refused file
            remember_bad(catalogue, Path(resolved_of[str(path)]), stamp, parts, sha, bad.bad, bad.bad_settings)
        else:
            scan.new.append(str(path))
    for found in (scan.new, scan.known, scan.unsettled, scan.known_bad):
        found.sort()
    return scan


def remember_problems(archive: str | Path, problems: dict[str, str], settings: str) -> None:
    """Remember the inbox's entries that cannot be ingested at all (a FIFO, a name that is not UTF-8) as refused,
    once they have been reported: the next scans count them as known bad until they change."""
    if not problems or not (Path(archive) / "zarr.json").is_file():
        return
    catalogue = catalogue_for(archive)
    for path, reason in problems.items():
        remember_bad(catalogue, Path(path), source_stamp(Path(path), None), None, None, reason, refused_under(settings))
