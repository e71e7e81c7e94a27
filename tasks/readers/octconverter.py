"""Topcon ``.fds``/``.fda``, Zeiss Cirrus ``.img`` and Bioptigen ``.oct``, read with oct-converter (the ``vendor`` extra).

oct-converter pulls opencv-python and imageio-ffmpeg (~460 MB), so it is the optional extra
``vendor`` (``pip install 'octseg[vendor]'``), imported only when such a file is read; without it
these files fail with a line naming the extra. Tested on synthetic files.

oct-converter's own ``FDS``/``FDA`` classes call ``np.fromstring`` on binary data, which NumPy 2.3
removed, so they fail on every file here; this module walks the Topcon chunk list itself and decodes
each chunk with oct-converter's ``fds_binary``/``fda_binary`` structures (the tests cross-check the
result against those classes with ``np.fromstring`` restored).
"""
from __future__ import annotations

import math
import mmap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels, one_line
from octseg.tasks.readers.headers import add_identifier, boundary_layers, grey, iso_date, laterality, new_volume, scale_um

__all__ = ["BOCT", "FDA", "FDS", "HEAVY_EXTRA", "IMG", "OctConverterReader", "need_oct_converter"]

HEAVY_EXTRA = "vendor"  # pip install 'octseg[vendor]' brings oct-converter


def need_oct_converter(path: Path) -> Any:
    """``oct_converter.readers``, or a :class:`ReadError` naming the extra (or the system library) that is missing."""
    try:
        import oct_converter.readers as readers
    except ImportError as e:
        if getattr(e, "name", None) in ("oct_converter", "oct_converter.readers") or "oct_converter" in str(e):
            raise ReadError(path, f"reading {path.suffix.lower()} files needs the optional reader oct-converter: "
                                  f"pip install 'octseg[{HEAVY_EXTRA}]'") from e
        # installed, but a library it loads is missing (opencv's libGL.so.1 on a bare container, say)
        raise ReadError(path, f"oct-converter is installed but cannot be imported ({e}); on Debian/Ubuntu "
                              f"`apt-get install libgl1 libglib2.0-0` gives opencv what it needs") from e
    return readers


class OctConverterReader(ExportReader):
    """A format read with oct-converter's structures or classes."""

    extra = HEAVY_EXTRA

    def __init__(self, name: str, suffix: str, label: str, decode) -> None:
        self.name, self.suffixes, self.label, self._decode = name, (suffix,), label, decode

    def decode(self, path: Path, limits: Limits, options: Mapping[str, Any]) -> ScanVolume:
        return self._decode(path, limits.max_voxels)


# --------------------------------------------------------------------------------- Topcon .fds/.fda


def _topcon_chunks(path: Path) -> dict[bytes, list[tuple[int, int]]]:
    """Chunk name -> [(offset, size)] after the 15-byte header; every chunk must lie inside the file."""
    size = path.stat().st_size
    chunks: dict[bytes, list[tuple[int, int]]] = {}
    with path.open("rb") as fh:
        head = fh.read(15)
        if not head.startswith(b"FOCT"):
            raise ReadError(path, f"not a Topcon file (magic {head[:4]!r}, expected b'FOCT')")
        if len(head) < 15:
            raise ReadError(path, "truncated Topcon header")
        from oct_converter.readers.binary_structs import fds_binary

        try:  # as oct-converter reads it first (its version strings are ASCII)
            fds_binary.header.parse(head)
        except Exception as e:  # noqa: BLE001 - construct's errors
            raise ReadError(path, f"unreadable Topcon file header ({one_line(e)})") from e
        while (n := fh.read(1)) != b"\0":
            if not n:
                raise ReadError(path, f"truncated: the chunk list ends at byte {size:,} without its terminating "
                                      f"zero (after {sum(map(len, chunks.values()))} chunks)")
            name, raw = fh.read(n[0]), fh.read(4)
            if len(raw) < 4:
                raise ReadError(path, "truncated chunk list")
            start, length = fh.tell(), int.from_bytes(raw, "little")
            if start + length > size:
                raise ReadError(path, f"truncated: chunk {name.decode('latin1')!r} needs {start + length:,} bytes, "
                                      f"the file has {size:,}")
            chunks.setdefault(name, []).append((start, length))
            fh.seek(length, 1)
    return chunks


