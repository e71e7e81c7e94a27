"""HEYEX XML exports of Heidelberg devices: an XML file naming its B-scan and localizer images, or its folder.

The XML is parsed here with ElementTree rather than by eyepy's ``HeXmlReader``, which fails on
single-B-scan exports (``get_bscan_spacing`` indexes an empty list), caches the parsed XML per path
and cannot check the B-scan files' sizes before reading them. Tested on a real export (eyepy's test
data). A folder holding exactly one ``.xml`` whose root element is ``HEDX`` is read as that export;
the export's fingerprint covers the XML and the images it names (:func:`heyex_xml_files`).
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels, one_line
from octseg.tasks.readers.headers import (
    add_identifier,
    boundary_layers,
    floats_as_float32,
    grey,
    iso_date,
    laterality,
    new_volume,
    positive,
    scale_um,
)
from octseg.tasks.readers.heidelberg import ANGIOGRAPHY, HEIDELBERG

__all__ = ["XML", "HeyexXmlReader", "export_xml", "heyex_xml_files", "is_heyex_xml"]


def is_heyex_xml(path: Path) -> bool:
    """Whether the regular file ``path`` is a HEYEX XML export (its root element, ``HEDX``, in the first 512 bytes)."""
    with path.open("rb") as fh:
        return b"<HEDX" in fh.read(512)


def export_xml(folder: Path) -> Path | None:
    """The HEYEX XML file of an export folder (one ``.xml`` whose root element is ``HEDX``), else None."""
    xmls = [f for f in folder.iterdir() if f.suffix.lower() == ".xml" and f.is_file()]  # is_file: no FIFO
    return xmls[0] if len(xmls) == 1 and is_heyex_xml(xmls[0]) else None


class HeyexXmlReader(ExportReader):
    """A HEYEX XML file, or the folder of an export (read as its XML; the volume's source is the folder)."""

    name, suffixes, label = "heyex-xml", (".xml",), HEIDELBERG

    def sniff(self, path: Path) -> bool:
        return path.is_dir() and export_xml(path) is not None

    def fingerprint_files(self, path: Path) -> list[Path]:
        xml = export_xml(path) if path.is_dir() else path
        return [xml, *heyex_xml_files(xml)]

    def read(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        xml = export_xml(path) if path.is_dir() else path
        if xml is None:
            raise ReadError(path, "not a HEYEX export folder (it holds no single HEYEX .xml file)")
        return super().read(xml, limits, options)

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_heyex_xml(path, limits.max_voxels)


XML = HeyexXmlReader()


def _read_heyex_xml(path: Path, max_voxels: int | None) -> ScanVolume:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ReadError(path, f"not well-formed XML ({e})") from e
    body = root.find("BODY")
    if root.tag != "HEDX" or body is None or body.find("Patient") is None:
        raise ReadError(path, f"not a HEYEX XML export (root <{root.tag}>, expected <HEDX><BODY><Patient>)")
    _check_modality(path, body)
    octs = body.findall(".//ImageType[Type='OCT']..")
    if not octs:
        localizers = body.findall(".//ImageType[Type='LOCALIZER']..")
        if localizers:
            raise ReadError(path, f"an SLO-only export: {len(localizers)} localizer (fundus) image(s) and no OCT B-scans")
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
        "laterality": laterality(body.findtext("Patient/Study/Series/Laterality")), "scan_pattern": pattern,
        "acquired": _xml_date(body.find("Patient/Study/Series/ExamDate/Date"))
        or _xml_date(body.find("Patient/Study/StudyDate/Date")),
        "device": " ".join(filter(None, (body.findtext(f".//GeneralEquipment/{t}", "").strip()
                                          for t in ("Manufacturer", "ManufacturerModelName")))) or None,
    }
    ctx = octs[0].find("OphthalmicAcquisitionContext")
    scale = scale_um(_xml_spacing(octs), ctx.findtext("ScaleY"), ctx.findtext("ScaleX"), len(octs), meta,
                      warnings, single=pattern in ("circle", "radial"))
    layers = _xml_layers(octs, w, warnings)
    fundus, fundus_scale, fundus_file = _xml_fundus(path, body, max_voxels)
    return new_volume(image, scale, files=[path, *files, *([fundus_file] if fundus_file else [])], layers=layers,
                   layers_source="device" if layers else None, fundus=fundus, fundus_scale_um=fundus_scale,
                   meta=meta, identifiers=_xml_identifiers(body), warnings=warnings)


def heyex_xml_files(path: str | Path) -> list[Path]:
    """The image files beside a HEYEX XML export that it names (B-scans, localizer), for its fingerprint:
    a changed B-scan TIFF beside an unchanged XML is a changed source. Empty when the XML is unreadable
    or not a HEYEX export (root element ``HEDX``)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError):
        return []
    if root.tag != "HEDX":
        return []
    names = [_exam_name(url.text or "") for url in root.iter("ExamURL")]
    found = {path.parent / n for n in names if n and n not in (".", "..")}
    return sorted(f for f in found if f.is_file())


def _exam_name(url: str) -> str:
    """The file name an ExamURL ends with (Windows or POSIX separators); the image lies beside the XML."""
    return re.split(r"[\\/]", url.strip())[-1]


def _check_modality(path: Path, body: ET.Element) -> None:
    """The export's series must be OCT (its Modality, where given) and not OCT angiography (its
    ModalityProcedure or Type naming angiography or flow)."""
    for series in body.findall("Patient/Study/Series"):
        modality = (series.findtext("Modality") or "").strip()
        said = [t for t in ((series.findtext(k) or "").strip() for k in ("ModalityProcedure", "Type")) if t]
        if modality and modality.upper() != "OCT":
            raise ReadError(path, f"not OCT: the export's series has Modality {modality!r}"
                                  + (f" ({', '.join(said)})" if said else ""))
        if any(ANGIOGRAPHY.search(t) for t in (modality, *said)):
            raise ReadError(path, f"an OCT angiography export ({', '.join(map(repr, said))}): flow data, not "
                                  f"structural B-scans")


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
    """One exported B-scan or fundus image as 2-D grey, its size checked before decoding; a TIFF checked as
    every TIFF is (:mod:`octseg.tasks.readers.tiff`: whole, not cut short), and of one page."""
    from PIL import Image

    from octseg.tasks.readers.tiff import read_tiff_pages, tiff_layout

    try:
        if f.suffix.lower() in (".tif", ".tiff"):
            layout = tiff_layout(f, max_voxels)
            if layout.bscans != 1:
                raise ReadError(f, f"{layout.bscans} pages where the export names one image")
            arr = read_tiff_pages(f, layout)
        else:
            with Image.open(f) as img:
                check_voxels(f, (img.height, img.width), max_voxels)
                arr = np.asarray(img)
    except ReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ReadError(f, f"unreadable image ({one_line(e)})") from e
    arr = grey(arr, f, "image")
    if shape is not None and arr.shape != shape:
        raise ReadError(f, f"image of {arr.shape[0]} x {arr.shape[1]}, the XML says {shape[0]} x {shape[1]}")
    return floats_as_float32(arr)


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
    return iso_date("-".join(parts))


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
    return boundary_layers(maps.items())


def _xml_fundus(path: Path, body: ET.Element, max_voxels: int | None) -> tuple[Any, Any, Path | None]:
    loc = body.find(".//ImageType[Type='LOCALIZER']..")
    if loc is None:
        return None, None, None
    f = _xml_file(path, loc)
    ctx = loc.find("OphthalmicAcquisitionContext")
    sy, sx = ctx.findtext("ScaleY"), ctx.findtext("ScaleX")
    scale = (float(sy) * 1000, float(sx) * 1000) if positive(sy) and positive(sx) else None
    return _xml_image(f, None, max_voxels), scale, f


def _xml_identifiers(body: ET.Element) -> dict[str, str]:
    ids: dict[str, str] = {}
    patient = body.find("Patient")
    for tag, key in (("ID", "pid"), ("PatientID", "patient_id"), ("LastName", "last_name"),
                     ("FirstNames", "first_names"), ("Title", "title"), ("BirthName", "birth_name")):
        add_identifier(ids, key, patient.findtext(tag))
    add_identifier(ids, "birth_date", _xml_date(patient.find("Birthdate/Date")))
    for uid in patient.findall("PatientUIDList/PatientUID"):
        add_identifier(ids, "patient_uid_source", uid.findtext("Source"))
        add_identifier(ids, "patient_uid", uid.findtext("UID"))
    for path, key in (("Study/StudyUID", "study_uid"), ("Study/Operator", "operator"),
                      ("Study/ReferringPhysician", "referring_physician"), ("Study/Comment", "study_comment"),
                      ("Study/Series/SeriesUID", "series_uid"),
                      ("Study/Series/ReferenceSeries/SeriesUID", "series_uid"),
                      ("Study/Series/ProgID", "progression_id"), ("Study/Series/Comment", "series_comment")):
        for el in patient.findall(path):
            add_identifier(ids, key, el.text)
    known = {"ID", "PatientID", "LastName", "FirstNames", "Title", "BirthName", "Birthdate", "PatientUIDList",
             "Study", "Sex"}
    for el in patient:  # any other patient-level text (addresses, phone numbers, ...)
        if el.tag not in known and len(el) == 0:
            add_identifier(ids, f"patient.{el.tag}", el.text)
    return ids
