"""Vendor readers: real Heidelberg exports when ../shared/data is present, synthetic files otherwise."""
from __future__ import annotations

import json
import shutil
import sys
import time
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.octconverter import HEAVY_EXTRA
from octseg.tasks.readers.registry import READERS, read_volume, reader_for, source_sha256
from tests.tasks import vendor_files as vf

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
WILLIS = ("heidelberg_vol", "Willis_B_716_{}.vol")
XML = ("heyex_eyepy_tests", "heyex_xml", "test_dummy.xml")
RNG = np.random.default_rng(11)
VENDOR_SUFFIXES = {s: r.name for r in READERS if r.vendor for s in r.suffixes}
VOL8 = RNG.integers(0, 256, (3, 20, 30), dtype=np.uint8)
VOL16 = RNG.integers(0, 4000, (3, 20, 30), dtype=np.uint16)


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available at {p}")
    return p


def _leaves(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    elif obj is not None:
        yield str(obj)


def assert_no_phi(vol) -> None:
    """meta is JSON and holds none of the identifiers (an export's birth date may equal its exam date)."""
    text, leaves = json.dumps(vol.meta), set(_leaves(vol.meta))
    for key, value in vol.identifiers.items():
        if "birth" in key.lower() and value == vol.meta.get("acquired"):
            continue
        assert value not in leaves, (key, value)
        assert len(value) < 4 or value.lower() not in text.lower(), (key, value)


def assert_common(vol, path: Path, reader: str) -> None:
    assert vol.reader == reader and vol.meta["format"] == reader and vol.source == path
    assert vol.sha256 == source_sha256(path) and path in vol.files
    assert vol.image.ndim == 3 and vol.image.dtype in (np.uint8, np.uint16, np.float32)
    assert vol.meta["scan_pattern"] in ("volume", "line", "circle", "radial", "unknown")
    for rows in vol.layers.values():
        assert rows.dtype == np.float32 and rows.shape == (vol.image.shape[0], vol.image.shape[2])
        assert not np.isnan(rows).all()
    assert_no_phi(vol)


def half(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


# --------------------------------------------------------------------------------------- API


def is_vendor_file(path: str | Path) -> bool:
    return (reader := reader_for(path)) is not None and reader.vendor


def test_suffixes_and_detection(tmp_path: Path) -> None:
    assert VENDOR_SUFFIXES == {".vol": "heyex-vol", ".e2e": "heyex-e2e", ".xml": "heyex-xml", ".mat": "duke-mat",
                               ".dcm": "dicom", ".fds": "topcon-fds", ".fda": "topcon-fda", ".img": "zeiss-img",
                               ".oct": "bioptigen-oct"}
    assert HEAVY_EXTRA == "vendor"
    assert is_vendor_file("x/scan.VOL") and is_vendor_file(tmp_path / "missing.E2E")
    no_suffix = vf.write_opt_dicom(tmp_path / "IM000001", VOL8)
    odd_suffix = vf.write_opt_dicom(tmp_path / "scan.1", VOL8)
    assert is_vendor_file(no_suffix) and is_vendor_file(odd_suffix)
    (tmp_path / "b.png").write_bytes(b"\x89PNG" + bytes(200))
    assert not is_vendor_file(tmp_path / "b.png") and not is_vendor_file(tmp_path / "none.txt")
    assert read_volume(no_suffix).reader == "dicom"


@pytest.mark.parametrize("suffix", sorted(VENDOR_SUFFIXES))
def test_garbage_and_empty_files(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(ReadError, match=r"empty file \(0 bytes\)"):
        read_volume(empty)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ReadError) as err:
        read_volume(garbage)
    assert "\n" not in str(err.value) and err.value.path == garbage


def test_not_a_vendor_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReadError, match="unsupported suffix '.txt'"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(ReadError, match="does not exist"):
        read_volume(tmp_path / "gone.vol")


# ---------------------------------------------------------------------------- Heidelberg .vol


def test_vol_line_scan_equals_eyepy() -> None:
    import eyepy
    from eyepy.io import HeVolReader

    p = shared(WILLIS[0], WILLIS[1].format(0))
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_vol(p).data)
    assert vol.image.shape == (1, 496, 768) and vol.image.dtype == np.uint8
    assert vol.scale_um == pytest.approx((11.8206, 3.8717, 11.8206), abs=1e-4)
    assert vol.meta["z_spacing"] == "none (single B-scan)" and "eyepy" in vol.meta["intensity"]
    assert vol.meta.items() >= {"laterality": "OD", "scan_pattern": "line", "acquired": "2017-01-11"}.items()
    assert vol.fundus.shape == (768, 768) and vol.fundus.dtype == np.uint8
    assert vol.fundus_scale_um == pytest.approx((11.8206, 11.8206), abs=1e-4)
    raw = HeVolReader(p).layers  # (n_layers, Z, X), >= 3e38 already NaN; RNFL is all NaN here
    assert set(vol.layers) == {"ILM", "BM"} and vol.layers_source == "device"
    np.testing.assert_array_equal(vol.layers["ILM"], raw[0])
    np.testing.assert_array_equal(vol.layers["BM"], raw[1])
    assert np.isnan(vol.layers["BM"]).sum() == 135 and np.nanmax(vol.layers["BM"]) < 496
    assert vol.identifiers == {"patient_id": "01234", "pid": "86", "birth_date": "1951-10-03", "vid": "145"}


@pytest.mark.parametrize("n", [2, 4])
def test_vol_circle_scans(n: int) -> None:
    import eyepy
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io import HeVolReader

    p = shared(WILLIS[0], WILLIS[1].format(n))
    with pytest.raises(ValueError, match="scan pattern 2"):
        eyepy.import_heyex_vol(p)  # what this reader works around
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    assert vol.image.shape == (1, 496, 768) and vol.meta["scan_pattern"] == "circle"
    expected = vol_intensity_transform(HeVolReader(p).parsed_file.bscans[0].data.astype(np.float32))
    np.testing.assert_array_equal(vol.image[0], expected)
    assert vol.scale_um == pytest.approx((14.722, 3.8717, 14.722), abs=1e-3)
    assert set(vol.layers) == {"ILM", "BM", "RNFL"} and vol.fundus.shape == (768, 768)


def test_vol_volume_equals_eyepy() -> None:
    import eyepy

    p = shared("heyex_eyepy_tests", "test_volume.vol")
    vol = read_volume(p)
    assert_common(vol, p, "heyex-vol")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_vol(p).data)
    assert vol.image.shape == (10, 40, 50) and vol.fundus.shape == (50, 50)
    assert vol.scale_um == pytest.approx((31.444, 3.872, 11.819), abs=1e-3)
    assert vol.layers == {} and vol.layers_source is None  # no layers stored
    assert vol.identifiers["patient_id"] == "Study-01" and "visit_id" not in vol.identifiers  # 'unknown' dropped


