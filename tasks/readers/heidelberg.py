"""Heidelberg Engineering ``.vol`` and ``.e2e`` files, read with eyepy (imported only when such a file is read).

``.vol`` (all scan patterns: eyepy's ``import_heyex_vol`` refuses circle scans, so its ``HeVolReader``
is used directly) is tested on real files; ``.e2e`` (the first OCT series) on synthetic files only.
Both check sizes and lengths from their headers before eyepy reads the pixels. HEYEX XML exports are
:mod:`octseg.tasks.readers.heyex_xml`.
"""
from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels
from octseg.tasks.readers.headers import (
    add_identifier,
    boundary_layers,
    iso_date,
    laterality,
    new_volume,
    positive,
    scale_um,
)

__all__ = ["ANGIOGRAPHY", "E2E", "HEIDELBERG", "HE_PATTERNS", "VOL", "HeyexE2eReader", "HeyexVolReader"]

HEIDELBERG = "Heidelberg .vol/.e2e/HEYEX .xml"  # how --help names the family
# Heidelberg scan pattern codes (.vol header, E2E B-scan meta) -> meta["scan_pattern"]
HE_PATTERNS = {0: "unknown", 1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}

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
        if nb == 0 and slo_x and slo_y:
            raise ReadError(path, f"an SLO-only export: a {slo_y} x {slo_x} fundus image and no OCT B-scans")
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


def _read_heyex_vol(path: Path, max_voxels: int | None) -> ScanVolume:
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io.he.vol_reader import SEG_MAPPING, HeVolReader

    _vol_preflight(path, max_voxels)
    reader = HeVolReader(path)
    pf = reader.parsed_file
    raw = np.stack([b.data for b in pf.bscans]).astype(np.float32)  # a writable copy
    image = vol_intensity_transform(raw)
    pattern = HE_PATTERNS.get(pf.scan_pattern, "unknown")
    meta: dict[str, Any] = {
        "laterality": laterality(pf.scan_position), "scan_pattern": pattern,
        "acquired": iso_date(pf.exam_time) or iso_date(pf.visit_date), "device": "Heidelberg Engineering",
        "file_version": str(pf.version).strip(), "intensity": "heyex-vol display transform of raw float32 (eyepy)",
    }
    warnings: list[str] = []
    scale = scale_um(pf.distance, pf.scale_y, pf.scale_x, image.shape[0], meta, warnings,
                      single=pattern in ("circle", "radial"))
    names = {i: name for name, i in SEG_MAPPING.items()}
    layers = boundary_layers((names.get(i, f"layer_{i}"), a) for i, a in enumerate(reader.layers))
    fundus = np.array(pf.localizer) if pf.size_x_slo and pf.size_y_slo else None
    fundus_scale = ((pf.scale_y_slo * 1000, pf.scale_x_slo * 1000)
                    if fundus is not None and positive(pf.scale_x_slo) and positive(pf.scale_y_slo) else None)
    ids: dict[str, str] = {}
    add_identifier(ids, "patient_id", pf.patient_id)
    add_identifier(ids, "pid", pf.pid)  # HEYEX's internal patient number
    add_identifier(ids, "birth_date", iso_date(pf.dob))
    add_identifier(ids, "visit_id", pf.visit_id)
    add_identifier(ids, "vid", pf.vid)  # internal visit number
    add_identifier(ids, "progression_id", pf.prog_id)  # shared by all scans of a patient's progression
    return new_volume(image, scale, layers=layers, layers_source="device" if layers else None, fundus=fundus,
                   fundus_scale_um=fundus_scale, meta=meta, identifiers=ids, warnings=warnings)


# ------------------------------------------------------------------------------ Heidelberg .e2e


_E2E_HEAD = 36 + 52  # version structure, then the main header; chunks follow
_E2E_CHUNK, _E2E_FOLDER, _E2E_CONTAINER = 52, 44, 60  # chunk header, folder header, data container header
_E2E_TEXTS = {17, 9000, 9001, 9005, 9006, 9007, 9008}  # containers of n_strings strings of string_size bytes


