"""One SQLite file that many processes and threads of octseg use at once (the archive's catalogue).

WAL mode on a local file system; SQLite's rollback journal on a network file system (WAL cannot be shared
between hosts; read from ``/proc/self/mountinfo``). One connection per thread (and per process, after a
fork); writers wait up to a minute for one another. A file SQLite finds damaged is moved aside
(``*.unreadable-<time>-<pid>``) and a new one started; one that cannot be opened or created here (a
read-only folder) is replaced by a database in memory for the process. A subclass writes its schema in
``_prepare(conn)``; writes go through ``_safely`` (a failure is logged once, never raised), reads through
``_query``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["SharedSQLite"]

LOGGER = logging.getLogger("octseg.tasks.archive.catalogue")
_BUSY_MS = 60_000  # how long a writer waits for another's transaction
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.cephfs", "lustre", "gpfs", "beegfs", "glusterfs",
               "fuse.glusterfs", "fuse.sshfs", "9p", "afs", "fuse.s3fs", "fuse.juicefs", "fuse.gcsfuse"}


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


class SharedSQLite:
    """The SQLite file at ``path``, shared by processes and threads (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._memory: str | None = None  # the shared in-memory database's URI, when the file cannot be used
        self._keep_memory: sqlite3.Connection | None = None
        self._warned = False
        self._ino: int | None = None  # the file's inode when this object last connected to it

    def replaced(self) -> bool:
        """Whether the file this object uses is gone from its path or another stands there now (another process
        moved a damaged one aside, someone deleted it): a long-lived process must not go on writing to it."""
        if self._memory is not None or self._ino is None:
            return False
        try:
            return os.stat(self.path).st_ino != self._ino
        except OSError:
            return True

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """Create or check the schema on a new connection (a subclass's)."""

    def _connect(self) -> sqlite3.Connection:
        if self._memory is not None:
            conn = sqlite3.connect(self._memory, uri=True, timeout=_BUSY_MS / 1000, check_same_thread=False,
                                   isolation_level=None)
        else:
            conn = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            if self._memory is None:
                mode = "DELETE" if _network_fs(self.path.parent) else "WAL"
                if conn.execute("PRAGMA journal_mode").fetchone()[0].upper() != mode:
                    conn.execute(f"PRAGMA journal_mode={mode}")
                conn.execute("PRAGMA synchronous=NORMAL")
            self._prepare(conn)
            if self._memory is None:
                self._ino = os.stat(self.path).st_ino
        except BaseException:
            conn.close()
            raise
        return conn


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

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
