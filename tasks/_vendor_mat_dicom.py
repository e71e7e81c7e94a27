"""Private to :mod:`octseg.tasks.vendor`: Duke DME ``.mat`` (SciPy, h5py) and DICOM (pydicom)."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks._vendor_common import (
    _grey,
    _image_dtype,
    _iso_date,
    _laterality,
    _layers,
    _one_line,
    _put,
    _scale_um,
    _volume,
)
from octseg.tasks.readers import ReadError, ScanVolume, check_voxels

# ------------------------------------------------------------------------------------ Duke .mat


_DUKE_LAYERS = ["ILM", "NFL/GCL", "IPL/INL", "INL/OPL", "OPL/ONL", "ISM/ISE", "OS/RPE", "BM"]  # eyepy's names


def _read_duke_mat(path: Path, max_voxels: int | None, grader: int) -> ScanVolume:
    """Chiu et al. 2015 DME ``.mat``: ``images`` (Y, X, Z), ``manualFluid{g}`` (Y, X, Z) with NaN on
    B-scans grader g did not annotate, ``manualLayers{g}`` (8, X, Z) MATLAB (1-based) rows."""
    if grader not in (1, 2):
        raise ReadError(path, f"grader must be 1 or 2, not {grader!r}")
    import h5py

    wanted = ["images", f"manualFluid{grader}", f"manualLayers{grader}"]
    arrays = _mat73(path, wanted, max_voxels) if h5py.is_hdf5(str(path)) else _mat5(path, wanted, max_voxels)
    images = arrays["images"]
    if images.ndim not in (2, 3) or min(images.shape[:2]) < 2 or 0 in images.shape or images.dtype.kind not in "buif":
        raise ReadError(path, f"'images' is {images.ndim}-D {images.dtype} of shape {images.shape}: expected "
                              f"a (rows, columns, B-scans) array of real numbers")
    image = np.ascontiguousarray(np.moveaxis(images if images.ndim == 3 else images[..., None], -1, 0))
    meta: dict[str, Any] = {"laterality": None, "scan_pattern": "volume" if image.shape[0] > 1 else "line",
                            "acquired": None, "device": None,
                            "layer_rows": "0-based (the file's MATLAB 1-based rows minus 1)"}
    warnings = ["a Duke .mat file carries no voxel size (Chiu 2015 gives about 123 x 3.87 x 11.3 µm)"]
    labels, annotated = None, []
    fluid = arrays.get(f"manualFluid{grader}")
    if fluid is not None:
        fluid = np.moveaxis(fluid if fluid.ndim == 3 else fluid[..., None], -1, 0)
        if fluid.shape != image.shape:
            raise ReadError(path, f"manualFluid{grader} of shape {fluid.shape} does not match images {image.shape}")
        fluid = fluid.astype(np.float32, copy=False)
        annotated = [z for z in range(fluid.shape[0]) if not np.isnan(fluid[z]).all()]
        labels = np.ascontiguousarray(np.nan_to_num(fluid, nan=0.0) > 0).astype(np.uint8)
    layers = _duke_layers(path, arrays.get(f"manualLayers{grader}"), image.shape)
    if fluid is not None and not np.isnan(fluid).any() and layers:
        # no NaN marks the unannotated B-scans: those the grader drew layers on are the annotated ones
        drawn = sorted({z for rows in layers.values() for z in np.flatnonzero(~np.isnan(rows).all(axis=1))})
        if drawn and len(drawn) < fluid.shape[0]:
            annotated = [int(z) for z in drawn]
            unmarked = sorted(set(range(fluid.shape[0])) - set(annotated))
            if labels[unmarked].any():  # fluid drawn where no layers are: keep every B-scan with fluid
                annotated = sorted(set(annotated) | {int(z) for z in unmarked if labels[z].any()})
            warnings.append(f"manualFluid{grader} marks no B-scan as unannotated (no NaN): the {len(annotated)} "
                            f"B-scans with grader {grader}'s layers (or fluid) are taken as annotated")
    return _volume(_image_dtype(image), None, layers=layers, layers_source=f"grader {grader}" if layers else None,
                   meta=meta, manual_labels=labels, annotated=annotated, warnings=warnings)


def _duke_layers(path: Path, arr: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    if arr is None:
        return {}
    arr = arr if arr.ndim == 3 else arr[..., None]  # (n, X, Z)
    if arr.shape[1:] != (shape[2], shape[0]):
        raise ReadError(path, f"layer array of shape {arr.shape} does not match {shape[0]} B-scans "
                              f"of {shape[2]} A-scans")
    names = _DUKE_LAYERS if arr.shape[0] == len(_DUKE_LAYERS) else [f"layer_{i}" for i in range(arr.shape[0])]
    return _layers((name, arr[i].T.astype(np.float32) - 1) for i, name in enumerate(names))


def _check_duke_shapes(path: Path, shapes: dict[str, tuple[int, ...]], wanted: list[str],
                       max_voxels: int | None) -> None:
    """``shapes``: every variable's (MATLAB-order) shape; those ``wanted`` are checked against the limit."""
    if "images" not in shapes:
        listed = ", ".join(sorted(shapes)[:10]) or "none"
        raise ReadError(path, f"no 'images' variable: not a Duke DME .mat file (variables: {listed})")
    for name in wanted:
        if name in shapes:
            check_voxels(path, shapes[name], max_voxels, name)