def _e2e_preflight(path: Path) -> None:
    """Walk the E2E index as eyepy will (chunks of folder headers, each chunk followed by the next at the end
    of its last folder's data) and refuse what would make eyepy loop, allocate without end or read a cut
    file: a chunk that leads back to one already read (eyepy's GreedyRange re-reads it forever), an
    index chunk or a data container cut by the end of the file, and text containers whose string count
    and size cannot fit (zero-byte strings are counted without reading anything)."""
    size = path.stat().st_size
    pos, seen = _E2E_HEAD, set()
    with path.open("rb") as fh:
        while pos < size:
            if pos in seen:
                raise ReadError(path, f"corrupt .e2e index: the chunk at byte {pos:,} leads back to itself")
            seen.add(pos)
            fh.seek(pos)
            head = fh.read(_E2E_CHUNK)
            if len(head) < _E2E_CHUNK:
                raise ReadError(path, f"truncated: an index chunk at byte {pos:,} is cut by the end of the file "
                                      f"({size:,} bytes)")
            entries = struct.unpack_from("<I", head, 36)[0]
            if entries == 0:
                return  # eyepy stops its index here
            need = pos + _E2E_CHUNK + entries * _E2E_FOLDER
            if need > size:
                raise ReadError(path, f"truncated: an index chunk at byte {pos:,} lists {entries:,} folders, "
                                      f"{need:,} bytes, the file has {size:,}")
            table = fh.read(entries * _E2E_FOLDER)
            for k in range(entries):
                start, length = struct.unpack_from("<2I", table, k * _E2E_FOLDER + 4)
                kind = struct.unpack_from("<I", table, k * _E2E_FOLDER + 36)[0]
                end = start + _E2E_CONTAINER + length
                if end > size:
                    raise ReadError(path, f"truncated: a data container needs {end:,} bytes, the file has {size:,}")
                if kind in _E2E_TEXTS and length:
                    fh.seek(start + _E2E_CONTAINER)
                    count = fh.read(8)
                    strings, each = struct.unpack("<2I", count) if len(count) == 8 else (0, 0)
                    if strings * max(each, 1) > length:
                        raise ReadError(path, f"corrupt .e2e: a text container of {length:,} bytes claims {strings:,} "
                                              f"strings of {each:,} bytes")
            pos = start + length + _E2E_CONTAINER  # eyepy's jump: after the last folder's data (padding
            # folders of start 0 send it back to byte 60, where it finds no entries and stops, as here)
            if len(seen) > 100_000:
                raise ReadError(path, "corrupt .e2e index: more than 100,000 chunks")


def _read_heyex_e2e(path: Path, max_voxels: int | None) -> ScanVolume:
    """The first OCT series of an E2E file (eyepy's reader; tested on synthetic files only)."""
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he import HeE2eReader
    from eyepy.io.he.e2e_format import TypesEnum
    from eyepy.io.he.vol_reader import SEG_MAPPING

    with path.open("rb") as fh:
        head = fh.read(0x24 + 7)
    if head[:4] != b"CMDb" or head[0x24:0x24 + 7] != b"MDbMDir":
        raise ReadError(path, f"not a Heidelberg .e2e file (magic {head[:4]!r}, expected b'CMDb' ... b'MDbMDir')")
    _e2e_preflight(path)
    reader = HeE2eReader(path)  # indexes the folder headers, parses the small containers
    with reader:
        with_bscans = [s for s in reader.series
                       if any(TypesEnum.bscanmeta in sl.folders for sl in s.slices.values())]
        series = [s for s in with_bscans if not _e2e_angiography(s, TypesEnum)]
        if not series:
            raise ReadError(path, _e2e_no_oct(reader.series, with_bscans, TypesEnum))
        s, warnings = series[0], []
        if len(series) > 1:
            warnings.append(f"{len(series)} OCT series in the file: only the first (id {s.id}) was read")
        if len(with_bscans) > len(series):
            warnings.append(f"{len(with_bscans) - len(series)} OCT angiography series left out (flow data, "
                            f"not structural B-scans)")
        first = s.get_bscan_meta()[0]
        check_voxels(path, (s.n_bscans, int(first["size_y"]), int(first["size_x"])), max_voxels)
        image = from_e2e_intensity(s.get_bscans())
        names = {i: name for name, i in SEG_MAPPING.items()}
        found = _guard(s.get_layers)  # a series without layer annotations has none (eyepy raises KeyError)
        if found is None:
            warnings.append("no layer boundaries in the series")
        layers = boundary_layers((names.get(i, f"layer_{i}"), a) for i, a in sorted((found or {}).items()))
        pattern = HE_PATTERNS.get(int(first["scan_pattern"]), "unknown")
        meta = {"laterality": _e2e_laterality(s, TypesEnum), "scan_pattern": pattern,
                "acquired": _guard(s._series_date_iso), "device": _guard(lambda: s._study_text(TypesEnum.device, 0)),
                "intensity": "heyex-e2e display transform (eyepy from_e2e_intensity)"}
        scale = _e2e_scale(s, first, image.shape[0], meta, warnings, pattern)
        fundus = _guard(lambda: np.asarray(s.get_localizer().data))
        ids = _e2e_identifiers(s, TypesEnum)
    return new_volume(image, scale, layers=layers, layers_source="device" if layers else None, fundus=fundus,
                   meta=meta, identifiers=ids, warnings=warnings)


