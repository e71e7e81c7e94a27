"""Ingest's skip/replace rules where identifiers, graders and vendor exports come in, and the journalled
replacement used where a file system cannot swap folders. Plain functions, real archives under tmp_path."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.archive import staging
from octseg.tasks.archive.layout import ArchiveError
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.inbox import scan_inbox
from octseg.tasks.ingest.source import ingest_source
from tests.tasks.readers import vendor_files as vf

EYEPY = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "heyex_eyepy_tests"


def _volume(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((3, 16, 24)) * 250).astype(np.uint8)


def test_same_generic_name_in_two_patients_folders_never_replaces_the_other(tmp_path: Path) -> None:
    """Both stored paths redact to ``.../[redacted]_[redacted]/scan.dcm``; the path digest still tells them apart."""
    a = vf.write_opt_dicom(_mkdir(tmp_path / "Doe_Jane") / "scan.dcm", _volume(1))
    b = vf.write_opt_dicom(_mkdir(tmp_path / "Roe_Rick") / "scan.dcm", _volume(2), PatientName="Roe^Rick",
                           PatientID="PAT-0815")
    archive = tmp_path / "a.zarr"
    assert ingest_source(a, archive).status == "written"
    with pytest.raises(ValueError, match="already holds .*different content"):
        ingest_source(b, archive)
    np.testing.assert_array_equal(open_archive(archive, create=False).image("scan")[...], _volume(1))
    vf.write_opt_dicom(a, _volume(3))  # the same file, re-exported: updated in place
    assert ingest_source(a, archive).status == "written"
    np.testing.assert_array_equal(open_archive(archive, create=False).image("scan")[...], _volume(3))


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_another_grader_or_identifier_setting_rewrites_the_volume(tmp_path: Path) -> None:
    archive = tmp_path / "a.zarr"
    mat = vf.write_mat5(tmp_path / "Subject_01.mat", vf.duke_arrays())
    assert ingest_source(mat, archive).annotated == [1, 2, 3]
    assert ingest_source(mat, archive).status == "skipped"
    second = ingest_source(mat, archive, options={"grader": 2})
    assert second.status == "written" and second.annotated == [0, 2]

    dicom = vf.write_opt_dicom(tmp_path / "scan7.dcm", _volume(4))
    assert ingest_source(dicom, archive, options={"keep_identifiers": True}).status == "written"
    assert "identifiers" in open_archive(archive, create=False).volume_meta("scan7")
    assert ingest_source(dicom, archive).status == "written"  # identifiers written before: removed now
    assert "identifiers" not in open_archive(archive, create=False).volume_meta("scan7")
    assert ingest_source(dicom, archive).status == "skipped"


def test_the_no_op_plan_reads_the_same_rule_from_the_catalogue(tmp_path: Path) -> None:
    """The plan decides from the catalogue's columns (the settings a volume was read with) what the flow decides
    from the volume's provenance: for each setting, the plan has work exactly where ingest writes."""
    from octseg.flows.config import IngestConfig
    from octseg.flows.plans import plan_ingest

    archive = tmp_path / "a.zarr"
    mat = vf.write_mat5(tmp_path / "Subject_01.mat", vf.duke_arrays())
    dicom = vf.write_opt_dicom(tmp_path / "scan7.dcm", _volume(4))

    def planned(source: Path, **options) -> bool:
        todo, _ = plan_ingest(IngestConfig(sources=[source], archive=archive, reader_options=options,
                                           dask_address=None))
        return todo == [str(source)]

    for source, options in [(mat, {}), (mat, {}), (mat, {"grader": 2}), (mat, {"grader": 2}), (mat, {"grader": 1}),
                            (dicom, {"keep_identifiers": True}), (dicom, {"keep_identifiers": True}), (dicom, {}),
                            (dicom, {}), (mat, {"keep_identifiers": True})]:
        plan = planned(source, **options)
        assert plan == (ingest_source(source, archive, options=options).status == "written"), (source, options)


@pytest.mark.skipif(not EYEPY.is_dir(), reason="../shared/data is not here")
def test_an_edited_xml_inside_an_export_folder_is_ingested_again(tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(EYEPY / "heyex_xml", export)
    archive = tmp_path / "a.zarr"
    assert ingest_source(export, archive).status == "written"
    assert ingest_source(export, archive).status == "skipped"
    xml = export / "test_dummy.xml"
    xml.write_text(xml.read_text().replace("<Laterality>R</Laterality>", "<Laterality>L</Laterality>"))
    assert ingest_source(export, archive).status == "written"
    assert open_archive(archive, create=False).volume_meta("export")["laterality"] == "OS"


def test_journalled_replacement_where_folders_cannot_be_swapped(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    archive = open_archive(tmp_path / "a.zarr")
    provenance = {"source": "s", "source_sha256": "0", "reader": "npy"}
    for k in range(3):
        archive.write_volume("v", _volume(k), provenance={**provenance, "source_sha256": str(k)})
        np.testing.assert_array_equal(archive.image("v")[...], _volume(k))
    assert not (tmp_path / ".a.zarr.staging").exists()

    failed = []

    def crash(src, dst):  # the second rename fails once: the old volume is put back
        if Path(dst).name == "v" and Path(src).name == "new" and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        os.rename(src, dst)

    monkeypatch.setattr(staging.os, "replace", crash)
    with pytest.raises(ArchiveError):
        archive.write_volume("v", _volume(9), provenance={**provenance, "source_sha256": "9"})
    monkeypatch.undo()
    assert failed and archive.volume_meta("v")["source_sha256"] == "2"
    assert not (tmp_path / ".a.zarr.staging").exists()


@pytest.mark.parametrize("name", ["pipe", "export.xml", "pipe.vol"])
def test_a_fifo_in_the_inbox_fails_alone_and_never_blocks_the_scan(tmp_path: Path, name: str) -> None:
    inbox = _mkdir(tmp_path / "inbox")
    np.save(inbox / "good.npy", _volume(0))
    os.mkfifo(inbox / name)
    result = {}
    scan = threading.Thread(target=lambda: result.update(scan=scan_inbox(inbox, tmp_path / "a.zarr", settle_seconds=0)),
                            daemon=True)
    scan.start()
    scan.join(30)
    if scan.is_alive():  # unblock the thread before failing
        with open(inbox / name, "wb"):
            pass
        pytest.fail(f"scan_inbox blocked on the FIFO {name}")
    assert [Path(p).name for p in result["scan"].new] == ["good.npy"]
    assert [p.split(": ", 1)[1] for p in result["scan"].unreadable] == ["not a regular file (a FIFO)"]
