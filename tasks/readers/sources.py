"""Source paths before any reader opens them: safe to show, ingestible at all, in natural order, hashed.

Standard library only, so the flows and the command can name paths without loading a reader.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = ["natural_key", "sha256_of_files", "shown", "source_check", "source_problem"]


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` safe for a terminal or a log line: control characters (escape sequences, newlines) and
    undecodable bytes of a file name are written as Python escapes, so a hostile name cannot drive the terminal."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.isprintable() and not any(0xDC80 <= ord(c) <= 0xDCFF for c in text):
        return text
    out = []
    for c in text:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte the file system encoding could not decode (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable() or c == " ":
            out.append(c)
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def source_problem(path: str | Path) -> str | None:
    """Why a source given by name cannot be ingested at all, as ``"<path>: <why>"``; None when it can be
    tried. Catches what would otherwise abort or hang a whole batch: a name that is not UTF-8 (it cannot
    travel in Prefect's JSON parameters), a symbolic link loop, a missing path, a FIFO, socket or device."""
    return source_check(path)[0]


def source_check(path: str | Path) -> tuple[str | None, os.stat_result | None, bool]:
    """(:func:`source_problem`; when there is none the ``stat`` of the file or folder the path names; whether
    the path is itself a symbolic link). A path that is not a link costs one ``lstat``."""
    p = os.fspath(path)
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return f"{shown(p)}: file name is not valid UTF-8; rename the file (e.g. with convmv) and ingest it again", None, False
    try:
        st = os.lstat(p)
        link = stat.S_ISLNK(st.st_mode)
        if link:
            st = os.stat(p)  # follows links: ELOOP for a loop, ENOENT for a dangling one
        mode = st.st_mode
    except FileNotFoundError:
        return f"{shown(p)}: does not exist", None, False
    except (RuntimeError, OSError) as e:
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == 40:
            return f"{shown(p)}: symbolic link loop", None, False
        return f"{shown(p)}: cannot be resolved ({getattr(e, 'strerror', None) or e})", None, False
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # opening a FIFO would wait for a writer forever
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        return f"{shown(p)}: not a regular file ({kind})", None, False
    return None, st, link


def natural_key(name: str) -> list[int | str]:
    """Sort key in which digit runs compare as numbers: ``x_2`` < ``x_10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def sha256_of_files(files: Iterable[Path], with_names: bool) -> str:
    """SHA-256 over the bytes of ``files`` in order, each preceded by its name and a NUL when ``with_names``."""
    digest, buffer = hashlib.sha256(), bytearray(1 << 20)  # one buffer: no allocation (and page faults) per block
    view = memoryview(buffer)
    for f in files:
        if with_names:
            digest.update(f.name.encode() + b"\0")
        with f.open("rb", buffering=0) as fh:
            while n := fh.readinto(buffer):
                digest.update(view[:n])
    return digest.hexdigest()