# what names an OCT-A series or procedure: "OCTA", "OCT-A", "IR_OCTA", "OCT Angiography", "flow" (not "OCT ART")
ANGIOGRAPHY = re.compile(r"angio|(?<![a-z])oct-?a(?![a-z])|(?<![a-z])flow(?![a-z])", re.I)


def _series_texts(s: Any, types: Any, *kinds: str) -> list[str]:
    """The strings of a series' text items (scan pattern, OCT or en-face modality) wherever eyepy finds them."""
    out: list[str] = []
    for kind in kinds:
        for folder in s.folders.get(getattr(types, kind), []):
            text = _guard(lambda f=folder: list(f.data.text)) or []
            out += [str(t).strip("\0 ") for t in text if str(t).strip("\0 ")]
    return out


def _e2e_angiography(s: Any, types: Any) -> bool:
    """Whether an E2E series says it is OCT angiography (its scan pattern or OCT modality text)."""
    return any(ANGIOGRAPHY.search(t) for t in _series_texts(s, types, "scanpattern", "oct_modality"))


def _e2e_no_oct(every: Any, with_bscans: list, types: Any) -> str:
    """Why an E2E file gives no structural OCT volume: only angiography, only fundus images, or nothing."""
    if with_bscans:
        said = sorted({t for s in with_bscans for t in _series_texts(s, types, "scanpattern", "oct_modality")})
        return f"only OCT angiography series ({', '.join(map(repr, said))}): flow data, not structural B-scans"
    enface = sorted({t for s in every for t in _series_texts(s, types, "enface_modality")})
    if enface:
        return f"no OCT B-scans in the .e2e file: its series hold only fundus/SLO images ({', '.join(map(repr, enface))})"
    return "no OCT series in the .e2e file (truncated, or only fundus images)"


def _guard(fn: Callable[[], Any]) -> Any:
    """fn() or None: for E2E details eyepy derives from partly understood fields."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return None


def _e2e_laterality(s: Any, types: Any) -> str | None:
    folders = s.folders.get(types.laterality, [])
    return laterality(getattr(folders[0].data.laterality, "name", None)) if folders else None


def _e2e_scale(s: Any, first: Any, nz: int, meta: dict, warnings: list[str], pattern: str) -> Any:
    """Axial size from the B-scan meta; lateral and B-scan spacing as eyepy derives them (assumes a medium eye)."""
    x_um = _guard(lambda: s.get_x_scale_derivation()["scaling_x_um_per_pixel"])
    span = _guard(s._bscan_vertical_span_deg)
    um_per_deg = _guard(lambda: s.get_x_scale_derivation()["constant_um_per_deg"])
    z_mm = span * um_per_deg / (nz - 1) / 1000 if nz > 1 and span and um_per_deg else None
    meta["scale_source"] = "lateral and B-scan spacing derived by eyepy from scan angles (medium eye)"
    return scale_um(z_mm, first["scale_y"], None if x_um is None else x_um / 1000, nz, meta, warnings,
                     single=pattern in ("circle", "radial"))


def _e2e_identifiers(s: Any, types: Any) -> dict[str, str]:
    ids: dict[str, str] = {}
    patient = _guard(lambda: s._first_patient_folder(types.patient).data)
    if patient is not None:
        add_identifier(ids, "first_name", patient.firstname)
        add_identifier(ids, "surname", patient.surname)
        add_identifier(ids, "patient_id", patient.patient_id)
        add_identifier(ids, "birthdate_raw", patient.birthdate)  # encoding unknown: kept as the stored number
    for key, folder_type in (("study_name", types.studyname), ("diagnosis", types.diagnose)):
        text = _guard(lambda t=folder_type: s._first_study_folder(t).data.text) or \
            _guard(lambda t=folder_type: s._first_series_folder(t).data.text) or []
        for t in text:
            add_identifier(ids, key, t)
    return ids


class HeyexVolReader(ExportReader):
    name, suffixes, label = "heyex-vol", (".vol",), HEIDELBERG

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_heyex_vol(path, limits.max_voxels)


class HeyexE2eReader(ExportReader):
    name, suffixes, label = "heyex-e2e", (".e2e",), HEIDELBERG

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return _read_heyex_e2e(path, limits.max_voxels)


VOL, E2E = HeyexVolReader(), HeyexE2eReader()
