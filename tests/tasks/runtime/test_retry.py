"""Which failures Prefect retries: transient I/O only, never bad input (no Prefect server needed)."""
from __future__ import annotations

import errno

import pytest
from prefect.states import Failed

from octseg.tasks.archive.layout import ArchiveError
from octseg.tasks.readers.base import ReadError
from octseg.tasks.runtime.retry import is_transient, retry_on_transient_io, TRANSIENT_IO_RETRIES

def _caused_by(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


CASES = [  # (exception, transient?)
    (OSError(errno.EIO, "Input/output error"), True),
    (OSError(errno.ESTALE, "Stale file handle"), True),
    (TimeoutError("read timed out"), True),  # an OSError subclass
    (ConnectionResetError("connection reset by peer"), True),
    (BlockingIOError(errno.EAGAIN, "try again"), True),
    (InterruptedError("interrupted system call"), True),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "scan.tif"), False),
    (FileExistsError(errno.EEXIST, "File exists", "a.zarr"), False),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "scans"), False),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "scan.tif/x"), False),
    (PermissionError(errno.EACCES, "Permission denied", "scan.tif"), False),
    (ReadError("scan.tif", "truncated file"), False),  # bad input
    (_caused_by(ReadError("scan.tif", "cannot read"), OSError(errno.EIO, "Input/output error")), True),  # a reader's
    (_caused_by(ReadError("scan.tif", "cannot read"), FileNotFoundError(errno.ENOENT, "gone")), False),
    (ArchiveError("a.zarr: exists and is not an empty folder"), False),
    (ValueError("volume id 'eye_a' already holds another file"), False),
    (RuntimeError("boom"), False),
    (OSError("image file is truncated (4 bytes not processed)"), False),  # Pillow: a corrupt file, no errno
    (OSError("Unable to open file (file signature not found)"), False),  # h5py: the same
    (_caused_by(ReadError("scan.png", "unreadable"), OSError("image file is truncated")), False),
    (OSError(errno.EMFILE, "Too many open files"), False),  # the system's, but no retry in seconds cures it
    (OSError(errno.ECONNRESET, "Connection reset by peer"), True),
    (type("CommClosedError", (OSError,), {})("in <TCP ...>: Stream is closed"), True),  # Dask's dropped connection
    (KeyboardInterrupt(), False),
    (None, False),
]


@pytest.mark.parametrize(("exc", "transient"), CASES, ids=[repr(e) for e, _ in CASES])
def test_is_transient(exc, transient: bool) -> None:
    assert is_transient(exc) is transient


@pytest.mark.parametrize(("exc", "transient"), CASES, ids=[repr(e) for e, _ in CASES])
def test_retry_condition_reads_the_exception_of_the_failed_state(exc, transient: bool) -> None:
    state = Failed(data=exc)
    assert retry_on_transient_io(None, None, state) is transient


def test_retry_condition_without_an_exception_does_not_retry() -> None:
    assert retry_on_transient_io(None, None, Failed(data="not an exception")) is False
    assert retry_on_transient_io(None, None, Failed(data=None)) is False


def test_transient_io_retries_settings() -> None:
    assert TRANSIENT_IO_RETRIES["retries"] == 2
    assert TRANSIENT_IO_RETRIES["retry_delay_seconds"] == [1, 5]
    assert TRANSIENT_IO_RETRIES["retry_condition_fn"] is retry_on_transient_io


def test_tasks_use_the_retry_settings() -> None:
    from octseg.tasks.ingest.source import ingest_source_task
    from octseg.tasks.preprocess.derive import preprocess_volume_task
    from octseg.tasks.segmentation.segment import segment_volume_task

    for task in (ingest_source_task, preprocess_volume_task, segment_volume_task):
        assert task.retries == 2, task.name
        assert task.retry_condition_fn is retry_on_transient_io, task.name


def test_call_with_retries_retries_transient_errors_only(monkeypatch) -> None:
    import octseg.tasks.runtime.retry as retry

    monkeypatch.setattr(retry, "RETRY_DELAYS", (0.0, 0.0))
    calls = []

    def flaky(fail_with: BaseException, times: int) -> str:
        calls.append(1)
        if len(calls) <= times:
            raise fail_with
        return "done"

    assert retry.call_with_retries(flaky, OSError(errno.EIO, "Input/output error"), 2) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(OSError):
        retry.call_with_retries(flaky, OSError(errno.EIO, "Input/output error"), 3)
    assert len(calls) == 3  # two retries, then the error
    calls.clear()
    with pytest.raises(ReadError):
        retry.call_with_retries(flaky, ReadError("x.tif", "truncated"), 1)
    assert len(calls) == 1  # bad input: never again