def _one_volume_chunk(path: Path, chunks: dict, names: tuple[bytes, ...]) -> None:
    """A volume chunk that occurs twice is ambiguous (oct-converter reads the last, a chunk list the first): refused."""
    for name in names:
        if len(chunks.get(name, [])) > 1:
            raise ReadError(path, f"{len(chunks[name])} {name.decode()} chunks: which one is the volume is ambiguous")


def _chunk(path: Path, chunks: dict, name: bytes, index: int = 0) -> bytes | None:
    if name not in chunks:
        return None
    start, length = chunks[name][index]
    with path.open("rb") as fh:
        fh.seek(start)
        return fh.read(length)


def _topcon_raw(path: Path, data: bytes, header: Any, hsize: int, max_voxels: int | None) -> np.ndarray:
    """uint16 B-scans stored row by row after a chunk header (IMG_SCAN_0x, IMG_MOT_COMP_03)."""
    shape = (header.number_slices, header.height, header.width)
    check_voxels(path, shape, max_voxels)
    need = hsize + 2 * math.prod(shape)
    if len(data) < need:
        raise ReadError(path, f"OCT chunk of {len(data):,} bytes, its header needs {need:,}")
    return np.frombuffer(data, "<u2", math.prod(shape), hsize).reshape(shape).copy()


def _read_topcon_fds(path: Path, max_voxels: int | None) -> ScanVolume:
    need_oct_converter(path)
    from oct_converter.readers.binary_structs import fds_binary as binary

    chunks = _topcon_chunks(path)
    _one_volume_chunk(path, chunks, (b"@IMG_SCAN_03", b"@IMG_SCAN_02"))
    for name, struct_, hsize in ((b"@IMG_SCAN_03", binary.oct_header, 22), (b"@IMG_SCAN_02", binary.oct_header_2, 30)):
        if name in chunks:
            data = _chunk(path, chunks, name)
            header = struct_.parse(data)
            image = _topcon_raw(path, data, header, hsize, max_voxels)
            break
    else:
        raise ReadError(path, "no OCT volume chunk (@IMG_SCAN_03 or @IMG_SCAN_02)")
    fundus = None
    if obs := _chunk(path, chunks, b"@IMG_OBS"):
        fh = binary.fundus_header.parse(obs)
        check_voxels(path, (fh.height, fh.width, 3), max_voxels, "fundus image")
        bgr = np.frombuffer(obs, np.uint8, fh.width * fh.height * 3, 21).reshape(fh.height, fh.width, 3)
        fundus = grey(bgr[..., ::-1], path, "fundus image")
    return _topcon_volume(path, binary, chunks, image, header.scan_mode, fundus, {}, [])


def _read_topcon_fda(path: Path, max_voxels: int | None) -> ScanVolume:
    need_oct_converter(path)
    from oct_converter.readers.binary_structs import fda_binary as binary

    chunks = _topcon_chunks(path)
    _one_volume_chunk(path, chunks, (b"@IMG_JPEG", b"@IMG_MOT_COMP_03"))
    if data := _chunk(path, chunks, b"@IMG_JPEG"):
        header = binary.oct_header.parse(data)
        image = _topcon_jpegs(path, data, header, max_voxels)
    elif data := _chunk(path, chunks, b"@IMG_MOT_COMP_03"):
        header = binary.oct_header_2.parse(data)
        image = _topcon_raw(path, data, header, 22, max_voxels)
    else:
        raise ReadError(path, "no OCT volume chunk (@IMG_JPEG or @IMG_MOT_COMP_03)")
    warnings: list[str] = []
    fundus = _fda_fundus(path, chunks, max_voxels)
    layers = _fda_layers(path, binary, chunks, image.shape, warnings)
    return _topcon_volume(path, binary, chunks, image, header.scan_mode, fundus, layers, warnings)


