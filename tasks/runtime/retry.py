"""Which failures Prefect retries: transient I/O only (a network file system hiccup), never bad input.

Tasks that read or write the archive or source files use :data:`TRANSIENT_IO_RETRIES`::

    @task(**TRANSIENT_IO_RETRIES)
    def ingest_source_task(...): ...

A file that is missing, unreadable or malformed fails at once with its error; an ``OSError`` such as
EIO, ESTALE or a dropped connection is retried twice after 1 s and 5 s.
"""
from __future__ import annotations

__all__ = ["TRANSIENT_IO_RETRIES", "is_transient", "retry_on_transient_io"]

_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_transient(error: BaseException | None) -> bool:
    """True for an ``OSError`` that a retry may cure, raised directly or as the cause of another error
    (a reader reports an EIO as a ReadError naming the file); False for bad input and anything else."""
    seen = 0
    while error is not None and seen < 8:  # the cause chain, guarded against cycles
        if isinstance(error, OSError) and not isinstance(error, _PERMANENT):
            return True
        error, seen = error.__cause__, seen + 1
    return False


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: the failed state's data is the exception the task raised."""
    return is_transient(state.data if isinstance(state.data, BaseException) else None)


TRANSIENT_IO_RETRIES = dict(retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_transient_io)
