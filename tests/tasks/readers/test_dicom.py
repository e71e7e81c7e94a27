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
