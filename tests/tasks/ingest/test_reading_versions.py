"""Volumes read under older reading rules: read again by the next ingest, kept (with what was computed from
them) when today's rules give the same pixels and masks, written again when they do not. The volumes "of an
older octseg" are real ingests whose provenance loses the versions it records (what older versions wrote)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.rules import MASK_READING, reading_of
from octseg.tasks.ingest.source import ingest_source

RNG = np.random.default_rng(11)
STACK = (RNG.random((3, 12, 20)) * 250).astype(np.uint8)
MASK = np.zeros((12, 20), np.uint8)
MASK[3:6, 4:9] = 255
MODEL = {"model_name": "m", "model_version": "1", "run_id": "r", "model_uri": "models:/m/1"}


def _as_older_octseg(archive: Path, volume_id: str) -> None:
    """The volume's provenance as an octseg before reading versions wrote it: without them."""
    path = archive / volume_id / "zarr.json"
    doc = json.loads(path.read_text())
    for key in ("reading", "mask_reading"):
        doc["attributes"]["octseg"].pop(key, None)
    path.write_text(json.dumps(doc))


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder of PNG B-scans and a labels folder with one mask."""
    src, labels = tmp_path / "src" / "eye", tmp_path / "labels" / "eye"
    src.mkdir(parents=True)
    labels.mkdir(parents=True)
    for z in range(3):
        Image.fromarray(STACK[z]).save(src / f"b{z}.png")
    Image.fromarray(MASK).save(labels / "b1.png")
    return src, labels.parent


def test_versions_are_recorded(tmp_path: Path, folder) -> None:
    src, labels = folder
    ingest_source(src, tmp_path / "a.zarr", labels)
    meta = open_archive(tmp_path / "a.zarr", create=False).volume_meta("eye")
    assert (meta["reading"], meta["mask_reading"]) == (reading_of("folder"), MASK_READING) and meta["reading"] >= 2


def test_same_pixels_under_new_rules_keep_the_volume_and_its_derived_arrays(tmp_path: Path, folder) -> None:
    src, labels = folder
    path = tmp_path / "a.zarr"
    ingest_source(src, path, labels)
    archive = open_archive(path, create=False)
    archive.write_prediction("eye", np.zeros(STACK.shape, np.uint8), class_names={0: "background", 1: "fluid"},
                             model_info=MODEL)
    fingerprint = archive.image_fingerprint("eye")
    _as_older_octseg(path, "eye")
    again = ingest_source(src, path, labels)
    assert again.status == "skipped" and again.annotated == [1]
    meta = archive.volume_meta("eye")
    assert (meta["reading"], meta["mask_reading"]) == (reading_of("folder"), MASK_READING)
    assert archive.image_fingerprint("eye") == fingerprint and archive.prediction("eye") is not None
    assert ingest_source(src, path, labels).status == "skipped"  # recorded now: not read a third time


def test_without_masks_given_only_the_reader_rules_count(tmp_path: Path, folder) -> None:
    """Stored masks read under older mask rules cannot be read again without their folder: kept as they are,
    and the volume is not read again on every ingest for them."""
    src, labels = folder
    path = tmp_path / "a.zarr"
    ingest_source(src, path, labels)
    _as_older_octseg(path, "eye")
    assert ingest_source(src, path).status == "skipped"
    meta = open_archive(path, create=False).volume_meta("eye")
    assert meta["reading"] == reading_of("folder") and "mask_reading" not in meta
    assert ingest_source(src, path).status == "skipped"
    assert open_archive(path, create=False).manual_labels("eye")[1] == [1]
    assert ingest_source(src, path, labels).status == "skipped"  # masks given again: read, same labels
    assert open_archive(path, create=False).volume_meta("eye")["mask_reading"] == MASK_READING


def test_pixels_that_read_differently_now_are_written_again(tmp_path: Path) -> None:
    """An older octseg ignored the TIFF Orientation tag: its volume holds the pixels as stored, today's rules
    turn them. Simulated by storing the unturned pixels under the older provenance."""
    src = tmp_path / "turned.tif"
    tifffile.imwrite(src, STACK, photometric="minisblack", extratags=[(274, "H", 1, 3, True)])  # 180 degrees
    path = tmp_path / "a.zarr"
    ingest_source(src, path)
    archive = open_archive(path, create=False)
    today = archive.image("turned")[...]
    np.testing.assert_array_equal(today, STACK[:, ::-1, ::-1])
    meta = archive.volume_meta("turned")
    archive.write_volume("turned", STACK, provenance=meta)  # what the older reading stored
    _as_older_octseg(path, "turned")
    archive.write_prediction("turned", np.zeros(STACK.shape, np.uint8), class_names={0: "background", 1: "fluid"},
                             model_info=MODEL)
    assert ingest_source(src, path).status == "written"
    np.testing.assert_array_equal(archive.image("turned")[...], today)
    assert archive.prediction("turned") is None  # computed from the old pixels: gone with them
    assert archive.volume_meta("turned")["reading"] == reading_of("tiff")


def test_the_plan_and_the_catalogue_command_see_stale_volumes(tmp_path: Path, folder) -> None:
    from octseg.flows.config import IngestConfig
    from octseg.flows.plans import plan_ingest
    from tests.flows.cli_runner import invoke

    src, labels = folder
    path = tmp_path / "a.zarr"
    config = IngestConfig(sources=[src], archive=path, labels=labels, dask_address=None)
    ingest_source(src, path, labels)
    assert plan_ingest(config)[0] == []
    _as_older_octseg(path, "eye")
    assert plan_ingest(config)[0] == [str(src)]
    assert plan_ingest(config.model_copy(update={"labels": None}))[0] == [str(src)]  # the reader's rules
    shown = invoke("catalogue", "--archive", str(path))
    assert shown.exit_code == 0 and "1 volume(s) read under older reading rules" in shown.plain
    ingest_source(src, path, labels)
    assert plan_ingest(config)[0] == []
    assert "older reading rules" not in invoke("catalogue", "--archive", str(path)).plain


def test_masks_from_a_folder_are_never_dropped_by_a_reread(tmp_path: Path) -> None:
    """Today's rules turn the image; its masks (turned with it) can only be read again from their folder: without
    --labels the source fails naming what to do and the volume stays as it was; with them it is written again."""
    src, labels = tmp_path / "turned.tif", tmp_path / "labels"
    labels.mkdir()
    mask = np.zeros(STACK.shape, np.uint8)
    mask[1, 2:5, 3:9] = 255
    turn = {"photometric": "minisblack", "extratags": [(274, "H", 1, 3, True)]}
    tifffile.imwrite(src, STACK, **turn)
    tifffile.imwrite(labels / "turned.tif", mask, **turn)
    path = tmp_path / "a.zarr"
    ingest_source(src, path, labels)
    archive = open_archive(path, create=False)
    today = archive.manual_labels("turned")[0][...]
    archive.write_volume("turned", STACK, provenance=archive.volume_meta("turned"), manual_labels=mask // 255,
                         annotated=[1])  # what the older reading stored: neither turned
    _as_older_octseg(path, "turned")
    with pytest.raises(ValueError, match="turned.tif: read under newer rules.*ingest it again with --labels"):
        ingest_source(src, path)
    np.testing.assert_array_equal(archive.manual_labels("turned")[0][...], mask // 255)
    np.testing.assert_array_equal(archive.image("turned")[...], STACK)
    assert ingest_source(src, path, labels).status == "written"
    np.testing.assert_array_equal(archive.manual_labels("turned")[0][...], today)
    assert ingest_source(src, path).status == "skipped"


def test_a_newer_reading_is_not_read_back_and_a_kept_volume_says_its_warnings(tmp_path: Path, folder) -> None:
    src, labels = folder
    path = tmp_path / "a.zarr"
    Image.fromarray(MASK).save(labels / "eye" / "b7.png")  # names no B-scan of the folder
    ingest_source(src, path, labels)
    _as_older_octseg(path, "eye")
    kept = ingest_source(src, path, labels)
    assert kept.status == "skipped" and any("name no B-scan" in w for w in kept.warnings)
    assert any("name no B-scan" in w for w in open_archive(path, create=False).volume_meta("eye")["warnings"])
    doc_path = path / "eye" / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["octseg"].update(reading=99, mask_reading=99)  # written by a newer octseg
    doc_path.write_text(json.dumps(doc))
    assert ingest_source(src, path, labels).status == "skipped"
    assert open_archive(path, create=False).volume_meta("eye")["reading"] == 99