def test_vol_limit_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from eyepy.io.he import vol_reader

    p = shared(WILLIS[0], WILLIS[1].format(0))
    monkeypatch.setattr(vol_reader.HeVolReader, "__init__", lambda *a: pytest.fail("decoded before the check"))
    with pytest.raises(ReadError, match=r"1 x 496 x 768 = 380,928 voxels exceeds the limit of 1,000"):
        read_volume(p, max_voxels=1000)


def test_forged_vol_headers_refused_quickly(tmp_path: Path) -> None:
    huge = vf.write_vol_header(tmp_path / "huge.vol", 100_000, 100_000, 100_000, extra=2048)
    slo = vf.write_vol_header(tmp_path / "slo.vol", 4, 1, 4, slo=100_000, extra=2048)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(huge)
    with pytest.raises(ReadError, match=r"truncated: the header promises 100000 B-scans"):
        read_volume(huge, max_voxels=None)
    with pytest.raises(ReadError, match="SLO image of 100000 x 100000"):
        read_volume(slo)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - start < 2 and peak < 20e6


@pytest.mark.parametrize("parts", [(WILLIS[0], WILLIS[1].format(0)), (WILLIS[0], WILLIS[1].format(2)),
                                   ("heyex_eyepy_tests", "test_volume.vol")])
def test_truncated_vol(tmp_path: Path, parts: tuple[str, str]) -> None:
    cut = half(shared(*parts), tmp_path / "cut.vol")
    with pytest.raises(ReadError, match="truncated"):
        read_volume(cut)


