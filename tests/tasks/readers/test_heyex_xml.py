"""HEYEX XML exports: eyepy's test export when ../shared/data is present."""
from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers.checks import XML, assert_common, half, shared


def test_xml_export_equals_eyepy() -> None:
    import eyepy

    p = shared(*XML)
    vol = read_volume(p)
    assert_common(vol, p, "heyex-xml")
    ev = eyepy.import_heyex_xml(p)
    np.testing.assert_array_equal(vol.image, ev.data)
    np.testing.assert_array_equal(vol.fundus, ev.localizer.data)
    assert sorted(vol.layers) == sorted(ev.layers) and len(vol.layers) == 11
    for name, rows in vol.layers.items():
        np.testing.assert_array_equal(rows, ev.layers[name].data.astype(np.float32))
    assert vol.image.shape == (10, 40, 50) and vol.fundus.shape == (50, 50)
    assert vol.scale_um == pytest.approx((31.444, 3.872, 11.819), abs=1e-3)
    assert vol.fundus_scale_um == pytest.approx((11.8, 11.8))
    assert [f.name for f in vol.files] == ["test_dummy.xml", *(f"B{i}.tif" for i in range(1, 11)), "NIR1.tif"]
    assert vol.meta.items() >= {"laterality": "OD", "scan_pattern": "volume", "acquired": "2000-01-01",
                             "device": "Heidelberg Engineering Spectralis"}.items()
    ids = vol.identifiers
    assert ids["last_name"] == "Doe" and ids["first_names"] == "John" and ids["patient_id"] == "Study-01"
    assert ids["birth_date"] == "2000-01-01" and ids["patient_uid_source"] == "LOC-000000001"
    assert ids["pid"] == "00001" and ids["operator"] == "main" and "study_uid" in ids


def _xml_copy(tmp_path: Path, keep_bscans: int | None = None) -> Path:
    src = shared(*XML)
    for f in src.parent.glob("*.tif"):
        shutil.copy(f, tmp_path / f.name)
    tree = ET.parse(src)
    if keep_bscans is not None:
        series = tree.getroot().find("BODY/Patient/Study/Series")
        for img in [i for i in series.findall("Image") if i.findtext("ImageType/Type") == "OCT"][keep_bscans:]:
            series.remove(img)
    tree.write(tmp_path / "export.xml")
    return tmp_path / "export.xml"


def test_xml_single_bscan_export(tmp_path: Path) -> None:
    vol = read_volume(_xml_copy(tmp_path, keep_bscans=1))  # eyepy's HeXmlReader fails on these
    assert vol.image.shape == (1, 40, 50) and vol.meta["z_spacing"] == "none (single B-scan)"
    assert vol.scale_um == pytest.approx((11.819, 3.872, 11.819), abs=1e-3)


def test_xml_errors(tmp_path: Path) -> None:
    xml = _xml_copy(tmp_path)
    with pytest.raises(ReadError, match="10 x 40 x 50 = 20,000 voxels exceeds the limit of 100"):
        read_volume(xml, max_voxels=100)
    (tmp_path / "B3.tif").unlink()
    with pytest.raises(ReadError, match="missing image file B3.tif"):
        read_volume(xml)
    with pytest.raises(ReadError, match="not well-formed XML"):
        read_volume(half(xml, tmp_path / "cut.xml"))
    (tmp_path / "other.xml").write_text("<config><a>1</a></config>")
    with pytest.raises(ReadError, match="not a HEYEX XML export"):
        read_volume(tmp_path / "other.xml")


def test_xml_export_never_follows_a_link_out_of_its_folder(tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(shared(*XML).parent, export)
    (export / "B2.tif").unlink()
    (export / "B2.tif").symlink_to("/etc/passwd")
    with pytest.raises(ReadError, match="B2.tif links outside the export folder") as err:
        read_volume(export / "test_dummy.xml")
    assert "header=b'root" not in str(err.value)  # nothing of the link's target is read


def _export(tmp_path: Path, modality: str, procedure: str, images: list[str]) -> Path:
    """A HEYEX XML export's skeleton (no image files: these are refused before any is opened)."""
    body = "".join(f"<Image><ID>{i}</ID><ImageType><Type>{t}</Type></ImageType></Image>" for i, t in enumerate(images))
    xml = tmp_path / "export.xml"
    xml.write_text(f"<HEDX><BODY><Patient><ID>1</ID><Study><Series><Modality>{modality}</Modality>"
                   f"<ModalityProcedure>{procedure}</ModalityProcedure><Type>Volume</Type>{body}"
                   f"</Series></Study></Patient></BODY></HEDX>")
    return xml


@pytest.mark.parametrize(("modality", "procedure", "images", "phrase"), [
    ("OCT", "IR_OCT", ["LOCALIZER"], r"an SLO-only export: 1 localizer \(fundus\) image\(s\) and no OCT B-scans"),
    ("OCT", "IR_OCTA", ["LOCALIZER", "OCT", "OCT"], r"an OCT angiography export \('IR_OCTA', 'Volume'\)"),
    ("FA", "FA", ["LOCALIZER"], r"not OCT: the export's series has Modality 'FA'"),
])
def test_xml_export_that_is_not_oct_is_refused(tmp_path: Path, modality: str, procedure: str, images: list[str],
                                               phrase: str) -> None:
    with pytest.raises(ReadError, match=phrase):
        read_volume(_export(tmp_path, modality, procedure, images))
