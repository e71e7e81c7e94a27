"""Which volumes trained a model: by the scan's bytes in any archive, by id only where a digest is unknown; and
training refuses one scan held twice."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import ingest_source
from octseg.tasks.segmentation.evaluation import seen_in_training
from octseg.tasks.tracking.models import ModelRef
from octseg.tasks.training.dataset import source_digests



def _scan(folder: Path, name: str, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = (np.random.default_rng(seed).random((2, 16, 24)) * 250).astype(np.uint8)
    tifffile.imwrite(folder / name, image, photometric="minisblack")
    mask = np.zeros(image.shape, np.uint8)
    mask[:, 4:8, 4:12] = 255
    (folder / "labels").mkdir(exist_ok=True)
    tifffile.imwrite(folder / "labels" / name, mask, photometric="minisblack")
    return folder / name


def _ref(trained_on: dict | None) -> ModelRef:
    return ModelRef("octseg-unet", "1", None, "models:/octseg-unet/1", {}, trained_on=trained_on)


def test_seen_by_content_across_archives_and_by_id_where_unknown(tmp_path: Path) -> None:
    first = tmp_path / "first.zarr"
    for name, seed in (("a.tif", 0), ("b.tif", 1)):
        ingest_source(_scan(tmp_path / "in", name, seed), first, tmp_path / "in" / "labels")
    trained_on = source_digests(first, ["a", "b"])
    assert all(isinstance(d, str) and len(d) == 64 for d in trained_on.values())
    # another archive: scan a renamed, a different scan under b's id, and a new scan c
    other = tmp_path / "other.zarr"
    for name, seed in (("a_renamed.tif", 0), ("b.tif", 7), ("c.tif", 2)):
        ingest_source(_scan(tmp_path / "in2", name, seed), other, tmp_path / "in2" / "labels")
    ids = ["a_renamed", "b", "c"]
    assert seen_in_training(_ref(trained_on), other, ids) == ["a_renamed"]
    # a model that knows only the ids (digests unknown): the same id counts as seen
    assert seen_in_training(_ref({"b": None}), other, ids) == ["b"]
    assert seen_in_training(_ref(None), other, ids) == []  # recorded nothing: nothing to say


def test_training_refuses_one_scan_held_twice(tmp_path: Path) -> None:
    archive = tmp_path / "arc.zarr"
    src = _scan(tmp_path / "in", "a.tif", 0)
    ingest_source(src, archive, tmp_path / "in" / "labels")
    # the same bytes under another name with another grader's masks: a volume of its own (ingest keeps both)
    twin = _scan(tmp_path / "in_g2", "a_g2.tif", 0)
    mask = np.zeros((2, 16, 24), np.uint8)
    mask[:, 9:12, 4:12] = 255
    tifffile.imwrite(tmp_path / "in_g2" / "labels" / "a_g2.tif", mask, photometric="minisblack")
    assert ingest_source(twin, archive, tmp_path / "in_g2" / "labels").status == "written"
    assert open_archive(archive, create=False).volume_ids() == ["a", "a_g2"]
    with pytest.raises(ValueError, match="'a' and 'a_g2' hold the same scan"):
        source_digests(archive, ["a", "a_g2"])
    assert list(source_digests(archive, ["a"])) == ["a"]