def _fda_fundus(path: Path, chunks: dict, max_voxels: int | None) -> np.ndarray | None:
    """The grey IR image (@IMG_TRC_02), else the colour fundus photo (@IMG_FUNDUS, BGR) as luminance."""
    if data := _chunk(path, chunks, b"@IMG_TRC_02"):
        return grey(_jpeg(path, data[21:], None, max_voxels, "IR image"), path, "IR image")
    if data := _chunk(path, chunks, b"@IMG_FUNDUS"):
        rgb = _jpeg(path, data[24:], None, max_voxels, "fundus image")
        return grey(rgb[..., ::-1] if rgb.ndim == 3 else rgb, path, "fundus image")
    return None


def _jpeg(path: Path, data: bytes, shape: tuple[int, int] | None, max_voxels: int | None, what: str) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        check_voxels(path, (img.height, img.width), max_voxels, what)
        if shape is not None and (img.height, img.width) != shape:
            raise ReadError(path, f"{what} of {img.height} x {img.width}, the header says {shape[0]} x {shape[1]}")
        return np.asarray(img)


def _topcon_jpegs(path: Path, data: bytes, header: Any, max_voxels: int | None) -> np.ndarray:
    """@IMG_JPEG: after a 25-byte header, per B-scan an int32 length and a JPEG image."""
    check_voxels(path, (header.number_slices, header.height, header.width), max_voxels)
    bscans, pos = [], 25
    for i in range(header.number_slices):
        if pos + 4 > len(data):
            raise ReadError(path, f"truncated @IMG_JPEG chunk at B-scan {i} of {header.number_slices}")
        n = int.from_bytes(data[pos:pos + 4], "little")
        if pos + 4 + n > len(data):
            raise ReadError(path, f"truncated @IMG_JPEG chunk at B-scan {i} of {header.number_slices}")
        bscans.append(grey(_jpeg(path, data[pos + 4:pos + 4 + n], (header.height, header.width), max_voxels,
                                  f"B-scan {i}"), path, f"B-scan {i}"))
        pos += 4 + n
    return np.stack(bscans)


def _fda_layers(path: Path, binary: Any, chunks: dict, shape: tuple[int, ...],
                warnings: list[str]) -> dict[str, np.ndarray]:
    """@CONTOUR_INFO chunks as oct-converter reads them: uint16 heights from the bottom, flipped B-scans."""
    names = {"MULTILAYERS_1": "ILM", "MULTILAYERS_2": "RNFL_GCL", "MULTILAYERS_3": "GCL_IPL",
             "MULTILAYERS_4": "IPL_INL", "MULTILAYERS_5": "MZ_EZ", "MULTILAYERS_6": "IZ_RPE", "MULTILAYERS_7": "BM",
             "MULTILAYERS_8": "INL_OPL", "MULTILAYERS_9": "ELM", "MULTILAYERS_10": "CSI"}
    out = []
    for i in range(len(chunks.get(b"@CONTOUR_INFO", []))):
        data = _chunk(path, chunks, b"@CONTOUR_INFO", i)
        h = binary.contour_info_header.parse(data)
        if (h.height, h.width) != (shape[0], shape[2]) or len(data) < 34 + 2 * h.width * h.height:
            warnings.append(f"contour {h.id!r} of {h.height} x {h.width} does not fit the volume: dropped")
            continue
        seg = np.frombuffer(data, "<u2", h.width * h.height, 34).reshape(h.height, h.width)
        out.append((names.get(h.id, h.id), shape[1] - np.flip(seg, 0).astype(np.float32)))
    return boundary_layers(out)


