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
* **Listing.** Each plan lists the archive folder (one ``scandir``): volumes the catalogue does not know
  are read and added, rows of volumes that are gone are dropped.
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from octseg.tasks.archive.names import valid_name

__all__ = ["CATALOGUE_SCHEMA", "Catalogue", "SourceRecord", "VolumeEntry", "catalogue_for", "catalogue_path",
           "file_stamp", "image_fingerprint_of", "read_entry"]

LOGGER = logging.getLogger(__name__)
CATALOGUE_SCHEMA = 1
_BUSY_MS = 60_000  # how long a writer waits for another's transaction
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.cephfs", "lustre", "gpfs", "beegfs", "glusterfs",
               "fuse.glusterfs", "fuse.sshfs", "9p", "afs", "fuse.s3fs", "fuse.juicefs", "fuse.gcsfuse"}

_VOLUME_COLUMNS = ("volume_id", "status", "v_stamp", "source", "source_sha256", "source_size", "source_mtime_ns",
                   "source_ino", "reader", "n_bscans", "labels_sha256", "image_fp", "manual", "annotated", "p_stamp",
                   "model_name", "model_version", "p_image_fp", "p_complete", "derived")
_DETAIL_COLUMNS = ("meta", "prediction")  # JSON, loaded only where needed; their own digest
_SOURCE_COLUMNS = ("key", "stamp", "parts", "sha256", "volume_id", "bad", "bad_settings")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalogue (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS volumes (
  volume_id TEXT PRIMARY KEY, doubt INTEGER NOT NULL DEFAULT 0, status TEXT, v_stamp TEXT, source TEXT,
  source_sha256 TEXT, source_size INTEGER, source_mtime_ns INTEGER, source_ino INTEGER, reader TEXT,
  n_bscans INTEGER, labels_sha256 TEXT, image_fp TEXT, manual INTEGER, annotated INTEGER, p_stamp TEXT,
  model_name TEXT, model_version TEXT, p_image_fp TEXT, p_complete INTEGER, derived TEXT,
  meta TEXT, prediction TEXT, recorded_at REAL, digest TEXT, detail_digest TEXT);
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


def file_stamp(st: os.stat_result) -> str:
    """What identifies one version of a file: inode, size and modification time (ns)."""
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _stamp_at(path: str) -> str | None:
    try:
        return file_stamp(os.stat(path))
    except OSError:
        return None


def _digest(values: Iterable[Any]) -> str:
    return hashlib.blake2b("\x1f".join("\x00" if v is None else str(v) for v in values).encode(),
                           digest_size=8).hexdigest()


def image_fingerprint_of(meta: Mapping[str, Any]) -> str:
    """Identifies a volume's image from its provenance: its source's sha256, when it was ingested, the reader
    (:meth:`octseg.tasks.archive.store.Archive.image_fingerprint`)."""
    key = json.dumps([meta.get("source_sha256"), meta.get("ingested_at"), meta.get("reader")])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def canonical(value: Any) -> str:
    """One JSON text per value (sorted keys, tuples as lists): how fingerprints are compared."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ---- one volume, read from its own records ---------------------------------------------------------------

def _read_json(path: str) -> tuple[str | None, Any]:
    """(stamp, parsed content) of a JSON file, both from one descriptor; (None, None) when it does not exist.
    ValueError when it is not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 4096) + 1):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return file_stamp(st), json.loads(b"".join(chunks))


def _octseg_attrs(doc: Any) -> dict[str, Any]:
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else {}
    found = attrs.get("octseg", {}) if isinstance(attrs, dict) else {}
    return dict(found) if isinstance(found, dict) else {}


