"""``octseg ingest`` on hostile names and contents mixed with good files: each bad one is one escaped
line naming it, the good ones land, nothing partial stays, and repairs are said as warnings."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.tasks.archive.store import open_archive
from tests.flows.cli_runner import invoke as _invoke


def _stack(seed: int, n: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 32, 48)) * 250).astype(np.uint8)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_hostile_batch_each_fails_alone_and_good_files_land(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "good.npy", _stack(0))
    tifffile.imwrite(scans / "three.tif", _stack(1))  # tifffile defaults: planar "RGB" -> still 3 B-scans
    np.save(scans / "huge_ints.npy", _stack(2).astype(np.int64) << 32)  # beyond float32: a warning
    bad_nan = _stack(3).astype(np.float32)
    bad_nan[2, 5, 5] = np.nan
    np.save(scans / "nan.npy", bad_nan)
    tifffile.imwrite(scans / "scale.ome.tif", _stack(4), ome=True, photometric="minisblack",
                     metadata={"PhysicalSizeX": 5.0, "PhysicalSizeY": 3.9, "PhysicalSizeZ": 120.0})
    with tifffile.TiffFile(scans / "scale.ome.tif") as tif:
        xml = tif.ome_metadata.replace('PhysicalSizeX="5.0"', 'PhysicalSizeX="abc"')
    tifffile.tiffcomment(scans / "scale.ome.tif", xml.encode())
    os.symlink(scans / "loop_b.tif", scans / "loop_a.tif")
    os.symlink(scans / "loop_a.tif", scans / "loop_b.tif")
    latin1 = os.path.join(os.fsencode(scans), b"caf\xe9.npy")  # not UTF-8: cannot travel in Prefect's JSON
    with open(latin1, "wb") as fh:
        np.save(fh, _stack(5))
    hostile = scans / "evil\x1b[2J\x1b]0;pwned\x07.npy"  # clear screen + set terminal title
    hostile.write_bytes(b"\x93NUMPY garbage")
    os.mkfifo(scans / "pipe.dcm")  # opening it would wait for a writer forever
    archive = tmp_path / "a.zarr"

    result = _invoke("ingest", str(scans / "good.npy"), str(scans / "three.tif"), str(scans / "huge_ints.npy"),
                     str(scans / "nan.npy"), str(scans / "scale.ome.tif"), str(scans / "loop_a.tif"),
                     os.fsdecode(latin1), str(hostile), str(scans / "missing.npy"), str(scans / "pipe.dcm"),
                     "--archive", str(archive))

    assert result.exit_code == 1, result.output
    assert "\x1b[2J" not in result.output and "\x07" not in result.output  # escaped, never raw
    assert "4 written, 0 up to date, 6 failed" in result.plain, result.plain
    failed = [line for line in result.plain.splitlines() if "failed:" in line]
    for phrase in ["nan.npy: 1 NaN or infinite voxels (B-scan 2)", "loop_a.tif: symbolic link loop",
                   "caf\\xe9.npy: file name is not valid UTF-8", "evil\\x1b[2J\\x1b]0;pwned\\x07.npy:",
                   "missing.npy: does not exist", "pipe.dcm: not a regular file (a FIFO)"]:
        assert sum(phrase in line for line in failed) == 1, (phrase, failed)
    assert re.search(r"warning: huge_ints: .*exceed float32's exact integers", result.plain), result.plain
    assert re.search(r"warning: scale: OME PhysicalSizeX='abc'", result.plain), result.plain

    stored = open_archive(archive, create=False)
    assert stored.volume_ids() == ["good", "huge_ints", "scale", "three"]
    assert stored.image("three").shape == (3, 32, 48)
    assert stored.scale_um("scale") is None and stored.volume_meta("scale")["warnings"]
    assert not (tmp_path / ".a.zarr.staging").exists() and not (tmp_path / ".a.zarr.claims").exists()
