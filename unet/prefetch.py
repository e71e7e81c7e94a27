"""Iterate in a background thread, a bounded number of items ahead (I/O and NumPy work overlap torch's)."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

__all__ = ["threaded"]

_DONE = object()


def threaded(source: Iterator, depth: int = 2, name: str = "octseg-prefetch") -> Iterator:
    """Iterate ``source`` in a background thread, ``depth`` items ahead; its exception is raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand ``item`` over unless the consumer has gone; False when it has."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
