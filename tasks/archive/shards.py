"""The fast shard writer: whole shards of NumPy data written straight into a local Zarr v3 array of the archive.

zarr's own ``array[...] = data`` runs every B-scan chunk through its asyncio codec pipeline; for the
archive's layout (one B-scan per chunk, a few B-scans per shard, one compressor) that pipeline, not
the compression, was most of an ingest (benchmarks/ingest.py). :func:`write_shards` encodes each
shard with the array's own codec settings (numcodecs, as zarr does) in a thread per core and writes
the shard file whole, every chunk included (the array's ``write_empty_chunks`` must be on). The bytes
are exactly the ones zarr writes (``tests/tasks/archive/test_shards.py`` compares them file by file), so
zarr, ome-zarr and napari read them as their own.

It is for arrays nothing reads yet (the archive's staging folders): shard files are written in place,
not through a temporary file. Chunks are encoded in worker threads, where numcodecs' Blosc takes its
single-threaded context path (zarr also turns Blosc's global threads off); that keeps the bytes zarr's.

Only the layout it knows is taken: a sharding codec over chunks that are whole B-scans, a ``bytes``
codec and at most one blosc or zstd compressor inside, a ``bytes`` + ``crc32c`` index at the end, a
local store, ``write_empty_chunks``, and data of the array's dtype and B-scan size. Anything else
returns False, and the caller writes through zarr.
"""
from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Zstd
from zarr.storage import LocalStore

__all__ = ["absent_shards", "write_shards"]

_EMPTY = np.iinfo(np.uint64).max  # offset and length of a chunk that is not stored
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def _chunk_encoder(inner: list[dict[str, Any]]) -> Callable[[np.ndarray], Any] | None:
    """The encoder of one chunk's bytes for these inner codecs, or None if it is not one this module writes."""
    if not inner or inner[0]["name"] != "bytes" or len(inner) > 2:
        return None
    if inner[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    if len(inner) == 1:
        return lambda chunk: memoryview(chunk).cast("B")
    name, conf = inner[1]["name"], inner[1].get("configuration", {})
    if name == "blosc" and conf.get("shuffle") in _SHUFFLE and conf.get("typesize"):
        codec = Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=_SHUFFLE[conf["shuffle"]],
                      blocksize=conf.get("blocksize", 0), typesize=conf["typesize"])
        return codec.encode
    if name == "zstd":
        return Zstd(level=conf.get("level", 0), checksum=conf.get("checksum", False)).encode
    return None


def _layout(array: zarr.Array, data: np.ndarray) -> tuple[Callable[[np.ndarray], Any], int] | None:
    """(chunk encoder, chunks per shard) when ``array`` has the layout this module writes, else None."""
    if sys.byteorder != "little" or not isinstance(array.store, LocalStore) or array.metadata.zarr_format != 3:
        return None
    if not array.config.write_empty_chunks:
        return None  # zarr would leave out chunks of fill value; every chunk is written here
    if data.dtype != array.dtype or data.dtype.byteorder == ">" or data.ndim != array.ndim or data.ndim < 1:
        return None
    if tuple(data.shape[1:]) != tuple(array.shape[1:]):
        return None  # zarr broadcasts or refuses it
    codecs = array.metadata.to_dict()["codecs"]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    index_codecs = [c["name"] for c in conf["index_codecs"]]
    if conf.get("index_location", "end") != "end" or index_codecs != ["bytes", "crc32c"]:
        return None
    chunk, shard = tuple(conf["chunk_shape"]), tuple(array.shards or ())
    if chunk[1:] != tuple(array.shape[1:]) or shard[1:] != chunk[1:] or chunk[0] != 1:
        return None  # chunks are not whole B-scans: zarr writes it
    encode = _chunk_encoder(conf["codecs"])
    return (encode, shard[0]) if encode is not None else None


def _shard_file(encode: Callable[[np.ndarray], Any], block: np.ndarray, per_shard: int) -> list[Any]:
    """The bytes of one shard file: the encoded chunks in order, then the index and its CRC-32C."""
    parts = [encode(np.ascontiguousarray(block[i])) for i in range(len(block))]
    index = np.full((per_shard, 2), _EMPTY, dtype="<u8")  # chunks past the array's end are not stored
    index[: len(parts), 1] = [len(p) for p in parts]
    index[: len(parts), 0] = np.cumsum(index[: len(parts), 1]) - index[: len(parts), 1]
    raw = index.tobytes()
    return [*parts, raw, google_crc32c.value(raw).to_bytes(4, "little")]


def write_shards(array: zarr.Array, data: np.ndarray, z0: int = 0) -> bool:
    """Write ``data`` as B-scans ``z0 ..`` of ``array``, whole shards at a time; False (nothing written) when
    the array's layout or ``data`` is not one this module writes, or the B-scans do not fill whole shards
    (the last shard of the array may end early). ``z0`` must start a shard."""
    found = _layout(array, data)
    if found is None:
        return False
    encode, per_shard = found
    end = z0 + len(data)
    if z0 % per_shard or end > array.shape[0] or (end % per_shard and end != array.shape[0]):
        return False
    root = Path(array.store.root) / array.path
    starts = range(z0, end, per_shard)

    def write(start: int) -> None:
        key = array.metadata.encode_chunk_key((start // per_shard,) + (0,) * (array.ndim - 1))
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        parts = _shard_file(encode, data[start - z0 : start - z0 + per_shard], per_shard)
        with path.open("wb") as fh:
            fh.writelines(parts)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(min(len(starts), cores), thread_name_prefix="octseg-shards") as pool:
        list(pool.map(write, starts))  # never in the calling thread: see the module docstring
    return True


def absent_shards(array: zarr.Array) -> list[str]:
    """Keys of the shard (or chunk) files missing from a local array written with every shard, all-zero
    ones included (its ``octseg.every_shard`` attribute): a missing one is damage, zarr would read it as
    zeros. Arrays written otherwise (zarr leaves out all-zero shards) give []."""
    if not isinstance(array.store, LocalStore) or not array.attrs.get("octseg", {}).get("every_shard"):
        return []
    outer = array.shards or array.chunks
    root = Path(array.store.root) / array.path
    keys = (array.metadata.encode_chunk_key(idx)
            for idx in itertools.product(*(range(-(-n // c)) for n, c in zip(array.shape, outer))))
    return [key for key in keys if not (root / key).is_file()]