# ---------------------------------------------------------------------------------- HEYEX XML


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


# ---------------------------------------------------------------------------- Heidelberg .e2e


def test_e2e_synthetic_equals_eyepy(tmp_path: Path) -> None:
    import eyepy

    codes = RNG.integers(0, 60000, (3, 10, 12)).astype(np.uint16)  # E2E's 16-bit float codes
    rows = {0: RNG.uniform(1, 4, (3, 12)), 1: RNG.uniform(6, 9, (3, 12)), 2: np.full((3, 12), 3.0e38)}
    p = vf.write_e2e(tmp_path / "exam.e2e", codes, rows)
    vol = read_volume(p)
    assert_common(vol, p, "heyex-e2e")
    np.testing.assert_array_equal(vol.image, eyepy.import_heyex_e2e(p).data)
    assert vol.image.shape == (3, 10, 12) and vol.image.dtype == np.uint8
    assert set(vol.layers) == {"ILM", "BM"}  # RNFL (id 2) is all 3e38: absent
    np.testing.assert_array_equal(vol.layers["ILM"], rows[0].astype(np.float32))
    assert vol.meta.items() >= {"laterality": "OS", "scan_pattern": "volume", "acquired": "2019-04-17",
                                "device": "Heidelberg Retina Angiograph"}.items()
    assert vol.scale_um == pytest.approx((289.6, 3.9, 20 / 12 * 289.6))  # eyepy's degrees x 289.6 µm
    assert vol.fundus.shape == (8, 8)
    assert vol.identifiers.items() >= {"first_name": "Erika", "surname": "Mustermann", "patient_id": "E2E-777",
                                       "study_name": "Glaucoma study"}.items()
    with pytest.raises(ReadError, match="3 x 10 x 12 = 360 voxels exceeds the limit of 100"):
        read_volume(p, max_voxels=100)
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.e2e"))


def test_e2e_errors(tmp_path: Path) -> None:
    head = tmp_path / "head.e2e"  # the magic of an E2E file, then nothing
    head.write_bytes(b"CMDb" + bytes(0x20) + b"MDbMDir" + bytes(100))
    with pytest.raises(ReadError):
        read_volume(head)
    wrong = tmp_path / "wrong.e2e"
    wrong.write_bytes(b"NOPE" + bytes(500))
    with pytest.raises(ReadError, match="not a Heidelberg .e2e file"):
        read_volume(wrong)


# ------------------------------------------------------------------------------------ Duke .mat


@pytest.mark.parametrize("grader", [1, 2])
@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
def test_duke_mat(tmp_path: Path, write, grader: int) -> None:
    arrays = vf.duke_arrays()
    p = write(tmp_path / "Subject_01.mat", arrays)
    vol = read_volume(p, options={"grader": grader})
    assert_common(vol, p, "duke-mat")
    np.testing.assert_array_equal(vol.image, np.moveaxis(arrays["images"], -1, 0))
    assert vol.image.dtype == np.uint8 and vol.image.shape == (4, 12, 10) and vol.scale_um is None
    fluid = np.moveaxis(arrays[f"manualFluid{grader}"], -1, 0)
    assert vol.annotated == ([1, 2, 3] if grader == 1 else [0, 2])
    assert vol.manual_labels.dtype == np.uint8 and vol.manual_labels.shape == vol.image.shape
    np.testing.assert_array_equal(vol.manual_labels[vol.annotated], fluid[vol.annotated] > 0)
    assert set(np.unique(vol.manual_labels)) <= {0, 1}
    assert list(vol.layers) == ["ILM", "NFL/GCL", "IPL/INL", "INL/OPL", "OPL/ONL", "ISM/ISE", "OS/RPE", "BM"]
    assert vol.layers_source == f"grader {grader}"
    layers = arrays[f"manualLayers{grader}"]
    for i, rows in enumerate(vol.layers.values()):
        np.testing.assert_array_equal(rows, layers[i].T.astype(np.float32) - 1)  # 1-based -> 0-based
    assert np.isnan(vol.layers["INL/OPL"][:, :2]).all()


