"""Writers of small synthetic vendor files for test_vendor: the layouts the readers' libraries parse."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

OPT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PAT-4711", "PatientBirthDate": "19620417",
           "InstitutionName": "Northside Eye Hospital", "OperatorsName": "Smith^Tech",
           "ReferringPhysicianName": "Welby^Marcus", "AccessionNumber": "ACC998877",
           "StudyDescription": "Macula follow-up Jane", "DeviceSerialNumber": "SN-55501"}


# ------------------------------------------------------------------------------------------ DICOM


def write_opt_dicom(path: Path, volume: np.ndarray, *, spacing_mm: tuple[float, float] = (0.0039, 0.0117),
                    between_mm: float | None = 0.12, laterality: str = "R", transfer_syntax: str | None = None,
                    pixels: bool = True, sop_class: str = OPT_SOP_CLASS, **extra: Any) -> Path:
    """A multi-frame OPT file (frames = B-scans) with PATIENT's identifiers; spacing in the shared groups.
    ``sop_class`` and ``Modality=...`` make other kinds of DICOM image with the same pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "OPT", "Acme Optics", "RetinaScan 3000"
    ds.StudyDate, ds.AcquisitionDateTime = "20230105", "20230102101530"
    ds.ImageLaterality = laterality
    for key, value in {**PATIENT, **extra}.items():
        setattr(ds, key, value)
    z, y, x = volume.shape
    ds.NumberOfFrames, ds.Rows, ds.Columns, ds.SamplesPerPixel = z, y, x, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * volume.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    measures = Dataset()
    measures.PixelSpacing = list(spacing_mm)
    if between_mm is not None:
        measures.SliceThickness = between_mm
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    if pixels:
        ds.PixelData = volume.tobytes()
        ds["PixelData"].VR = "OB" if volume.itemsize == 1 else "OW"
    if transfer_syntax and pixels:  # a compressed syntax: encapsulate bytes no decoder can read
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream"] * z)
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------ Duke .mat


