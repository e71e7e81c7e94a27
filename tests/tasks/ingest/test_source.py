"""Ingest of single sources into a real archive under tmp_path (plain function, no Prefect server)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from octseg.tasks.archive.layout import ArchiveError
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import ingest_source, ingest_source_task, IngestResult, is_up_to_date
from octseg.tasks.readers.base import ReadError

RNG = np.random.default_rng(3)
STACK = (RNG.random((4, 16, 24)) * 250).astype(np.uint8)  # (Z, Y, X)
MASK = np.zeros(STACK.shape, np.uint8)
MASK[1, 4:8, 5:15] = 255
GREY = {"photometric": "minisblack"}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """A TIFF stack with a mask, a folder of PNG B-scans with masks for B-scans 0 and 2, a lone PNG."""
    src, labels = tmp_path / "src", tmp_path / "labels"
    (labels / "eye_b").mkdir(parents=True)
    (src / "eye_b").mkdir(parents=True)
    tifffile.imwrite(src / "eye_a.tif", STACK, **GREY)
    tifffile.imwrite(labels / "eye_a.tif", MASK, **GREY)
    for z in range(4):
        Image.fromarray(STACK[z]).save(src / "eye_b" / f"b_{z}.png")
    for z in (0, 2):
        Image.fromarray(MASK[1]).save(labels / "eye_b" / f"b_{z}.png")
    Image.fromarray(STACK[0]).save(src / "eye c.png")
    return {"a": src / "eye_a.tif", "b": src / "eye_b", "c": src / "eye c.png", "labels": labels}


def _ino(archive_path: Path, volume_id: str) -> int:
    return os.stat(archive_path / volume_id).st_ino


def test_ingest_writes_volumes(tmp_path: Path, sources: dict[str, Path]) -> None:
    arc_path = tmp_path / "arc.zarr"
    results = [ingest_source(sources[k], arc_path, sources["labels"]) for k in "abc"]
    assert [(r.volume_id, r.status, r.n_bscans, r.annotated) for r in results] == [
        ("eye_a", "written", 4, [0, 1, 2, 3]),
        ("eye_b", "written", 4, [0, 2]),
        ("eye_c", "written", 1, []),  # no mask: not annotated
    ]
    assert all(isinstance(r, IngestResult) and not hasattr(r, "error") for r in results)
    arc = open_archive(arc_path, create=False)
    assert arc.volume_ids() == ["eye_a", "eye_b", "eye_c"]
    np.testing.assert_array_equal(arc.image("eye_b")[:], STACK)
    labels, annotated = arc.manual_labels("eye_b")
    assert annotated == [0, 2]
    np.testing.assert_array_equal(labels[:], np.stack([MASK[1] // 255, 0 * MASK[1], MASK[1] // 255, 0 * MASK[1]]))
    meta = arc.volume_meta("eye_a")
    assert meta["source"] == str(sources["a"].resolve()) and meta["reader"] == "tiff"
    assert len(meta["source_sha256"]) == 64 and len(meta["labels_sha256"]) == 64
    assert arc.manual_labels("eye_c") is None and arc.volume_meta("eye_c")["labels_sha256"] is None


def test_rerun_skips_without_rewriting(tmp_path: Path, sources: dict[str, Path]) -> None:
    arc_path = tmp_path / "arc.zarr"
    for k in "abc":
        ingest_source(sources[k], arc_path, sources["labels"])
    inodes = {v: _ino(arc_path, v) for v in ("eye_a", "eye_b", "eye_c")}
    again = [ingest_source(sources[k], arc_path, sources["labels"]) for k in "abc"]
    assert [(r.status, r.n_bscans, r.annotated) for r in again] == [
        ("skipped", 4, [0, 1, 2, 3]), ("skipped", 4, [0, 2]), ("skipped", 1, [])]
    assert {v: _ino(arc_path, v) for v in inodes} == inodes  # nothing was moved into place again


@pytest.mark.parametrize(("change", "key"), [
    (lambda s: tifffile.imwrite(s["a"], STACK[::-1], **GREY), "a"),                         # new image bytes
    (lambda s: tifffile.imwrite(s["labels"] / "eye_a.tif", MASK[::-1], **GREY), "a"),       # new mask
    (lambda s: Image.fromarray(MASK[1]).save(s["labels"] / "eye_b" / "b_3.png"), "b"),      # one more mask
    (lambda s: (s["b"] / "b_3.png").rename(s["b"] / "b_4.png"), "b"),                       # renamed B-scan
])
def test_changed_source_is_ingested_again(tmp_path: Path, sources: dict[str, Path], change, key: str) -> None:
    arc_path = tmp_path / "arc.zarr"
    first = ingest_source(sources[key], arc_path, sources["labels"])
    fingerprints = lambda: tuple(open_archive(arc_path).volume_meta(first.volume_id)[k]  # noqa: E731
                                 for k in ("source_sha256", "labels_sha256"))
    before = fingerprints()
    change(sources)
    second = ingest_source(sources[key], arc_path, sources["labels"])
    assert (first.status, second.status) == ("written", "written")
    assert fingerprints() != before
    assert ingest_source(sources[key], arc_path, sources["labels"]).status == "skipped"


def test_ingest_without_labels_dir_then_with_it(tmp_path: Path, sources: dict[str, Path]) -> None:
    arc_path = tmp_path / "arc.zarr"
    assert ingest_source(sources["a"], arc_path).annotated == []
    result = ingest_source(sources["a"], arc_path, sources["labels"])
    assert (result.status, result.annotated) == ("written", [0, 1, 2, 3])


MODEL = {"model_name": "m", "model_version": "1", "run_id": "r", "model_uri": "models:/m/1"}


def _no_masks(s: dict[str, Path]) -> Path:
    (s["labels"].parent / "other_labels").mkdir()
    return s["labels"].parent / "other_labels"


def _changed_mask(s: dict[str, Path]) -> Path:
    tifffile.imwrite(s["labels"] / "eye_a.tif", MASK[::-1], **GREY)
    return s["labels"]


def _one_more_mask(s: dict[str, Path]) -> Path:
    Image.fromarray(MASK[1]).save(s["labels"] / "eye_b" / "b_3.png")
    return s["labels"]


# (id, source key, labels dir of the rerun after a change, status, annotated, volume kept as it was)
RERUNS = [
    ("no labels dir", "a", lambda s: None, "skipped", [0, 1, 2, 3], True),
    ("no labels dir, folder", "b", lambda s: None, "skipped", [0, 2], True),
    ("labels dir without its masks", "a", _no_masks, "skipped", [0, 1, 2, 3], True),
    ("same masks", "b", lambda s: s["labels"], "skipped", [0, 2], True),
    ("changed mask", "a", _changed_mask, "written", [0, 1, 2, 3], False),
    ("one more mask", "b", _one_more_mask, "written", [0, 2, 3], False),
]


@pytest.mark.parametrize(("key", "rerun_labels", "status", "annotated", "kept"),
                         [r[1:] for r in RERUNS], ids=[r[0] for r in RERUNS])
def test_rerun_keeps_ground_truth_unless_masks_change(tmp_path: Path, sources: dict[str, Path], key: str,
                                                      rerun_labels, status: str, annotated: list[int],
                                                      kept: bool) -> None:
    arc_path = tmp_path / "arc.zarr"
    first = ingest_source(sources[key], arc_path, sources["labels"])
    arc = open_archive(arc_path)
    vid = first.volume_id
    labels_before = arc.manual_labels(vid)[0][:]
    arc.write_prediction(vid, labels_before, class_names={0: "bg", 1: "fluid"}, model_info=MODEL)
    inode = _ino(arc_path, vid)

    again = ingest_source(sources[key], arc_path, rerun_labels(sources))

    assert (again.status, again.n_bscans, again.annotated) == (status, 4, annotated)
    labels, stored_annotated = arc.manual_labels(vid)
    assert stored_annotated == annotated
    assert (_ino(arc_path, vid) == inode) is kept
    assert (arc.prediction(vid) is not None) is kept  # a re-write starts the volume afresh
    assert np.array_equal(labels[:], labels_before) is kept
    if not kept:  # re-ingest with the new masks is itself skipped afterwards
        assert ingest_source(sources[key], arc_path, rerun_labels(sources)).status == "skipped"


def _same_name_elsewhere(s: dict[str, Path], data: np.ndarray) -> Path:
    (s["a"].parent.parent / "elsewhere").mkdir()
    other = s["a"].parent.parent / "elsewhere" / "eye_a.tif"
    tifffile.imwrite(other, data, **GREY)
    return other


def _updated_in_place(s: dict[str, Path]) -> Path:
    tifffile.imwrite(s["a"], STACK[::-1], **GREY)
    return s["a"]


def _moved(s: dict[str, Path]) -> Path:
    return s["a"].rename(s["a"].parent.parent / "eye_a.tif")


# (id, second source, status, error phrases, volume afterwards from the first file)
IDENTITIES = [
    ("colliding id", lambda s: _write(s["a"].parent / "eye a.tif", STACK[::-1]), "failed",
     ["volume id 'eye_a' already holds", "eye a.tif", "eye_a.tif", "rename one of them"], True),
    ("same name, other folder", lambda s: _same_name_elsewhere(s, STACK[::-1]), "failed",
     ["elsewhere/eye_a.tif: volume id", "already holds /", "src/eye_a.tif"], True),
    ("updated in place", _updated_in_place, "written", [], False),
    ("moved", _moved, "skipped", [], True),
    ("same bytes under a colliding name", lambda s: _write(s["a"].parent / "eye a.tif", STACK), "skipped", [], True),
]


def _write(path: Path, data: np.ndarray) -> Path:
    tifffile.imwrite(path, data, **GREY)
    return path


@pytest.mark.parametrize(("second", "status", "phrases", "first_kept"),
                         [r[1:] for r in IDENTITIES], ids=[r[0] for r in IDENTITIES])
def test_volume_id_belongs_to_one_source(tmp_path: Path, sources: dict[str, Path], second, status: str,
                                         phrases: list[str], first_kept: bool) -> None:
    arc_path = tmp_path / "arc.zarr"
    first_source = str(sources["a"].resolve())
    assert ingest_source(sources["a"], arc_path).status == "written"
    arc = open_archive(arc_path)
    meta_before, inode = arc.volume_meta("eye_a"), _ino(arc_path, "eye_a")

    if status == "failed":
        with pytest.raises(ValueError) as info:
            ingest_source(second(sources), arc_path)  # a separate batch: no labels dir
        assert phrases
        for phrase in phrases:
            assert phrase in str(info.value), str(info.value)
    else:
        result = ingest_source(second(sources), arc_path)  # a separate batch: no labels dir
        assert (result.volume_id, result.status) == ("eye_a", status)
    meta = arc.volume_meta("eye_a")
    assert meta["source"] == first_source
    assert (meta == meta_before and _ino(arc_path, "eye_a") == inode) is first_kept
    expected = STACK if first_kept else STACK[::-1]
    np.testing.assert_array_equal(arc.image("eye_a")[:], expected)
    assert arc.volume_ids() == ["eye_a"]


def test_updated_source_without_masks_drops_old_labels(tmp_path: Path, sources: dict[str, Path]) -> None:
    """New image bytes re-write the volume: the old masks no longer fit it."""
    arc_path = tmp_path / "arc.zarr"
    ingest_source(sources["a"], arc_path, sources["labels"])
    result = ingest_source(_updated_in_place(sources), arc_path)
    assert (result.status, result.annotated) == ("written", [])
    assert open_archive(arc_path).manual_labels("eye_a") is None


def test_source_is_hashed_once(tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from octseg.tasks.readers import registry

    calls: list[int] = []
    real = registry.sha256_of_files
    monkeypatch.setattr(registry, "sha256_of_files", lambda files, with_names: calls.append(1) or real(files, with_names))
    for key in "ab":
        assert ingest_source(sources[key], tmp_path / "arc.zarr").status == "written"
    assert len(calls) == 2


def _bad_sources(tmp_path: Path) -> list[tuple[Path, str]]:
    """(bad source, phrase its error must contain)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.png").write_text("hello, not a PNG")
    tifffile.imwrite(bad / "trunc.tif", STACK, **GREY)
    (bad / "trunc.tif").write_bytes((bad / "trunc.tif").read_bytes()[:900])
    (bad / "no_images").mkdir()
    tifffile.imwrite(bad / "odd_mask.tif", STACK, **GREY)
    (tmp_path / "labels" / "odd_mask.tif").parent.mkdir(exist_ok=True)
    tifffile.imwrite(tmp_path / "labels" / "odd_mask.tif", MASK[:, :10], **GREY)
    return [(bad / "empty.png", "empty file"), (bad / "text.png", "not an image"),
            (bad / "trunc.tif", "truncated"), (bad / "no_images", "empty folder"),
            (bad / "odd_mask.tif", "mask shape (4, 10, 24) does not match")]


