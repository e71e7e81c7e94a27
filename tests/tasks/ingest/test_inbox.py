"""The drop folder's scan over vendor exports: what is a candidate, what fails alone."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from octseg.tasks.ingest.inbox import scan_inbox
from tests.tasks.readers import vendor_files as vf

EYEPY = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "heyex_eyepy_tests"


def test_vendor_exports_are_candidates_and_a_fifo_fails_alone(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    vf.write_opt_dicom(inbox / "1.2.840.99.1", (np.arange(2 * 8 * 8) % 251).astype(np.uint8).reshape(2, 8, 8))
    vf.write_mat5(inbox / "Subject_09.mat", vf.duke_arrays())
    (inbox / "notes.txt").write_text("not a scan")
    os.mkfifo(inbox / "pipe.vol")
    if EYEPY.is_dir():
        for f in (EYEPY / "heyex_xml").iterdir():  # an export's files loose in the inbox
            shutil.copy(f, inbox / f.name)
    scan = scan_inbox(inbox, tmp_path / "a.zarr", settle_seconds=0)
    names = sorted(Path(p).name for p in scan.new)
    expected = ["1.2.840.99.1", "Subject_09.mat"] + (["B11.tif", "test_dummy.xml"] if EYEPY.is_dir() else [])
    assert names == sorted(expected)  # B1..B10 and NIR1 belong to the XML; B11 is named by nothing
    (problem,) = scan.unreadable
    assert "pipe.vol: not a regular file (a FIFO)" in problem


@pytest.mark.skipif(not EYEPY.is_dir(), reason="../shared/data is not here")
def test_an_export_folder_is_one_candidate(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    shutil.copytree(EYEPY / "heyex_xml", inbox / "export")
    scan = scan_inbox(inbox, tmp_path / "a.zarr", settle_seconds=0)
    assert [Path(p).name for p in scan.new] == ["export"]