@dataclass
class VolumeEntry:
    """A volume as its catalogue row (or its own records) summarise it. ``derived`` maps each derived array
    to ``[stamp, complete, canonical fingerprint]``; ``meta`` and ``prediction`` are the octseg attributes of
    the volume (without identifiers) and of its prediction, loaded only where asked for."""

    volume_id: str
    status: str = "ingested"
    v_stamp: str | None = None
    source: str | None = None
    source_sha256: str | None = None
    source_size: int | None = None
    source_mtime_ns: int | None = None
    source_ino: int | None = None
    reader: str | None = None
    n_bscans: int = 0
    labels_sha256: str | None = None
    image_fp: str | None = None
    manual: bool = False  # listed manual labels
    annotated: int = 0  # annotated B-scans of the manual labels
    p_stamp: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    p_image_fp: str | None = None
    p_complete: bool = False  # a complete prediction, listed in the labels group
    derived_json: str = "{}"  # {name: [stamp, complete, canonical fingerprint]}; parsed by :attr:`derived`
    meta: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    _derived: dict[str, list[Any]] | None = field(default=None, repr=False, compare=False)

    @property
    def derived(self) -> dict[str, list[Any]]:
        """Each derived array: ``[stamp, complete, canonical fingerprint]``."""
        if self._derived is None:
            self._derived = json.loads(self.derived_json or "{}")
        return self._derived

    def set_derived(self, derived: dict[str, list[Any]]) -> None:
        self._derived, self.derived_json = derived, canonical(derived)

    def row(self) -> tuple[Any, ...]:
        return (self.volume_id, self.status, self.v_stamp, self.source, self.source_sha256, self.source_size,
                self.source_mtime_ns, self.source_ino, self.reader, self.n_bscans, self.labels_sha256, self.image_fp,
                int(self.manual), self.annotated, self.p_stamp, self.model_name, self.model_version, self.p_image_fp,
                int(self.p_complete), self.derived_json)

    @classmethod
    def from_row(cls, values: Sequence[Any]) -> VolumeEntry:
        (vid, status, v_stamp, source, sha, size, mtime, ino, reader, n, labels_sha, image_fp, manual, annotated,
         p_stamp, model_name, model_version, p_image_fp, p_complete, derived) = values
        return cls(vid, status, v_stamp, source, sha, size, mtime, ino, reader, int(n or 0), labels_sha, image_fp,
                   bool(manual), int(annotated or 0), p_stamp, model_name, model_version, p_image_fp, bool(p_complete),
                   derived or "{}")

    def segmented_by(self, model_name: str, model_version: str | int) -> bool:
        """The rule of :func:`octseg.tasks.archive.store.already_segmented`: a complete prediction by this model
        name and version, made from the volume's current image."""
        return (self.p_complete and (self.model_name, str(self.model_version)) == (model_name, str(model_version))
                and self.p_image_fp == self.image_fp)

    def derived_current(self, name: str, fingerprint: Mapping[str, Any]) -> bool:
        """The rule of :meth:`DerivedArrays.derived_is_current`: complete, with this fingerprint."""
        found = self.derived.get(name)
        return bool(found) and found[1] is True and found[2] == canonical(json.loads(canonical(fingerprint)))


def read_entry(root: Path, volume_id: str) -> VolumeEntry | None:
    """The entry of ``volume_id`` read from the volume's own ``zarr.json`` files; None when no volume of that id
    exists. A volume whose records cannot be parsed gets status ``unreadable`` (every plan gives it work)."""
    base = os.path.join(root, volume_id)
    try:
        v_stamp, doc = _read_json(os.path.join(base, "zarr.json"))
    except (OSError, ValueError):
        return VolumeEntry(volume_id, status="unreadable")
    if v_stamp is None:
        return None
    meta = _octseg_attrs(doc)
    meta.pop("identifiers", None)  # the catalogue is kept as clean as the archive's defaults
    entry = VolumeEntry(volume_id, v_stamp=v_stamp, meta=meta)
    stat = meta.get("source_stat") if isinstance(meta.get("source_stat"), dict) else {}
    entry.source, entry.source_sha256, entry.reader = meta.get("source"), meta.get("source_sha256"), meta.get("reader")
    entry.source_size, entry.source_mtime_ns, entry.source_ino = stat.get("size"), stat.get("mtime_ns"), stat.get("ino")
    entry.labels_sha256, entry.image_fp = meta.get("labels_sha256"), image_fingerprint_of(meta)
    try:
        entry.n_bscans = int(meta.get("n_bscans") or 0)
        _, labels_doc = _read_json(os.path.join(base, "labels", "zarr.json"))
        listed = labels_doc.get("attributes", {}).get("ome", {}).get("labels", []) if labels_doc else []
        if "manual" in listed:
            _, manual = _read_json(os.path.join(base, "labels", "manual", "zarr.json"))
            if manual is not None:
                entry.manual, entry.annotated = True, len(_octseg_attrs(manual).get("annotated_bscans", []))
        p_stamp, prediction = _read_json(os.path.join(base, "labels", "prediction", "zarr.json"))
        entry.p_stamp = p_stamp
        info = _octseg_attrs(prediction) if prediction is not None else {}
        if info:
            entry.prediction = info
            entry.model_name, entry.p_image_fp = info.get("model_name"), info.get("image_fingerprint")
            entry.model_version = None if info.get("model_version") is None else str(info.get("model_version"))
            entry.p_complete = info.get("complete") is True and "prediction" in listed
        derived: dict[str, list[Any]] = {}
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for e in sorted(os.scandir(os.path.join(base, "derived")), key=lambda e: e.name):
                d_stamp, d_doc = _read_json(os.path.join(e.path, "zarr.json"))
                if d_stamp is not None:
                    attrs = _octseg_attrs(d_doc)
                    derived[e.name] = [d_stamp, attrs.get("complete") is True, canonical(attrs.get("fingerprint"))]
        entry.set_derived(derived)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return VolumeEntry(volume_id, status="unreadable", v_stamp=v_stamp)
    entry.status = ("segmented" if entry.p_complete else
                    "preprocessed" if (entry.derived.get("normalized") or [None, False])[1] else "ingested")
    return entry


