"""A seeded hostile-input probe over the readers (issue 17): small valid files of each format are mutated
(cut short, bits flipped, header fields set to edge values, blocks removed or doubled, bytes appended) and
each mutated file is read by ``read_volume``. Every one must either be refused with one line naming the
file (a ``ReadError``), or be read whole: equal to what the format's own library (tifffile, NumPy, Pillow,
pydicom, eyepy, SciPy, oct-converter) reads from the same bytes. A volume that differs from it, or is read
where that library fails, counts as "stored in part"; any other exception, or a read that hangs, counts
as "crashed". Both must be 0.

``tests/tasks/readers/test_hostile_probe.py`` runs a bounded version in ``make test``; for the README's counts:
``python -m tests.tasks.readers.probe 1000 [SEED]`` (mutations per format; seeded, default 0: the same counts
every run).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from octseg.tasks.readers.base import ReadError, to_volume_dtype
from octseg.tasks.readers.registry import read_volume

MAX_VOXELS = 50_000  # the probe's voxel limit: a forged header is refused before anything large is allocated
SECONDS = 10  # a read that takes longer hangs
_RNG = np.random.default_rng(3)
SMALL = (_RNG.random((3, 6, 8)) * 250).astype(np.uint8)


@dataclass
class Format:
    name: str
    suffix: str
    build: Callable[[Path], Path]  # writes a small valid file (and any files beside it), returns the source
    reference: Callable[[Path], np.ndarray]  # the format library's (Z, Y, X) read of a source
    options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- references

def _grey(arr: np.ndarray) -> np.ndarray:
    """Colour samples in the last axis -> one channel, as the readers do (equal channels kept, else luminance)."""
    from octseg.tasks.readers.images import _to_gray

    return _to_gray(arr, arr.ndim == 3 and arr.shape[-1] in (2, 3, 4))


def _ref_tiff(path: Path) -> np.ndarray:
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
                bscans.append(_grey(a) if p.samplesperpixel > 1 else a)
    return to_volume_dtype(np.stack(bscans), path, [])


def _ref_npy(path: Path) -> np.ndarray:
    a = np.load(path, allow_pickle=False)
    return to_volume_dtype(a[None] if a.ndim == 2 else a, path, [])


def _ref_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode == "P":
            img = img.convert("RGBA")
        elif img.mode in ("LA", "PA"):
            img = img.getchannel(0)
        a = np.asarray(img)
    return to_volume_dtype(_grey(a)[None], path, [])


def _ref_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    a = ds.pixel_array
    if int(ds.get("NumberOfFrames") or 1) == 1:
        a = a[None]
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        a = np.stack([_grey(f) for f in a])
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        top = (1 << int(ds.get("BitsStored") or 8 * a.itemsize)) - 1 if a.dtype.kind == "u" else 0
        a = (top - a).astype(a.dtype)
    return to_volume_dtype(a.astype(np.float32) if a.dtype.kind == "f" else a, path, [])


def _ref_vol(path: Path) -> np.ndarray:
    from eyepy.core.utils import vol_intensity_transform
    from eyepy.io import HeVolReader

    raw = np.stack([b.data for b in HeVolReader(path).parsed_file.bscans]).astype(np.float32)
    return vol_intensity_transform(raw)


def _ref_e2e(path: Path) -> np.ndarray:
    """eyepy's B-scans of the first series that has any (eyepy's EyeVolume also wants metadata it can parse)."""
    from eyepy.core.utils import from_e2e_intensity
    from eyepy.io.he import HeE2eReader
    from eyepy.io.he.e2e_format import TypesEnum

    with HeE2eReader(path) as reader:
        series = next(s for s in reader.series if any(TypesEnum.bscanmeta in sl.folders for sl in s.slices.values()))
        return from_e2e_intensity(series.get_bscans())


def _ref_mat(path: Path) -> np.ndarray:
    import scipy.io

    images = np.asarray(scipy.io.loadmat(path, variable_names=["images"])["images"])
    images = images if images.ndim == 3 else images[..., None]
    return to_volume_dtype(np.ascontiguousarray(np.moveaxis(images, -1, 0)), path, [])


def _ref_mat73(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        images = np.asarray(f["images"][()]).T
    images = images if images.ndim == 3 else images[..., None]
    return to_volume_dtype(np.ascontiguousarray(np.moveaxis(images, -1, 0)), path, [])


@contextlib.contextmanager
def _fromstring() -> Iterator[None]:
    """np.fromstring for binary data, which oct-converter 0.7.0's Topcon classes still call."""
    saved = getattr(np, "fromstring", None)
    np.fromstring = lambda s, dtype=float: np.frombuffer(s, dtype=dtype).copy()
    try:
        yield
    finally:
        np.fromstring = saved


