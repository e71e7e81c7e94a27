"""Slow, obvious references for the hostile-input probe (:mod:`tests.tasks.readers.probe`): each format read
straight by its own library (tifffile, NumPy, Pillow, pydicom, eyepy, SciPy/h5py, oct-converter), so a volume
octseg stores can be compared pixel for pixel with what the file holds."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from octseg.tasks.readers.base import to_volume_dtype


def grey(arr: np.ndarray) -> np.ndarray:
    """Colour samples in the last axis -> one channel, as the readers do (equal channels kept, else luminance)."""
    from octseg.tasks.readers.base import luminance

    return luminance(arr, "image") if arr.ndim == 3 and arr.shape[-1] in (2, 3, 4) else arr


def ref_tiff(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        kept = [p for p in pages if not p.subfiletype & 0b101] or pages
        bscans: list[np.ndarray] = []
        for p in kept:
            a = p.asarray()
            if (p.planarconfig == 2 and p.samplesperpixel > 1) or p.imagedepth > 1:
                bscans += list(a.reshape(-1, p.imagelength, p.imagewidth))
            else:
                bscans.append(grey(a) if p.samplesperpixel > 1 else a)
        first = kept[0]
        tag = np.ravel(first.tags.valueof(274, 1) or 1)
        turn = _TURNS.get(int(tag[0]) if tag.size == 1 else 1, lambda b: b)
        bscans = [turn(b) for b in bscans]
        if first.photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            stack = np.stack(bscans)
            if stack.dtype.kind == "u":
                return to_volume_dtype(((1 << max(np.atleast_1d(first.bitspersample))) - 1 - stack).astype(stack.dtype), path, [])
            return to_volume_dtype((float(stack.max()) + float(stack.min()) - stack.astype(np.float64)).astype(np.float32), path, [])
    return to_volume_dtype(np.stack(bscans), path, [])


# TIFF Orientation, written out case by case (the reader's table is checked against Pillow in test_images)
_TURNS = {2: np.fliplr, 3: lambda b: np.rot90(b, 2), 4: np.flipud, 5: lambda b: b.T,
          6: lambda b: np.rot90(b, -1), 7: lambda b: np.rot90(b.T, 2), 8: lambda b: np.rot90(b, 1)}


def ref_npy(path: Path) -> np.ndarray:
    a = np.load(path, allow_pickle=False)
    return to_volume_dtype(a[None] if a.ndim == 2 else a, path, [])


def ref_pil(path: Path) -> np.ndarray:
    from PIL import Image

    from PIL import ImageOps

    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA")
        elif img.mode in ("LA", "PA"):
            img = img.getchannel(0)
        a = np.asarray(img)
    return to_volume_dtype(grey(a)[None], path, [])


def ref_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) == 1:
        a = a[None]
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        a = np.stack([grey(f) for f in a])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        top = (1 << int(ds.get("BitsStored") or 8 * a.itemsize)) - 1 if a.dtype.kind == "u" else 0
        a = (top - a).astype(a.dtype)
    return to_volume_dtype(a.astype(np.float32) if a.dtype.kind == "f" else a, path, [])


def ref_vol(path: Path) -> np.ndarray:
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io import HeVolReader

    raw = np.stack([b.data for b in HeVolReader(path).parsed_file.bscans]).astype(np.float32)
    return vol_intensity_transform(raw)


def ref_e2e(path: Path) -> np.ndarray:
    """eyepy's B-scans of the first series that has any (eyepy's EyeVolume also wants metadata it can parse)."""
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he import HeE2eReader
    from eyepy.io.he.e2e_format import TypesEnum

    with HeE2eReader(path) as reader:
        series = next(s for s in reader.series if any(TypesEnum.bscanmeta in sl.folders for sl in s.slices.values()))
        return from_e2e_intensity(series.get_bscans())


def ref_mat(path: Path) -> np.ndarray:
    import scipy.io

    images = np.asarray(scipy.io.loadmat(path, variable_names=["images"])["images"])
    images = images if images.ndim == 3 else images[..., None]
    return to_volume_dtype(np.ascontiguousarray(np.moveaxis(images, -1, 0)), path, [])


def ref_mat73(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        images = np.asarray(f["images"][()]).T
    images = images if images.ndim == 3 else images[..., None]
    return to_volume_dtype(np.ascontiguousarray(np.moveaxis(images, -1, 0)), path, [])


@contextlib.contextmanager
def fromstring() -> Iterator[None]:
    """np.fromstring for binary data, which oct-converter 0.7.0's Topcon classes still call."""
    saved = getattr(np, "fromstring", None)
    np.fromstring = lambda s, dtype=float: np.frombuffer(s, dtype=dtype).copy()
    try:
        yield
    finally:
        np.fromstring = saved


def ref_fds(path: Path) -> np.ndarray:
    """oct-converter's B-scans of a .fds: its chunk table and its @IMG_SCAN_03 header, the pixels laid out as
    its ``FDS.read_oct_volume`` lays them out. (That method then parses every metadata chunk and fails on a
    damaged date or name, which octseg does not read: those would count against the pixels here.)"""
    from oct_converter.readers import FDS
    from oct_converter.readers.binary_structs import fds_binary

    with fromstring():
        chunks = FDS(path).chunk_dict
    start, _ = chunks[b"@IMG_SCAN_03"]
    with path.open("rb") as f:
        f.seek(start)
        h = fds_binary.oct_header.parse(f.read(22))
        n = h.width * h.height * h.number_slices
        raw = np.frombuffer(f.read(n * 2), dtype=np.uint16)
    volume = np.transpose(raw.reshape(h.width, h.height, h.number_slices, order="F"), [1, 0, 2])
    return np.stack([volume[:, :, i] for i in range(volume.shape[2])])


def ref_boct(path: Path) -> np.ndarray:
    """oct-converter's B-scans: a line scan's volumes are one B-scan each (all of them), a volume scan's first
    volume (the others repeat it; octseg says so in a warning)."""
    from oct_converter.readers import BOCT

    reader = BOCT(path)
    volumes = reader.read_oct_volume()
    with path.open("rb") as fh:
        from oct_converter.readers.binary_structs import boct_binary

        linear = boct_binary.bioptigen_oct_header_struct.parse_stream(fh).scantype.value == 0
    image = np.concatenate([np.asarray(v.volume) for v in volumes]) if linear else np.asarray(volumes[0].volume)
    return np.ascontiguousarray(image.transpose(0, 2, 1))


def ref_xml(path: Path) -> np.ndarray:
    """The HEYEX export's B-scans as the XML lists them, each image read by tifffile."""
    import xml.etree.ElementTree as ET

    import tifffile

    root = ET.parse(path).getroot()
    octs = root.findall(".//ImageType[Type='OCT']..")
    names = [(i.findtext("ImageData/ExamURL") or "").replace("\\", "/").split("/")[-1] for i in octs]
    return np.stack([tifffile.imread(path.parent / n) for n in names])


