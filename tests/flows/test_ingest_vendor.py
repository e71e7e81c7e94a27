"""``octseg ingest`` of vendor exports: the real Heidelberg files, a HEYEX XML export, synthetic DICOM
and Duke .mat files; identifiers stay out of the whole archive unless --keep-identifiers."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.archive.store import open_archive
from tests.flows.cli_runner import invoke as _invoke
from tests.tasks.readers import vendor_files as vf

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HEIDELBERG, EYEPY = DATA / "heidelberg_vol", DATA / "heyex_eyepy_tests"


def _archive_bytes(root: Path) -> bytes:
    """Every byte the archive (and the folders octseg keeps beside it) holds, names included."""
    blob = []
    for p in sorted(root.parent.rglob("*")):
        if p == root or root in p.parents or p.name.startswith(f".{root.name}"):
            blob.append(str(p.relative_to(root.parent)).encode())
            if p.is_file():
                blob.append(p.read_bytes())
    return b"\n".join(blob)


def _metadata_text(root: Path) -> str:
    return "\n".join(p.read_text() for p in root.rglob("zarr.json"))


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> dict:
    """Exports named as reading centres receive them: after the patient."""
    root = tmp_path_factory.mktemp("vendor")
    scans = root / "scans"
    scans.mkdir()
    volume = (np.random.default_rng(1).random((5, 48, 64)) * 255).astype(np.uint8)
    vf.write_opt_dicom(scans / "Doe_Jane_19620417.dcm", volume)
    duke = vf.duke_arrays()
    vf.write_mat5(scans / "Subject_07.mat", duke)
    ids = dict(vf.PATIENT)
    return {"root": root, "scans": scans, "dicom_volume": volume, "duke": duke, "ids": ids}


def _identifier_strings(ids: dict) -> list[str]:
    """The values a grep must not find: whole values and name parts of 4+ characters (shorter ones
    could occur by chance inside compressed chunks)."""
    found = set()
    for value in ids.values():
        text = str(value)
        found.add(text)
        found.update(p for p in re.split(r"[\^\s,]+", text) if len(p) >= 4)
    return sorted(s for s in found if len(s) >= 4)


def test_dicom_and_duke_mat_land_without_identifiers(inbox) -> None:
    archive = inbox["root"] / "plain.zarr"
    result = _invoke("ingest", str(inbox["scans"] / "Doe_Jane_19620417.dcm"), str(inbox["scans"] / "Subject_07.mat"),
                     "--archive", str(archive))
    assert result.exit_code == 0, result.output
    stored = open_archive(archive, create=False)
    ids = stored.volume_ids()
    assert "Subject_07" in ids and not any("Doe" in v or "Jane" in v for v in ids)
    (dicom_id,) = [v for v in ids if v != "Subject_07"]
    assert dicom_id.startswith("dicom-")  # named after the patient: the id comes from the content
    np.testing.assert_array_equal(stored.image(dicom_id)[...], inbox["dicom_volume"])
    meta = stored.volume_meta(dicom_id)
    assert meta["laterality"] == "OD" and meta["acquired"] == "2023-01-02" and "identifiers" not in meta
    assert "[redacted]" in meta["source"]
    assert stored.scale_um(dicom_id) == pytest.approx((120.0, 3.9, 11.7))

    blob = _archive_bytes(archive)
    for text in _identifier_strings(inbox["ids"]) + ["19620417"]:
        assert text.encode() not in blob, text
    metadata = _metadata_text(archive)
    for value in inbox["ids"].values():  # short ones too, in the readable metadata
        assert str(value) not in metadata, value

    duke = inbox["duke"]
    manual, annotated = stored.manual_labels("Subject_07")
    graded = [z for z in range(duke["images"].shape[2]) if not np.isnan(duke["manualFluid1"][:, :, z]).all()]
    assert annotated == graded
    expected = np.nan_to_num(np.moveaxis(duke["manualFluid1"], 2, 0)) > 0
    np.testing.assert_array_equal(manual[...] > 0, expected)
    assert stored.boundaries("Subject_07")  # the grader's layers are kept


def test_keep_identifiers_writes_them_and_names_volumes_after_files(inbox) -> None:
    archive = inbox["root"] / "kept.zarr"
    result = _invoke("ingest", str(inbox["scans"] / "Doe_Jane_19620417.dcm"), "--keep-identifiers",
                     "--archive", str(archive))
    assert result.exit_code == 0, result.output
    stored = open_archive(archive, create=False)
    assert stored.volume_ids() == ["Doe_Jane_19620417"]
    meta = stored.volume_meta("Doe_Jane_19620417")
    assert meta["identifiers_kept"] is True
    assert set(meta["identifiers"].values()) >= {str(v) for v in inbox["ids"].values() if str(v)} - {""}


@pytest.mark.skipif(not HEIDELBERG.is_dir(), reason="../shared/data is not here")
def test_real_heidelberg_exports_with_layers_fundus_and_no_identifiers(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for f in HEIDELBERG.glob("*.vol"):
        shutil.copy(f, scans / f.name)
    shutil.copytree(EYEPY / "heyex_xml", scans / "heyex_export")
    shutil.copy(EYEPY / "test_volume.vol", scans / "test_volume.vol")
    archive = tmp_path / "a.zarr"
    result = _invoke("ingest", *sorted(map(str, scans.glob("*.vol"))), str(scans / "heyex_export" / "test_dummy.xml"),
                     "--archive", str(archive))
    assert result.exit_code == 0, result.output
    stored = open_archive(archive, create=False)
    assert sorted(stored.volume_ids()) == ["Willis_B_716_0", "Willis_B_716_2", "Willis_B_716_4", "test_dummy",
                                           "test_volume"]
    line = stored.volume_meta("Willis_B_716_0")
    circle = stored.volume_meta("Willis_B_716_2")
    assert (line["scan_pattern"], circle["scan_pattern"]) == ("line", "circle")
    assert stored.image("Willis_B_716_2").shape == (1, 496, 768)
    assert stored.scale_um("Willis_B_716_0")[1] == pytest.approx(3.8717, abs=1e-3)
    assert line["laterality"] == "OD" and line["acquired"] == "2017-01-11"
    assert stored.fundus("Willis_B_716_0").shape == (768, 768)
    assert {"ILM", "BM"} <= set(stored.boundaries("Willis_B_716_0"))
    assert stored.image("test_volume").shape == (10, 40, 50)
    assert stored.image("test_dummy").shape[0] >= 10
    folder = _invoke("ingest", str(scans / "heyex_export"), "--archive", str(tmp_path / "b.zarr"))  # the whole export
    assert folder.exit_code == 0, folder.output
    by_folder = open_archive(tmp_path / "b.zarr", create=False)
    assert by_folder.volume_ids() == ["heyex_export"]
    np.testing.assert_array_equal(by_folder.image("heyex_export")[...], stored.image("test_dummy")[...])

    # the XML export's identifiers are nowhere in the archive
    blob = _archive_bytes(archive)
    for text in ["Study-01", "LOC-000000001", "John"]:
        assert text.encode() not in blob, text
    assert "Doe" not in _metadata_text(archive)


@pytest.mark.skipif(not EYEPY.is_dir(), reason="../shared/data is not here")
def test_a_changed_bscan_beside_an_unchanged_heyex_xml_is_ingested_again(tmp_path: Path) -> None:
    import tifffile

    export = tmp_path / "export"
    shutil.copytree(EYEPY / "heyex_xml", export)
    archive = tmp_path / "a.zarr"
    first = _invoke("ingest", str(export / "test_dummy.xml"), "--archive", str(archive))
    assert first.exit_code == 0 and "1 written" in first.plain, first.output
    again = _invoke("ingest", str(export / "test_dummy.xml"), "--archive", str(archive))
    assert "0 written, 1 up to date" in again.plain, again.output
    bscan = tifffile.imread(export / "B3.tif")
    tifffile.imwrite(export / "B3.tif", (255 - bscan).astype(bscan.dtype))  # the XML itself is unchanged
    changed = _invoke("ingest", str(export / "test_dummy.xml"), "--archive", str(archive))
    assert changed.exit_code == 0 and "1 written, 0 up to date" in changed.plain, changed.output
    stored = open_archive(archive, create=False).image("test_dummy")
    assert any(np.array_equal(stored[z], 255 - bscan) for z in range(stored.shape[0]))