def _ref_fds(path: Path) -> np.ndarray:
    """oct-converter's B-scans of a .fds: its chunk table and its @IMG_SCAN_03 header, the pixels laid out as
    its ``FDS.read_oct_volume`` lays them out. (That method then parses every metadata chunk and fails on a
    damaged date or name, which octseg does not read: those would count against the pixels here.)"""
    from oct_converter.readers import FDS
    from oct_converter.readers.binary_structs import fds_binary

    with _fromstring():
        chunks = FDS(path).chunk_dict
    start, _ = chunks[b"@IMG_SCAN_03"]
    with path.open("rb") as f:
        f.seek(start)
        h = fds_binary.oct_header.parse(f.read(22))
        n = h.width * h.height * h.number_slices
        raw = np.frombuffer(f.read(n * 2), dtype=np.uint16)
    volume = np.transpose(raw.reshape(h.width, h.height, h.number_slices, order="F"), [1, 0, 2])
    return np.stack([volume[:, :, i] for i in range(volume.shape[2])])


def _ref_boct(path: Path) -> np.ndarray:
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


def _ref_xml(path: Path) -> np.ndarray:
    """The HEYEX export's B-scans as the XML lists them, each image read by tifffile."""
    import xml.etree.ElementTree as ET

    import tifffile

    root = ET.parse(path).getroot()
    octs = root.findall(".//ImageType[Type='OCT']..")
    names = [(i.findtext("ImageData/ExamURL") or "").replace("\\", "/").split("/")[-1] for i in octs]
    return np.stack([tifffile.imread(path.parent / n) for n in names])


# ------------------------------------------------------------------------------------------ builders

def _tiff_per_page(path: Path) -> Path:
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for bscan in SMALL:
            tif.write(bscan, photometric="minisblack")
    return path


def _tiff_imagej(path: Path) -> Path:
    import tifffile

    tifffile.imwrite(path, SMALL, imagej=True)
    return path


def _tiff_zlib(path: Path) -> Path:
    import tifffile

    tifffile.imwrite(path, SMALL, photometric="minisblack", compression="zlib")
    return path


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(SMALL[0]).save(path)
    return path


