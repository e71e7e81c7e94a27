"""The archive's catalogue: rows equal to what the volumes say, under concurrent writers and kill -9, and never
trusted over the volumes: a missing, damaged, stale or hand-edited catalogue never makes a plan skip a volume
that needs work."""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from octseg.flows.config import PreprocessConfig, SegmentConfig
from octseg.flows.plans import plan_preprocess, plan_segmentation
from octseg.tasks.archive.catalogue import catalogue_for, catalogue_path, read_entry
from octseg.tasks.archive.store import already_segmented, open_archive
from octseg.tasks.preprocess.derive import outdated
from octseg.tasks.tracking.models import ModelRef
from octseg.unet.config import WeightMapConfig

CTX = mp.get_context("spawn")
MODEL = {"model_name": "unet", "model_version": "3", "run_id": "r", "model_uri": "models:/unet/3"}
REF = ModelRef("unet", "3", "r", "models:/unet/3", {})
CLASSES = {0: "background", 1: "fluid"}


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (3, 16, 24), dtype=np.uint8)


def _prov(i: int) -> dict:
    return {"source": f"/data/v{i}.tif", "source_sha256": f"{i:064x}", "reader": "tiff"}


def _segmented_archive(root: Path, n: int = 4, segmented: int | None = None):
    """An archive of ``n`` volumes; the first ``segmented`` (default all) segmented by unet v3, all normalised."""
    arc = open_archive(root / "a.zarr")
    for i in range(n):
        arc.write_volume(f"v{i}", _image(i), provenance=_prov(i))
        out = arc.create_derived(f"v{i}", "normalized", "float32")
        out[...] = 1.0
        arc.mark_derived_complete(f"v{i}", "normalized", {"source_sha256": f"{i:064x}",
                                                           "method": "zscore-excluding-fill-v1"})
        if i < (n if segmented is None else segmented):
            arc.write_prediction(f"v{i}", np.zeros((3, 16, 24), np.uint8), class_names=CLASSES, model_info=MODEL)
    return arc


def _rows(arc) -> dict[str, tuple]:
    """The catalogue's volume rows as stored (no check, no refresh)."""
    with contextlib.closing(sqlite3.connect(catalogue_path(arc.path))) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT volume_id, doubt, v_stamp, p_stamp, p_complete, derived "
                                                  "FROM volumes")}


def _truth(arc) -> dict[str, tuple]:
    """The same fields read from the volumes themselves."""
    out = {}
    for vid in arc.volume_ids():
        e = read_entry(arc.path, vid)
        out[vid] = (0, e.v_stamp, e.p_stamp, int(e.p_complete), e.derived_json)
    return out


def _todo(arc) -> tuple[list[str], list[str]]:
    """(volumes segment would do, volumes preprocess would do)."""
    seg, _ = plan_segmentation(SegmentConfig(archive=arc.path, dask_address=None), REF)
    pre, _ = plan_preprocess(PreprocessConfig(archive=arc.path, dask_address=None))
    return seg, pre


def _truly_todo(arc) -> tuple[list[str], list[str]]:
    """What the volumes' own records say (no catalogue involved)."""
    ids = arc.volume_ids()
    return ([v for v in ids if not already_segmented(arc, v, "unet", "3")],
            [v for v in ids if outdated(arc, v, WeightMapConfig())])


def test_rows_follow_every_write_and_plans_read_them(tmp_path: Path) -> None:
    arc = _segmented_archive(tmp_path, n=4, segmented=2)
    assert _rows(arc) == _truth(arc)  # written with each publish, nothing in doubt
    entries = arc.catalogue().entries(verify=("volume", "prediction", "derived"))
    assert [e.status for e in entries.values()] == ["segmented", "segmented", "preprocessed", "preprocessed"]
    assert entries["v0"].segmented_by("unet", "3") and not entries["v2"].segmented_by("unet", "3")
    assert entries["v1"].n_bscans == 3 and entries["v1"].source_sha256 == f"{1:064x}"
    assert _todo(arc) == _truly_todo(arc) == (["v2", "v3"], [])
    assert set(arc.prediction_infos()) == {"v0", "v1"}
    arc.write_volume("v0", _image(9), provenance={**_prov(0), "source_sha256": "f" * 64})  # re-ingested
    assert _rows(arc)["v0"] == _truth(arc)["v0"] and _todo(arc) == _truly_todo(arc) == (["v0", "v2", "v3"], ["v0"])


