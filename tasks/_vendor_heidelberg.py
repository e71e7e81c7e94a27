"""Private to :mod:`octseg.tasks.vendor`: Heidelberg ``.vol``, ``.e2e`` and HEYEX XML exports (eyepy)."""
from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks._vendor_common import (
    _HE_PATTERNS,
    _grey,
    _image_dtype,
    _iso_date,
    _laterality,
    _layers,
    _one_line,
    _put,
    _scale_um,
    _valid,
    _volume,
)
from octseg.tasks.readers import ReadError, ScanVolume, check_voxels

# ------------------------------------------------------------------------------ Heidelberg .vol


_VOL_HEADER = 2048
_BSCAN_HEADER = 256


def _vol_preflight(path: Path, max_voxels: int | None) -> None:
    """Check magic, sizes and file length from the headers before eyepy reads every byte."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(_VOL_HEADER)
        if not head.startswith((b"HSF-OCT", b"ep-v")):
            raise ReadError(path, f"not a Heidelberg .vol file (magic {head[:12]!r}, expected b'HSF-OCT-...')")
        if len(head) < _VOL_HEADER:
            raise ReadError(path, f"truncated .vol header ({len(head)} of {_VOL_HEADER} bytes)")
        sx, nb, sy = struct.unpack_from("<3I", head, 12)
        slo_x, slo_y = struct.unpack_from("<2I", head, 48)
        if nb == 0 or sx == 0 or sy == 0:
            raise ReadError(path, f"header gives an empty volume ({nb} B-scans of {sy} x {sx})")
        check_voxels(path, (nb, sy, sx), max_voxels)
        check_voxels(path, (slo_y, slo_x), max_voxels, "SLO image")
        pos, bscan_bytes = _VOL_HEADER + slo_x * slo_y, sx * sy * 4
        least = pos + nb * (_BSCAN_HEADER + bscan_bytes)
        if least > size:
            raise ReadError(path, f"truncated: the header promises {nb} B-scans of {sy} x {sx} and a "
                                  f"{slo_y} x {slo_x} SLO ({least:,} bytes at least), the file has {size:,}")
        for i in range(nb):
            fh.seek(pos)
            bh = fh.read(_BSCAN_HEADER)
            hdr_size, n_seg = struct.unpack_from("<I", bh, 12)[0], struct.unpack_from("<I", bh, 48)[0]
            if hdr_size < _BSCAN_HEADER + n_seg * 4 * sx:
                raise ReadError(path, f"B-scan {i}: a header of {hdr_size} bytes cannot hold {n_seg} layers")
            pos += hdr_size + bscan_bytes
            if pos > size:
                raise ReadError(path, f"truncated at B-scan {i} of {nb} (needs {pos:,} bytes, the file has {size:,})")


def _read_heyex_vol(path: Path, max_voxels: int | None, grader: int) -> ScanVolume:
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io.he.vol_reader import SEG_MAPPING, HeVolReader

    _vol_preflight(path, max_voxels)
    reader = HeVolReader(path)
    pf = reader.parsed_file
    raw = np.stack([b.data for b in pf.bscans]).astype(np.float32)  # a writable copy
    image = vol_intensity_transform(raw)
    pattern = _HE_PATTERNS.get(pf.scan_pattern, "unknown")
    meta: dict[str, Any] = {
        "laterality": _laterality(pf.scan_position), "scan_pattern": pattern,
        "acquired": _iso_date(pf.exam_time) or _iso_date(pf.visit_date), "device": "Heidelberg Engineering",
        "file_version": str(pf.version).strip(), "intensity": "heyex-vol display transform of raw float32 (eyepy)",
    }
    warnings: list[str] = []
    scale = _scale_um(pf.distance, pf.scale_y, pf.scale_x, image.shape[0], meta, warnings,
                      single=pattern in ("circle", "radial"))
    names = {i: name for name, i in SEG_MAPPING.items()}
    layers = _layers((names.get(i, f"layer_{i}"), a) for i, a in enumerate(reader.layers))
    fundus = np.array(pf.localizer) if pf.size_x_slo and pf.size_y_slo else None
    fundus_scale = ((pf.scale_y_slo * 1000, pf.scale_x_slo * 1000)
                    if fundus is not None and _valid(pf.scale_x_slo) and _valid(pf.scale_y_slo) else None)
    ids: dict[str, str] = {}
    _put(ids, "patient_id", pf.patient_id)
    _put(ids, "pid", pf.pid)  # HEYEX's internal patient number
    _put(ids, "birth_date", _iso_date(pf.dob))
    _put(ids, "visit_id", pf.visit_id)
    _put(ids, "vid", pf.vid)  # internal visit number
    _put(ids, "progression_id", pf.prog_id)  # shared by all scans of a patient's progression
    return _volume(image, scale, layers=layers, layers_source="device" if layers else None, fundus=fundus,
                   fundus_scale_um=fundus_scale, meta=meta, identifiers=ids, warnings=warnings)


# ------------------------------------------------------------------------------ Heidelberg .e2e


def _read_heyex_e2e(path: Path, max_voxels: int | None, grader: int) -> ScanVolume:
    """The first OCT series of an E2E file (eyepy's reader; tested on synthetic files only)."""
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he import HeE2eReader
    from eyepy.io.he.e2e_format import TypesEnum
    from eyepy.io.he.vol_reader import SEG_MAPPING

    with path.open("rb") as fh:
        head = fh.read(0x24 + 7)
    if head[:4] != b"CMDb" or head[0x24:0x24 + 7] != b"MDbMDir":
        raise ReadError(path, f"not a Heidelberg .e2e file (magic {head[:4]!r}, expected b'CMDb' ... b'MDbMDir')")
    reader = HeE2eReader(path)  # indexes the folder headers only
    size = path.stat().st_size
    for folder in getattr(reader.file_hierarchy, "all_folders", []):
        if folder.start + 60 + folder.size > size:
            raise ReadError(path, f"truncated: a data container needs {folder.start + 60 + folder.size:,} bytes, "
                                  f"the file has {size:,}")
    with reader:
        series = [s for s in reader.series
                  if any(TypesEnum.bscanmeta in sl.folders for sl in s.slices.values())]
        if not series:
            raise ReadError(path, "no OCT series in the .e2e file (truncated, or only fundus images)")
        s, warnings = series[0], []
        if len(series) > 1:
            warnings.append(f"{len(series)} OCT series in the file: only the first (id {s.id}) was read")
        first = s.get_bscan_meta()[0]
        check_voxels(path, (s.n_bscans, int(first["size_y"]), int(first["size_x"])), max_voxels)
        image = from_e2e_intensity(s.get_bscans())
        names = {i: name for name, i in SEG_MAPPING.items()}
        found = _guard(s.get_layers)  # a series without layer annotations has none (eyepy raises KeyError)
        if found is None:
            warnings.append("no layer boundaries in the series")
        layers = _layers((names.get(i, f"layer_{i}"), a) for i, a in sorted((found or {}).items()))
        pattern = _HE_PATTERNS.get(int(first["scan_pattern"]), "unknown")
        meta = {"laterality": _e2e_laterality(s, TypesEnum), "scan_pattern": pattern,
                "acquired": _guard(s._series_date_iso), "device": _guard(lambda: s._study_text(TypesEnum.device, 0)),
                "intensity": "heyex-e2e display transform (eyepy from_e2e_intensity)"}
        scale = _e2e_scale(s, first, image.shape[0], meta, warnings, pattern)
        fundus = _guard(lambda: np.asarray(s.get_localizer().data))
        ids = _e2e_identifiers(s, TypesEnum)
    return _volume(image, scale, layers=layers, layers_source="device" if layers else None, fundus=fundus,
                   meta=meta, identifiers=ids, warnings=warnings)


def _guard(fn: Callable[[], Any]) -> Any:
    """fn() or None: for E2E details eyepy derives from partly understood fields."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _e2e_laterality(s: Any, types: Any) -> str | None:
    folders = s.folders.get(types.laterality, [])
    return _laterality(getattr(folders[0].data.laterality, "name", None)) if folders else None


def _e2e_scale(s: Any, first: Any, nz: int, meta: dict, warnings: list[str], pattern: str) -> Any:
    """Axial size from the B-scan meta; lateral and B-scan spacing as eyepy derives them (assumes a medium eye)."""
    x_um = _guard(lambda: s.get_x_scale_derivation()["scaling_x_um_per_pixel"])
    span = _guard(s._bscan_vertical_span_deg)
    um_per_deg = _guard(lambda: s.get_x_scale_derivation()["constant_um_per_deg"])
    z_mm = span * um_per_deg / (nz - 1) / 1000 if nz > 1 and span and um_per_deg else None
    meta["scale_source"] = "lateral and B-scan spacing derived by eyepy from scan angles (medium eye)"
    return _scale_um(z_mm, first["scale_y"], None if x_um is None else x_um / 1000, nz, meta, warnings,
                     single=pattern in ("circle", "radial"))


def _e2e_identifiers(s: Any, types: Any) -> dict[str, str]:
    ids: dict[str, str] = {}
    patient = _guard(lambda: s._first_patient_folder(types.patient).data)
    if patient is not None:
        _put(ids, "first_name", patient.firstname)
        _put(ids, "surname", patient.surname)
        _put(ids, "patient_id", patient.patient_id)
        _put(ids, "birthdate_raw", patient.birthdate)  # encoding unknown: kept as the stored number
    for key, folder_type in (("study_name", types.studyname), ("diagnosis", types.diagnose)):
        text = _guard(lambda t=folder_type: s._first_study_folder(t).data.text) or \
            _guard(lambda t=folder_type: s._first_series_folder(t).data.text) or []
        for t in text:
            _put(ids, key, t)
    return ids


# ------------------------------------------------------------------------------------ HEYEX XML


def _read_heyex_xml(path: Path, max_voxels: int | None, grader: int) -> ScanVolume:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ReadError(path, f"not well-formed XML ({e})") from e
    body = root.find("BODY")
    if root.tag != "HEDX" or body is None or body.find("Patient") is None:
        raise ReadError(path, f"not a HEYEX XML export (root <{root.tag}>, expected <HEDX><BODY><Patient>)")
    octs = body.findall(".//ImageType[Type='OCT']..")
    if not octs:
        raise ReadError(path, "the export holds no OCT B-scans")
    sizes = {(_xml_int(path, i, "Height"), _xml_int(path, i, "Width")) for i in octs}
    if len(sizes) > 1:
        raise ReadError(path, f"B-scans of different sizes {sorted(sizes)}")
    (h, w), = sizes
    check_voxels(path, (len(octs), h, w), max_voxels)
    files = [_xml_file(path, i) for i in octs]
    image = np.stack([_xml_image(f, (h, w), max_voxels) for f in files])
    warnings: list[str] = []
    series = body.find("Patient/Study/Series")
    pattern = _xml_pattern(series)
    meta: dict[str, Any] = {
        "laterality": _laterality(body.findtext("Patient/Study/Series/Laterality")), "scan_pattern": pattern,
        "acquired": _xml_date(body.find("Patient/Study/Series/ExamDate/Date"))
        or _xml_date(body.find("Patient/Study/StudyDate/Date")),
        "device": " ".join(filter(None, (body.findtext(f".//GeneralEquipment/{t}", "").strip()
                                          for t in ("Manufacturer", "ManufacturerModelName")))) or None,
    }
    ctx = octs[0].find("OphthalmicAcquisitionContext")
    scale = _scale_um(_xml_spacing(octs), ctx.findtext("ScaleY"), ctx.findtext("ScaleX"), len(octs), meta,
                      warnings, single=pattern in ("circle", "radial"))
    layers = _xml_layers(octs, w, warnings)
    fundus, fundus_scale, fundus_file = _xml_fundus(path, body, max_voxels)
    return _volume(image, scale, files=[path, *files, *([fundus_file] if fundus_file else [])], layers=layers,
                   layers_source="device" if layers else None, fundus=fundus, fundus_scale_um=fundus_scale,
                   meta=meta, identifiers=_xml_identifiers(body), warnings=warnings)


def heyex_xml_files(path: str | Path) -> list[Path]:
    """The image files beside a HEYEX XML export that it names (B-scans, localizer), for its fingerprint:
    a changed B-scan TIFF beside an unchanged XML is a changed source. Empty when the XML is unreadable."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError):
        return []
    names = [_exam_name(url.text or "") for url in root.iter("ExamURL")]
    found = {path.parent / n for n in names if n and n not in (".", "..")}
    return sorted(f for f in found if f.is_file())


def _exam_name(url: str) -> str:
    """The file name an ExamURL ends with (Windows or POSIX separators); the image lies beside the XML."""
    return re.split(r"[\\/]", url.strip())[-1]


def _xml_int(path: Path, image: ET.Element, tag: str) -> int:
    text = image.findtext(f"OphthalmicAcquisitionContext/{tag}")
    if text is None or not text.strip().isdigit():
        raise ReadError(path, f"image {image.findtext('ID')}: missing or invalid {tag} ({text!r})")
    return int(text)


def _xml_file(path: Path, image: ET.Element) -> Path:
    """The image file an <Image> names (its ExamURL's last component, beside the XML): a regular file that
    stays inside the export folder (a symbolic link out of it is refused, never read)."""
    url = (image.findtext("ImageData/ExamURL") or "").strip()
    name = _exam_name(url)
    if not name or name in (".", ".."):
        raise ReadError(path, f"image {image.findtext('ID')}: no image file in ExamURL {url!r}")
    f = path.parent / name
    if not f.exists():
        raise ReadError(path, f"missing image file {name} (referenced by image {image.findtext('ID')})")
    if f.resolve().parent != path.parent.resolve():
        raise ReadError(path, f"image file {name} links outside the export folder; refused")
    if not f.is_file():
        raise ReadError(path, f"image file {name} is not a regular file")
    return f


def _xml_image(f: Path, shape: tuple[int, ...] | None, max_voxels: int | None) -> np.ndarray:
    """One exported B-scan or fundus image as 2-D grey, its size checked before decoding."""
    import tifffile
    from PIL import Image

    try:
        if f.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(f) as tif:
                check_voxels(f, tif.series[0].shape, max_voxels)
                arr = tif.series[0].asarray()
        else:
            with Image.open(f) as img:
                check_voxels(f, (img.height, img.width), max_voxels)
                arr = np.asarray(img)
    except ReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ReadError(f, f"unreadable image ({_one_line(e)})") from e
    arr = _grey(arr, f, "image")
    if shape is not None and arr.shape != shape:
        raise ReadError(f, f"image of {arr.shape[0]} x {arr.shape[1]}, the XML says {shape[0]} x {shape[1]}")
    return _image_dtype(arr)


def _xml_pattern(series: ET.Element | None) -> str:
    text = (series.findtext("Type") if series is not None else "") or ""
    for key, pattern in (("volume", "volume"), ("circle", "circle"), ("radial", "radial"), ("star", "radial"),
                         ("line", "line")):
        if key in text.lower():
            return pattern
    return "unknown"


def _xml_date(date: ET.Element | None) -> str | None:
    if date is None:
        return None
    parts = (date.findtext(t, "").strip().zfill(n) for t, n in (("Year", 4), ("Month", 2), ("Day", 2)))
    return _iso_date("-".join(parts))


def _xml_spacing(octs: list[ET.Element]) -> float | None:
    """Mean distance (mm) between neighbouring B-scans' start and end points, as eyepy computes it."""
    def point(img: ET.Element, end: str) -> tuple[float, float]:
        c = f"OphthalmicAcquisitionContext/{end}/Coord/"
        return float(img.findtext(c + "X")), float(img.findtext(c + "Y"))

    try:
        dists = [math.dist(point(a, e), point(b, e)) for a, b in zip(octs, octs[1:]) for e in ("Start", "End")]
    except (TypeError, ValueError):
        return None
    return float(np.mean(dists)) if dists else None


def _xml_layers(octs: list[ET.Element], width: int, warnings: list[str]) -> dict[str, np.ndarray]:
    maps: dict[str, np.ndarray] = {}
    for z, img in enumerate(octs):
        for line in img.findall("Segmentation/SegLine"):
            name, text = line.findtext("Name", "").strip(), line.findtext("Array", "")
            try:
                values = np.array(text.split(), dtype=np.float32)
            except ValueError:
                values = np.zeros(0, np.float32)
            if not name or values.size != width:
                warnings.append(f"B-scan {z}: layer {name!r} with {values.size} values for {width} A-scans dropped")
                continue
            maps.setdefault(name, np.full((len(octs), width), np.nan, np.float32))[z] = values
    return _layers(maps.items())


def _xml_fundus(path: Path, body: ET.Element, max_voxels: int | None) -> tuple[Any, Any, Path | None]:
    loc = body.find(".//ImageType[Type='LOCALIZER']..")
    if loc is None:
        return None, None, None
    f = _xml_file(path, loc)
    ctx = loc.find("OphthalmicAcquisitionContext")
    sy, sx = ctx.findtext("ScaleY"), ctx.findtext("ScaleX")
    scale = (float(sy) * 1000, float(sx) * 1000) if _valid(sy) and _valid(sx) else None
    return _xml_image(f, None, max_voxels), scale, f


def _xml_identifiers(body: ET.Element) -> dict[str, str]:
    ids: dict[str, str] = {}
    patient = body.find("Patient")
    for tag, key in (("ID", "pid"), ("PatientID", "patient_id"), ("LastName", "last_name"),
                     ("FirstNames", "first_names"), ("Title", "title"), ("BirthName", "birth_name")):
        _put(ids, key, patient.findtext(tag))
    _put(ids, "birth_date", _xml_date(patient.find("Birthdate/Date")))
    for uid in patient.findall("PatientUIDList/PatientUID"):
        _put(ids, "patient_uid_source", uid.findtext("Source"))
        _put(ids, "patient_uid", uid.findtext("UID"))
    for path, key in (("Study/StudyUID", "study_uid"), ("Study/Operator", "operator"),
                      ("Study/ReferringPhysician", "referring_physician"), ("Study/Comment", "study_comment"),
                      ("Study/Series/SeriesUID", "series_uid"),
                      ("Study/Series/ReferenceSeries/SeriesUID", "series_uid"),
                      ("Study/Series/ProgID", "progression_id"), ("Study/Series/Comment", "series_comment")):
        for el in patient.findall(path):
            _put(ids, key, el.text)
    known = {"ID", "PatientID", "LastName", "FirstNames", "Title", "BirthName", "Birthdate", "PatientUIDList",
             "Study", "Sex"}
    for el in patient:  # any other patient-level text (addresses, phone numbers, ...)
        if el.tag not in known and len(el) == 0:
            _put(ids, f"patient.{el.tag}", el.text)
    return ids