def _mat5(path: Path, wanted: list[str], max_voxels: int | None) -> dict[str, np.ndarray]:
    import scipy.io

    with path.open("rb") as fh:
        head = fh.read(128)
    if not head.startswith(b"MATLAB 5.0 MAT-file") or head[126:128] not in (b"IM", b"MI"):
        raise ReadError(path, f"not a MATLAB v5 or v7.3 .mat file (starts {head[:19]!r})")
    _mat5_check_length(path, "<" if head[126:128] == b"IM" else ">")
    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(path)}
        _check_duke_shapes(path, shapes, wanted, max_voxels)
        loaded = scipy.io.loadmat(path, variable_names=[k for k in wanted if k in shapes])
    except ReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ReadError(path, f"truncated or corrupt .mat file ({_one_line(e)})") from e
    return {k: np.asarray(loaded[k]) for k in wanted if k in loaded}


def _mat5_check_length(path: Path, endian: str) -> None:
    """Every top-level data element (8-byte tag: type, length) must end inside the file."""
    size, pos = path.stat().st_size, 128
    with path.open("rb") as fh:
        while pos < size:
            fh.seek(pos)
            tag = fh.read(8)
            if len(tag) < 8:
                raise ReadError(path, f"truncated .mat file (a partial element header at byte {pos:,})")
            mtype, nbytes = struct.unpack(endian + "2I", tag)
            pos += 8 + nbytes + (-nbytes % 8 if mtype != 15 else 0)  # miCOMPRESSED (15) is not padded
            if pos > size + 7:
                raise ReadError(path, f"truncated .mat file (an element needs {pos:,} bytes, the file has {size:,})")


def _mat73(path: Path, wanted: list[str], max_voxels: int | None) -> dict[str, np.ndarray]:
    """MATLAB v7.3 (HDF5): h5py gives the axes reversed, so each array is transposed back to MATLAB order."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ReadError(path, f"truncated or corrupt MATLAB v7.3 (HDF5) file ({_one_line(e)})") from e
    with f:
        found = {k: d for k, d in f.items() if isinstance(d, h5py.Dataset)}
        _check_duke_shapes(path, {k: tuple(reversed(d.shape)) for k, d in found.items()}, wanted, max_voxels)
        found = {k: found[k] for k in wanted if k in found}
        return {k: np.asarray(d[()]).T for k, d in found.items()}


# ---------------------------------------------------------------------------------------- DICOM


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


def _read_dicom(path: Path, max_voxels: int | None, grader: int) -> ScanVolume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size="256 KB")
    except InvalidDicomError as e:
        raise ReadError(path, f"not a DICOM file ({_one_line(e)})") from e
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
        "acquired": next(filter(None, (_iso_date(ds.get(k)) for k in (
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
    return _volume(_image_dtype(image), _dicom_scale(ds, image.shape[0], meta, warnings), meta=meta,
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
            raise ReadError(path, f"cannot decode transfer syntax {ts.name} ({ts}): {_one_line(e)}") from e
        raise ReadError(path, f"truncated or corrupt pixel data ({_one_line(e)})") from e
    if frames == 1:
        arr = arr[None]
    if spp > 1:
        arr = np.stack([_grey(a, path, "colour frame") for a in arr])
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
    return _scale_um(z, row, col, nz, meta, warnings)


def _dicom_laterality(ds: Any) -> str | None:
    anatomy = _first_item(ds, "SharedFunctionalGroupsSequence", "FrameAnatomySequence")
    values = [ds.get("ImageLaterality"), ds.get("Laterality"), anatomy.get("FrameLaterality") if anatomy else None]
    return next(filter(None, map(_laterality, values)), None)


def _dicom_identifiers(ds: Any) -> dict[str, str]:
    """Listed identifying keywords and every person name, anywhere in the data set (pixels skipped)."""
    ids: dict[str, str] = {}
    for kw in ("MediaStorageSOPInstanceUID",):
        _put(ids, kw, ds.file_meta.get(kw))
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
                _put(ids, key, v)
                if el.VR == "PN":
                    for part in ("family_name", "given_name", "middle_name"):
                        _put(ids, f"{key}.{part}", getattr(v, part, ""))