def test_bad_sources_fail_clearly_while_good_ones_land(tmp_path: Path, sources: dict[str, Path]) -> None:
    arc_path = tmp_path / "arc.zarr"
    bad = _bad_sources(tmp_path)
    assert ingest_source(sources["a"], arc_path, tmp_path / "labels").status == "written"
    for path, phrase in bad:
        with pytest.raises(ReadError) as info:
            ingest_source(path, arc_path, tmp_path / "labels")
        message = str(info.value)
        assert path.name in message and phrase in message, message
        assert "\n" not in message
    assert ingest_source(sources["b"], arc_path, tmp_path / "labels").status == "written"
    assert open_archive(arc_path).volume_ids() == ["eye_a", "eye_b"]  # nothing partial
    beside = sorted(p.name for p in tmp_path.iterdir() if ".catalogue.sqlite" not in p.name)
    assert beside == ["arc.zarr", "bad", "labels", "src"]  # no staging (the catalogue belongs beside the archive)


def test_unexpected_error_propagates_as_it_is(tmp_path: Path, sources: dict[str, Path]) -> None:
    not_an_archive = tmp_path / "file.zarr"
    not_an_archive.write_text("a file where the archive should be")
    with pytest.raises(ArchiveError, match="not an empty folder") as info:
        ingest_source(sources["a"], not_an_archive)
    assert str(not_an_archive) in str(info.value)
    assert not_an_archive.read_text() == "a file where the archive should be"  # left alone