def test_duke_mat_without_nan_takes_the_bscans_with_layers_as_annotated(tmp_path: Path) -> None:
    """Should a file mark unannotated B-scans with 0 instead of NaN, the grader's layers tell them apart."""
    arrays = vf.duke_arrays()
    fluid = arrays["manualFluid1"]
    fluid[:, :, 0] = 0  # B-scan 0: not annotated (its layers are NaN) but 0, not NaN
    vol = read_volume(vf.write_mat5(tmp_path / "zeros.mat", arrays))
    assert vol.annotated == [1, 2, 3]
    assert any("no NaN" in w for w in vol.warnings)
    fluid[:, :, 0] = 0
    fluid[0, 0, 0] = 2  # fluid drawn on a B-scan without layers: annotated after all
    assert read_volume(vf.write_mat5(tmp_path / "fluid.mat", arrays)).annotated == [0, 1, 2, 3]


@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
@pytest.mark.parametrize(("images", "phrase"), [
    (np.ones((12, 10, 4), np.complex128) + 1j, "complex128"),
    (np.ones(5, np.uint8), "'images' is [12]-D uint8 of shape \\((1, )?5"),  # MATLAB has no 1-D: v5 gives 1 x 5
    (np.ones((2, 3, 4, 5), np.uint8), "'images' is 4-D"),
])
def test_duke_mat_images_that_are_not_a_volume_are_refused(tmp_path: Path, write, images, phrase) -> None:
    """Through read_volume, as ingest reads: the imaginary part is never dropped silently, 1-D or 4-D
    images are never taken for a volume, with or without the graders' masks beside them."""
    from octseg.tasks.readers.registry import read_volume

    for arrays in ({"images": images}, {**vf.duke_arrays(), "images": images}):
        with pytest.raises(ReadError, match=phrase):
            read_volume(write(tmp_path / "bad.mat", arrays))


def test_dicom_whose_frame_count_disagrees_with_its_pixels_is_refused_clearly(tmp_path: Path) -> None:
    import pydicom

    from octseg.tasks.readers.registry import read_volume

    p = vf.write_opt_dicom(tmp_path / "f.dcm", (np.arange(3 * 16 * 20) % 200).astype(np.uint8).reshape(3, 16, 20))
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = 1
    ds.save_as(p)
    with pytest.raises(ReadError, match=r"f\.dcm: .*(disagrees|pixel data)"):
        read_volume(p)


def test_e2e_without_layer_annotations_is_read(tmp_path: Path) -> None:
    vol = read_volume(vf.write_e2e(tmp_path / "x.e2e", np.full((2, 16, 24), 30000, np.uint16), {}))
    assert vol.image.shape[0] == 2 and vol.layers == {} and any("no layer" in w for w in vol.warnings)


def test_xml_export_never_follows_a_link_out_of_its_folder(tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(shared(*XML).parent, export)
    (export / "B2.tif").unlink()
    (export / "B2.tif").symlink_to("/etc/passwd")
    with pytest.raises(ReadError, match="B2.tif links outside the export folder") as err:
        read_volume(export / "test_dummy.xml")
    assert "header=b'root" not in str(err.value)  # nothing of the link's target is read


@pytest.mark.parametrize("write", [vf.write_mat5, vf.write_mat73], ids=["v5", "v7.3"])
def test_duke_mat_errors(tmp_path: Path, write) -> None:
    arrays = vf.duke_arrays()
    bare = read_volume(write(tmp_path / "bare.mat", {"images": arrays["images"]}))
    assert bare.manual_labels is None and bare.annotated == [] and bare.layers == {}
    with pytest.raises(ReadError, match="no 'images' variable"):
        read_volume(write(tmp_path / "noimg.mat", {"manualFluid1": arrays["manualFluid1"]}))
    full = write(tmp_path / "full.mat", arrays)
    with pytest.raises(ReadError, match=r"images of 12 x 10 x 4 = 480 voxels exceeds the limit of 100"):
        read_volume(full, max_voxels=100)
    with pytest.raises(ReadError, match="grader must be 1 or 2"):
        read_volume(full, options={"grader": 3})
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(full, tmp_path / "cut.mat"))


# ------------------------------------------------------------------------------------- DICOM


