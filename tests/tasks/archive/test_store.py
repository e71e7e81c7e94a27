"""The archive layout: real Zarr v3 stores under tmp_path, read back with zarr, ome-zarr and ome_zarr_models."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Labels, Multiscales, Reader
from ome_zarr_models.v05 import Image as OmeImage
from ome_zarr_models.v05 import ImageLabel as OmeImageLabel
from ome_zarr_models.v05 import Labels as OmeLabels

from octseg.tasks.archive.layout import ArchiveError, volume_id_from_path
from octseg.tasks.archive.store import Archive, open_archive

SHAPE = (5, 32, 48)  # (Z, Y, X): odd sizes, fewer B-scans than a shard
SCALE = (120.0, 3.87, 5.7)  # micrometres (z, y, x)
PROV = {"source": "/data/scan.tif", "source_sha256": "ab" * 32, "reader": "tiff"}
CLASSES = {0: "background", 1: "fluid", 2: "layer"}
MODEL = {"model_name": "unet", "model_version": "3", "run_id": "r123", "model_uri": "models:/unet/3"}


def _image(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random(shape) * 200).astype(dtype)


def _labels(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, dtype=np.uint8)
    lab[1, 3:9, 5:20] = 1
    lab[3, 10:14, :] = 2
    return lab


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    arc = open_archive(tmp_path / "arc.zarr")
    arc.write_volume("vol1", _image(), scale_um=SCALE, provenance=PROV, manual_labels=_labels(),
                     annotated=[1, 3], class_names=CLASSES)
    return arc


def _ome(path: Path) -> dict:
    return zarr.open_group(path, mode="r").attrs["ome"]


def test_write_and_read_back(archive: Archive) -> None:
    assert archive.volume_ids() == ["vol1"]
    assert archive.has_volume("vol1") and not archive.has_volume("vol2")
    np.testing.assert_array_equal(archive.image("vol1")[:], _image())
    manual, annotated = archive.manual_labels("vol1")
    np.testing.assert_array_equal(manual[:], _labels())
    assert annotated == [1, 3]
    assert archive.scale_um("vol1") == SCALE
    assert archive.prediction_info("vol1") is None and archive.prediction("vol1") is None


def test_damaged_volume_metadata_names_its_file(archive: Archive) -> None:
    meta = archive.path / "vol1" / "zarr.json"
    meta.write_text('{"zarr_format": 3, bad')
    with pytest.raises(ArchiveError, match=r"vol1/zarr.json: damaged metadata \(JSONDecodeError"):
        archive.volume_meta("vol1")


def test_a_missing_image_shard_is_damage_not_zeros(tmp_path: Path) -> None:
    """Every shard of an image is written, all-zero ones too; one removed is named, never read as zeros."""
    from octseg.tasks.preprocess.normalized import bscan_reader, normalized_bscans

    arc = open_archive(tmp_path / "arc.zarr")
    image = _image((20, 16, 24))
    image[8:16] = 0  # a whole shard of zeros is still a file
    arc.write_volume("vol1", image, scale_um=SCALE, provenance=PROV)
    arc.check_whole("vol1")
    shard = arc.path / "vol1" / "s0" / "c" / "1" / "0" / "0"
    shard.unlink()
    for read in (lambda: arc.check_whole("vol1"), lambda: normalized_bscans(arc, "vol1"),
                 lambda: bscan_reader(arc, "vol1")):
        with pytest.raises(ArchiveError, match=r"vol1: 1 shard file\(s\) of its image are missing \(c/1/0/0\)"):
            read()
    arc.write_volume("lazy", da.from_array(image, chunks=(4, 16, 24)), scale_um=SCALE, provenance=PROV)
    assert not (arc.path / "lazy" / "s0" / "c" / "1" / "0" / "0").exists()  # zarr leaves an all-zero shard out
    arc.check_whole("lazy")  # not marked as written whole: nothing to say


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtype_is_kept(tmp_path: Path, dtype: type) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    arc.write_volume("v", _image(dtype=dtype), provenance=PROV)
    assert arc.image("v").dtype == np.dtype(dtype)
    np.testing.assert_array_equal(arc.image("v")[:], _image(dtype=dtype))


@pytest.mark.parametrize(("dtype", "codec"), [(np.uint8, "blosc"), (np.uint16, "zstd"), (np.float32, "zstd")])
def test_compressor_follows_the_dtype(tmp_path: Path, dtype: type, codec: str) -> None:
    """uint8 images and all labels: Blosc LZ4 (bit-shuffled); wider images and float32 derived arrays: zstd."""
    arc = open_archive(tmp_path / "arc.zarr")
    arc.write_volume("v", _image(dtype=dtype), provenance=PROV, manual_labels=np.zeros(_image().shape, np.uint8))
    derived = arc.create_derived("v", "normalized", "float32")

    def compressor(arr: zarr.Array) -> dict:
        inner = arr.metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
        return inner[-1]

    assert compressor(arc.image("v"))["name"] == codec
    labels = compressor(arc.manual_labels("v")[0])
    assert labels["name"] == "blosc" and labels["configuration"]["cname"] == "lz4"
    assert labels["configuration"]["shuffle"] == "bitshuffle"
    assert compressor(derived)["name"] == "zstd"


@pytest.mark.parametrize(("z", "shard_z"), [
    (1, 1),   # a single B-scan
    (5, 5),   # fewer B-scans than a shard: shard clipped to Z
    (13, 8),  # a full shard and a partial one
])
def test_chunks_are_bscans_and_shards_group_them(tmp_path: Path, z: int, shard_z: int) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    shape = (z, 32, 48)
    arc.write_volume("v", _image(shape), provenance=PROV, manual_labels=np.zeros(shape, np.uint8))
    for arr in (arc.image("v"), arc.manual_labels("v")[0]):
        assert arr.chunks == (1, 32, 48)
        assert arr.shards == (shard_z, 32, 48)
        assert arr.metadata.dimension_names == ("z", "y", "x")
    assert arc.shard_bscans("v") == shard_z
    np.testing.assert_array_equal(arc.image("v")[:], _image(shape))


def test_ome_metadata(archive: Archive) -> None:
    vol = archive.path / "vol1"
    ome = _ome(vol)
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [(a["name"], a["type"], a["unit"]) for a in ms["axes"]] == [
        ("z", "space", "micrometer"), ("y", "space", "micrometer"), ("x", "space", "micrometer")]
    (ds,) = ms["datasets"]  # one resolution level
    assert ds["path"] == "s0"
    assert ds["coordinateTransformations"][0] == {"type": "scale", "scale": list(SCALE)}
    labels = _ome(vol / "labels")
    assert labels == {"version": "0.5", "labels": ["manual"]}
    manual = _ome(vol / "labels" / "manual")
    assert manual["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == list(SCALE)
    image_label = manual["image-label"]
    assert image_label["properties"] == [{"label-value": v, "class": n} for v, n in CLASSES.items()]
    assert image_label["colors"][0] == {"label-value": 0, "rgba": [0, 0, 0, 0]}  # background transparent
    assert [c["label-value"] for c in image_label["colors"]] == [0, 1, 2]
    attrs = zarr.open_group(vol / "labels" / "manual").attrs["octseg"]
    assert attrs["annotated_bscans"] == [1, 3] and set(attrs) == {"annotated_bscans", "labels_digest"}


def test_unknown_scale_is_one_and_recorded(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    arc.write_volume("v", _image(), provenance=PROV)
    ds = _ome(arc.path / "v")["multiscales"][0]["datasets"][0]
    assert ds["coordinateTransformations"][0]["scale"] == [1.0, 1.0, 1.0]
    assert arc.volume_meta("v")["scale_known"] is False
    assert arc.scale_um("v") is None
    assert arc.manual_labels("v") is None


def test_provenance_attrs(archive: Archive) -> None:
    meta = archive.volume_meta("vol1")
    assert {k: meta[k] for k in PROV} == PROV
    assert meta["volume_id"] == "vol1" and meta["scale_known"] is True
    assert isinstance(meta["octseg_version"], str) and meta["octseg_version"]
    assert datetime.fromisoformat(meta["ingested_at"]).utcoffset().total_seconds() == 0


def test_ome_zarr_reader_finds_image_and_labels(archive: Archive) -> None:
    archive.write_prediction("vol1", _labels(), class_names=CLASSES, model_info=MODEL)
    nodes = list(Reader(parse_url(str(archive.path / "vol1")))())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert image.data[0].shape == SHAPE
    assert any(isinstance(s, Labels) for n in nodes for s in n.specs)
    label_nodes = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert sorted(n.zarr.basename() for n in label_nodes) == ["manual", "prediction"]
    np.testing.assert_array_equal(np.asarray(label_nodes[0].data[0]), _labels())


def test_ome_zarr_models_validate(archive: Archive) -> None:
    archive.create_derived("vol1", "normalized", "float32")  # extra members must not break validation
    archive.write_prediction("vol1", _labels(), class_names=CLASSES, model_info=MODEL)
    vol = archive.path / "vol1"
    image = OmeImage.from_zarr(zarr.open_group(vol, mode="r"))
    assert image.labels is not None and image.labels.label_paths == ["manual", "prediction"]
    assert OmeLabels.from_zarr(zarr.open_group(vol / "labels", mode="r")).label_paths == ["manual", "prediction"]
    for name in ("manual", "prediction"):
        label = OmeImageLabel.from_zarr(zarr.open_group(vol / "labels" / name, mode="r"))
        props = label.attributes.ome.image_label.properties
        assert {p.label_value for p in props} == {0, 1, 2}


def test_derived_completion_marker(archive: Archive) -> None:
    fp = {"source_sha256": PROV["source_sha256"], "method": "zscore", "window": (1, 99)}
    assert not archive.derived_is_current("vol1", "normalized", fp)  # absent
    out = archive.create_derived("vol1", "normalized", "float32", {"method": "zscore"})
    assert (out.shape, out.chunks, out.dtype) == (SHAPE, (1, 32, 48), np.float32)
    assert out.shards == (5, 32, 48)
    assert not archive.derived_is_current("vol1", "normalized", fp)  # created, not complete
    assert not archive.derived_is_complete("vol1", "normalized")
    data = _image().astype(np.float32) / 200
    shard_z = archive.shard_bscans("vol1")
    da.store(da.from_array(data, chunks=(shard_z, -1, -1)), out, lock=False)
    archive.mark_derived_complete("vol1", "normalized", fp)
    assert archive.derived_is_current("vol1", "normalized", fp)  # tuples compare as stored lists
    assert archive.derived_is_complete("vol1", "normalized")
    assert not archive.derived_is_current("vol1", "normalized", {**fp, "method": "minmax"})  # stale
    attrs = archive.open_derived("vol1", "normalized").attrs["octseg"]
    assert attrs["method"] == "zscore" and attrs["complete"] is True
    np.testing.assert_array_equal(archive.open_derived("vol1", "normalized")[:], data)
    archive.create_derived("vol1", "normalized", "float32")  # recreating resets the marker
    assert not archive.derived_is_current("vol1", "normalized", fp)


def test_derived_errors(archive: Archive) -> None:
    assert archive.open_derived("vol1", "weights") is None
    with pytest.raises(ArchiveError, match="no such derived array"):
        archive.mark_derived_complete("vol1", "weights", {})
    with pytest.raises(ArchiveError, match="not a valid name"):
        archive.create_derived("vol1", "../escape", "float32")
    with pytest.raises(ArchiveError, match="no such volume"):
        archive.create_derived("missing", "weights", "float32")


def test_prediction_write_info_and_replace(archive: Archive) -> None:
    pred = _labels()[::-1].copy()
    archive.write_prediction("vol1", pred, class_names=CLASSES, model_info=MODEL)
    info = archive.prediction_info("vol1")
    assert {k: info[k] for k in MODEL} == MODEL and info["complete"] is True and "written_at" in info
    np.testing.assert_array_equal(archive.prediction("vol1")[:], pred)
    archive.write_prediction("vol1", _labels(), class_names=CLASSES, model_info={**MODEL, "model_version": "4"})
    assert archive.prediction_info("vol1")["model_version"] == "4"
    np.testing.assert_array_equal(archive.prediction("vol1")[:], _labels())
    assert _ome(archive.path / "vol1" / "labels")["labels"] == ["manual", "prediction"]
    np.testing.assert_array_equal(archive.manual_labels("vol1")[0][:], _labels())  # untouched


def test_prediction_without_manual_labels_creates_labels_group(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    arc.write_volume("v", _image(), scale_um=SCALE, provenance=PROV)
    arc.write_prediction("v", _labels(), class_names=CLASSES, model_info=MODEL)
    assert _ome(arc.path / "v" / "labels") == {"version": "0.5", "labels": ["prediction"]}
    assert arc.manual_labels("v") is None
    scale = _ome(arc.path / "v" / "labels" / "prediction")["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == list(SCALE)
    OmeImage.from_zarr(zarr.open_group(arc.path / "v", mode="r"))


@pytest.mark.parametrize(("labels", "model_info", "phrase"), [
    (np.zeros((5, 32, 47), np.uint8), MODEL, "does not match image shape"),  # wrong shape
    (np.full(SHAPE, 300, np.int32), MODEL, "0..255"),                          # out of range
    (_labels(), {"model_name": "unet"}, "model_info lacks"),                   # incomplete info
])
def test_bad_prediction_is_refused(archive: Archive, labels: np.ndarray, model_info: dict, phrase: str) -> None:
    with pytest.raises(ArchiveError, match=phrase):
        archive.write_prediction("vol1", labels, class_names=CLASSES, model_info=model_info)
    assert archive.prediction_info("vol1") is None


def _beside(folder: Path) -> list[str]:
    """What a folder holds, leaving out the archive's catalogue (which belongs beside it)."""
    return sorted(p.name for p in folder.iterdir() if ".catalogue.sqlite" not in p.name)


