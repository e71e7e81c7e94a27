"""The archive's catalogue: one SQLite index beside the archive, so that finding work costs O(1) reads.

``<archive>.catalogue.sqlite`` (WAL mode on a local file system) holds one row per volume, summarised
from the volume's own records: the source (path as stored, SHA-256, size, mtime, inode), the image
fingerprint, the manual labels, the prediction (model, version, the image it was made from, its report),
each derived array (complete, fingerprint) and a status. It also remembers the files octseg has read
(``sources``: by path, their stat stamp and SHA-256, the volume that holds their content, or why they
were refused), which is how the drop folder knows a file without reading it.

The volumes are the truth; the catalogue is a cache of them that may always be wrong, and never decides
alone that work is done:

* **Stamps.** Each row records the stamp (inode, size, mtime in ns) of every ``zarr.json`` it was read
  from, taken with ``fstat`` on the descriptor it read (so a stamp always belongs to the bytes read). The
  archive writes each of those files whole by a rename (a new inode every time), so a file that changed
  since it was read has another stamp. A plan stats the files a "nothing to do" decision rests on (the
  volume's and its prediction's for segment; the volume's and its derived arrays' for preprocess) and
  reads the volume itself when one differs.
* **In doubt during a write.** Every publish marks the volume's row in doubt first and rewrites it from
  the volume after: a process killed between the publish and its entry leaves the row in doubt, and the
  next plan reads that volume.
* **Digests.** Each row carries a digest of its fields: a row edited by hand, or damaged, is in doubt.
* **Listing.** Each plan lists the archive folder (one ``scandir``; a question about a few volumes stats
  their folders instead): volumes the catalogue does not know are read and added, rows of gone ones dropped.
* **A catalogue that cannot be trusted is rebuilt.** A missing file is rebuilt from the volumes; one that
  SQLite cannot read (not a database, truncated, malformed) or of another schema is moved aside and
  rebuilt; one that cannot be created (a read-only folder) is kept in memory for the process.

Writes to the catalogue never fail a write to the archive: the volume is written first, and a catalogue
that cannot record it leaves the row in doubt (a warning says so once per process).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from octseg.tasks.archive.entries import (
    DETAIL_COLUMNS,
    SOURCE_COLUMNS,
    SourceIndex,
    VOLUME_COLUMNS,
    SourceRecord,
    VolumeEntry,
    canonical,
    file_stamp,
    image_fingerprint_of,
    loads,
    n_bscans_fallback,
    read_entry,
    row_digest,
)
from octseg.tasks.archive.names import valid_name
from octseg.tasks.archive.sqlite_file import SharedSQLite
from octseg.tasks.runtime.memory import paused_gc

__all__ = ["CATALOGUE_SCHEMA", "Catalogue", "SourceRecord", "VolumeEntry", "catalogue_for", "catalogue_path",
           "file_stamp", "image_fingerprint_of", "read_entry"]

LOGGER = logging.getLogger(__name__)
CATALOGUE_SCHEMA = 3  # 2: the volumes' reading settings (``settings``); 3: their manual labels' ``labels_digest``
_SOURCES_KEPT_FROM = {"1", "2"}  # older schemas whose ``sources`` rows mean what this one's do

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalogue (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS volumes (
  volume_id TEXT PRIMARY KEY, doubt INTEGER NOT NULL DEFAULT 0, status TEXT, v_stamp TEXT, source TEXT,
  source_sha256 TEXT, source_size INTEGER, source_mtime_ns INTEGER, source_ino INTEGER, reader TEXT,
  n_bscans INTEGER, labels_sha256 TEXT, image_fp TEXT, manual INTEGER, annotated INTEGER, p_stamp TEXT,
  model_name TEXT, model_version TEXT, p_image_fp TEXT, p_complete INTEGER, derived TEXT, settings TEXT,
  labels_digest TEXT, meta TEXT, prediction TEXT, recorded_at REAL, digest TEXT, detail_digest TEXT);
CREATE INDEX IF NOT EXISTS volumes_by_sha ON volumes (source_sha256);
CREATE TABLE IF NOT EXISTS sources (
  key TEXT PRIMARY KEY, stamp TEXT, parts TEXT, sha256 TEXT, volume_id TEXT, bad TEXT, bad_settings TEXT,
  seen_at REAL, digest TEXT);
CREATE INDEX IF NOT EXISTS sources_by_sha ON sources (sha256);
"""


def catalogue_path(archive_root: str | os.PathLike[str]) -> Path:
    """``<archive>.catalogue.sqlite`` beside the archive (same folder, like its ``.qc`` and ``.reports``)."""
    root = Path(archive_root)
    return root.with_name(root.name + ".catalogue.sqlite")


# ---- the catalogue ---------------------------------------------------------------------------------------