def _topcon_volume(path: Path, binary: Any, chunks: dict, image: np.ndarray, scan_mode: int,
                   fundus: np.ndarray | None, layers: dict, warnings: list[str]) -> ScanVolume:
    info = _topcon_info(path, binary, chunks)
    capture = info.get("capture_info_02") or info.get("capture_info") or {}
    hw = info.get("hw_info_03") or info.get("hw_info_02") or info.get("hw_info_01") or {}
    cap = list(capture.get("cap_date") or [])
    meta: dict[str, Any] = {
        "laterality": {0: "OD", 1: "OS"}.get(capture.get("eye")),
        "scan_pattern": {2: "volume", 3: "radial"}.get(scan_mode, "line" if image.shape[0] == 1 else "unknown"),
        "acquired": iso_date("-".join(f"{v:02d}" for v in cap[:3])) if len(cap) >= 3 else None,
        "device": " ".join(filter(None, ["Topcon", str(hw.get("model_name") or "").strip("\0 ")])),
    }
    params = info.get("param_scan_04") or info.get("param_scan_02")
    if params:  # as oct-converter computes it: range / count
        n, _, w = image.shape
        scale = scale_um(params["y_dimension_mm"] / n, params["z_resolution_um"] / 1000, params["x_dimension_mm"] / w,
                          n, meta, warnings, single=meta["scan_pattern"] == "radial")
    else:
        scale = None
        warnings.append("no @PARAM_SCAN_04/02 chunk: no voxel size")
    return new_volume(image, scale, layers=layers, layers_source="device" if layers else None, fundus=fundus,
                   meta=meta, identifiers=_topcon_identifiers(info, hw, capture), warnings=warnings)


def _topcon_info(path: Path, binary: Any, chunks: dict) -> dict[str, dict]:
    info = {}
    for name in (b"@PATIENT_INFO_02", b"@CAPTURE_INFO_02", b"@CAPTURE_INFO", b"@HW_INFO_03", b"@HW_INFO_02",
                 b"@HW_INFO_01", b"@PARAM_SCAN_04", b"@PARAM_SCAN_02"):
        key = name.decode()[1:].lower()
        data = _chunk(path, chunks, name)
        if data is not None:
            try:
                info[key] = dict(getattr(binary, f"{key}_header").parse(data))
            except Exception as e:  # noqa: BLE001
                raise ReadError(path, f"unreadable {name.decode()} chunk ({one_line(e)})") from e
    return info


def _text(v: Any) -> str:
    """A construct string, or an Int8un array (possibly nested) read as Latin-1 text."""
    if isinstance(v, str):
        return v.replace("\0", " ").strip()
    flat = np.asarray(v, dtype=np.uint8).ravel().tobytes() if v is not None else b""
    return " ".join(part.decode("latin1").strip() for part in flat.split(b"\0") if part.strip())


def _topcon_identifiers(info: dict, hw: dict, capture: dict) -> dict[str, str]:
    ids: dict[str, str] = {}
    p = info.get("patient_info_02") or {}
    for key in ("patient_id", "first_name", "last_name", "mid_name", "occup_reg", "record_id", "physician",
                "zip_code", "addr", "phones", "multipurpose_field", "descp"):
        add_identifier(ids, key, _text(p.get(key)))
    birth = list(p.get("birth_date") or [])
    if len(birth) == 3:
        add_identifier(ids, "birth_date", iso_date("-".join(f"{v:02d}" for v in birth)))
    add_identifier(ids, "capture_label", _text(capture.get("label")))
    add_identifier(ids, "session_id", capture.get("session_id"))
    add_identifier(ids, "device_serial_number", _text(hw.get("serial_number")))
    return ids


# ----------------------------------------------------------------------------------- Zeiss .img


_CIRRUS_GEOMETRIES = {200 * 1024 * 200: (200, 1024, 200), 128 * 1024 * 512: (128, 1024, 512)}  # bytes -> (Z, Y, X)