def test_dicom_opt(tmp_path: Path) -> None:
    p = vf.write_opt_dicom(tmp_path / "opt.dcm", VOL16)
    vol = read_volume(p)
    assert_common(vol, p, "dicom")
    np.testing.assert_array_equal(vol.image, VOL16)
    assert vol.image.dtype == np.uint16 and vol.scale_um == pytest.approx((120.0, 3.9, 11.7))
    assert vol.meta.items() >= {"laterality": "OD", "acquired": "2023-01-02", "scan_pattern": "volume",
                             "device": "Acme Optics RetinaScan 3000", "modality": "OPT",
                             "sop_class": "Ophthalmic Tomography Image Storage"}.items()
    ids = vol.identifiers
    for key, value in vf.PATIENT.items():
        assert ids[key] == value
    assert ids["PatientName.family_name"] == "Doe" and ids["PatientName.given_name"] == "Jane"
    assert {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"} <= set(ids)


def test_dicom_single_frame_left_eye(tmp_path: Path) -> None:
    vol = read_volume(vf.write_opt_dicom(tmp_path / "line", VOL8[:1], laterality="L", between_mm=None))
    np.testing.assert_array_equal(vol.image, VOL8[:1])
    assert vol.meta["laterality"] == "OS" and vol.meta["z_spacing"] == "none (single B-scan)"
    assert vol.scale_um == pytest.approx((11.7, 3.9, 11.7))


def test_dicom_errors(tmp_path: Path) -> None:
    jpeg_ls = vf.write_opt_dicom(tmp_path / "c.dcm", VOL8, transfer_syntax="1.2.840.10008.1.2.4.80")
    with pytest.raises(ReadError, match="cannot decode transfer syntax JPEG-LS Lossless"):
        read_volume(jpeg_ls)
    with pytest.raises(ReadError, match="without pixel data"):
        read_volume(vf.write_opt_dicom(tmp_path / "n.dcm", VOL8, pixels=False))
    full = vf.write_opt_dicom(tmp_path / "f.dcm", VOL8)
    with pytest.raises(ReadError, match=r"3 x 20 x 30 = 1,800 voxels exceeds the limit of 1,000"):
        read_volume(full, max_voxels=1000)
    with pytest.raises(ReadError):
        read_volume(half(full, tmp_path / "cut.dcm"))


# --------------------------------------------------------------------- oct-converter formats


@pytest.fixture
def fromstring(monkeypatch: pytest.MonkeyPatch):
    """np.fromstring for binary data, which oct-converter 0.7.0's FDS/FDA classes still call."""
    pytest.importorskip("oct_converter")
    monkeypatch.setattr(np, "fromstring", lambda s, dtype=float: np.frombuffer(s, dtype=dtype).copy())


def test_topcon_fds(tmp_path: Path, fromstring) -> None:
    from oct_converter.readers import FDS

    p = vf.write_fds(tmp_path / "scan.fds", VOL16)
    vol = read_volume(p)
    assert_common(vol, p, "topcon-fds")
    ref = FDS(p).read_oct_volume()
    np.testing.assert_array_equal(vol.image, np.stack(ref.volume))
    np.testing.assert_array_equal(vol.image, VOL16)
    x, z, y = ref.pixel_spacing  # mm, oct-converter's order
    assert vol.scale_um == pytest.approx((z * 1000, y * 1000, x * 1000)) == (2000, 2.6, 200)
    assert vol.meta.items() >= {"laterality": "OS", "acquired": "2021-06-15", "device": "Topcon 3D OCT-1"}.items()
    assert vol.fundus.shape == (6, 8) and vol.fundus[0, 0] == 22  # luminance of RGB (30, 20, 10)
    assert vol.identifiers.items() >= {"patient_id": "TP-0042", "first_name": "Hanako", "last_name": "Yamada",
                                    "birth_date": "1971-03-09", "capture_label": "Yamada follow-up",
                                    "device_serial_number": "SN77Q1"}.items()


@pytest.mark.parametrize("jpeg", [False, True], ids=["raw", "jpeg"])
def test_topcon_fda(tmp_path: Path, fromstring, jpeg: bool) -> None:
    from oct_converter.readers import FDA

    rows = {"MULTILAYERS_1": RNG.integers(2, 8, (3, 30)).astype(float),
            "MULTILAYERS_7": RNG.integers(12, 18, (3, 30)).astype(float)}
    volume = (VOL16 // 16).astype(np.uint8) if jpeg else VOL16
    p = vf.write_fda(tmp_path / "scan.fda", volume, rows, jpeg=jpeg)
    vol = read_volume(p)
    assert_common(vol, p, "topcon-fda")
    ref = FDA(p).read_oct_volume()
    np.testing.assert_array_equal(vol.image, np.stack(ref.volume))
    if jpeg:
        assert vol.image.dtype == np.uint8 and np.abs(vol.image.astype(int) - volume).max() < 16
    else:
        np.testing.assert_array_equal(vol.image, VOL16)
    assert set(vol.layers) == {"ILM", "BM"} and vol.layers_source == "device"
    for name, cid in (("ILM", "MULTILAYERS_1"), ("BM", "MULTILAYERS_7")):
        np.testing.assert_array_equal(vol.layers[name], ref.contours[name])
        np.testing.assert_array_equal(vol.layers[name], rows[cid])
    assert vol.meta["laterality"] == "OD" and vol.fundus.shape == (6, 8) and vol.fundus[0, 0] == 99


def test_topcon_truncated(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    p = vf.write_fds(tmp_path / "scan.fds", VOL16)
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.fds"))
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=100)


def test_zeiss_img(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    cube = RNG.integers(0, 256, (200, 1024, 200), dtype=np.uint8)
    name = "P1234567_Macular Cube 200x200_6-15-2021_9-30-0_OS_sn4242_cube_raw.img"
    p = vf.write_cirrus_img(tmp_path / name, cube)
    vol = read_volume(p)
    assert_common(vol, p, "zeiss-img")
    np.testing.assert_array_equal(vol.image, cube)
    assert vol.scale_um is None and vol.warnings
    assert vol.meta.items() >= {"laterality": "OS", "acquired": "2021-06-15", "device": "Zeiss Cirrus"}.items()
    assert vol.identifiers == {"patient_id": "P1234567", "device_serial_number": "sn4242"}
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=1000)
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    with pytest.raises(ReadError, match="matches no known Cirrus geometry"):
        read_volume(tmp_path / "odd.img")


def test_bioptigen_oct(tmp_path: Path) -> None:
    pytest.importorskip("oct_converter")
    p = vf.write_bioptigen(tmp_path / "eye_OD_01.OCT", VOL16)
    vol = read_volume(p)
    assert_common(vol, p, "bioptigen-oct")
    np.testing.assert_array_equal(vol.image, VOL16)
    assert vol.meta.items() >= {"laterality": "OD", "acquired": "2019-11-05", "scan_pattern": "volume"}.items()
    assert vol.identifiers == {"description": "Subject Miller, baseline"} and vol.scale_um is None
    with pytest.raises(ReadError, match="truncated"):
        read_volume(half(p, tmp_path / "cut.oct"))
    with pytest.raises(ReadError, match="exceeds the limit"):
        read_volume(p, max_voxels=100)


@pytest.mark.parametrize("suffix", [".fds", ".fda", ".img", ".oct"])
def test_missing_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    p = tmp_path / f"scan{suffix}"
    p.write_bytes(b"FOCT" + bytes(400))
    for name in ("oct_converter", "oct_converter.readers", "oct_converter.readers.binary_structs"):
        monkeypatch.setitem(sys.modules, name, None)  # as if the optional extra were not installed
    expected = f"reading {suffix} files needs the optional reader oct-converter: pip install 'octseg[vendor]'"
    with pytest.raises(ReadError) as err:
        read_volume(p)
    assert err.value.reason == expected


def test_extra_installed_but_a_system_library_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """opencv without libGL (a bare container): the line says what is missing, not that the extra is."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("oct_converter"):
            raise ImportError("libGL.so.1: cannot open shared object file: No such file or directory", name="cv2")
        return real_import(name, *args, **kwargs)

    for name in [m for m in sys.modules if m.startswith("oct_converter")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    p = tmp_path / "scan.img"
    p.write_bytes(bytes(200 * 1024 * 200))
    with pytest.raises(ReadError, match=r"oct-converter is installed but cannot be imported \(libGL\.so\.1.*libgl1"):
        read_volume(p)
