"""The registry of readers: which reader takes a path, one line of formats, and a format added by one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.archive.layout import volume_id_from_path
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.inbox import scan_inbox
from octseg.tasks.ingest.source import ingest_source
from octseg.tasks.readers.base import ExportReader, Limits, ReadError, ScanVolume, check_voxels
from octseg.tasks.readers.headers import new_volume
from octseg.tasks.readers.octconverter import HEAVY_EXTRA
from octseg.tasks.readers.registry import READERS, format_summary, read_volume, reader_for
from tests.tasks.readers import vendor_files as vf
from tests.tasks.readers.checks import RNG, VOL8

VENDOR_SUFFIXES = {s: r.name for r in READERS if r.vendor for s in r.suffixes}


def is_vendor_file(path: str | Path) -> bool:
    return (reader := reader_for(path)) is not None and reader.vendor


def test_suffixes_and_detection(tmp_path: Path) -> None:
    assert VENDOR_SUFFIXES == {".vol": "heyex-vol", ".e2e": "heyex-e2e", ".xml": "heyex-xml", ".mat": "duke-mat",
                               ".dcm": "dicom", ".fds": "topcon-fds", ".fda": "topcon-fda", ".img": "zeiss-img",
                               ".oct": "bioptigen-oct"}
    assert HEAVY_EXTRA == "vendor"
    assert is_vendor_file("x/scan.VOL") and is_vendor_file(tmp_path / "missing.E2E")
    no_suffix = vf.write_opt_dicom(tmp_path / "IM000001", VOL8)
    odd_suffix = vf.write_opt_dicom(tmp_path / "scan.1", VOL8)
    assert is_vendor_file(no_suffix) and is_vendor_file(odd_suffix)
    (tmp_path / "b.png").write_bytes(b"\x89PNG" + bytes(200))
    assert not is_vendor_file(tmp_path / "b.png") and not is_vendor_file(tmp_path / "none.txt")
    assert read_volume(no_suffix).reader == "dicom"


@pytest.mark.parametrize("suffix", sorted(VENDOR_SUFFIXES))
def test_garbage_and_empty_files(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(ReadError, match=r"empty file \(0 bytes\)"):
        read_volume(empty)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(RNG.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(ReadError) as err:
        read_volume(garbage)
    assert "\n" not in str(err.value) and err.value.path == garbage


def test_not_a_vendor_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReadError, match="unsupported suffix '.txt'"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(ReadError, match="does not exist"):
        read_volume(tmp_path / "gone.vol")


# ----- the dispatch rules and what follows from the one list -----


def test_which_reader_takes_a_path(tmp_path: Path) -> None:
    dual = vf.write_opt_dicom(tmp_path / "dual.tif", VOL8)  # "DICM" at byte 128 under a TIFF name
    named_img = vf.write_opt_dicom(tmp_path / "IM0001.img", VOL8)  # a DICOM file under a Zeiss suffix
    folder = tmp_path / "bscans"
    folder.mkdir()
    cases = [  # (path, the reader's name or None)
        (dual, "tiff"),  # a plain image suffix is taken at its word (a DICOM-TIFF dual file is a TIFF)
        (named_img, "dicom"),  # otherwise the content decides before the suffix
        (tmp_path / "scan.OME.TIF", "tiff"),
        (tmp_path / "missing.vol", "heyex-vol"),  # by suffix: the reader says it does not exist
        (tmp_path / ".tif", None),  # a suffix alone is no name
        (tmp_path / "notes.txt", None),
        (folder, "folder"),
    ]
    for path, name in cases:
        reader = reader_for(path)
        assert (reader.name if reader else None) == name, path
    assert read_volume(named_img).reader == "dicom"


def test_unsupported_suffix_lists_every_registered_suffix(tmp_path: Path) -> None:
    with pytest.raises(ReadError) as err:
        read_volume(tmp_path / "scan.XYZ")
    assert err.value.reason == ("unsupported suffix '.xyz' (expected one of .tif, .tiff, .npy, .png, .jpg, .jpeg, "
                                "a vendor export (.vol, .e2e, .xml, .dcm, .mat, .fds, .fda, .img, .oct) or a "
                                "folder of B-scans)")


def test_format_summary_is_the_source_help_of_the_command() -> None:
    assert format_summary() == (
        "TIFF stacks, .npy files, 2-D images, folders of 2-D B-scans (one folder = one volume), or vendor "
        "exports: Heidelberg .vol/.e2e/HEYEX .xml, DICOM, Duke .mat; Topcon .fds/.fda, Zeiss .img and "
        "Bioptigen .oct with the 'vendor' extra.")


@pytest.mark.parametrize(("name", "volume_id"), [  # the ids volumes had before the registry: kept
    ("eye.ome.tiff", "eye"), ("eye.OME.TIF", "eye"), ("eye.tif", "eye"), ("eye.npy", "eye"), ("eye.jpeg", "eye"),
    ("eye.vol", "eye"), ("eye.E2E", "eye"), ("eye.dcm", "eye"), ("eye.oct", "eye"), ("eye.1", "eye.1"),
    (".vol", "vol"), ("Doe, Jane.fds", "Doe__Jane"),
])
def test_volume_ids_leave_out_registered_suffixes(tmp_path: Path, name: str, volume_id: str) -> None:
    assert volume_id_from_path(tmp_path / name) == volume_id


def test_importing_the_registry_loads_no_vendor_library() -> None:
    code = ("import sys; import octseg.tasks.readers.registry as r; r.format_summary(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('eyepy', 'pydicom', 'h5py', 'oct_converter', 'torch', 'zarr', 'dask', 'prefect', 'mlflow')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----- a new format is one module plus one registry line -----


class ToyReader(ExportReader):
    """A made-up format: b"TOY1", three uint8 sizes (Z, Y, X), then the uint8 voxels."""

    name, suffixes, label = "toy", (".toy",), "Toy .toy"

    def decode(self, path: Path, limits: Limits, options) -> ScanVolume:
        data = path.read_bytes()
        if data[:4] != b"TOY1":
            raise ReadError(path, "not a toy file")
        shape = tuple(data[4:7])
        check_voxels(path, shape, limits.max_voxels)
        image = np.frombuffer(data, np.uint8, int(np.prod(shape)), 7).reshape(shape)
        return new_volume(image, None, meta={"scan_pattern": "volume"})


def write_toy(path: Path, image: np.ndarray) -> Path:
    path.write_bytes(b"TOY1" + bytes(image.shape) + image.astype(np.uint8).tobytes())
    return path


@pytest.fixture
def toy_format():
    """The one line a new format needs, for the length of a test."""
    reader = ToyReader()
    READERS.append(reader)
    yield reader
    READERS.remove(reader)


def test_a_registered_format_is_read_ingested_and_found_in_the_inbox(tmp_path: Path, toy_format) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    toy = write_toy(inbox / "eye_7.toy", VOL8)
    (inbox / "notes.txt").write_text("not a scan")

    vol = read_volume(toy)
    assert vol.reader == "toy" and vol.meta["format"] == "toy" and vol.source == toy
    np.testing.assert_array_equal(vol.image, VOL8)
    with pytest.raises(ReadError, match="exceeds the limit of 100"):
        read_volume(toy, max_voxels=100)
    assert "Duke .mat, Toy .toy; Topcon" in format_summary()

    scan = scan_inbox(inbox, tmp_path / "a.zarr", settle_seconds=0)
    assert [Path(p).name for p in scan.new] == ["eye_7.toy"]
    result = ingest_source(toy, tmp_path / "a.zarr")
    assert (result.status, result.volume_id) == ("written", "eye_7")
    assert open_archive(tmp_path / "a.zarr").volume_meta("eye_7")["reader"] == "toy"


def test_without_its_line_the_format_is_unknown(tmp_path: Path) -> None:
    toy = write_toy(tmp_path / "eye_7.toy", VOL8)
    with pytest.raises(ReadError, match="unsupported suffix '.toy'"):
        read_volume(toy)