def test_is_up_to_date_says_whether_ingest_would_skip(tmp_path: Path, sources: dict[str, Path]) -> None:
    arc_path = tmp_path / "arc.zarr"
    labels = sources["labels"]
    ingest_source(sources["a"], arc_path)  # no masks yet
    ingest_source(sources["b"], arc_path, labels)
    arc = open_archive(arc_path)
    assert not is_up_to_date(sources["c"], arc)  # not in the archive
    assert is_up_to_date(sources["a"], arc) and is_up_to_date(sources["b"], arc, labels)  # unchanged
    assert is_up_to_date(sources["b"], arc)  # no labels dir: masks are never dropped from unchanged bytes
    assert not is_up_to_date(sources["a"], arc, labels)  # new masks
    assert ingest_source(sources["a"], arc_path, labels).status == "written"
    assert is_up_to_date(sources["a"], arc, labels)
    assert ingest_source(sources["a"], arc_path, labels).status == "skipped"
    Image.fromarray(MASK[1]).save(labels / "eye_b" / "b_3.png")  # one more mask
    assert not is_up_to_date(sources["b"], arc, labels)
    _updated_in_place(sources)  # changed file
    assert not is_up_to_date(sources["a"], arc) and not is_up_to_date(sources["a"], arc, labels)
    assert ingest_source(sources["a"], arc_path).status == "written"
    assert is_up_to_date(sources["a"], arc)


def test_task_wrapper_calls_the_plain_function(tmp_path: Path, sources: dict[str, Path]) -> None:
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        result = ingest_source_task.fn(str(sources["c"]), str(tmp_path / "arc.zarr"))
    assert (result.volume_id, result.status) == ("eye_c", "written")
    assert ingest_source_task.name == "ingest-source"
