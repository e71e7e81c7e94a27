"""The drop folder knows what it has seen: known files are not opened, only new or changed ones are hashed,
a renamed copy of known content is recognised by its hash once, refused files are remembered until they change,
and transient errors are still retried while corrupt files never are."""
from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.tasks.ingest.inbox import scan_inbox
from octseg.tasks.ingest.known import read_settings
from octseg.tasks.ingest.source import ingest_source
from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import source_sha256
from octseg.tasks.runtime.batches import run_items
from octseg.tasks.runtime.retry import is_transient

SETTINGS = read_settings({}, 2**28)


def _age(path: Path, seconds: float = 600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _tiff(path: Path, seed: int) -> Path:
    tifffile.imwrite(path, np.random.default_rng(seed).integers(0, 255, (2, 8, 8), dtype=np.uint8),
                     photometric="minisblack")
    _age(path)
    return path


class OpenCounter:
    """Counts the files under ``folder`` opened by any means Python has (open, io.open, os.open, Path.open)."""

    def __init__(self, folder: Path, monkeypatch) -> None:
        self.folder, self.opened = str(folder), []
        real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

        def seen(path) -> None:
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(self.folder):
                self.opened.append(os.fspath(path))

        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (seen(f), real_open(f, *a, **k))[1])
        monkeypatch.setattr(io, "open", lambda f, *a, **k: (seen(f), real_io_open(f, *a, **k))[1])
        monkeypatch.setattr(os, "open", lambda f, *a, **k: (seen(f), real_os_open(f, *a, **k))[1])


@pytest.fixture(scope="module")
def known_inbox(tmp_path_factory) -> tuple[Path, Path]:
    """500 settled files in an inbox, all ingested into an archive."""
    root = tmp_path_factory.mktemp("known")
    inbox, archive = root / "inbox", root / "a.zarr"
    inbox.mkdir()
    files = [_tiff(inbox / f"scan_{i:03d}.tif", i) for i in range(500)]
    for f in files:
        ingest_source(f, archive)
    return inbox, archive


def test_500_known_files_are_not_opened(known_inbox, monkeypatch) -> None:
    inbox, archive = known_inbox
    counter = OpenCounter(inbox, monkeypatch)
    t0 = time.perf_counter()
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    scanned = time.perf_counter() - t0
    assert len(scan.known) == 500 and scan.new == [] and scan.hashed == 0
    assert counter.opened == []  # not one of them read
    t0 = time.perf_counter()
    for f in sorted(inbox.iterdir()):
        source_sha256(f)
    hashing = time.perf_counter() - t0
    assert len(counter.opened) == 500  # the counter sees a read when there is one
    print(f"no-op scan of 500 known files {scanned:.3f} s; hashing them {hashing:.3f} s")


def test_only_new_or_changed_files_are_hashed_and_a_renamed_copy_once(known_inbox, tmp_path: Path) -> None:
    _, archive_src = known_inbox
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    archive = tmp_path / "a.zarr"
    shutil.copytree(archive_src, archive)  # a copy: new inodes, so its catalogue is rebuilt from the volumes
    first = _tiff(inbox / "scan_000.tif", 0)  # the content of a known volume, at a path never seen
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert scan.known == [str(first)] and scan.hashed == 1  # recognised by its hash, once
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert scan.known == [str(first)] and scan.hashed == 0  # then by its path and stamp
    shutil.copy(first, inbox / "renamed.tif")
    _age(inbox / "renamed.tif")
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert len(scan.known) == 2 and scan.new == [] and scan.hashed == 1
    _tiff(first, 999)  # rewritten with new content, same name
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert scan.new == [str(first)] and scan.hashed == 1
    os.utime(inbox / "renamed.tif")  # touched: read again, found unchanged, and still waits to settle first
    assert str(inbox / "renamed.tif") in scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS).unsettled


def test_an_inbox_named_dot_gives_the_names_of_paths(known_inbox, tmp_path: Path, monkeypatch) -> None:
    """``octseg watch --inbox .``: each entry as ``str(Path(".") / name)`` is, known by hash and then by stamp."""
    _, archive_src = known_inbox
    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    inbox.mkdir()
    shutil.copytree(archive_src, archive)
    _tiff(inbox / "copy.tif", 3)  # known content, a path never seen
    monkeypatch.chdir(inbox)
    for hashed in (1, 0):
        scan = scan_inbox(".", archive, settle_seconds=60, settings=SETTINGS)
        assert scan.known == ["copy.tif"] and scan.hashed == hashed and not scan.unreadable


