"""Whether a process that left its mark (a claim, a staging folder, a training run) is still alive.

A holder is recorded as host, pid, PID namespace and start time (:func:`holder_record`); it is gone only
when it surely is: same host and PID namespace, and no process with its pid (:func:`process_gone`).
Work that lasts renews its mark with :func:`heartbeat`, so other hosts can judge it by its age.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["heartbeat", "holder_record", "pid_namespace", "process_gone"]


def pid_namespace() -> int | None:
    """This process's PID namespace (an inode): pids of two containers on one host name are not comparable."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def holder_record() -> bytes:
    """Who holds a claim or a staging folder: host, pid, PID namespace, start time."""
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(),
                       "since": time.time()}).encode()


def process_gone(holder: Mapping[str, Any]) -> bool:
    """True only when ``holder`` (a :func:`holder_record`) is surely dead: same host and PID namespace,
    and no process with its pid."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder.get("pidns") is not None and holder.get("pidns") != pid_namespace():
        return False  # another container sharing the host name: its pids mean nothing here
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextlib.contextmanager
def heartbeat(path: Path, every: float = 60.0) -> Iterator[None]:
    """Touch ``path`` every ``every`` seconds while the block runs, so others see its holder alive
    however long the work takes (claims and staging folders are judged stale when not touched)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name=f"heartbeat-{path.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