class Catalogue(SharedSQLite):
    """The catalogue of the archive at ``root`` (an absolute path). One connection per thread; a database that
    cannot be opened is moved aside and rebuilt, one that cannot be created lives in memory
    (:class:`~octseg.tasks.archive.sqlite_file.SharedSQLite`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        super().__init__(catalogue_path(self.root))
        self._salt: str | None = None

    # ---- the schema ----

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Read the schema version and salt; create the tables when missing. A database of another schema has
        its volume rows dropped (they are read again from the volumes); what it knows of source files is kept
        when that table has the columns this schema reads (its keys need the same salt), else dropped too."""
        with contextlib.suppress(sqlite3.OperationalError):  # no such table: a new file
            found = dict(conn.execute("SELECT key, value FROM catalogue").fetchall())
            if found.get("schema") == str(CATALOGUE_SCHEMA) and found.get("salt"):
                self._salt = found["salt"]
                return
        conn.execute("BEGIN IMMEDIATE")
        try:
            with contextlib.suppress(sqlite3.OperationalError):
                found = dict(conn.execute("SELECT key, value FROM catalogue").fetchall())
                if found.get("schema") != str(CATALOGUE_SCHEMA):  # another schema (another process may have
                    conn.execute("DROP TABLE IF EXISTS volumes")  # moved it on since the check above)
                    columns = {row[1] for row in conn.execute("PRAGMA table_info(sources)")}
                    if (found.get("schema") not in _SOURCES_KEPT_FROM or not found.get("salt")
                            or not {*SOURCE_COLUMNS, "seen_at", "digest"} <= columns):  # e.g. a newer octseg's
                        conn.execute("DROP TABLE IF EXISTS sources")
                        conn.execute("DELETE FROM catalogue WHERE key = 'salt'")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = dict(conn.execute("SELECT key, value FROM catalogue").fetchall())
            if found.get("schema") != str(CATALOGUE_SCHEMA) or not found.get("salt"):
                salt = found.get("salt") or secrets.token_hex(16)
                if not found.get("salt"):
                    conn.execute("DELETE FROM sources")
                conn.execute("DELETE FROM catalogue")
                found = {"schema": str(CATALOGUE_SCHEMA), "salt": salt, "created_at": str(time.time())}
                conn.executemany("INSERT INTO catalogue VALUES (?, ?)", found.items())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._salt = found["salt"]

    @property
    def salt(self) -> str:
        if self._salt is None:
            self.conn  # noqa: B018 - opens and reads the salt
        assert self._salt is not None
        return self._salt

    # ---- writes of the archive ----
    def mark_doubt(self, volume_id: str) -> None:
        """Before a write to the volume: its row is not to be trusted until :meth:`record` rewrites it."""
        self._safely("marking a volume in doubt", self.conn.execute,
                     "UPDATE volumes SET doubt = 1 WHERE volume_id = ?", (volume_id,))

    def record(self, volume_id: str) -> VolumeEntry | None:
        """Read the volume's own records and write its row (or drop it when the volume is gone)."""
        entry = read_entry(self.root, volume_id)
        self._safely("recording a volume", self._write_entries, [(volume_id, entry)])
        return entry

    def _write_entries(self, entries: Sequence[tuple[str, VolumeEntry | None]]) -> None:
        rows, gone = [], []
        for volume_id, entry in entries:
            if entry is None:
                gone.append((volume_id,))
                continue
            if not entry.n_bscans and entry.status != "unreadable":
                entry.n_bscans = n_bscans_fallback(self.root, volume_id) or 0
            row = entry.row()
            meta = None if entry.meta is None else canonical(entry.meta)
            prediction = None if entry.prediction is None else canonical(entry.prediction)
            rows.append((*row, meta, prediction, time.time(), row_digest(row), row_digest((volume_id, meta, prediction))))
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = (*VOLUME_COLUMNS, *DETAIL_COLUMNS, "recorded_at", "digest", "detail_digest")
            conn.executemany(f"INSERT OR REPLACE INTO volumes ({', '.join(columns)}, doubt) VALUES "
                             f"({', '.join('?' * len(columns))}, 0)", rows)
            conn.executemany("DELETE FROM volumes WHERE volume_id = ?", gone)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ---- reading, with the doubt resolved from the volumes ----
    def _listed(self, volume_ids: Sequence[str] | None = None) -> set[str]:
        """The archive's volume folders: one ``scandir``, or for a few ids one ``lstat`` each (cheaper at scale)."""
        if volume_ids is None:
            return {e.name for e in os.scandir(self.root) if valid_name(e.name) and e.is_dir(follow_symlinks=False)}
        return {v for v in set(volume_ids) if valid_name(v) and (p := self.root / v).is_dir() and not p.is_symlink()}

    def sync(self) -> None:
        """Bring the rows in line with the archive (see :meth:`entries`, which does this as it reads)."""
        self.entries(verify=())

    def _refresh(self, volume_ids: Sequence[str]) -> dict[str, VolumeEntry | None]:
        fresh = {vid: read_entry(self.root, vid) for vid in volume_ids}
        for start in range(0, len(volume_ids), 2000):
            chunk = [(vid, fresh[vid]) for vid in volume_ids[start : start + 2000]]
            self._safely("recording volumes", self._write_entries, chunk)
        return fresh

    def rebuild(self) -> int:
        """Forget every volume row and read the volumes again (``octseg catalogue --rebuild``); the number of
        volumes. What the drop folder knows of its files is kept (each is checked against its file when used)."""
        self._safely("forgetting the volumes", self.conn.execute, "DELETE FROM volumes")
        return len(self.entries(verify=()))

    def volume_ids(self) -> list[str]:
        """Sorted ids of the volumes."""
        return list(self.entries(verify=()))

    @paused_gc()
    def entries(self, volume_ids: Sequence[str] | None = None, *, verify: Sequence[str] = ("volume",),
                details: bool = False, missing_ok: bool = False) -> dict[str, VolumeEntry]:
        """Volume id -> entry for ``volume_ids`` (in that order; ValueError naming those the archive lacks unless
        ``missing_ok``), or for every volume in id order. On the way the rows are brought in line with the
        archive: its listing (one ``scandir``; for a few ids a stat of their folders) adds the volumes the
        catalogue lacks (a new or deleted catalogue, a volume copied in by hand) and drops rows of gone ones; a row in doubt, failing its digest, or
        whose files named by ``verify`` (``volume``, ``prediction``, ``derived``) changed since it was read, is
        read again from the volume. ``details`` also loads each volume's provenance (``meta``) and prediction
        attributes."""
        extra = ", meta, prediction, detail_digest" if details else ""
        sql = f"SELECT {', '.join(VOLUME_COLUMNS)}, doubt, digest{extra} FROM volumes"
        if volume_ids is not None and len(volume_ids) <= 2000:  # a few volumes of a large archive: their rows,
            ids, rows = sorted(set(volume_ids)), []  # and a stat of their folders, not a listing of all
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows += self._query(f"{sql} WHERE volume_id IN ({', '.join('?' * len(chunk))})", chunk)
            listed = self._listed(ids)
            if unknown := listed - {values[0] for values in rows}:  # by the listing's real names: a file system
                listed = (listed - unknown) | (unknown & self._listed())  # that folds case finds VOL1 for vol1
        else:
            rows, listed = self._query(sql), self._listed()
        width = len(VOLUME_COLUMNS)
        found: dict[str, VolumeEntry] = {}
        stale: list[str] = []
        want_volume, want_prediction, want_derived = ("volume" in verify, "prediction" in verify, "derived" in verify)
        wanted = None if volume_ids is None else set(volume_ids)
        with _folder_fd(self.root) as fd:
            def stamp(rel: str) -> str | None:  # relative to the archive's descriptor: no path walk each time
                if fd is None:
                    return None
                try:
                    st = os.stat(rel, dir_fd=fd)
                except OSError:
                    return None
                return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

            for values in rows:
                vid = values[0]
                if vid not in listed:
                    stale.append(vid)
                    continue
                if wanted is not None and vid not in wanted:
                    continue
                row = values[:width]
                if values[width] or values[width + 1] != row_digest(row):  # in doubt, or edited / damaged
                    stale.append(vid)
                    continue
                entry = VolumeEntry.from_row(row)
                if ((want_volume and stamp(f"{vid}/zarr.json") != entry.v_stamp)
                        or (want_prediction and entry.p_stamp is not None
                            and stamp(f"{vid}/labels/prediction/zarr.json") != entry.p_stamp)
                        or (want_derived and entry.derived_json != "{}"
                            and any(stamp(f"{vid}/derived/{name}/zarr.json") != d[0]
                                    for name, d in entry.derived.items()))):
                    stale.append(vid)
                    continue
                if details:
                    meta, attrs, detail_digest = values[width + 2:]
                    if detail_digest != row_digest((vid, meta, attrs)):
                        stale.append(vid)
                        continue
                    entry.meta = loads(meta) if meta else None
                    entry.prediction = loads(attrs) if attrs else None
                found[vid] = entry
        known = {values[0] for values in rows}
        stale += sorted(vid for vid in listed - known if wanted is None or vid in wanted)
        for vid, entry in self._refresh(stale).items():  # the volume's own records win
            if entry is not None and (wanted is None or vid in wanted):
                found[vid] = entry
        if wanted is None:
            return dict(sorted(found.items()))
        missing = sorted(wanted - set(found))
        if missing and not missing_ok:
            held = sorted(self._listed())  # the whole listing, to say what the archive does hold
            raise ValueError(f"volume(s) {missing} not in archive {self.root}; it holds {held[:20]}"
                             f"{f' and {len(held) - 20} more' if len(held) > 20 else ''}")
        return {vid: found[vid] for vid in volume_ids if vid in found}

    def counts(self) -> dict[str, int]:
        """Volumes per status, and the files known: ``sources`` (read, content held) and ``bad`` (refused)."""
        out = dict(self._query("SELECT status, COUNT(*) FROM volumes GROUP BY status"))
        out["sources"] = self._query("SELECT COUNT(*) FROM sources WHERE bad IS NULL")[0][0]
        out["bad"] = self._query("SELECT COUNT(*) FROM sources WHERE bad IS NOT NULL")[0][0]
        return out

    def models(self) -> dict[tuple[str, str], int]:
        """(model name, version) -> volumes whose complete prediction it made."""
        return {(name, version): n for name, version, n in self._query(
            "SELECT model_name, model_version, COUNT(*) FROM volumes WHERE p_complete = 1 "
            "GROUP BY model_name, model_version")}

    def volumes_holding(self, sha256: str) -> list[str]:
        """Ids whose rows record this source SHA-256 (check them with :meth:`entries` before trusting)."""
        return [r[0] for r in self._query("SELECT volume_id FROM volumes WHERE source_sha256 = ?", (sha256,))]

    # ---- sources ----
    def source_key(self, resolved_path: str) -> str:
        """The key of a source path: a salted hash, so the catalogue does not hold patients' file names."""
        return hashlib.sha256((self.salt + resolved_path).encode("utf-8", "surrogateescape")).hexdigest()[:32]

    @paused_gc()
    def sources(self) -> SourceIndex:
        """Every file octseg remembers, by key; a row failing its digest is left out (read the file again)."""
        return SourceIndex(self._query(f"SELECT {', '.join(SOURCE_COLUMNS)}, digest FROM sources"))

    def bad_by_sha(self, sha256: str, settings: str) -> SourceRecord | None:
        """A file refused under ``settings`` whose content had this SHA-256 (a renamed copy of a bad file)."""
        rows = self._query(f"SELECT {', '.join(SOURCE_COLUMNS)}, digest FROM sources WHERE sha256 = ? AND "
                           "bad IS NOT NULL AND bad_settings = ?", (sha256, settings))
        for *values, digest in rows:
            if digest == row_digest(values):
                key, stamp, parts, sha, vid, bad, bad_settings = values
                return SourceRecord(key, stamp, None if parts is None else tuple(json.loads(parts)), sha, vid, bad,
                                    bad_settings)
        return None

    def remember(self, records: Iterable[SourceRecord]) -> None:
        """Record what is known of these files (replacing what was known at their paths)."""
        rows = [(*r.row(), time.time(), row_digest(r.row())) for r in records]
        if rows:
            self._safely("remembering files", self._write_sources, rows)

    def forget(self, keys: Iterable[str]) -> None:
        keys = [(k,) for k in keys]
        if keys:
            self._safely("forgetting files", self.conn.executemany, "DELETE FROM sources WHERE key = ?", keys)

    def _write_sources(self, rows: list[tuple[Any, ...]]) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT OR REPLACE INTO sources ({', '.join(SOURCE_COLUMNS)}, seen_at, digest) "
                             f"VALUES ({', '.join('?' * (len(SOURCE_COLUMNS) + 2))})", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

