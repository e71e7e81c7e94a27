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
from octseg.tasks.readers.base import ReadError
from octseg.tasks.readers.registry import read_volume

from tests.tasks.readers.probe_references import (
    ref_boct,
    ref_dicom,
    ref_e2e,
    ref_fds,
    ref_mat,
    ref_mat73,
    ref_npy,
    ref_pil,
    ref_tiff,
    ref_vol,
    ref_xml,
)

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
        Format("tiff (one series a page)", ".tif", _tiff_per_page, ref_tiff),
        Format("tiff (ImageJ stack)", ".tif", _tiff_imagej, ref_tiff),
        Format("tiff (zlib stack)", ".tif", _tiff_zlib, ref_tiff),
        Format("npy", ".npy", _npy, ref_npy),
        Format("png", ".png", _png, ref_pil),
        Format("jpeg", ".jpg", _jpeg, ref_pil),
        Format("dicom (OPT)", ".dcm", _dicom, ref_dicom),
        Format("heidelberg .vol", ".vol", _vol, ref_vol),
        Format("heidelberg .e2e", ".e2e", _e2e, ref_e2e),
        Format("heyex xml", ".xml", _xml, ref_xml),
        Format("duke .mat (v5)", ".mat", _mat, ref_mat),
        Format("duke .mat (v7.3, HDF5)", ".mat", _mat73, ref_mat73),
    ]
    try:
        import oct_converter  # noqa: F401 - the 'vendor' extra
    except ImportError:
        return found
    return found + [Format("topcon .fds", ".fds", _fds, ref_fds), Format("bioptigen .oct", ".oct", _boct, ref_boct)]


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
