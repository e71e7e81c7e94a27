"""Per-volume claims, so two runs on one archive never segment the same volume at once.

A claim is a small file ``<parent>/.<archive name>.claims/<volume id>``, hard-linked into place whole
(atomic on local and NFS file systems), holding the claimant's host, pid and start time. It is renewed
(touched) while the work goes on and removed when it ends. A claim whose process is gone (same host),
or that was not renewed for :data:`STALE_SECONDS` (anywhere), is taken over: a run killed with
``kill -9`` blocks nobody.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from octseg.tasks.runtime.processes import heartbeat, holder_record, process_gone

__all__ = ["STALE_SECONDS", "Claim", "VolumeBusy", "claim_volume"]

STALE_SECONDS = 900.0  # a claim not renewed for this long (its holder on another host) is abandoned


class VolumeBusy(RuntimeError):
    """Another live run holds the volume's claim."""


def _claims_dir(archive: Path) -> Path:
    return archive.parent / f".{archive.name}.claims"


def _holder_alive(path: Path) -> bool:
    """A claim is alive while it is renewed (younger than STALE_SECONDS) and, on this host, its process runs."""
    try:
        age = time.time() - path.stat().st_mtime
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return False  # released meanwhile
    except (OSError, ValueError):
        return age < STALE_SECONDS  # unreadable: trust its age
    if age >= STALE_SECONDS:
        return False  # not renewed: abandoned, wherever it was (a restarted container may reuse the pid)
    return not process_gone(holder)


def _take_over(path: Path) -> None:
    """Remove the abandoned claim at ``path``, but never a fresh one another run put there meanwhile."""
    try:
        stale = path.stat().st_ino
        tomb = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
        os.rename(path, tomb)
    except FileNotFoundError:
        return  # someone else took it over first
    if tomb.stat().st_ino != stale:  # a new claim replaced the stale one between stat and rename: give it back
        with contextlib.suppress(OSError):
            os.link(tomb, path)  # never over a third run's claim
        with contextlib.suppress(OSError):
            os.unlink(tomb)
        return
    with contextlib.suppress(OSError):
        os.unlink(tomb)


class Claim:
    """A held claim; :meth:`renew` marks it alive (call it as work progresses)."""

    def __init__(self, path: Path) -> None:
        self.path, self._last = path, time.monotonic()

    def renew(self, *_: object) -> None:
        if time.monotonic() - self._last > 30:
            with contextlib.suppress(OSError):
                os.utime(self.path)
            self._last = time.monotonic()


@contextlib.contextmanager
def claim_volume(archive: str | os.PathLike[str], volume_id: str, wait: float = 0.0,
                 doing: str = "segmenting") -> Iterator[Claim]:
    """Hold the claim of ``volume_id`` for the block; :class:`VolumeBusy` when a live run holds it
    for longer than ``wait`` seconds (0: at once). ``doing`` names the work in that error."""
    folder = _claims_dir(Path(archive))
    path = folder / volume_id
    deadline = time.monotonic() + wait
    while True:
        try:
            mine = _acquire(folder, path, volume_id, doing)
            break
        except VolumeBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    try:
        with heartbeat(path):  # renewed however long the work takes (an ingest has no progress to report)
            yield Claim(path)
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == mine:  # still ours (not taken over after going stale)
                os.unlink(path)
        with contextlib.suppress(OSError):
            folder.rmdir()


def _acquire(folder: Path, path: Path, volume_id: str, doing: str) -> int:
    """Link a new claim into ``path``; its inode. VolumeBusy when a live run holds it."""
    body = holder_record()
    for _ in range(5):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            draft = folder / f".{volume_id}.{os.getpid()}.{time.monotonic_ns()}"
            draft.write_bytes(body)
            try:
                os.link(draft, path)  # atomic, and the claim is whole the moment it exists
            finally:
                draft.unlink(missing_ok=True)
        except FileNotFoundError:  # another run removed the empty claims folder meanwhile
            continue
        except FileExistsError:
            if _holder_alive(path):
                raise VolumeBusy(f"{volume_id}: another octseg run is {doing} it") from None
            _take_over(path)
            continue
        return path.stat().st_ino
    raise VolumeBusy(f"{volume_id}: its claim keeps changing hands; try again")
