"""Checks the command runs before the Prefect engine starts: a user error is one line, at once.

Standard library only (no zarr, torch, mlflow or prefect), so a wrong path answers in well under a
second. Each check raises ValueError naming the path and what is wrong with it. The flows check
again where they touch the data; these checks only make the common mistakes fast and clear.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from octseg.tasks.archive.names import ARCHIVE_VERSION

__all__ = ["SIBLINGS", "check_archive", "check_archive_siblings", "check_new_archive", "check_output_folder",
           "check_labels", "check_sources", "check_tracking_writable", "check_writable"]

# The folders octseg keeps beside an archive ``A`` (name patterns, what they hold): the per-volume claims of
# concurrent runs and the staging folders of volumes being written (tasks.archive.claims and .staging, next
# to the resolved archive), the QC overlays and the reports (next to the archive as given).
SIBLINGS = {
    "claims": (".{}.claims", "per-volume claims"),
    "staging": (".{}.staging", "staging folders"),
    "qc": ("{}.qc", "QC overlays"),
    "reports": ("{}.reports", "reports"),
}


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists; ValueError when that is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir() and p != path:
                raise ValueError(f"{path}: {p} is a file, not a folder")
            return p
    return Path("/")


def check_writable(folder: Path, what: str) -> None:
    """ValueError unless a file can be created in ``folder`` (a real probe: root ignores mode bits,
    a read-only mount does not)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".octseg-write-probe-", dir=folder)
    except OSError as e:
        raise ValueError(f"{what} {folder} is not writable ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def check_tracking_writable(tracking_uri: str) -> None:
    """For a command that writes to MLflow: a SQLite tracking database (when it exists) opens for writing and
    its folder takes a new file (SQLite's journal). Without this MLflow retries for minutes before failing."""
    from octseg.tasks.tracking.uri import sqlite_path

    path = sqlite_path(tracking_uri)
    if path in (None, "", ":memory:"):
        return
    db = Path(path)
    check_writable(db.parent, f"tracking URI {tracking_uri}: the database's folder")
    try:
        if db.exists():
            with db.open("r+b"):
                pass
    except OSError as e:
        raise ValueError(f"tracking URI {tracking_uri}: {db} is not writable ({e.strerror or e})") from None


def check_sources(sources: Iterable[Path]) -> None:
    """Every source given on the command line exists."""
    missing = [str(p) for p in sources if not Path(p).exists()]
    if missing:
        raise ValueError(f"source(s) not found: {', '.join(missing)}")


def check_labels(labels: Path | None) -> None:
    """The masks folder of ``--labels``, when given, is a folder (a typo would ingest without masks)."""
    if labels is not None and not Path(labels).is_dir():
        raise ValueError(f"--labels {labels}: " + ("is a file, not a folder" if Path(labels).exists() else
                                                   "no such folder"))


def _octseg_group(path: Path) -> bool:
    return _octseg_attrs(path) is not None


def _octseg_attrs(path: Path) -> dict | None:
    """The group's ``octseg`` attributes (its ``archive_version``), None when it has none."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None
    found = attrs.get("octseg") if isinstance(attrs, dict) else None
    return found if isinstance(found, dict) else {} if found is not None else None


def check_archive_siblings(path: Path, *which: str) -> None:
    """The folders octseg creates beside the archive (``which`` of :data:`SIBLINGS`) can be created or
    written: each that exists is a writable folder, and the folder beside the archive takes new ones."""
    path = Path(path)
    resolved = path.resolve()
    missing: list[Path] = []
    for key in which:
        pattern, purpose = SIBLINGS[key]
        where = resolved.parent if key in ("claims", "staging") else path.parent
        sibling = where / pattern.format(resolved.name if key in ("claims", "staging") else path.name)
        if sibling.exists() or sibling.is_symlink():
            if not sibling.is_dir():
                raise ValueError(f"{sibling} is {'a broken link' if not sibling.exists() else 'a file'}, not a folder: "
                                 f"octseg keeps the archive's {purpose} there; remove or rename it")
            check_writable(sibling, f"the archive's {purpose} folder")
        else:
            missing.append(sibling)
    for parent in dict.fromkeys(s.parent for s in missing):
        names = ", ".join(s.name for s in missing if s.parent == parent)
        try:
            check_writable(_existing_ancestor(parent), "folder beside the archive")
        except ValueError as e:
            raise ValueError(f"{e}: octseg creates {names} there") from None


def check_archive(path: Path, writable: bool) -> None:
    """An existing octseg archive at ``path`` (written by ``octseg ingest``), writable if asked."""
    path = Path(path)
    _existing_ancestor(path)
    if not path.exists():
        raise ValueError(f"{path}: no archive here; create one with `octseg ingest FILES --archive {path}`")
    if not path.is_dir():
        raise ValueError(f"{path}: is a file, not an archive folder")
    if not (path / "zarr.json").is_file():
        raise ValueError(f"{path}: no archive here (no zarr.json); create one with `octseg ingest`")
    attrs = _octseg_attrs(path)
    if attrs is None:
        raise ValueError(f"{path}: a Zarr store but not an octseg archive")
    if attrs.get("archive_version") != ARCHIVE_VERSION:  # what open_archive refuses, without importing Zarr
        raise ValueError(f"{path}: not an octseg archive this version reads (octseg.archive_version is "
                         f"{attrs.get('archive_version')!r}, expected {ARCHIVE_VERSION})")
    if writable:
        check_writable(path, "archive")
        check_archive_siblings(path, "claims", "staging")


def check_new_archive(path: Path) -> None:
    """``path`` is an octseg archive, an empty folder, or can be created; and it can be written."""
    path = Path(path)
    where = _existing_ancestor(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: is a file, not an archive folder")
        if not (path / "zarr.json").is_file() and any(path.iterdir()):
            raise ValueError(f"{path}: exists and is not an empty folder; refusing to create an archive in it")
        if (path / "zarr.json").is_file() and not _octseg_group(path):
            raise ValueError(f"{path}: a Zarr store but not an octseg archive")
    check_writable(where, "archive" if where == path else "folder")
    check_archive_siblings(path, "claims", "staging")


def check_output_folder(path: Path, what: str) -> None:
    """``path`` is a folder (or can be made one) that can be written, e.g. the QC overlays' folder."""
    path = Path(path)
    where = _existing_ancestor(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    check_writable(where, what)
