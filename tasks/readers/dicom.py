"""DICOM Ophthalmic Tomography files (and, when asked, secondary capture), read with pydicom when one is read.

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
from pydantic import Field

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels, one_line
from octseg.tasks.readers.headers import add_identifier, floats_as_float32, grey, iso_date, laterality, new_volume, scale_um

__all__ = ["DICOM", "NOT_BSCANS", "OPT_IMAGE", "SECONDARY_CAPTURE", "DicomReader", "check_oct", "is_dicom"]


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


OPT_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage: the OCT B-scans
SECONDARY_CAPTURE = {  # read only with the reader option dicom_secondary_capture
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
SECONDARY_CAPTURE_MODALITIES = ("OPT", "OT", None)  # what a secondary capture may say it shows (OT: other)
# ophthalmic classes that are not OCT B-scans, with what they are instead
NOT_BSCANS = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": "an OCT en-face image (a projection, not B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "OCT B-scan volume analysis, e.g. OCT angiography (flow data, not structural "
                                        "B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "an ophthalmic photograph (fundus/SLO image, not B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "an ophthalmic photograph (fundus/SLO image, not B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "a wide-field ophthalmic photograph (not B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "a wide-field ophthalmic photograph (not B-scans)",
    "1.2.840.10008.5.1.4.1.1.77.1.5.3": "a stereometric relationship (no B-scans)",
    "1.2.840.10008.5.1.4.1.1.81.1": "an ophthalmic thickness map (not B-scans)",
    "1.2.840.10008.5.1.4.1.1.82.1": "a corneal topography map (not B-scans)",
}


class DicomReader(ExportReader):
    """DICOM: Ophthalmic Tomography Image Storage (Modality OPT) is read; secondary capture only with the
    option ``dicom_secondary_capture``; everything else is refused naming its Modality and SOP class."""

    name, suffixes, label = "dicom", (".dcm",), "DICOM"
    option_fields = {"dicom_secondary_capture": (bool, Field(False, strict=True, description=(
        "Also read DICOM secondary capture files (e.g. multi-frame grey exports of OCT B-scans, Modality OPT, OT "
        "or none) as OCT volumes; without it only DICOM Ophthalmic Tomography is read.")))}

    def sniff(self, path: Path) -> bool:
        return is_dicom(path)

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_dicom(path, limits.max_voxels, bool(options.get("dicom_secondary_capture", False)))


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


def _sop_uid(ds: Any) -> str | None:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return str(uid).strip().rstrip("\0") or None if uid else None


def check_oct(path: Path, ds: Any, secondary_capture: bool) -> None:
    """Refuse what is not OCT B-scans, naming its Modality and SOP class (see :class:`DicomReader`)."""
    uid, modality = _sop_uid(ds), (str(ds.get("Modality") or "").strip() or None)
    what = f"Modality {modality or '(none)'}, SOP class {_sop_name(ds)}" + (f" ({uid})" if uid and _sop_name(ds) != uid else "")
    if uid == OPT_IMAGE:
        if modality not in ("OPT", None):
            raise ReadError(path, f"not read: {what}: an Ophthalmic Tomography image must have Modality OPT")
        return
    if uid in NOT_BSCANS:
        raise ReadError(path, f"not OCT B-scans: {what}, {NOT_BSCANS[uid]}")
    if uid in SECONDARY_CAPTURE:
        if not secondary_capture:
            raise ReadError(path, f"not read: {what}: a secondary capture is read as OCT B-scans only with "
                                  f"--dicom-secondary-capture")
        if modality not in SECONDARY_CAPTURE_MODALITIES:
            raise ReadError(path, f"not OCT: {what}: a secondary capture is read only with Modality OPT, OT or none")
        return
    raise ReadError(path, f"not OCT: {what}; octseg reads DICOM Ophthalmic Tomography Image Storage ({OPT_IMAGE}, "
                          f"Modality OPT) and, with --dicom-secondary-capture, secondary capture")


def _read_dicom(path: Path, max_voxels: int | None, secondary_capture: bool = False) -> ScanVolume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError as e:
        raise ReadError(path, f"not a DICOM file ({one_line(e)})") from e
    check_oct(path, ds, secondary_capture)
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise ReadError(path, f"DICOM file without pixel data (SOP class {_sop_name(ds)})")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ReadError(path, "DICOM image without Rows/Columns")
    frames, spp = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    check_voxels(path, (frames, rows, cols) if spp == 1 else (frames, rows, cols, spp), max_voxels)
    warnings: list[str] = []
    image = _dicom_pixels(path, ds, frames, spp, warnings)
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


def _check_native_length(path: Path, ds: Any, frames: int, spp: int) -> None:
    """Uncompressed pixel data must be exactly as long as its header says (one pad byte allowed): pydicom
    reads a longer one in part, with only a warning, when NumberOfFrames or the image size understates it."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if (ts is not None and ts.is_compressed) or "PixelData" not in ds:
        return
    bits = int(ds.get("BitsAllocated") or 0)
    need = (frames * int(ds.Rows) * int(ds.Columns) * spp * bits + 7) // 8
    held = len(ds.PixelData or b"")
    if held < need:
        raise ReadError(path, f"truncated pixel data: {held:,} bytes, the header describes {frames} frame(s) of "
                              f"{ds.Rows} x {ds.Columns} x {spp} samples of {bits} bits ({need:,} bytes)")
    if held > need + 1:
        raise ReadError(path, f"the pixel data holds {held:,} bytes, the header describes {frames} frame(s) of "
                              f"{ds.Rows} x {ds.Columns} x {spp} samples of {bits} bits ({need:,} bytes): the header "
                              f"disagrees with the pixel data (a wrong NumberOfFrames?); refused rather than read in part")


def _dicom_pixels(path: Path, ds: Any, frames: int, spp: int, warnings: list[str]) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID")
    _check_native_length(path, ds, frames, spp)
    try:
        arr = ds.pixel_array
    except Exception as e:  # noqa: BLE001
        if ts is not None and ts.is_compressed:
            raise ReadError(path, f"cannot decode transfer syntax {ts.name} ({ts}): {one_line(e)}") from e
        raise ReadError(path, f"truncated or corrupt pixel data ({one_line(e)})") from e
    if frames == 1:
        arr = arr[None]
    if spp > 1:
        arr = np.stack([grey(a, path, "colour frame", warnings) for a in arr])
        warnings[:] = list(dict.fromkeys(warnings))  # said once, not once a frame
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