def _read_zeiss_img(path: Path, max_voxels: int | None) -> ScanVolume:
    """Headerless Cirrus raw cube: its geometry inferred from the file size (200x200 or 512x128 cubes)."""
    readers = need_oct_converter(path)
    size = path.stat().st_size
    shape = _CIRRUS_GEOMETRIES.get(size)
    if shape is None:
        raise ReadError(path, f"file size {size:,} bytes matches no known Cirrus geometry "
                              f"(200 x 1024 x 200 = 40,960,000 or 128 x 1024 x 512 = 67,108,864)")
    check_voxels(path, shape, max_voxels)
    oct_volume = readers.IMG(path).read_oct_volume(rows=shape[1], cols=shape[2], interlaced=False)
    image = np.stack(oct_volume.volume).astype(np.uint8, copy=False)
    found = oct_volume.metadata or {}
    meta = {"laterality": laterality(found.get("laterality")), "scan_pattern": "volume",
            "acquired": iso_date(found.get("acquisition_date")), "device": "Zeiss Cirrus",
            "orientation": "as stored (oct-converter does not flip Cirrus B-scans)"}
    ids: dict[str, str] = {}
    add_identifier(ids, "patient_id", found.get("patient_id"))  # from the file name, like the date and laterality
    add_identifier(ids, "device_serial_number", found.get("sn"))
    return new_volume(image, None, meta=meta, identifiers=ids,
                   warnings=["a Cirrus .img file carries no voxel size (6 x 6 x 2 mm cube: the caller may set it)"])


# --------------------------------------------------------------------------------- Bioptigen .OCT


def _read_bioptigen_oct(path: Path, max_voxels: int | None) -> ScanVolume:
    readers = need_oct_converter(path)
    from oct_converter.readers.binary_structs import boct_binary

    size = path.stat().st_size
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        # parsed from a memory map: a forged length makes construct read to the end, not allocate it
        try:
            h = boct_binary.bioptigen_oct_header_struct.parse_stream(mm)
        except Exception as e:  # noqa: BLE001
            raise ReadError(path, f"not a Bioptigen .OCT file, or a truncated one ({one_line(e)})") from e
        frames, scans = h.frames.value, h.scans.value
        if h.dopplerflag.value:
            raise ReadError(path, f"a Bioptigen file with Doppler (flow) data (DOPPLERFLAG {h.dopplerflag.value}): "
                                  f"its frames are not read as structural B-scans")
        if h.framecount.value != frames * scans or h.framecount.value == 0:
            raise ReadError(path, f"header gives {h.framecount.value} frames for {frames} x {scans} B-scans")
        check_voxels(path, (h.framecount.value, h.linelength.value, h.linecount.value), max_voxels)
        try:
            mm.seek(0)
            ends = [frame.image.end for frame in boct_binary.bioptigen_file_structure.parse_stream(mm).data]
        except Exception as e:  # noqa: BLE001
            raise ReadError(path, f"truncated or corrupt Bioptigen frames ({one_line(e)})") from e
    if max(ends) > size:
        raise ReadError(path, f"truncated: the frames need {max(ends):,} bytes, the file has {size:,}")
    volumes = readers.BOCT(path).read_oct_volume()
    scan_type = {0: "line", 1: "volume", 3: "radial"}.get(h.scantype.value, "unknown")
    warnings = ["Bioptigen header sizes are not read as a voxel size (units unverified); see meta['header_mm']"]
    if scan_type == "line":
        image = np.concatenate([np.asarray(v.volume) for v in volumes])
    else:
        image = np.asarray(volumes[0].volume)
        if len(volumes) > 1:
            warnings.append(f"{len(volumes)} repeated volumes in the file: only the first was read")
    image = np.ascontiguousarray(image.transpose(0, 2, 1))  # (B-scan, A-scan, depth) -> (B-scan, depth, A-scan)
    meta = {"laterality": laterality(volumes[0].laterality), "scan_pattern": scan_type,
            "acquired": iso_date(volumes[0].acquisition_date), "device": "Bioptigen",
            "header_mm": {k: float(h[k].value) for k in ("scandepth", "scanlength", "azscanlength", "elscanlength")}}
    ids: dict[str, str] = {}
    add_identifier(ids, "description", h.description.value)
    return new_volume(image, None, meta=meta, identifiers=ids, warnings=warnings)


FDS = OctConverterReader("topcon-fds", ".fds", "Topcon .fds/.fda", _read_topcon_fds)
FDA = OctConverterReader("topcon-fda", ".fda", "Topcon .fds/.fda", _read_topcon_fda)
IMG = OctConverterReader("zeiss-img", ".img", "Zeiss .img", _read_zeiss_img)
BOCT = OctConverterReader("bioptigen-oct", ".oct", "Bioptigen .oct", _read_bioptigen_oct)