def test_plans_open_no_volume_when_the_catalogue_is_current(tmp_path: Path, monkeypatch) -> None:
    arc = _segmented_archive(tmp_path, n=3)
    import octseg.tasks.archive.catalogue as catalogue

    read = []
    monkeypatch.setattr(catalogue, "read_entry", lambda root, vid: read.append(vid))  # would read a volume
    assert _todo(arc) == ([], []) and read == []


def _write_volumes(root: str, ids: list[str], seed: int) -> None:
    arc = open_archive(root)
    for vid in ids:
        arc.write_volume(vid, _image(seed), provenance=_prov(seed))


def _segment_and_derive(root: str, ids: list[str]) -> None:
    arc = open_archive(root, create=False)
    for vid in ids:
        try:  # a volume re-ingested meanwhile refuses its prediction: the archive's own guard
            arc.write_prediction(vid, np.ones((3, 16, 24), np.uint8), class_names=CLASSES, model_info=MODEL)
            arc.create_derived(vid, "normalized", "float32")
            arc.mark_derived_complete(vid, "normalized", {"source_sha256": "x"})
        except Exception:
            pass


def test_concurrent_writers_leave_every_row_equal_to_its_volume(tmp_path: Path) -> None:
    root = str(tmp_path / "a.zarr")
    open_archive(root)
    ids = [[f"p{p}_{i}" for i in range(5)] for p in range(3)]
    with CTX.Pool(3) as pool:  # three processes writing volumes at once ...
        pool.starmap(_write_volumes, [(root, group, seed) for seed, group in enumerate(ids)])
        # ... then predictions and derived arrays, and re-ingests of half the volumes, at once
        everything = [v for group in ids for v in group]
        jobs = [pool.apply_async(_segment_and_derive, (root, everything[::2])),
                pool.apply_async(_segment_and_derive, (root, everything[1::2])),
                pool.apply_async(_write_volumes, (root, everything[:7], 7))]
        for job in jobs:
            job.get(120)
    arc = open_archive(root, create=False)
    assert sorted(_rows(arc)) == sorted(everything)
    assert _rows(arc) == _truth(arc)  # each write's entry landed, none lost to another writer, none in doubt
    assert _todo(arc) == _truly_todo(arc)


CRASH_AFTER_PUBLISH = """
import os, signal, sys
import numpy as np
import octseg.tasks.archive.catalogue as catalogue
from octseg.tasks.archive.store import open_archive

catalogue.Catalogue.record = lambda self, vid: os.kill(os.getpid(), signal.SIGKILL)  # between publish and entry
arc = open_archive(sys.argv[1], create=False)
if sys.argv[2] == "reingest":
    arc.write_volume("v1", np.full((3, 16, 24), 7, np.uint8),
                     provenance={"source": "/data/new.tif", "source_sha256": "e" * 64, "reader": "tiff"})
else:
    arc.write_prediction("v3", np.ones((3, 16, 24), np.uint8), class_names={0: "background", 1: "fluid"},
                         model_info={"model_name": "unet", "model_version": "3", "run_id": "r",
                                     "model_uri": "models:/unet/3"})
"""