def test_staging_leaves_no_trace(archive: Archive) -> None:
    archive.write_prediction("vol1", _labels(), class_names=CLASSES, model_info=MODEL)
    assert _beside(archive.path.parent) == ["arc.zarr"]  # and its catalogue
    assert sorted(p.name for p in archive.path.iterdir()) == ["vol1", "zarr.json"]


def _failing_image(bad_bscan: int) -> da.Array:
    """A lazy 13-B-scan image whose B-scan ``bad_bscan`` fails to load: with ``bad_bscan`` >= 8 the
    first shard is written before the second fails, a read error in the middle of a write."""
    def load(block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        if block_info is not None and block_info[None]["array-location"][0][0] == bad_bscan:
            raise OSError(f"B-scan {bad_bscan} unreadable")
        return block
    return da.from_array(_image((13, 32, 48)), chunks=(1, -1, -1)).map_blocks(load, dtype=np.uint8)


def test_failure_mid_write_leaves_nothing(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    with pytest.raises(ArchiveError, match="B-scan 10 unreadable") as err:
        arc.write_volume("broken", _failing_image(10), provenance=PROV)
    assert "broken" in str(err.value) and "archive unchanged" in str(err.value)
    assert arc.volume_ids() == [] and not arc.has_volume("broken")
    assert _beside(tmp_path) == ["arc.zarr"]  # no staging debris


def test_failed_replacement_keeps_the_old_volume(archive: Archive) -> None:
    with pytest.raises(ArchiveError):
        archive.write_volume("vol1", _failing_image(9), provenance={**PROV, "source_sha256": "new"})
    assert archive.volume_meta("vol1")["source_sha256"] == PROV["source_sha256"]
    np.testing.assert_array_equal(archive.image("vol1")[:], _image())
    assert archive.manual_labels("vol1")[1] == [1, 3]


def test_replace_volume(archive: Archive) -> None:
    archive.create_derived("vol1", "normalized", "float32")
    archive.write_prediction("vol1", _labels(), class_names=CLASSES, model_info=MODEL)
    new = _image((7, 32, 48))[::-1].copy()
    archive.write_volume("vol1", new, provenance={**PROV, "source_sha256": "cd" * 32})
    np.testing.assert_array_equal(archive.image("vol1")[:], new)
    assert archive.volume_meta("vol1")["source_sha256"] == "cd" * 32
    assert archive.manual_labels("vol1") is None and archive.prediction_info("vol1") is None
    assert not (archive.path / "vol1" / "derived").exists()  # derived data of the old image is gone
    assert archive.volume_ids() == ["vol1"]
    assert _beside(archive.path.parent) == ["arc.zarr"]


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"image": _image(dtype=np.int64)}, "dtype int64 not supported"),                # unsupported dtype
    ({"image": _image()[0]}, r"\(Z, Y, X\) array, got shape \(32, 48\)"),            # 2-D image
    ({"manual_labels": _labels()[:, :, :40]}, "does not match image shape"),         # labels shape
    ({"manual_labels": _labels(), "annotated": [1]}, r"B-scans \[3\] have labels"),  # unlisted labels
    ({"manual_labels": _labels(), "annotated": [1, 3, 9]}, "out of range"),          # bad index
    ({"provenance": {"source": "x"}}, "provenance lacks"),                           # incomplete
    ({"scale_um": (1.0, -2.0, 3.0)}, "positive finite"),                             # bad scale
])
def test_bad_volume_is_refused_before_writing(tmp_path: Path, kwargs: dict, phrase: str) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    args = {"image": _image(), "provenance": PROV, **kwargs}
    with pytest.raises(ArchiveError, match=phrase):
        arc.write_volume("v", args.pop("image"), **args)
    assert arc.volume_ids() == []
    assert _beside(tmp_path) == ["arc.zarr"]


