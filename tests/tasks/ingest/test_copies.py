"""A scan the archive holds is not stored again under another name (a copy, a link), unless its masks differ."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.flows.config import IngestConfig
from octseg.flows.plans import plan_ingest
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import ingest_source

RNG = np.random.default_rng(11)
STACK = (RNG.random((3, 16, 24)) * 250).astype(np.uint8)
GREY = {"photometric": "minisblack"}


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "stack.tif"
    tifffile.imwrite(path, STACK, **GREY)
    return path


def _mask(folder: Path, name: str, row: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(STACK.shape, np.uint8)
    mask[:, row : row + 3, 4:12] = 255
    tifffile.imwrite(folder / name, mask, **GREY)
    return folder


@pytest.mark.parametrize("how", ["copy", "symlink"])
def test_a_copy_under_another_name_is_not_stored_twice(tmp_path: Path, scan: Path, how: str) -> None:
    archive = tmp_path / "arc.zarr"
    assert ingest_source(scan, archive).status == "written"
    other = tmp_path / "in" / "renamed copy.tif"
    shutil.copy(scan, other) if how == "copy" else os.symlink(scan, other)
    result = ingest_source(other, archive)
    assert (result.status, result.volume_id) == ("skipped", "stack")
    assert "same scan" in result.warnings[0] and "'renamed_copy'" in result.warnings[0]
    assert open_archive(archive, create=False).volume_ids() == ["stack"]
    # the next plan knows the copy from the catalogue without reading it again
    todo, summary = plan_ingest(IngestConfig(sources=[other, scan], archive=archive, dask_address=None))
    assert todo == [] and sorted(summary.skipped) == ["stack", "stack"]
    assert summary.warnings == [f"stack: {other} is the same scan (same bytes, same masks): not stored again as "
                                f"'renamed_copy'"]


def test_the_same_image_with_other_masks_is_a_volume_of_its_own(tmp_path: Path, scan: Path) -> None:
    """Two graders' masks on one scan: two volumes."""
    archive = tmp_path / "arc.zarr"
    assert ingest_source(scan, archive, _mask(tmp_path / "g1", "stack.tif", 2)).status == "written"
    second = tmp_path / "in2" / "stack_g2.tif"
    second.parent.mkdir()
    shutil.copy(scan, second)
    assert ingest_source(second, archive, _mask(tmp_path / "g2", "stack_g2.tif", 8)).status == "written"
    again = ingest_source(tmp_path / "in" / "stack.tif", archive)  # no masks given: the held scan
    assert (again.status, again.volume_id) == ("skipped", "stack")
    assert open_archive(archive, create=False).volume_ids() == ["stack", "stack_g2"]


def test_two_copies_ingested_at_once_give_one_volume(tmp_path: Path, scan: Path) -> None:
    archive = tmp_path / "arc.zarr"
    open_archive(archive, create=True)
    copies = [tmp_path / "in" / f"copy_{i}.tif" for i in range(4)]
    for c in copies:
        shutil.copy(scan, c)
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(ingest_source(c, archive))) for c in copies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in results) == ["skipped"] * 3 + ["written"]
    assert len(open_archive(archive, create=False).volume_ids()) == 1


def test_a_labels_folder_without_masks_for_a_scan_is_said(tmp_path: Path, scan: Path) -> None:
    result = ingest_source(scan, tmp_path / "arc.zarr", _mask(tmp_path / "labels", "other.tif", 2))
    assert result.status == "written" and result.annotated == []
    assert any("holds no masks for it" in w for w in result.warnings)