def test_a_refused_file_is_remembered_until_it_changes(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    inbox.mkdir()
    good = _tiff(inbox / "good.tif", 1)
    ingest_source(good, archive)
    bad = inbox / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff" * 10)
    _age(bad)
    with pytest.raises(ReadError):
        ingest_source(bad, archive)
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert scan.known_bad == [str(bad)] and scan.new == [] and scan.hashed == 0
    shutil.copy(bad, inbox / "broken copy.tif")  # the same bad content under another name: by its hash
    _age(inbox / "broken copy.tif")
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert len(scan.known_bad) == 2 and scan.hashed == 1
    larger = read_settings({}, 2**30)  # another voxel limit: the refusal was not about size
    assert len(scan_inbox(inbox, archive, settle_seconds=60, settings=larger).known_bad) == 2
    other = read_settings({"grader": 2}, 2**28)  # refused under other reader options: tried again
    assert scan_inbox(inbox, archive, settle_seconds=60, settings=other).new == sorted(
        [str(bad), str(inbox / "broken copy.tif")])
    bad.write_bytes(b"II*\x00 still not a tiff, but another one" * 10)  # changed: tried again
    _age(bad)
    scan = scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS)
    assert scan.new == [str(bad)] and scan.known_bad == [str(inbox / "broken copy.tif")]


def test_too_large_is_remembered_under_its_limit_only(tmp_path: Path) -> None:
    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    inbox.mkdir()
    ingest_source(_tiff(inbox / "small.tif", 1), archive)
    big = _tiff(inbox / "big.tif", 2)
    with pytest.raises(ReadError, match="voxels"):
        ingest_source(big, archive, max_voxels=16)
    assert scan_inbox(inbox, archive, settle_seconds=60, settings=read_settings({}, 16)).known_bad == [str(big)]
    assert scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS).new == [str(big)]


def test_transient_errors_are_retried_and_never_remembered(tmp_path: Path, monkeypatch) -> None:
    import octseg.tasks.ingest.source as source
    import octseg.tasks.runtime.retry as retry

    monkeypatch.setattr(retry, "RETRY_DELAYS", (0.01, 0.01))
    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    inbox.mkdir()
    ingest_source(_tiff(inbox / "first.tif", 1), archive)
    flaky = _tiff(inbox / "flaky.tif", 2)
    real, calls = source.read_volume, []

    def read_volume(path, **kw):
        calls.append(path)
        if len(calls) <= 2:
            raise ReadError(path, "cannot read (Input/output error)") from OSError(errno.EIO, "Input/output error")
        return real(path, **kw)

    monkeypatch.setattr(source, "read_volume", read_volume)
    (outcome,) = run_items(ingest_source, [str(flaky)], {"archive_path": str(archive)})
    assert outcome.error is None and outcome.result.status == "written" and len(calls) == 3
    calls.clear()

    def always_eio(path, **kw):
        calls.append(path)
        raise ReadError(path, "cannot read (Input/output error)") from OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(source, "read_volume", always_eio)
    (outcome,) = run_items(ingest_source, [str(_tiff(inbox / "eio.tif", 3))], {"archive_path": str(archive)})
    assert is_transient(outcome.error) and len(calls) == 3  # tried three times, then reported
    assert scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS).new == [str(inbox / "eio.tif")]


def test_a_corrupt_file_is_never_retried(tmp_path: Path, monkeypatch) -> None:
    import octseg.tasks.ingest.source as source

    calls = []

    def truncated(path, **kw):  # what Pillow raises for a truncated image, h5py for a corrupt file: a bare OSError
        calls.append(path)
        raise OSError("image file is truncated (4 bytes not processed)")

    inbox, archive = tmp_path / "inbox", tmp_path / "a.zarr"
    inbox.mkdir()
    ingest_source(_tiff(inbox / "first.tif", 0), archive)
    corrupt = _tiff(inbox / "corrupt.tif", 1)
    monkeypatch.setattr(source, "read_volume", truncated)
    t0 = time.perf_counter()
    (outcome,) = run_items(ingest_source, [str(corrupt)], {"archive_path": str(archive)})
    assert isinstance(outcome.error, OSError) and len(calls) == 1 and time.perf_counter() - t0 < 1.0
    assert not is_transient(outcome.error)
    assert scan_inbox(inbox, archive, settle_seconds=60, settings=SETTINGS).known_bad == [str(corrupt)]


def test_the_batch_tasks_have_no_prefect_retries() -> None:
    from octseg.flows.ingest import INGEST_FILES
    from octseg.flows.preprocess import PREPROCESS_VOLUMES
    from octseg.flows.segment import SEGMENT_VOLUMES

    for task in (INGEST_FILES, PREPROCESS_VOLUMES, SEGMENT_VOLUMES):
        assert task.retries == 0, task.name  # each item's transient errors are retried where it runs
