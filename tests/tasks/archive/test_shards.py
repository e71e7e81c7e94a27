"""The direct shard writer against zarr's own write: the same files, byte for byte, or no write at all."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from octseg.tasks.archive.shards import write_shards


def _array(path: Path, shape, dtype, compressors, shards=8, chunks=None) -> zarr.Array:
    chunks = chunks or (1, *shape[1:])
    return zarr.create_array(str(path), shape=shape, dtype=dtype, chunks=chunks, shards=(shards, *shape[1:]),
                             compressors=compressors, fill_value=0, config={"write_empty_chunks": True})


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _data(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(100, 30, shape).astype(dtype)
    speckle = rng.gamma(2.0, 40.0, shape).clip(0, np.iinfo(dtype).max)
    speckle[:, : shape[1] // 3] = 0  # vitreous: a run of zeros, as in real B-scans
    return speckle.astype(dtype)


@pytest.mark.parametrize("compressors", [[BloscCodec(cname="lz4", clevel=5)], [ZstdCodec(level=1)],
                                         [BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")], []],
                         ids=["blosc-lz4", "zstd", "blosc-zstd-noshuffle", "raw"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
@pytest.mark.parametrize("depth", [1, 5, 8, 61])
def test_same_bytes_as_zarr(tmp_path, compressors, dtype, depth):
    data = _data((depth, 24, 40), dtype)
    ours, theirs = _array(tmp_path / "ours", data.shape, dtype, compressors), \
        _array(tmp_path / "theirs", data.shape, dtype, compressors)
    assert write_shards(ours, data)
    theirs[...] = data
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "ours"))[...], data)


def test_shard_by_shard_from_a_start(tmp_path):
    """Writes starting at a shard boundary (as a prediction is written) give zarr's bytes too; the last
    shard may end early; misaligned or partial writes are refused, with nothing written."""
    data = _data((21, 16, 12), "uint8")
    ours, theirs = _array(tmp_path / "ours", data.shape, "uint8", [BloscCodec(cname="lz4")], shards=4), \
        _array(tmp_path / "theirs", data.shape, "uint8", [BloscCodec(cname="lz4")], shards=4)
    assert not write_shards(ours, data[2:6], z0=2)  # does not start a shard
    assert not write_shards(ours, data[4:6], z0=4)  # stops inside a shard that is not the last
    assert not list((tmp_path / "ours").rglob("c/*"))
    for z0 in (8, 0, 20, 4, 12):
        end = min(z0 + 8, 21) if z0 != 20 else 21
        assert write_shards(ours, data[z0:end], z0=z0)
        theirs[z0:end] = data[z0:end]
    assert _files(tmp_path / "ours") == _files(tmp_path / "theirs")


@pytest.mark.parametrize("case", ["chunk-not-bscan", "not-sharded", "dtype", "index-start", "skip-empty-chunks",
                                  "big-endian", "bscan-size"])
def test_other_layouts_are_left_to_zarr(tmp_path, case):
    data = _data((8, 16, 12), "uint8")
    if case == "chunk-not-bscan":
        arr = _array(tmp_path / "a", data.shape, "uint8", [ZstdCodec()], chunks=(1, 8, 12))
    elif case == "not-sharded":
        arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, dtype="uint8", chunks=(1, 16, 12))
    elif case == "dtype":
        arr, data = _array(tmp_path / "a", data.shape, "uint16", [ZstdCodec()]), data
    elif case == "bscan-size":  # B-scans of another size than the array's: zarr's business (it refuses them)
        arr, data = _array(tmp_path / "a", (8, 16, 12), "uint8", [ZstdCodec()]), data[:, :10, :10]
    elif case == "big-endian":  # e.g. a big-endian TIFF: zarr converts it
        arr, data = _array(tmp_path / "a", data.shape, "uint16", [ZstdCodec()]), data.astype(">u2")
    elif case == "skip-empty-chunks":  # zarr would leave chunks of fill value out; this writer stores them all
        arr = _array(tmp_path / "a", data.shape, "uint8", [ZstdCodec()]).with_config({"write_empty_chunks": False})
    else:
        from zarr.codecs import ShardingCodec
        arr = zarr.create_array(str(tmp_path / "a"), shape=data.shape, dtype="uint8", chunks=data.shape,
                                serializer=ShardingCodec(chunk_shape=(1, 16, 12), index_location="start"),
                                compressors=None, filters=None)
    assert not write_shards(arr, data)
    assert not list((tmp_path / "a").rglob("c/*")) and not list((tmp_path / "a").rglob("c*/"))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])  # Blosc LZ4 and zstd: both codecs of the layout
def test_ingest_writes_through_the_fast_shard_writer(tmp_path, monkeypatch, dtype):
    """The archive's default layout is one this module writes: ingest's image (and masks) go through
    :func:`write_shards`, never zarr's 2-3x slower path. Should a zarr upgrade change the metadata it
    reads, write_shards declines (False) and this fails instead of ingest silently slowing down."""
    from octseg.tasks.archive import ome
    from octseg.tasks.ingest.source import ingest_source

    taken: list[bool] = []
    real = ome.write_shards
    monkeypatch.setattr(ome, "write_shards", lambda array, data, z0=0: taken.append(real(array, data, z0)) or taken[-1])
    image = _data((11, 24, 40), dtype)
    np.save(tmp_path / "eye.npy", image)
    (tmp_path / "labels").mkdir()
    np.save(tmp_path / "labels" / "eye.npy", (image > image.mean()).astype(np.uint8))
    result = ingest_source(tmp_path / "eye.npy", tmp_path / "a.zarr", tmp_path / "labels")
    assert result.status == "written"
    assert taken == [True, True]  # the image, then the manual labels