def test_open_archive(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "new" / "arc.zarr")
    assert zarr.open_group(arc.path, mode="r").attrs["octseg"] == {"archive_version": 1}
    assert open_archive(arc.path, create=False).path == arc.path  # reopens
    with pytest.raises(ArchiveError, match="create=False"):
        open_archive(tmp_path / "absent.zarr", create=False)
    zarr.open_group(tmp_path / "other.zarr", mode="w")
    with pytest.raises(ArchiveError, match="not an octseg archive"):
        open_archive(tmp_path / "other.zarr")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ArchiveError, match="not an empty folder"):
        open_archive(tmp_path / "busy")


@pytest.mark.parametrize(("path", "expected"), [
    ("scan.ome.tif", "scan"),                        # OME-TIFF double suffix
    ("dir/Scan_01.TIFF", "Scan_01"),                 # case-insensitive suffix, parent dropped
    ("vol.npy", "vol"),
    ("b-scan.png", "b-scan"),
    ("scan.v2.tif", "scan.v2"),                      # inner dots kept
    ("Patient 7 (left eye).tif", "Patient_7__left_eye_"),
    ("../../etc/passwd", "passwd"),                  # no escape: only the name counts
    ("..", "volume"),                                # nothing left -> fallback
    (".hidden.tif", "hidden"),                       # no leading dot
    ("...tif", "volume"),
    ("ünïcødé.tif", "_n_c_d_"),
    ("a/b\\c.tif", "b_c"),                           # backslash is not a separator on POSIX
    ("zarr.json", "_zarr.json"),                     # would clash with the archive's metadata
])
def test_volume_id_from_path(path: str, expected: str) -> None:
    assert volume_id_from_path(path) == expected


def test_volume_id_of_folder_is_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "Subject 01.tif"  # a folder with a file-like name keeps it
    folder.mkdir()
    assert volume_id_from_path(folder) == "Subject_01.tif"


def test_invalid_volume_id_is_refused(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    zarr.open_group(tmp_path / "x", mode="w")  # a Zarr group outside the archive
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ArchiveError, match="not a valid name"):
            arc.write_volume(bad, _image(), provenance=PROV)
        with pytest.raises(ArchiveError, match="not a valid name"):
            arc.volume_meta(bad)
        assert not arc.has_volume(bad)
    assert _beside(tmp_path) == ["arc.zarr", "x"]


def test_concurrent_writers(tmp_path: Path) -> None:
    arc = open_archive(tmp_path / "arc.zarr")
    ids = [f"v{i}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=3) as pool:  # as a threaded Dask/Prefect runner would
        list(pool.map(lambda v: arc.write_volume(v, _image(), provenance=PROV, manual_labels=_labels(),
                                                 annotated=[1, 3]), ids))
    assert arc.volume_ids() == ids
    assert all(arc.manual_labels(v)[1] == [1, 3] for v in ids)
    assert _beside(tmp_path) == ["arc.zarr"]
