"""DICOM files (Ophthalmic Tomography and any other multi-frame image), read with pydicom when one is read.

Recognised by content whatever the name ("DICM" at byte 128: DICOM files often have none) or by
``.dcm``. Frames are B-scans; MONOCHROME1 is inverted; the pixel spacing and B-scan spacing come from
the functional groups or the top level. Every identifying keyword and every person name, anywhere in
the data set, goes to ``identifiers``. Tested on synthetic OPT files (pydicom ships none).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels, one_line
from octseg.tasks.readers.headers import add_identifier, floats_as_float32, grey, iso_date, laterality, new_volume, scale_um

__all__ = ["DICOM", "DicomReader", "is_dicom"]


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a regular file with the DICOM marker "DICM" at byte 128 (FIFOs are never opened)."""
    try:
        if not path.is_file():
            return False
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


class DicomReader(ExportReader):
    name, suffixes, label = "dicom", (".dcm",), "DICOM"

    def sniff(self, path: Path) -> bool:
        return is_dicom(path)

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_dicom(path, limits.max_voxels)


DICOM = DicomReader()


_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DICOM_IDENTIFYING = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "IssuerOfPatientID", "PatientBirthDate",
    "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAge", "PatientAddress",
    "PatientTelephoneNumbers", "PatientComments", "AdditionalPatientHistory", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician",
    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ImageComments",
    "RequestedProcedureDescription", "PerformedProcedureStepDescription", "PerformedProcedureStepID",
    "RequestedProcedureID", "AdmissionID", "DeviceSerialNumber", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "FrameOfReferenceUID", "MediaStorageSOPInstanceUID",
)


def _read_dicom(path: Path, max_voxels: int | None) -> ScanVolume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError as e:
        raise ReadError(path, f"not a DICOM file ({one_line(e)})") from e
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ReadError(path, f"DICOM file without pixel data (SOP class {_sop_name(ds)})")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ReadError(path, "DICOM image without Rows/Columns")
    frames, spp = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    check_voxels(path, (frames, rows, cols) if spp == 1 else (frames, rows, cols, spp), max_voxels)
    image = _dicom_pixels(path, ds, frames, spp)
    warnings: list[str] = []
    meta: dict[str, Any] = {
        "laterality": _dicom_laterality(ds), "scan_pattern": "volume" if image.shape[0] > 1 else "unknown",
        "acquired": next(filter(None, (iso_date(ds.get(k)) for k in (
            "AcquisitionDateTime", "AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate"))), None),
        "device": " ".join(dict.fromkeys(filter(None, (str(ds.get(k) or "").strip()
                                                        for k in ("Manufacturer", "ManufacturerModelName"))))) or None,
        "sop_class": _sop_name(ds), "modality": str(ds.get("Modality") or "") or None,
    }
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        top = (1 << int(ds.get("BitsStored") or 8 * image.itemsize)) - 1 if image.dtype.kind == "u" else 0
        image = (top - image).astype(image.dtype)
        warnings.append("MONOCHROME1 pixels inverted to MONOCHROME2 (bright = strong signal)")
    if any(k in ds and float(ds.get(k)) != d for k, d in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0))):
        warnings.append("RescaleSlope/RescaleIntercept present: stored pixel values kept, not rescaled")
    return new_volume(floats_as_float32(image), _dicom_scale(ds, image.shape[0], meta, warnings), meta=meta,
                   identifiers=_dicom_identifiers(ds), warnings=warnings)


def _sop_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown")


def _dicom_pixels(path: Path, ds: Any, frames: int, spp: int) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID")
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        if ts is not None and ts.is_compressed:
            raise ReadError(path, f"cannot decode transfer syntax {ts.name} ({ts}): {one_line(e)}") from e
        raise ReadError(path, f"truncated or corrupt pixel data ({one_line(e)})") from e
    if frames == 1:
        arr = arr[None]
    if spp > 1:
        arr = np.stack([grey(a, path, "colour frame") for a in arr])
    return np.ascontiguousarray(arr)


def _first_item(ds: Any, *keywords: str) -> Any:
    for kw in keywords:
        seq = ds.get(kw)
        if not seq:
            return None
        ds = seq[0]
    return ds


def _dicom_scale(ds: Any, nz: int, meta: dict, warnings: list[str]) -> Any:
    """PixelSpacing [row, col] (mm) and the B-scan spacing, from the functional groups or the top level."""
    groups = [_first_item(ds, g, "PixelMeasuresSequence")
              for g in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")]
    sources = [g for g in groups if g is not None] + [ds]
    spacing = next((s.get("PixelSpacing") for s in sources if s.get("PixelSpacing")), None)
    z = next((s.get(k) for k in ("SpacingBetweenSlices", "SliceThickness") for s in sources if s.get(k)), None)
    try:
        row, col = spacing
    except (TypeError, ValueError):
        warnings.append(f"no valid PixelSpacing ({spacing!r}): no voxel size")
        return None
    return scale_um(z, row, col, nz, meta, warnings)


def _dicom_laterality(ds: Any) -> str | None:
    anatomy = _first_item(ds, "SharedFunctionalGroupsSequence", "FrameAnatomySequence")
    values = [ds.get("ImageLaterality"), ds.get("Laterality"), anatomy.get("FrameLaterality") if anatomy else None]
    return next(filter(None, map(laterality, values)), None)


def _dicom_identifiers(ds: Any) -> dict[str, str]:
    """Listed identifying keywords and every person name, anywhere in the data set (pixels skipped)."""
    ids: dict[str, str] = {}
    for kw in ("MediaStorageSOPInstanceUID",):
        add_identifier(ids, kw, ds.file_meta.get(kw))
    _dicom_walk(ds, ids)
    return ids


def _dicom_walk(ds: Any, ids: dict[str, str]) -> None:
    from pydicom.datadict import keyword_for_tag

    for tag in list(ds.keys()):
        if keyword_for_tag(tag) in _PIXEL_KEYWORDS:
            continue
        el = ds[tag]
        if el.VR == "SQ":
            for item in el.value:
                _dicom_walk(item, ids)
        elif el.keyword in _DICOM_IDENTIFYING or el.VR == "PN":
            key = el.keyword or f"private {tag}"
            values = list(el.value) if el.VM > 1 else [el.value]
            for v in values:
                add_identifier(ids, key, v)
                if el.VR == "PN":
                    for part in ("family_name", "given_name", "middle_name"):
                        add_identifier(ids, f"{key}.{part}", getattr(v, part, ""))
