"""DICOM Ophthalmic Tomography files (synthetic: pydicom ships none)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume
from tests.tasks.readers import vendor_files as vf
from tests.tasks.readers.checks import VOL8, VOL16, assert_common, half


def test_dicom_whose_frame_count_disagrees_with_its_pixels_is_refused_clearly(tmp_path: Path) -> None:
    import pydicom

    from octseg.tasks.readers.registry import read_volume

    p = vf.write_opt_dicom(tmp_path / "f.dcm", (np.arange(3 * 16 * 20) % 200).astype(np.uint8).reshape(3, 16, 20))
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = 1
    ds.save_as(p)
    with pytest.raises(ReadError, match=r"f\.dcm: .*(disagrees|pixel data)"):
        read_volume(p)


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


# ---- only OCT: what a DICOM file says it is decides (issue 17, item 2) -----------------------------------------

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MF_GREY_SC = "1.2.840.10008.5.1.4.1.1.7.2"


@pytest.mark.parametrize(("sop_class", "modality", "phrase"), [
    (CT_IMAGE, "CT", r"not OCT: Modality CT, SOP class CT Image Storage \(1\.2\.840\.10008\.5\.1\.4\.1\.1\.2\)"),
    ("1.2.840.10008.5.1.4.1.1.4", "MR", r"not OCT: Modality MR, SOP class MR Image Storage"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.7", "OPT", r"not OCT B-scans: Modality OPT, .*En Face.*an OCT en-face image"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.8", "OPT", r"not OCT B-scans: .*B-scan Volume Analysis.*OCT angiography"),
    ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", r"not OCT B-scans: Modality OP, .*ophthalmic photograph"),
    (vf.OPT_SOP_CLASS, "CT", r"Modality CT, SOP class Ophthalmic Tomography Image Storage.*must have Modality OPT"),
    (MF_GREY_SC, "OPT", r"secondary capture is read as OCT B-scans only with --dicom-secondary-capture"),
])
def test_dicom_that_is_not_oct_is_refused_naming_modality_and_sop_class(
        tmp_path: Path, sop_class: str, modality: str, phrase: str) -> None:
    p = vf.write_opt_dicom(tmp_path / "x.dcm", VOL8, sop_class=sop_class, Modality=modality)
    with pytest.raises(ReadError, match=phrase) as err:
        read_volume(p)
    assert "x.dcm" in str(err.value) and "\n" not in str(err.value)


def test_secondary_capture_is_read_only_when_asked(tmp_path: Path) -> None:
    sc = vf.write_opt_dicom(tmp_path / "sc.dcm", VOL8, sop_class=MF_GREY_SC, Modality="OT")
    with pytest.raises(ReadError, match="only with --dicom-secondary-capture"):
        read_volume(sc)
    vol = read_volume(sc, options={"dicom_secondary_capture": True})
    np.testing.assert_array_equal(vol.image, VOL8)
    assert vol.meta["modality"] == "OT" and "Secondary Capture" in vol.meta["sop_class"]
    ct_sc = vf.write_opt_dicom(tmp_path / "ct_sc.dcm", VOL8, sop_class=MF_GREY_SC, Modality="CT")
    with pytest.raises(ReadError, match=r"not OCT: Modality CT, .*read only with Modality OPT, OT or none"):
        read_volume(ct_sc, options={"dicom_secondary_capture": True})  # the opt-in is not a CT pass


def test_the_opt_in_is_a_declared_reader_option() -> None:
    from octseg.flows.config import IngestConfig
    from octseg.tasks.readers.dicom import DICOM

    assert DICOM.option_defaults == {"dicom_secondary_capture": False}
    cfg = IngestConfig(sources=("a.dcm",), archive="x.zarr", reader_options={"dicom_secondary_capture": True})
    assert cfg.reader_options.dicom_secondary_capture is True


def test_pixel_data_longer_than_the_header_says_is_refused_not_read_in_part(tmp_path: Path) -> None:
    import pydicom

    p = vf.write_opt_dicom(tmp_path / "f.dcm", np.concatenate([VOL8, VOL8]))  # 6 frames
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = 4  # pydicom would read the first 4 with a warning
    ds.save_as(p)
    with pytest.raises(ReadError, match=r"pixel data holds 3,600 bytes, the header describes 4 frame"):
        read_volume(p)


def test_colour_frames_become_luminance_with_a_warning(tmp_path: Path) -> None:
    import pydicom

    rgb = (np.random.default_rng(2).random((2, 12, 10, 3)) * 255).astype(np.uint8)
    path = vf.write_opt_dicom(tmp_path / "c.dcm", rgb[..., 0], pixels=False)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    volume = read_volume(path)
    expected = np.clip(np.rint(rgb @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(volume.image, expected)
    assert sum("luminance" in w for w in volume.warnings) == 1  # once, not once a frame
