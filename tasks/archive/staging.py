"""Nothing partial: folders are built in a staging folder beside the archive and swapped into place.

A staging folder is ``<parent>/.<archive name>.staging/<uuid>/`` (same file system as the archive),
holding an owner file (host, pid, boot) renewed by a heartbeat. A replaced folder is swapped with its
successor in one atomic ``renameat2(RENAME_EXCHANGE)``; where the file system cannot swap, the two
renames are journalled first. :func:`sweep_staging` removes the staging folders of killed writers,
completing a journalled replacement they had begun.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from octseg.tasks.runtime.processes import heartbeat, holder_record, process_gone

__all__ = ["STAGING_STALE_SECONDS", "replace_dir", "replace_file", "staging_dir", "sweep_staging"]

_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux 3.15+, ext4/xfs/btrfs/tmpfs/...)
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b``; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path, aside: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` ends in ``aside``. Readers see the old or the new
    folder, never neither: the two are swapped in one ``renameat2(RENAME_EXCHANGE)``. Where the file
    system cannot swap, the two renames are journalled in ``new``'s staging folder first, and
    :func:`sweep_staging` completes an interrupted replacement (the new folder goes into place)."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        os.replace(new, aside)  # ``new`` now holds the old folder
        return
    journal = aside.parent / _JOURNAL  # ``aside`` lies in the staging folder
    journal.write_text(json.dumps({"new": str(new.relative_to(aside.parent)), "target": str(target)}))
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise
    finally:
        journal.unlink(missing_ok=True)


def replace_file(target: Path, text: str) -> None:
    """Write ``text`` over the file ``target`` so that readers see the old or the new content, never part:
    a sibling temporary file, flushed to disk, renamed over it."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


_JOURNAL = "replace.json"  # in a staging folder: a two-rename replacement in progress
_OWNER = "owner.json"  # in a staging folder: who stages there (host, pid, start)
STAGING_STALE_SECONDS = 900.0  # a staging folder whose owner file was not touched for this long is abandoned


def _staging_owner_alive(stage: Path) -> bool:
    """A staging folder is in use while its owner file is touched (a heartbeat, every minute) and, on
    this host and PID namespace, its process runs in this boot."""
    try:
        owner = json.loads((stage / _OWNER).read_text())
        age = time.time() - (stage / _OWNER).stat().st_mtime
    except FileNotFoundError:
        try:  # being created (owner not written yet) or very old: judge by the folder's age
            return time.time() - stage.stat().st_mtime < 60
        except FileNotFoundError:
            return True  # removed meanwhile by its owner
    except (OSError, ValueError):
        return True
    if age >= STAGING_STALE_SECONDS:
        return False  # no heartbeat: its writer is gone, on whatever host
    if owner.get("boot") not in (None, _boot_id()) and owner.get("host") == socket.gethostname():
        return False  # written before this machine rebooted
    return not process_gone(owner)


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def sweep_staging(root: Path) -> list[Path]:
    """Remove the staging folders of dead writers beside the archive ``root`` (a ``kill -9`` leaves them),
    first completing a journalled replacement they had begun; returns the folders removed."""
    base = root.parent / f".{root.name}.staging"
    removed = []
    try:
        stages = [p for p in base.iterdir() if p.is_dir()]
    except OSError:
        return removed
    for stage in stages:
        if _staging_owner_alive(stage):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            journal = json.loads((stage / _JOURNAL).read_text())
            target, new = Path(journal["target"]), stage / journal["new"]
            if not target.exists() and (new / "zarr.json").is_file():
                os.replace(new, target)  # the old folder was moved aside: finish putting the new one in place
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    with contextlib.suppress(OSError):
        base.rmdir()
    return removed


@contextlib.contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A fresh folder beside the archive ``root`` (same file system), removed afterwards in any case.

    It holds an owner file (host, pid, boot), so :func:`sweep_staging`, run here first, can tell the
    leftovers of a killed writer from the folders of live ones.
    """
    sweep_staging(root)
    base = root.parent / f".{root.name}.staging"
    stage = base / uuid.uuid4().hex
    for attempt in range(3):  # another writer may remove an empty `base` between our mkdirs
        try:
            stage.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        (stage / _OWNER).write_text(json.dumps({**json.loads(holder_record()), "boot": _boot_id()}))
        with heartbeat(stage / _OWNER):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()  # fails while another writer still stages: fine