def _n_bscans_fallback(root: Path, volume_id: str) -> int | None:
    """B-scans of a volume whose provenance does not record them: the image array's shape."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, IndexError):
        _, doc = _read_json(os.path.join(root, volume_id, "s0", "zarr.json"))
        return int(doc["shape"][0])
    return None


# ---- sources: files octseg has read ----------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRecord:
    """What octseg knows of a file at one path: its stamp when it was read (``parts``: the other files that make
    up the source, relative to its folder, for exports and folders), its SHA-256, the volume that holds that
    content, or why it was refused (``bad``) under which reading settings (``bad_settings``)."""

    key: str
    stamp: str
    parts: tuple[str, ...] | None
    sha256: str | None
    volume_id: str | None = None
    bad: str | None = None
    bad_settings: str | None = None

    def row(self) -> tuple[Any, ...]:
        return (self.key, self.stamp, None if self.parts is None else json.dumps(list(self.parts)), self.sha256,
                self.volume_id, self.bad, self.bad_settings)


# ---- the catalogue ---------------------------------------------------------------------------------------

def _network_fs(path: Path) -> bool:
    """Whether ``path`` lies on a network file system (SQLite's WAL needs every user on one host)."""
    best, fstype = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            mount, kind = left.split()[4], right.split()[0]
            target = str(path)
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype = mount, kind
    return fstype in _NETWORK_FS


class Catalogue:
    """The catalogue of the archive at ``root`` (an absolute path). One connection per thread; a database that
    cannot be opened is moved aside and rebuilt, one that cannot be created lives in memory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = catalogue_path(self.root)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._memory: str | None = None  # the shared in-memory database's URI, when the file cannot be used
        self._keep_memory: sqlite3.Connection | None = None
        self._warned = False
        self._salt: str | None = None

    # ---- connections ----
    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            conn = sqlite3.connect(self._memory, uri=True, timeout=_BUSY_MS / 1000, check_same_thread=False,
                                   isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            if self._memory is None:
                mode = "DELETE" if _network_fs(self.root.parent) else "WAL"
                if conn.execute("PRAGMA journal_mode").fetchone()[0].upper() != mode:
                    conn.execute(f"PRAGMA journal_mode={mode}")
                conn.execute("PRAGMA synchronous=NORMAL")
            self._prepare(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Read the schema version and salt; create the tables when missing. A database of another schema is
        emptied (and so filled again from the volumes)."""
        with contextlib.suppress(sqlite3.OperationalError):  # no such table: a new file
            found = dict(conn.execute("SELECT key, value FROM catalogue").fetchall())
            if found.get("schema") == str(CATALOGUE_SCHEMA) and found.get("salt"):
                self._salt = found["salt"]
                return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            found = dict(conn.execute("SELECT key, value FROM catalogue").fetchall())
            if found.get("schema") != str(CATALOGUE_SCHEMA) or not found.get("salt"):
                for table in ("volumes", "sources", "catalogue"):
                    conn.execute(f"DELETE FROM {table}")
                found = {"schema": str(CATALOGUE_SCHEMA), "salt": secrets.token_hex(16),
                         "created_at": str(time.time())}
                conn.executemany("INSERT INTO catalogue VALUES (?, ?)", found.items())
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._salt = found["salt"]

    @property
    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        with self._lock:
            try:
                conn = self._connect()
            except sqlite3.Error as e:
                conn = self._recover(e)
            except OSError as e:
                conn = self._in_memory(e)
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @staticmethod
    def _damaged(error: Exception) -> bool:
        """SQLite says the file is not a (sound) database, as opposed to: cannot open, read-only, locked."""
        text = str(error).lower()
        return (not isinstance(error, sqlite3.OperationalError) or "malformed" in text or "not a database" in text
                or "no such table" in text or "no such column" in text)

    def _recover(self, error: Exception) -> sqlite3.Connection:
        """A damaged catalogue is moved aside and a new one started (filled from the volumes); one that cannot
        be opened or written here is replaced by one in memory for this process."""
        if not self._damaged(error) or self._memory is not None:
            return self._in_memory(error)
        aside = self.path.with_name(f"{self.path.name}.unreadable-{int(time.time())}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            pass
        except OSError as e:
            return self._in_memory(e)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
        LOGGER.warning("catalogue %s cannot be read (%s); moved to %s and rebuilt from the volumes",
                       self.path, error, aside.name)
        try:
            return self._connect()
        except (sqlite3.Error, OSError) as e:
            return self._in_memory(e)

    def _in_memory(self, error: Exception) -> sqlite3.Connection:
        if self._memory is None:
            LOGGER.warning("catalogue %s cannot be used (%s); this process keeps one in memory, read from the "
                           "volumes", self.path, error)
            self._memory = f"file:octseg-catalogue-{id(self)}-{os.getpid()}?mode=memory&cache=shared"
            self._keep_memory = self._connect()  # the shared in-memory database lives while one connection does
        return self._connect()

    def _safely(self, what: str, fn, *args: Any) -> Any:
        """Run a write; a catalogue that cannot take it leaves the row as it was (in doubt when marked so)."""
        try:
            return fn(*args)
        except (sqlite3.Error, OSError) as e:
            if not self._warned:
                self._warned = True
                LOGGER.warning("catalogue %s: %s failed (%s); the volumes stay the truth, the next plan reads them",
                               self.path, what, e)
            return None

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read; a catalogue SQLite finds damaged is moved aside, and the read answers from a new one."""
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            with self._lock:
                self._local.conn = self._recover(e)
            return self._local.conn.execute(sql, args).fetchall()

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
                entry.n_bscans = _n_bscans_fallback(self.root, volume_id) or 0
            row = entry.row()
            meta = None if entry.meta is None else canonical(entry.meta)
            prediction = None if entry.prediction is None else canonical(entry.prediction)
            rows.append((*row, meta, prediction, time.time(), _digest(row), _digest((volume_id, meta, prediction))))
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            columns = (*_VOLUME_COLUMNS, *_DETAIL_COLUMNS, "recorded_at", "digest", "detail_digest")
            conn.executemany(f"INSERT OR REPLACE INTO volumes ({', '.join(columns)}, doubt) VALUES "
                             f"({', '.join('?' * len(columns))}, 0)", rows)
            conn.executemany("DELETE FROM volumes WHERE volume_id = ?", gone)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ---- reading, with the doubt resolved from the volumes ----
    def _listed(self) -> set[str]:
        return {e.name for e in os.scandir(self.root) if valid_name(e.name) and e.is_dir(follow_symlinks=False)}

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

    def entries(self, volume_ids: Sequence[str] | None = None, *, verify: Sequence[str] = ("volume",),
                details: bool | str = False, missing_ok: bool = False) -> dict[str, VolumeEntry]:
        """Volume id -> entry for ``volume_ids`` (in that order; ValueError naming those the archive lacks unless
        ``missing_ok``), or for every volume in id order. On the way the rows are brought in line with the
        archive: its listing (one ``scandir``) adds the volumes the catalogue lacks (a new or deleted catalogue,
        a volume copied in by hand) and drops rows of vanished ones; a row in doubt, failing its digest, or
        whose files named by ``verify`` (``volume``, ``prediction``, ``derived``) changed since it was read, is
        read again from the volume. ``details`` also loads each volume's provenance (``meta``) and prediction
        attributes (``details="meta"``: the provenance alone)."""
        listed = self._listed()
        rows = self._query(f"SELECT {', '.join(_VOLUME_COLUMNS)}, doubt, digest FROM volumes")
        width = len(_VOLUME_COLUMNS)
        found: dict[str, VolumeEntry] = {}
        stale: list[str] = []
        want_volume, want_prediction, want_derived = ("volume" in verify, "prediction" in verify, "derived" in verify)
        wanted = None if volume_ids is None else set(volume_ids)
        join, stat_of = os.path.join, _stamp_at
        for values in rows:
            vid = values[0]
            if vid not in listed:
                stale.append(vid)
                continue
            if wanted is not None and vid not in wanted:
                continue
            doubt, digest = values[width:]
            row = values[:width]
            if doubt or digest != _digest(row):
                stale.append(vid)
                continue
            entry = VolumeEntry.from_row(row)
            base = join(self.root, vid)
            if ((want_volume and stat_of(join(base, "zarr.json")) != entry.v_stamp)
                    or (want_prediction and entry.p_stamp is not None
                        and stat_of(join(base, "labels", "prediction", "zarr.json")) != entry.p_stamp)
                    or (want_derived and entry.derived_json != "{}"
                        and any(stat_of(join(base, "derived", name, "zarr.json")) != d[0]
                                for name, d in entry.derived.items()))):
                stale.append(vid)
                continue
            found[vid] = entry
        if details and found:
            stale += self._load_details(found, all_rows=wanted is None or len(found) > 2000,
                                        prediction=details != "meta")
        known = {values[0] for values in rows}
        stale += sorted(vid for vid in listed - known if wanted is None or vid in wanted)
        for vid, entry in self._refresh(stale).items():  # the volume's own records win
            if entry is not None and (wanted is None or vid in wanted):
                found[vid] = entry
        if wanted is None:
            return dict(sorted(found.items()))
        missing = sorted(wanted - set(found))
        if missing and not missing_ok:
            held = sorted(listed)
            raise ValueError(f"volume(s) {missing} not in archive {self.root}; it holds {held[:20]}"
                             f"{f' and {len(held) - 20} more' if len(held) > 20 else ''}")
        return {vid: found[vid] for vid in volume_ids if vid in found}

    def _load_details(self, found: dict[str, VolumeEntry], all_rows: bool, prediction: bool = True) -> list[str]:
        """Fill ``meta`` and ``prediction`` of the entries in ``found``; the ids whose details fail their digest
        (removed from ``found``)."""
        sql = "SELECT volume_id, meta, prediction, detail_digest FROM volumes"
        if all_rows:
            rows = self._query(sql)
        else:
            ids, rows = sorted(found), []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows += self._query(f"{sql} WHERE volume_id IN ({', '.join('?' * len(chunk))})", chunk)
        stale = []
        loads = json.loads
        for vid, meta, attrs, detail_digest in rows:
            entry = found.get(vid)
            if entry is None:
                continue
            if detail_digest != _digest((vid, meta, attrs)):
                stale.append(vid)
                del found[vid]
                continue
            entry.meta = loads(meta) if meta else None
            if prediction:
                entry.prediction = loads(attrs) if attrs else None
        return stale

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

    def sources(self) -> dict[str, SourceRecord]:
        """Every file octseg remembers, by key; a row failing its digest is left out (read the file again)."""
        out = {}
        for *values, digest in self._query(f"SELECT {', '.join(_SOURCE_COLUMNS)}, digest FROM sources"):
            if digest != _digest(values):
                continue
            key, stamp, parts, sha, vid, bad, settings = values
            out[key] = SourceRecord(key, stamp, None if parts is None else tuple(json.loads(parts)), sha, vid, bad,
                                    settings)
        return out

    def bad_by_sha(self, sha256: str, settings: str) -> SourceRecord | None:
        """A file refused under ``settings`` whose content had this SHA-256 (a renamed copy of a bad file)."""
        rows = self._query(f"SELECT {', '.join(_SOURCE_COLUMNS)}, digest FROM sources WHERE sha256 = ? AND "
                           "bad IS NOT NULL AND bad_settings = ?", (sha256, settings))
        for *values, digest in rows:
            if digest == _digest(values):
                key, stamp, parts, sha, vid, bad, bad_settings = values
                return SourceRecord(key, stamp, None if parts is None else tuple(json.loads(parts)), sha, vid, bad,
                                    bad_settings)
        return None

    def remember(self, records: Iterable[SourceRecord]) -> None:
        """Record what is known of these files (replacing what was known at their paths)."""
        rows = [(*r.row(), time.time(), _digest(r.row())) for r in records]
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
            conn.executemany(f"INSERT OR REPLACE INTO sources ({', '.join(_SOURCE_COLUMNS)}, seen_at, digest) "
                             f"VALUES ({', '.join('?' * (len(_SOURCE_COLUMNS) + 2))})", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


_CATALOGUES: dict[tuple[str, int], Catalogue] = {}
_CATALOGUES_LOCK = threading.Lock()


def catalogue_for(archive_root: str | os.PathLike[str]) -> Catalogue:
    """The process's catalogue object of the archive at ``archive_root`` (resolved), made once per process."""
    key = (str(Path(archive_root).resolve()), os.getpid())
    with _CATALOGUES_LOCK:
        found = _CATALOGUES.get(key)
        if found is None or not found.path.exists() and found._memory is None:
            if found is not None:  # deleted by hand meanwhile: start again (sync fills it from the volumes)
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