def _jpeg(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(SMALL[0]).save(path, quality=90)
    return path


def _npy(path: Path) -> Path:
    np.save(path, SMALL)
    return path


def _dicom(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    return vf.write_opt_dicom(path, SMALL)


def _vol(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    return vf.write_vol(path, SMALL[:2].astype(np.float32) / 300, slo=np.full((4, 4), 9, np.uint8), layers=1)


def _e2e(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    return vf.write_e2e(path, (SMALL[:2].astype(np.uint16) << 7) + 20000, {0: np.full((2, 8), 2.0)})


def _mat(path: Path) -> Path:
    import scipy.io

    from tests.tasks.readers import vendor_files as vf

    arrays = vf.duke_arrays(z=4, y=6, x=8)
    scipy.io.savemat(path, {k: arrays[k] for k in ("images", "manualFluid1")})
    return path


def _mat73(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    arrays = vf.duke_arrays(z=4, y=6, x=8)
    return vf.write_mat73(path, {k: arrays[k] for k in ("images", "manualFluid1")})


def _fds(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    return vf.write_fds(path, SMALL.astype(np.uint16) * 100)


def _boct(path: Path) -> Path:
    from tests.tasks.readers import vendor_files as vf

    return vf.write_bioptigen(path, SMALL[:2].astype(np.uint16) * 100)


def _xml(path: Path) -> Path:
    import tifffile

    images = []
    for i, bscan in enumerate(SMALL[:2]):
        tifffile.imwrite(path.parent / f"B{i}.tif", bscan)
        images.append(f"<Image><ID>{i}</ID><ImageType><Type>OCT</Type></ImageType><OphthalmicAcquisitionContext>"
                      f"<Width>8</Width><Height>6</Height><ScaleX>0.0118</ScaleX><ScaleY>0.0039</ScaleY>"
                      f"<Start><Coord><X>0.0</X><Y>{i * 0.1}</Y></Coord></Start>"
                      f"<End><Coord><X>1.0</X><Y>{i * 0.1}</Y></Coord></End></OphthalmicAcquisitionContext>"
                      f"<ImageData><ExamURL>file:///C:\\export\\B{i}.tif</ExamURL></ImageData></Image>")
    path.write_text("<HEDX><BODY><Patient><ID>7</ID><LastName>Roe</LastName><Study><Series><Modality>OCT</Modality>"
                    f"<Type>Volume</Type><Laterality>L</Laterality>{''.join(images)}</Series></Study></Patient>"
                    "</BODY></HEDX>")
    return path


def formats() -> list[Format]:
    found = [
        Format("tiff (one series a page)", ".tif", _tiff_per_page, _ref_tiff),
        Format("tiff (ImageJ stack)", ".tif", _tiff_imagej, _ref_tiff),
        Format("tiff (zlib stack)", ".tif", _tiff_zlib, _ref_tiff),
        Format("npy", ".npy", _npy, _ref_npy),
        Format("png", ".png", _png, _ref_pil),
        Format("jpeg", ".jpg", _jpeg, _ref_pil),
        Format("dicom (OPT)", ".dcm", _dicom, _ref_dicom),
        Format("heidelberg .vol", ".vol", _vol, _ref_vol),
        Format("heidelberg .e2e", ".e2e", _e2e, _ref_e2e),
        Format("heyex xml", ".xml", _xml, _ref_xml),
        Format("duke .mat (v5)", ".mat", _mat, _ref_mat),
        Format("duke .mat (v7.3, HDF5)", ".mat", _mat73, _ref_mat73),
    ]
    try:
        import oct_converter  # noqa: F401 - the 'vendor' extra
    except ImportError:
        return found
    return found + [Format("topcon .fds", ".fds", _fds, _ref_fds), Format("bioptigen .oct", ".oct", _boct, _ref_boct)]


# ------------------------------------------------------------------------------------------ mutations

_EDGES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


def mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One seeded mutation of ``data``, named: cut, flip, set, int, drop, double or append."""
    n = len(data)
    kind = rng.choice(["cut", "cut", "flip", "set", "int", "int", "int", "drop", "double", "append"])
    b = bytearray(data)
    at = int(rng.integers(0, n))
    if kind == "cut":
        return kind, data[: int(rng.integers(1, n))]
    if kind == "flip":
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(0, n))
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == "set":
        width = int(rng.integers(1, 5))
        b[at:at + width] = bytes([int(rng.choice([0, 0xFF, int(rng.integers(0, 256))]))] * width)[: n - at]
    elif kind == "int":
        size = int(rng.choice([2, 4, 8]))
        at -= at % size
        if at + size > n:
            return mutate(data, rng)
        old = int.from_bytes(b[at:at + size], "little")
        value = int(rng.choice([*_EDGES, old + 1, max(old - 1, 0), old * 2, n, n + 1, max(n - 1, 0)]))
        b[at:at + size] = (value % (1 << (8 * size))).to_bytes(size, "little" if rng.random() < 0.8 else "big")
    elif kind == "drop":
        del b[at:at + int(rng.integers(1, 17))]
    elif kind == "double":
        k = int(rng.integers(1, 17))
        b[at:at] = b[at:at + k]
    else:
        b += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    return kind, bytes(b)


class _Hang(BaseException):  # not an Exception: readers that catch those must not swallow it
    pass


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def alarm(signum, frame):
        raise _Hang()

    import time

    outer = signal.alarm(0)  # pytest-timeout's alarm, if any: given back afterwards, less the time spent
    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.alarm(max(1, outer - int(time.monotonic() - start)))


def probe(fmt: Format, count: int, workdir: Path, seed: int = 0) -> tuple[Counter, list[str]]:
    """Mutate ``fmt``'s file ``count`` times; (outcome counts, examples of what must not happen)."""
    source_dir = workdir / "original"
    source_dir.mkdir(parents=True)
    original = fmt.build(source_dir / f"scan{fmt.suffix}")
    data = original.read_bytes()
    rng = np.random.default_rng([seed, sum(map(ord, fmt.name))])
    counts: Counter = Counter()
    bad: list[str] = []
    target_dir = workdir / "mutated"
    target_dir.mkdir()
    for f in source_dir.iterdir():  # files beside the source (a HEYEX export's images) come along unchanged
        if f != original:
            (target_dir / f.name).write_bytes(f.read_bytes())
    target = target_dir / original.name
    for i in range(count):
        kind, mutated = mutate(data, rng)
        if mutated == data:
            continue
        target.write_bytes(mutated)
        counts["tried"] += 1
        try:
            with _deadline(SECONDS):
                vol = read_volume(target, max_voxels=MAX_VOXELS, options=fmt.options)
        except ReadError as e:
            if "\n" in str(e) or original.name not in str(e):
                counts["refused, not one line naming the file"] += 1
                bad.append(f"{kind} #{i}: {str(e)[:200]!r}")
            else:
                counts["refused"] += 1
            continue
        except _Hang:
            counts["crashed"] += 1
            bad.append(f"{kind} #{i}: hung for {SECONDS} s")
            continue
        except Exception as e:  # noqa: BLE001 - what the probe looks for
            counts["crashed"] += 1
            bad.append(f"{kind} #{i}: {type(e).__name__}: {str(e)[:200]}")
            continue
        try:
            with _deadline(SECONDS):
                expected = fmt.reference(target)
        except Exception as e:  # noqa: BLE001 - the library cannot read what was ingested
            counts["stored in part"] += 1
            bad.append(f"{kind} #{i}: read as {vol.image.shape}, but the library fails ({type(e).__name__}: {e})"[:300])
            continue
        if vol.image.shape == expected.shape and np.array_equal(vol.image, expected, equal_nan=True):
            counts["ingested whole"] += 1
        else:
            counts["stored in part"] += 1
            bad.append(f"{kind} #{i}: read as {vol.image.shape} {vol.image.dtype}, the library reads "
                       f"{expected.shape} {expected.dtype}")
    return counts, bad


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The libraries' own complaints about broken files (logged or warned) stay off the console."""
    names = ("tifffile", "pydicom", "eyepy", "PIL", "oct_converter", "h5py")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 1000
    seed = int(argv[1]) if len(argv) > 1 else 0
    rows, failed = [], False
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        for k, fmt in enumerate(formats()):
            counts, bad = probe(fmt, count, Path(tmp) / str(k), seed=seed)
            rows.append((fmt.name, counts))
            failed |= bool(bad)
            for line in bad[:12]:
                print(f"  {fmt.name}: {line}", file=sys.stderr)
    print("| format | tried | ingested whole | refused (one line) | stored in part | crashed |")
    print("|---|---|---|---|---|---|")
    total: Counter = Counter()
    for name, c in rows:
        total += c
        print(f"| {name} | {c['tried']} | {c['ingested whole']} | {c['refused']} | {c['stored in part']} | "
              f"{c['crashed'] + c['refused, not one line naming the file']} |")
    print(f"| all | {total['tried']} | {total['ingested whole']} | {total['refused']} | {total['stored in part']} | "
          f"{total['crashed'] + total['refused, not one line naming the file']} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
