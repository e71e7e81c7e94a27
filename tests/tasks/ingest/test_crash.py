"""Ingest under crashes and concurrency, with real processes: ``kill -9`` at any moment then a rerun,
two ingests of one volume id at once, two processes creating one archive, and replacements that
readers never see half done."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.archive.staging import replace_dir, sweep_staging
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import ingest_source

CTX = mp.get_context("spawn")


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes, leaving out the times ingest records."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "zarr.json":
                doc = json.loads(data)
                doc.get("attributes", {}).get("octseg", {}).pop("ingested_at", None)
                data = json.dumps(doc, sort_keys=True).encode()
            out[str(p.relative_to(root))] = data
    return out


def _ingest_in_process(sources: list[str], archive: str, barrier=None) -> list[str]:
    if barrier is not None:
        barrier.wait()
    outcome = []
    for s in sources:
        try:
            outcome.append(ingest_source(s, archive).status)
        except ValueError as e:
            outcome.append(f"failed: {e}")
    return outcome


@pytest.fixture(scope="module")
def pool():
    """Two worker processes (spawned once: each start imports octseg) and a manager for their barriers."""
    with CTX.Pool(2) as workers, CTX.Manager() as manager:
        yield workers, manager


def _run_pair(pool, target, args_a, args_b):
    a = pool.apply_async(target, args_a)
    b = pool.apply_async(target, args_b)
    return a.get(120), b.get(120)


def test_kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_archive(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(0)
    sources = []
    for i in range(4):
        path = scans / f"vol_{i}.npy"
        np.save(path, (rng.random((48, 128, 192)) * 255).astype(np.uint8))
        sources.append(str(path))
    reference = tmp_path / "reference.zarr"
    _ingest_in_process(sources, str(reference))
    expected = _tree(reference)

    code = ("import sys; from octseg.tasks.ingest.source import ingest_source\n"
            "for s in sys.argv[2:]: ingest_source(s, sys.argv[1])\n")
    killed_mid_way = 0
    for trial, delay in enumerate([0.4, 0.8, 1.2, 1.6, 2.0, 2.6]):
        archive = tmp_path / f"a{trial}.zarr"
        proc = subprocess.Popen([sys.executable, "-c", code, str(archive), *sources])
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_way += 1
        proc.wait()
        _ingest_in_process(sources, str(archive))  # the rerun
        assert _tree(archive) == expected, f"killed after {delay} s"
        assert not (tmp_path / f".a{trial}.zarr.staging").exists(), "the rerun removes the killed run's staging"
        assert not (tmp_path / f".a{trial}.zarr.claims").exists()
    assert killed_mid_way >= 3  # the kills really interrupted ingests


def test_two_concurrent_ingests_of_one_volume_id_from_different_files(tmp_path: Path, pool) -> None:
    workers, manager = pool
    for trial in range(4):
        a, b = tmp_path / f"t{trial}" / "a" / "scan.npy", tmp_path / f"t{trial}" / "b" / "scan.npy"
        for path, seed in ((a, 1), (b, 2)):
            path.parent.mkdir(parents=True)
            np.save(path, (np.random.default_rng(seed).random((24, 96, 128)) * 255).astype(np.uint8))
        archive = str(tmp_path / f"t{trial}" / "x.zarr")
        barrier = manager.Barrier(2)
        out_a, out_b = _run_pair(workers, _ingest_in_process, ([str(a)], archive, barrier), ([str(b)], archive, barrier))
        outcomes = sorted(out_a + out_b)
        assert outcomes[1] == "written", outcomes
        assert outcomes[0].startswith("failed:") and str(a) in outcomes[0] and str(b) in outcomes[0], outcomes
        stored = open_archive(archive, create=False)
        winner = a if out_a == ["written"] else b
        np.testing.assert_array_equal(stored.image("scan")[...], np.load(winner))


def _create(path: str, barrier) -> str:
    barrier.wait()
    return str(open_archive(path).path)


def test_two_processes_creating_one_archive_both_open_it(tmp_path: Path, pool) -> None:
    workers, manager = pool
    for trial in range(20):
        path = str(tmp_path / f"new{trial}.zarr")
        barrier = manager.Barrier(2)
        first, second = _run_pair(workers, _create, (path, barrier), (path, barrier))
        assert first == second == str(Path(path).resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"new{t}.zarr" for t in range(20))  # no drafts left


def test_a_replaced_volume_is_never_missing_for_a_reader(tmp_path: Path) -> None:
    archive = open_archive(tmp_path / "a.zarr")
    image = np.zeros((8, 64, 64), np.uint8)
    provenance = {"source": "s", "source_sha256": "0", "reader": "npy"}
    archive.write_volume("v", image, provenance=provenance)
    missing, stop = [], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not (archive.path / "v" / "zarr.json").is_file():
                missing.append(time.monotonic())

    reader = threading.Thread(target=watch)
    reader.start()
    try:
        for k in range(30):
            archive.write_volume("v", image + k, provenance={**provenance, "source_sha256": str(k)})
    finally:
        stop.set()
        reader.join()
    assert missing == []
    assert archive.volume_meta("v")["source_sha256"] == "29"


def test_an_interrupted_two_rename_replacement_is_completed_by_the_next_writer(tmp_path: Path) -> None:
    """Where the file system cannot swap folders, the two renames are journalled; a crash between them
    (simulated: the old volume moved aside, the new one not yet in place, the writer dead) is rolled
    forward by the next write, so the volume is the new one and nothing is stranded."""
    root = tmp_path / "a.zarr"
    archive = open_archive(root)
    provenance = {"source": "s", "source_sha256": "old", "reader": "npy"}
    archive.write_volume("v", np.zeros((2, 8, 8), np.uint8), provenance=provenance)
    archive.write_volume("w", np.ones((2, 8, 8), np.uint8), provenance={**provenance, "source_sha256": "new"})
    stage = tmp_path / ".a.zarr.staging" / "dead"
    stage.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (stage / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    os.replace(root / "w", stage / "new")  # the new folder, complete in staging
    os.replace(root / "v", stage / "old")  # first rename done; the crash comes before the second
    (stage / "replace.json").write_text(json.dumps({"new": "new", "target": str(root / "v")}))
    assert not archive.has_volume("v")

    assert sweep_staging(root) == [stage]
    assert archive.has_volume("v") and archive.volume_meta("v")["source_sha256"] == "new"
    assert not (tmp_path / ".a.zarr.staging").exists()


def test_a_live_writers_staging_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "a.zarr"
    open_archive(root)
    stage = tmp_path / ".a.zarr.staging" / "live"
    stage.mkdir(parents=True)
    (stage / "owner.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "boot": Path("/proc/sys/kernel/random/boot_id").read_text().strip()
                                                  if Path("/proc/sys/kernel/random/boot_id").exists() else None}))
    assert sweep_staging(root) == [] and stage.is_dir()


@pytest.mark.parametrize("exists", [False, True])
def test_replace_dir_moves_the_old_folder_aside(tmp_path: Path, exists: bool) -> None:
    new, target, aside = tmp_path / "new", tmp_path / "target", tmp_path / "aside"
    new.mkdir()
    (new / "f").write_text("new")
    if exists:
        target.mkdir()
        (target / "f").write_text("old")
    replace_dir(new, target, aside)
    assert (target / "f").read_text() == "new" and not new.exists()
    assert (aside / "f").read_text() == "old" if exists else not aside.exists()
