"""The fast paths a plan of 100,000 files takes give what the slow, obvious code gives.

Volume ids from one regular expression against the loop over every registered suffix; a source's
remembered SHA-256 from the ``lstat`` a plan already took against ``realpath`` and ``stat``; the catalogue's
source rows checked when looked up against all checked at once; one ``lstat`` per source name against
resolving it.
"""
from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.archive.catalogue import catalogue_for, catalogue_path
from octseg.tasks.archive.entries import SourceRecord, row_digest
from octseg.tasks.archive.names import RESERVED_NAMES, volume_id_from_path
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.known import known_sha256, remember_read, resolved, source_stamp
from octseg.tasks.readers.registry import volume_suffixes
from octseg.tasks.readers.sources import source_check, source_problem


def _slow_volume_id(path: str) -> str:
    p = Path(path)
    name = p.name
    if not p.is_dir():
        for suffix in sorted({s for s in volume_suffixes()}, key=lambda s: (-len(s), s)):
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
    vid = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:200] or "volume"
    return "_" + vid if vid in RESERVED_NAMES else vid


def test_volume_ids_match_the_loop_over_every_suffix(tmp_path: Path) -> None:
    names = ["a.npy", "A.NPY", ".npy", "..npy", "x.y.npy", "scan.ome.tif", "scan.OME.TIFF", "b.tif", "c.TIFF",
             "s.vol", "s.E2E", "d.dcm", "m.mat", "n.png", "weird name!.npy", "zarr.json", "nosuffix", "ü.npy",
             "x" * 250 + ".npy", "a.npy.bak", "folder.npy"]
    names += [f"v{i}{s}" for i, s in enumerate(volume_suffixes())] + [f"{s}{s}" for s in volume_suffixes()]
    (tmp_path / "folder.npy").mkdir()
    for name in names:
        path = str(tmp_path / name)
        assert volume_id_from_path(path) == _slow_volume_id(path), name
        assert volume_id_from_path(path, is_dir=os.path.isdir(path)) == _slow_volume_id(path), name


def test_a_remembered_hash_from_the_plans_lstat_is_the_slow_one(tmp_path: Path) -> None:
    open_archive(tmp_path / "a.zarr")
    catalogue = catalogue_for(tmp_path / "a.zarr")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    plain, target, link = inbox / "plain.npy", inbox / "target.npy", inbox / "link.npy"
    for f in (plain, target):
        np.save(f, np.zeros((2, 4, 4), np.uint8))
    link.symlink_to(target)
    for f in (plain, target):
        remember_read(catalogue, Path(resolved(f)), source_stamp(f, None), None, "sha-" + f.name, "v")
    remembered = catalogue.sources()
    for f in (plain, link):
        problem, st, is_link = source_check(f)
        assert problem is None and is_link == (f == link)
        fast = known_sha256(catalogue, str(f), remembered, None if is_link else st)
        assert fast == known_sha256(catalogue, f) == ("sha-target.npy" if f == link else "sha-plain.npy")
    os.utime(plain, ns=(1, 1))  # changed since it was remembered: both forget it
    problem, st, _ = source_check(plain)
    assert known_sha256(catalogue, str(plain), catalogue.sources(), st) is None is known_sha256(catalogue, plain)


def test_a_source_row_failing_its_digest_is_not_there(tmp_path: Path) -> None:
    open_archive(tmp_path / "a.zarr")
    catalogue = catalogue_for(tmp_path / "a.zarr")
    records = [SourceRecord(f"k{i}", f"1:2:{i}", None if i % 2 else ("x.tif",), f"sha{i}", "v") for i in range(6)]
    catalogue.remember(records)
    with sqlite3.connect(catalogue_path(tmp_path / "a.zarr")) as conn:
        conn.execute("UPDATE sources SET sha256 = 'forged' WHERE key = 'k3'")
    index = catalogue.sources()
    assert "k3" not in index and index.get("k3") is None and sorted(index) == ["k0", "k1", "k2", "k4", "k5"]
    assert len(index) == 5 and index["k2"] == records[2] and index.get("k1") == records[1]
    rows = {r[0]: r for r in sqlite3.connect(catalogue_path(tmp_path / "a.zarr")).execute(
        "SELECT key, stamp, parts, sha256, volume_id, bad, bad_settings, digest FROM sources")}
    assert {k for k, r in rows.items() if r[-1] == row_digest(r[:-1])} == set(index)  # the slow check, all at once


@pytest.mark.parametrize("kind", ["missing", "dangling", "loop", "fifo", "folder", "file", "link"])
def test_one_lstat_per_name_refuses_what_resolving_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "src"
    if kind == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    elif kind == "loop":
        path.symlink_to(tmp_path / "other")
        (tmp_path / "other").symlink_to(path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "file":
        path.write_bytes(b"x")
    elif kind == "link":
        (tmp_path / "real").write_bytes(b"x")
        path.symlink_to(tmp_path / "real")
    problem, st, link = source_check(path)
    expected = {"missing": "does not exist", "dangling": "does not exist", "loop": "symbolic link loop",
                "fifo": "not a regular file (a FIFO)"}.get(kind)
    assert problem == source_problem(path)
    if expected:
        assert problem == f"{path}: {expected}" and st is None
    else:
        assert problem is None and st is not None and link == (kind == "link")
        assert (st.st_ino, st.st_mode) == (os.stat(path).st_ino, os.stat(path).st_mode)


def test_names_a_plan_takes_from_a_sources_file_are_those_of_paths(tmp_path: Path) -> None:
    from octseg.flows.config import IngestConfig

    names = ["a.npy", "./b.npy", "c.npy/", "d//e.npy", "f/./g.npy", "h/.", "sub/../i.npy", "x y.npy"]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n}\n" for n in names))
    cfg = IngestConfig(sources_file=listing, archive=tmp_path / "a.zarr", dask_address=None)
    assert cfg.source_names() == [str(p) for p in cfg.all_sources()]


def test_resolving_follows_links_before_dot_dot_and_forgets_retargeted_folders(tmp_path: Path) -> None:
    from octseg.tasks.ingest.known import forget_folders

    (tmp_path / "deep" / "sub").mkdir(parents=True)
    (tmp_path / "deep" / "x.tif").write_bytes(b"x")
    (tmp_path / "sublink").symlink_to(tmp_path / "deep" / "sub")
    assert resolved(tmp_path / "sublink" / ".." / "x.tif") == os.path.realpath(tmp_path / "sublink" / ".." / "x.tif")
    for m in ("m1", "m2"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "f.tif").write_bytes(b"x")
    (tmp_path / "cur").symlink_to(tmp_path / "m1")
    assert resolved(tmp_path / "cur" / "f.tif") == str(tmp_path / "m1" / "f.tif")
    (tmp_path / "cur").unlink()
    (tmp_path / "cur").symlink_to(tmp_path / "m2")
    forget_folders()  # what each plan and inbox scan does first
    assert resolved(tmp_path / "cur" / "f.tif") == str(tmp_path / "m2" / "f.tif")
    assert resolved(str(tmp_path / "cur") + "/") == os.path.realpath(tmp_path / "cur")


def test_suffixes_match_ascii_letters_only(tmp_path: Path) -> None:
    for name in ["scan.t\u0131f", "scan.T\u0130F", "x.fd\u017f", "y.\u212aat"]:
        assert volume_id_from_path(str(tmp_path / name)) == _slow_volume_id(str(tmp_path / name)), name
    for name in ["a/b/..", "a/b/.", "a/b/", "a/./b.npy"]:
        assert volume_id_from_path(name) == _slow_volume_id(name), name