def duke_arrays(z: int = 4, y: int = 12, x: int = 10, seed: int = 3) -> dict[str, np.ndarray]:
    """Duke DME fields in MATLAB order: images (Y, X, Z) uint8, fluid (Y, X, Z) ids + NaN, layers (8, X, Z)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (y, x, z), dtype=np.uint8)
    arrays: dict[str, np.ndarray] = {"images": images}
    for g, skipped in ((1, [0]), (2, [1, 3])):  # grader 1 skips B-scan 0, grader 2 skips 1 and 3
        fluid = rng.integers(0, 3, (y, x, z)).astype(np.float64)  # 0 none, 1-2 fluid pockets
        fluid[:, :, skipped] = np.nan
        arrays[f"manualFluid{g}"] = fluid
        layers = np.sort(rng.uniform(1, y, (8, x, z)), axis=0)  # 1-based rows
        layers[:, :, skipped] = np.nan
        layers[3, :2, :] = np.nan  # a boundary not drawn at the left edge
        arrays[f"manualLayers{g}"] = layers
    arrays["automaticFluidDME"] = np.zeros((y, x, z))
    return arrays


def write_mat5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    scipy.io.savemat(path, arrays)
    return path


def write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A MATLAB v7.3 file: HDF5 after a 512-byte text header, each array stored transposed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in arrays.items():
            ds = f.create_dataset(name, data=np.ascontiguousarray(arr.T))
            ds.attrs["MATLAB_class"] = np.bytes_("uint8" if arr.dtype == np.uint8 else "double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with path.open("r+b") as fh:
        fh.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    return path


# ------------------------------------------------------------------------------ Heidelberg .vol


def write_vol_header(path: Path, size_x: int, n_bscans: int, size_y: int, slo: int = 0, extra: int = 0) -> Path:
    """A .vol file header (2048 bytes) claiming the given sizes, followed by ``extra`` zero bytes."""
    head = bytearray(2048)
    head[:12] = b"HSF-OCT-103\0"
    struct.pack_into("<3I", head, 12, size_x, n_bscans, size_y)
    struct.pack_into("<2I", head, 48, slo, slo)
    path.write_bytes(bytes(head) + bytes(extra))
    return path


def write_vol(path: Path, raw: np.ndarray, slo: np.ndarray | None = None, layers: int = 2,
              scan_pattern: int = 3) -> Path:
    """A whole HSF-OCT-103 ``.vol`` file: header, SLO, then per B-scan a header with ``layers`` boundary rows
    and the raw float32 pixels (the layout eyepy's ``HeVolReader`` parses)."""
    z, y, x = raw.shape
    slo = np.full((8, 8), 40, np.uint8) if slo is None else slo
    hdr_size = 256 + layers * 4 * x + 64
    head = bytearray(2048)
    struct.pack_into("<12s3I3d2I2dId4sQiI", head, 0, b"HSF-OCT-103\0", x, z, y, 0.0117, 0.12, 0.0039,
                     slo.shape[1], slo.shape[0], 0.0117, 0.0117, 30, 0.0, b"OD\0\0", 131_000_000_000_000_000,
                     scan_pattern, hdr_size)
    struct.pack_into("<16s16sI24s", head, 104, b"4711\0", b"\0", 86, b"PAT-0815\0")
    out = [bytes(head), slo.astype(np.uint8).tobytes()]
    for i, bscan in enumerate(raw):
        bh = bytearray(hdr_size)
        struct.pack_into("<12sI4dII", bh, 0, b"HSF-BS-103\0", hdr_size, 0.0, i * 0.12, x * 0.0117, i * 0.12,
                         layers, 256)
        for k in range(layers):
            struct.pack_into(f"<{x}f", bh, 256 + k * 4 * x, *np.linspace(2 + k * 3, 3 + k * 3, x))
        out += [bytes(bh), np.ascontiguousarray(bscan, "<f4").tobytes()]
    path.write_bytes(b"".join(out))
    return path


# ----------------------------------------------------------------------------- Heidelberg .e2e


def _utf16(texts: list[str], size: int = 128) -> bytes:
    """Type 9000-9008 items: string count, string size in bytes, UTF-16 strings."""
    return struct.pack("<2I", len(texts), size) + b"".join(t.encode("utf-16-le").ljust(size, b"\0") for t in texts)


def _e2e_items(volume: np.ndarray, layers: dict[int, np.ndarray], oct_modality: tuple[str, ...] = ("OCT", "OCT"),
               scan_pattern: str = "OCT ART Volume", bscans: bool = True) -> list[tuple[int, int, int, int, int, bytes]]:
    """(patient, study, series, slice, type, data) of a left-eye volume, its patient, localizer and layers;
    the series' OCT modality and scan pattern texts as given, its B-scans left out unless ``bscans``."""
    from eyepy.io.he import e2e_format as f

    z, h, w = volume.shape
    loc = np.full((8, 8), 50, np.uint8)
    items = [(1, -1, -1, -1, 9, f.Latin1String(31).build("Erika") + f.Latin1String(66).build("Mustermann")
              + struct.pack("<I", 19600101) + b"F" + f.Latin1String(25).build("E2E-777")),
             (1, 1, -1, -1, 9000, _utf16(["Glaucoma study"])),
             (1, 1, -1, -1, 9001, _utf16(["Heidelberg Retina Angiograph"])),
             (1, 1, 1, -1, 11, bytes(14) + bytes([76])),  # 'L'
             (1, 1, 1, -1, 9005, _utf16(["Retina"])), (1, 1, 1, -1, 9006, _utf16([scan_pattern])),
             (1, 1, 1, -1, 9007, _utf16(["Infra-Red", "IR"])), (1, 1, 1, -1, 9008, _utf16(list(oct_modality))),
             (1, 1, 1, -1, 1073741824, struct.pack("<5I", loc.size, 33620481, loc.size, 8, 8) + loc.tobytes()),
             (1, 1, 1, -1, 10005, bytes(16) + struct.pack("<Q", 132_000_000_000_000_000))]  # 2019-04-17
    meta = f.type10004_format.subcon
    for i in range(z if bscans else 0):
        y_deg = 2.0 - i  # B-scans 1 degree apart
        bscan_meta = build(meta, size_y=h, size_x=w, start_x=0.0, end_x=20.0, start_y=y_deg, end_y=y_deg,
                           center_x=10.0, center_y=y_deg, scale_y=0.0039, imgSizeWidth=w, n_bscans=z, aktImage=i,
                           scan_pattern=3, acquisitionTime="2019-04-17T10:00:00", unknown6=bytes(12),
                           oct_controller_fw_raw=bytes(4), oct_camera_fw_raw=bytes(4), oct_camera_fpga_raw=bytes(4),
                           unknown7=bytes(4), unknown8=bytes(12), rest=b"")
        pixels = struct.pack("<5I", h * w, 35652097, h * w, h, w) + volume[i].astype("<u2").tobytes()
        items += [(1, 1, 1, 2 * i, 10004, bscan_meta), (1, 1, 1, 2 * i, 1073741824, pixels)]
        items += [(1, 1, 1, 2 * i, 10019, struct.pack("<5I", 0, lid, 0, w, 0) + rows[i].astype("<f4").tobytes())
                  for lid, rows in layers.items()]
    return items


def write_e2e(path: Path, volume: np.ndarray, layers: dict[int, np.ndarray], **series: Any) -> Path:
    """An E2E file in one chunk: version and directory headers, folder headers, then the data containers.
    ``volume`` holds the raw uint16 codes of E2E's 16-bit float; ``layers`` maps layer ids to (Z, X) rows;
    ``series``: :func:`_e2e_items`' texts (OCT modality, scan pattern) and whether it holds B-scans."""
    from eyepy.io.he import e2e_format as f

    items = _e2e_items(volume, layers, **series)
    n = len(items)
    version = build(f.version_format.subcon, name="CMDb", version=1)
    directory = build(f.header_format.subcon, magic2="MDbMDir", version=1, num_entries=n, current=36)
    chunk_start = len(version) + len(directory)
    chunk = build(f.header_format.subcon, magic2="MDbDir", version=1, num_entries=n, current=chunk_start)
    folders, containers, pos = [], [], chunk_start + len(chunk) + 44 * n
    for k, (patient, study, series, slice_, type_, data) in enumerate(items):
        ids = {"patient_id": patient, "study_id": study, "series_id": series, "slice_id": slice_,
               "ind": int(type_ == 1073741824 and slice_ >= 0), "type": f.TypesEnum(type_)}
        folders.append(build(f.folderheader_format.subcon, pos=chunk_start + 52 + 44 * k, start=pos, size=len(data),
                             **ids))
        containers.append(build(f.containerheader_format.subcon, magic3="MDbData", pos=pos, size=len(data), **ids)
                          + data)
        pos += 60 + len(data)
    path.write_bytes(version + directory + chunk + b"".join(folders) + b"".join(containers))
    return path


# ----------------------------------------------------------------------------------- Zeiss .img


def write_cirrus_img(path: Path, volume: np.ndarray) -> Path:
    """Raw Cirrus cube: depth fastest, then A-scans, then B-scans (what oct-converter's IMG reshapes)."""
    path.write_bytes(np.ascontiguousarray(volume.transpose(0, 2, 1)).tobytes())
    return path


# ------------------------------------------------------------------------------ Topcon .fds/.fda


def _zero(con: Any) -> Any:
    """A value for every field of a construct Struct: zeros, empty strings, nested lists."""
    import construct as cs

    while isinstance(con, cs.Renamed):
        con = con.subcon
    if isinstance(con, cs.Array):
        return [_zero(con.subcon) for _ in range(con.count)]
    if isinstance(con, cs.Struct):
        return {sc.name: _zero(sc) for sc in con.subcons if sc.name}
    if isinstance(con, cs.StringEncoded):
        return ""
    return 0


def build(con: Any, **values: Any) -> bytes:
    return con.build({**_zero(con), **values})


def topcon_file(path: Path, chunks: list[tuple[bytes, bytes]], file_type: str = "FDA") -> Path:
    from oct_converter.readers.binary_structs import fds_binary

    out = [build(fds_binary.header, file_code="FOCT", file_type=file_type, major_ver=3, minor_ver=0)]
    for name, data in chunks:
        out.append(bytes([len(name)]) + name + struct.pack("<I", len(data)) + data)
    path.write_bytes(b"".join(out) + b"\0")
    return path


def topcon_meta_chunks(binary: Any, eye: int = 1) -> list[tuple[bytes, bytes]]:
    """Patient (identifiers), capture (left eye, date), hardware and scan-size chunks."""
    return [
        (b"@PATIENT_INFO_02", build(binary.patient_info_02_header, patient_id="TP-0042", first_name="Hanako",
                                    last_name="Yamada", sex=2, birth_date=[1971, 3, 9])),
        (b"@CAPTURE_INFO_02", build(binary.capture_info_02_header, eye=eye, scan_mode=2, session_id=31337,
                                    label="Yamada follow-up", cap_date=[2021, 6, 15, 9, 30, 0])),
        (b"@HW_INFO_03", build(binary.hw_info_03_header, model_name="3D OCT-1", serial_number="SN77Q1")),
        (b"@PARAM_SCAN_04", build(binary.param_scan_04_header, x_dimension_mm=6.0, y_dimension_mm=6.0,
                                  z_resolution_um=2.6)),
    ]


def write_fds(path: Path, volume: np.ndarray) -> Path:
    """A .fds file: @IMG_SCAN_03 raw uint16 B-scans, a BGR @IMG_OBS fundus, and the metadata chunks."""
    from oct_converter.readers.binary_structs import fds_binary as b

    z, y, x = volume.shape
    scan = build(b.oct_header, scan_mode=2, width=x, height=y, bits_per_pixel=16, number_slices=z,
                 size=volume.nbytes) + volume.astype("<u2").tobytes()
    bgr = np.full((6, 8, 3), (10, 20, 30), np.uint8)
    obs = build(b.fundus_header, width=8, height=6, bits_per_pixel=24, number_slices=1, size=bgr.nbytes) + bgr.tobytes()
    return topcon_file(path, [(b"@IMG_SCAN_03", scan), (b"@IMG_OBS", obs), *topcon_meta_chunks(b)], "FDA")


def _jpeg_bytes(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_fda(path: Path, volume: np.ndarray, contours: dict[str, np.ndarray], jpeg: bool = False) -> Path:
    """A .fda file: raw @IMG_MOT_COMP_03 (or per-B-scan @IMG_JPEG) B-scans, @CONTOUR_INFO layers stored
    as heights from the bottom with B-scans reversed, a grey JPEG @IMG_TRC_02, and the metadata chunks."""
    from oct_converter.readers.binary_structs import fda_binary as b

    z, y, x = volume.shape
    if jpeg:
        data = build(b.oct_header, scan_mode=2, width=x, height=y, number_slices=z)
        data += b"".join(struct.pack("<i", len(j)) + j for j in map(_jpeg_bytes, volume))
        chunks = [(b"@IMG_JPEG", data)]
    else:
        chunks = [(b"@IMG_MOT_COMP_03", build(b.oct_header_2, scan_mode=2, width=x, height=y, bits_per_pixel=16,
                                              number_slices=z, size=volume.nbytes) + volume.astype("<u2").tobytes())]
    for cid, rows in contours.items():  # rows: (Z, X) from the top
        stored = np.flip(y - rows, 0).astype("<u2")
        chunks.append((b"@CONTOUR_INFO", build(b.contour_info_header, id=cid, width=x, height=z,
                                               size=stored.nbytes) + stored.tobytes()))
    ir = _jpeg_bytes(np.full((6, 8), 99, np.uint8))
    chunks.append((b"@IMG_TRC_02", build(b.img_trc_02_header, width=8, height=6, bits_per_pixel=8,
                                         num_slices_0x2=2, size=len(ir)) + ir))
    return topcon_file(path, chunks + topcon_meta_chunks(b, eye=0), "FDA")


# ----------------------------------------------------------------------------- Bioptigen .OCT


def _field(key: str, value: bytes = b"", length: int | None = None) -> bytes:
    k = key.encode()
    return struct.pack("<I", len(k)) + k + struct.pack("<I", len(value) if length is None else length) + value


def _int(key: str, v: int) -> bytes:
    return _field(key, struct.pack("<I", v))


def _float(key: str, v: float) -> bytes:
    return _field(key, struct.pack("<d", v))


def _text(key: str, v: str) -> bytes:
    return _field(key, v.encode())


def write_bioptigen(path: Path, volume: np.ndarray, description: str = "Subject Miller, baseline",
                    doppler: int = 0) -> Path:
    """A Bioptigen .OCT rectangular volume (frames = 1 repeat, scans = B-scans): each frame holds its
    A-scans one after the other, depth samples contiguous, as uint16."""
    z, depth, ascans = volume.shape
    out = [struct.pack("<IH", 0x572, 0x64), _field("FRAMEHEADER", length=0), _int("FRAMECOUNT", z),
           _int("LINECOUNT", ascans), _int("LINELENGTH", depth), _int("SAMPLEFORMAT", 2),
           _text("DESCRIPTION", description), _float("XMIN", 0.0), _float("XMAX", 6.0), _text("XCAPTION", "mm"),
           _float("YMIN", 0.0), _float("YMAX", 2.0), _text("YCAPTION", "mm"), _int("SCANTYPE", 1),
           _float("SCANDEPTH", 2.0), _float("SCANLENGTH", 6.0), _float("AZSCANLENGTH", 6.0),
           _float("ELSCANLENGTH", 6.0), _float("OBJECTDISTANCE", 0.0), _float("SCANANGLE", 0.0),
           _int("SCANS", z), _int("FRAMES", 1), _int("DOPPLERFLAG", doppler), _field("CONFIG", b"\0" * 4),
           b"\0" * 4]
    stamp = struct.pack("<8H", 2019, 11, 2, 5, 14, 20, 7, 0)
    for bscan in volume:
        pixels = np.ascontiguousarray(bscan.T).astype("<u2").tobytes()
        out += [_field("FRAMEDATA", length=0), _field("FRAMEDATETIME", stamp), _float("FRAMETIMESTAMP", 0.0),
                _int("FRAMELINES", ascans), _field("FRAMESAMPLES", length=len(pixels)), pixels, b"\0" * 4]
    path.write_bytes(b"".join(out))
    return path