@contextlib.contextmanager
def _folder_fd(folder: Path) -> Iterator[int | None]:
    """A descriptor of ``folder`` to stat its files relative to (None where it cannot be opened: then every
    stamp reads as changed, and the volumes are read)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield None
        return
    try:
        yield fd
    finally:
        os.close(fd)


_CATALOGUES: dict[tuple[str, int], Catalogue] = {}
_CATALOGUES_LOCK = threading.Lock()


def catalogue_for(archive_root: str | os.PathLike[str]) -> Catalogue:
    """The process's catalogue object of the archive at ``archive_root`` (resolved), made once per process."""
    key = (str(Path(archive_root).resolve()), os.getpid())
    with _CATALOGUES_LOCK:
        found = _CATALOGUES.get(key)
        if found is None or found.replaced():
            if found is not None:  # deleted or replaced meanwhile: start again on the file there now
                found.close()
            found = _CATALOGUES[key] = Catalogue(Path(key[0]))
        return found


@contextlib.contextmanager
def publishing(archive_root: Path, volume_id: str) -> Iterator[None]:
    """Around a write that changes a volume: its row in doubt first, rewritten from the volume after (also
    when the write failed: the volume then holds what it held). A kill in between leaves it in doubt."""
    catalogue = catalogue_for(archive_root)
    catalogue.mark_doubt(volume_id)
    try:
        yield
    finally:
        catalogue.record(volume_id)