@pytest.mark.parametrize("what", ["reingest", "segment"])
def test_kill_9_between_a_publish_and_its_catalogue_entry(tmp_path: Path, what: str) -> None:
    arc = _segmented_archive(tmp_path, n=4, segmented=3)
    before = _todo(arc)
    done = subprocess.run([sys.executable, "-c", CRASH_AFTER_PUBLISH, str(arc.path), what], timeout=120)
    assert done.returncode == -9
    doubt = {vid for vid, row in _rows(arc).items() if row[0]}
    assert doubt == {"v1" if what == "reingest" else "v3"}  # the publish happened, the entry did not
    assert before == (["v3"], [])
    if what == "reingest":
        assert _todo(arc) == _truly_todo(arc) == (["v1", "v3"], ["v1"])  # v1's new image is new work
    else:
        assert _todo(arc) == _truly_todo(arc) == ([], [])  # v3 was published: done
    assert _rows(arc) == _truth(arc)  # and the row was read again from the volume


def test_a_catalogue_deleted_by_hand_is_rebuilt_from_the_volumes(tmp_path: Path) -> None:
    arc = _segmented_archive(tmp_path, n=4, segmented=2)
    rows = _rows(arc)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{catalogue_path(arc.path)}{suffix}").unlink(missing_ok=True)
    assert _todo(arc) == (["v2", "v3"], [])
    assert _rows(arc) == rows
    catalogue_path(arc.path).unlink()  # only the database, its WAL left behind
    assert _todo(arc) == (["v2", "v3"], []) and _rows(arc) == rows


