"""Ingest of single sources into a real archive under tmp_path (plain function, no Prefect server)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tasks.archive import open_archive
from tasks.ingest import ingest_source, ingest_source_task

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
    assert [(r.volume_id, r.status, r.n_bscans, r.annotated, r.error) for r in results] == [
        ("eye_a", "written", 4, [0, 1, 2, 3], None),
        ("eye_b", "written", 4, [0, 2], None),
        ("eye_c", "written", 1, [], None),  # no mask: not annotated
    ]
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
    batch = [sources["a"], *[p for p, _ in bad], sources["b"]]
    results = {Path(r.source).name: r for r in (ingest_source(p, arc_path, tmp_path / "labels") for p in batch)}
    assert results["eye_a.tif"].status == results["eye_b"].status == "written"
    for path, phrase in bad:
        r = results[path.name]
        assert r.status == "failed" and r.n_bscans == 0
        assert path.name in r.error and phrase in r.error, r.error
    assert open_archive(arc_path).volume_ids() == ["eye_a", "eye_b"]  # nothing partial
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc.zarr", "bad", "labels", "src"]  # no staging


def test_unexpected_error_is_reported_not_raised(tmp_path: Path, sources: dict[str, Path]) -> None:
    not_an_archive = tmp_path / "file.zarr"
    not_an_archive.write_text("a file where the archive should be")
    result = ingest_source(sources["a"], not_an_archive)
    assert result.status == "failed" and result.volume_id == "eye_a"
    assert result.error.startswith("eye_a.tif: ArchiveError:") and "not an empty folder" in result.error


def test_task_wrapper_calls_the_plain_function(tmp_path: Path, sources: dict[str, Path]) -> None:
    from prefect.logging import disable_run_logger

    with disable_run_logger():
        result = ingest_source_task.fn(str(sources["c"]), str(tmp_path / "arc.zarr"))
    assert (result.volume_id, result.status) == ("eye_c", "written")
    assert ingest_source_task.name == "ingest-source"
