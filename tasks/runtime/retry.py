"""Which failures Prefect retries: transient I/O only (a network file system hiccup), never bad input.

Tasks that read or write the archive or source files use :data:`TRANSIENT_IO_RETRIES`::

    @task(**TRANSIENT_IO_RETRIES)
    def ingest_source_task(...): ...

A file that is missing, unreadable or malformed fails at once with its error; an ``OSError`` such as
EIO, ESTALE or a dropped connection is retried twice after 1 s and 5 s. Only an ``OSError`` whose errno
(or type: a connection error, a timeout) says the system failed is transient: libraries also raise bare
``OSError`` for a corrupt file (Pillow's "image file is truncated", h5py's "file signature not found"),
and no retry reads those differently. :func:`call_with_retries` applies the same rule where work runs
outside a Prefect task run of its own (the volumes of a batch).
"""
from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["RETRY_DELAYS", "TRANSIENT_IO_RETRIES", "call_with_retries", "is_transient", "retry_on_transient_io"]

_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_TRANSIENT_TYPES = (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)
_TRANSIENT_ERRNOS = {getattr(errno, name) for name in (
    "EIO", "ESTALE", "ETIMEDOUT", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH",
    "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "EAGAIN", "EINTR", "EBUSY", "ENOLCK", "EREMOTEIO", "ENOLINK", "ECOMM",
    "EPIPE", "ENOBUFS") if hasattr(errno, name)}
_TRANSIENT_NAMES = {"CommClosedError", "StreamClosedError"}  # Dask's dropped connections (OSErrors without errno)
RETRY_DELAYS = (1.0, 5.0)  # seconds before the second and the third attempt
R = TypeVar("R")


def is_transient(error: BaseException | None) -> bool:
    """True for an ``OSError`` that a retry may cure, raised directly or as the cause of another error
    (a reader reports an EIO as a ReadError naming the file); False for bad input and anything else."""
    seen = 0
    while error is not None and seen < 8:  # the cause chain, guarded against cycles
        if (isinstance(error, OSError) and not isinstance(error, _PERMANENT)
                and (isinstance(error, _TRANSIENT_TYPES) or error.errno in _TRANSIENT_ERRNOS
                     or type(error).__name__ in _TRANSIENT_NAMES)):
            return True
        error, seen = error.__cause__, seen + 1
    return False


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: the failed state's data is the exception the task raised."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


TRANSIENT_IO_RETRIES = dict(retries=len(RETRY_DELAYS), retry_delay_seconds=[int(d) for d in RETRY_DELAYS],
                            retry_condition_fn=retry_on_transient_io)


def call_with_retries(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)``, attempted again after each of :data:`RETRY_DELAYS` when it fails with a
    transient error (:func:`is_transient`); bad input fails at once."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if delay is None or not is_transient(e):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")