def _checkpoint(arc) -> Path:
    path = catalogue_path(arc.path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    catalogue_for(arc.path).close()
    return path


@pytest.mark.parametrize("damage", ["garbage", "half-written", "zeroed pages", "empty file"])
def test_a_damaged_catalogue_is_set_aside_and_rebuilt(tmp_path: Path, damage: str) -> None:
    arc = _segmented_archive(tmp_path, n=4, segmented=2)
    rows = _rows(arc)
    path = _checkpoint(arc)
    data = path.read_bytes()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes({"garbage": b"not a database at all" * 100, "half-written": data[: len(data) // 2],
                      "zeroed pages": data[:4096] + bytes(len(data) - 4096), "empty file": b""}[damage])
    import octseg.tasks.archive.catalogue as catalogue

    catalogue._CATALOGUES.clear()  # a new process
    assert _todo(arc) == _truly_todo(arc) == (["v2", "v3"], [])
    assert _rows(arc) == rows


def test_a_hand_edited_or_stale_catalogue_never_skips_work(tmp_path: Path) -> None:
    arc = _segmented_archive(tmp_path, n=4, segmented=2)
    path = _checkpoint(arc)
    old = tmp_path / "backup.sqlite"
    shutil.copy(path, old)
    # 1. rows edited by hand to claim work that was never done
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE volumes SET p_complete = 1, model_name = 'unet', model_version = '3', "
                     "p_image_fp = image_fp WHERE volume_id = 'v2'")
        conn.execute("UPDATE volumes SET derived = '{}' WHERE volume_id = 'v3'")  # harmless: v3 gets checked
    assert _todo(arc) == _truly_todo(arc) == (["v2", "v3"], [])
    # 2. a prediction and a derived array deleted by hand
    shutil.rmtree(arc.path / "v0" / "labels")
    shutil.rmtree(arc.path / "v1" / "derived")
    assert _todo(arc) == _truly_todo(arc) == (["v0", "v2", "v3"], ["v1"])
    # 3. an old copy of the catalogue put back after a volume changed (v1 re-ingested: its prediction is gone)
    arc.write_volume("v1", _image(5), provenance=_prov(1))
    catalogue_for(arc.path).close()
    shutil.copy(old, path)
    Path(f"{path}-wal").unlink(missing_ok=True)
    assert _todo(arc) == _truly_todo(arc)
    assert "v1" in _todo(arc)[0] and "v1" in _todo(arc)[1]
    # 4. a volume copied in by hand, and one removed
    shutil.copytree(arc.path / "v2", arc.path / "v9")
    shutil.rmtree(arc.path / "v3")
    assert _todo(arc) == _truly_todo(arc)
    assert set(arc.catalogue().volume_ids()) == set(arc.volume_ids()) == {"v0", "v1", "v2", "v9"}


def test_an_unusable_catalogue_folder_falls_back_to_memory(tmp_path: Path, monkeypatch) -> None:
    arc = _segmented_archive(tmp_path, n=2, segmented=1)
    import octseg.tasks.archive.catalogue as catalogue

    monkeypatch.setattr(catalogue, "catalogue_path", lambda root: tmp_path / "no" / "such" / "folder" / "c.sqlite")
    catalogue._CATALOGUES.clear()
    assert _todo(arc) == (["v1"], [])
    arc.write_prediction("v1", np.zeros((3, 16, 24), np.uint8), class_names=CLASSES, model_info=MODEL)
    assert _todo(arc) == ([], [])
    catalogue._CATALOGUES.clear()


def test_a_volume_with_unreadable_records_is_always_work(tmp_path: Path) -> None:
    arc = _segmented_archive(tmp_path, n=2)
    (arc.path / "v0" / "labels" / "prediction" / "zarr.json").write_text("{ not json")
    seg, _ = _todo(arc)
    assert seg == ["v0"]
    assert catalogue_for(arc.path).entries()["v0"].status == "unreadable"


def test_select_missing_volumes_names_them(tmp_path: Path) -> None:
    arc = _segmented_archive(tmp_path, n=2)
    with pytest.raises(ValueError, match=r"\['nope'\] not in archive"):
        plan_segmentation(SegmentConfig(archive=arc.path, volumes=("v0", "nope"), dask_address=None), REF)
    assert os.path.exists(catalogue_path(arc.path))


def test_the_catalogue_command_checks_and_rebuilds(tmp_path: Path) -> None:
    from tests.flows.cli_runner import invoke

    arc = _segmented_archive(tmp_path, n=3, segmented=2)
    shown = invoke("catalogue", "--archive", str(arc.path))
    assert shown.exit_code == 0, shown.plain
    assert "3 volumes (2 segmented, 1 preprocessed, 0 ingested; segmented by unet v3: 2)" in shown.plain
    catalogue_path(arc.path).unlink()
    rebuilt = invoke("catalogue", "--archive", str(arc.path), "--rebuild")
    assert rebuilt.exit_code == 0 and "3 volumes" in rebuilt.plain and "rebuilt from the volumes" in rebuilt.plain
    assert _rows(arc) == _truth(arc)
    missing = invoke("catalogue", "--archive", str(tmp_path / "none.zarr"))
    assert missing.exit_code == 2 and "no archive here" in missing.plain
    other = tmp_path / "other.zarr"  # an archive of a layout this octseg does not read: refused, nothing created
    other.mkdir()
    (other / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", '
                                     '"attributes": {"octseg": {"archive_version": 99}}}')
    refused = invoke("catalogue", "--archive", str(other))
    assert refused.exit_code == 2 and "archive_version is 99, expected 1" in refused.plain
    assert not catalogue_path(other).exists()


@pytest.mark.parametrize("sources_table", ["as this schema reads it", "of other columns", "of a newer schema",
                                           "of schema 2"])
def test_a_catalogue_of_an_older_schema_is_read_again_keeping_what_it_knows_of_files(tmp_path: Path,
                                                                                     sources_table: str) -> None:
    import octseg.tasks.archive.catalogue as catalogue
    from octseg.tasks.archive.entries import SourceRecord

    arc = _segmented_archive(tmp_path, n=4, segmented=2)
    store = catalogue_for(arc.path)
    record = SourceRecord(store.source_key("/inbox/v0.tif"), "1:2:3:100644", None, f"{0:064x}", "v0")
    store.remember([record])
    salt = store.salt
    path = _checkpoint(arc)
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:  # what schema 1 wrote
        conn.execute("UPDATE catalogue SET value = '1' WHERE key = 'schema'")
        conn.execute("ALTER TABLE volumes DROP COLUMN labels_digest")
        if sources_table == "of schema 2":  # what schema 2 wrote
            conn.execute("UPDATE catalogue SET value = '2' WHERE key = 'schema'")
        else:
            conn.execute("ALTER TABLE volumes DROP COLUMN settings")
        if sources_table == "of other columns":
            conn.execute("ALTER TABLE sources DROP COLUMN parts")
        elif sources_table == "of a newer schema":  # its rows may mean something else: not trusted
            conn.execute(f"UPDATE catalogue SET value = '{catalogue.CATALOGUE_SCHEMA + 1}' WHERE key = 'schema'")
    catalogue._CATALOGUES.clear()  # a new process, of the new schema
    assert _todo(arc) == _truly_todo(arc) == (["v2", "v3"], [])
    assert _rows(arc) == _truth(arc)
    store = catalogue_for(arc.path)
    if sources_table in ("as this schema reads it", "of schema 2"):
        assert store.salt == salt and store.sources()[record.key] == record
    else:  # unusable: forgotten, files are hashed again
        assert not store.sources()


def test_a_catalogue_replaced_under_a_long_lived_process_is_followed(tmp_path: Path) -> None:
    """Another process moved the catalogue aside and started a new one (or a person deleted it and a command made
    a new one): this process's next writes go to the file at the path now, not to the one moved away."""
    from octseg.tasks.archive.catalogue import Catalogue

    arc = _segmented_archive(tmp_path, n=2, segmented=1)
    before = catalogue_for(arc.path)
    before.entries()
    path = catalogue_path(arc.path)
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.replace(f"{path}{suffix}", tmp_path / f"aside{suffix}")
    Catalogue(arc.path.resolve()).entries()  # what the other process did: a new file, filled from the volumes
    arc.write_volume("v9", _image(9), provenance=_prov(9))
    assert catalogue_for(arc.path) is not before
    assert "v9" in _rows(arc) and set(_rows(arc)) == {"v0", "v1", "v9"}


def test_a_question_about_a_few_volumes_stats_their_folders_and_still_sees_changes(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    arc = _segmented_archive(tmp_path, n=3)
    catalogue = catalogue_for(arc.path)
    shutil.copytree(arc.path / "v0", arc.path / "v9")  # a volume copied in by hand: no row yet
    shutil.rmtree(arc.path / "v1")  # a volume deleted by hand: its row is stale
    os.symlink(arc.path / "v2", arc.path / "v8")  # a link to a volume is not a volume, as in the listing
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": listings.append(p) or real_scandir(p))
    assert list(catalogue.entries(["v2", "v0"])) == ["v2", "v0"]
    assert arc.path not in map(Path, listings)  # ids the catalogue knows: a stat each, no listing of the archive
    found = catalogue.entries(["v9", "v1", "v8", "v2"], missing_ok=True)
    assert list(found) == ["v9", "v2"] and found["v9"].n_bscans == 3  # new to the catalogue: confirmed by listing
    assert "v1" not in _rows(arc) and "v9" in _rows(arc)
    import octseg.tasks.archive.catalogue as module

    real_is_dir, real_read = Path.is_dir, module.read_entry  # a file system that folds case (macOS, Windows):
    monkeypatch.setattr(Path, "is_dir", lambda p: real_is_dir(p.with_name(p.name.lower())))  # V2 is v2's folder
    monkeypatch.setattr(module, "read_entry", lambda root, vid: real_read(root, vid.lower()))
    assert catalogue.entries(["V2"], missing_ok=True) == {} and "V2" not in _rows(arc)  # not a second volume
    monkeypatch.setattr(Path, "is_dir", real_is_dir)
    with pytest.raises(ValueError, match=r"\['v1'\] not in archive .* it holds \['v0', 'v2', 'v9'\]"):
        catalogue.entries(["v1"])
    assert list(catalogue.entries()) == ["v0", "v2", "v9"]
