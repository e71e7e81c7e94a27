"""The archive's layout, as data and checks: names, axes and units, chunks and shards, compressors, label metadata.

Everything :mod:`octseg.tasks.archive.store` writes is shaped here (the package docstring draws the
layout); nothing here opens an archive. Volume ids come from source names with the suffixes of the
registered readers left out (:func:`volume_id_from_path`).
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import UTC, datetime
from collections.abc import Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
from zarr.codecs import BloscCodec, ZstdCodec

from octseg.tasks.archive.classes import palette_color
from octseg.tasks.archive.names import ID_PATTERN, RESERVED_NAMES, valid_name, volume_id_from_path

__all__ = [
    "AXES", "AXIS_UNITS", "BYTE_COMPRESSORS", "ID_PATTERN", "IMAGE_DTYPES", "OME_VERSION", "RESERVED_NAMES",
    "SHARD_BSCANS", "UNIT", "WIDE_COMPRESSORS", "ArchiveError", "annotated_bscans", "as_labels", "axis_scale",
    "bscan_chunks", "bscan_shards", "check_image", "check_name", "compressors_for", "default_class_names", "jsonable",
    "label_metadata", "labels_digest", "require_keys", "storage_options", "utc_now", "valid_name", "volume_id_from_path",
]

OME_VERSION = "0.5"
AXES = ("z", "y", "x")  # B-scan, depth, A-scan
UNIT = "micrometer"
SHARD_BSCANS = 8
IMAGE_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.float32))
AXIS_UNITS = dict.fromkeys(AXES, UNIT)


class ArchiveError(ValueError):
    """An archive operation failed; the message names the path and what was wrong."""


def bscan_chunks(shape: Sequence[int]) -> tuple[int, int, int]:
    """Chunk shape of a (Z, Y, X) array: one B-scan, ``(1, Y, X)``."""
    return (1, int(shape[1]), int(shape[2]))


def bscan_shards(shape: Sequence[int]) -> tuple[int, int, int]:
    """Shard shape of a (Z, Y, X) array: ``(min(8, Z), Y, X)``."""
    return (max(1, min(SHARD_BSCANS, int(shape[0]))), int(shape[1]), int(shape[2]))


# uint8 (most OCT images, all labels): Blosc LZ4 with bit-shuffle stores Duke B-scans in 54.5 MB of 76 MB where
# zstd level 1 stores 51.6 MB, and encodes ~1.6 GB/s per core against ~0.7 GB/s. Wider types (uint16 images,
# float32 derived arrays): zstd level 1, since LZ4 stores up to 3x more there (Duke B-scans normalised to
# float32: 27.6 MB with LZ4 against 9.2 MB). benchmarks/ingest.py measures the whole ingest.
BYTE_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5),)  # zarr picks bit-shuffle for 1-byte types
WIDE_COMPRESSORS = (ZstdCodec(level=1),)


def compressors_for(dtype: Any) -> list[Any]:
    """The compressors of an archive array of ``dtype`` (see the measurements above)."""
    return list(BYTE_COMPRESSORS if np.dtype(dtype).itemsize == 1 else WIDE_COMPRESSORS)


def storage_options(shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    return {"chunks": bscan_chunks(shape), "shards": bscan_shards(shape), "compressors": compressors_for(dtype)}


def jsonable(value: Any, what: str) -> Any:
    """``value`` as JSON would give it back (tuples -> lists), so stored and given compare equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ArchiveError(f"{what} must be JSON-serialisable: {e}") from e


def require_keys(mapping: Mapping[str, Any], keys: Sequence[str], what: str) -> dict[str, Any]:
    """``mapping`` as JSON-ready dict, after checking that it has every key of ``keys``."""
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ArchiveError(f"{what} lacks {missing} (required: {list(keys)})")
    return jsonable(dict(mapping), what)


def check_name(name: str, what: str) -> None:
    """ArchiveError unless ``name`` is a valid volume id or array name (:func:`valid_name`)."""
    if not valid_name(name):
        raise ArchiveError(f"{what} {name!r} is not a valid name (expected [A-Za-z0-9._-], no leading dot)")


def check_image(image: np.ndarray | da.Array, where: str) -> np.ndarray | da.Array:
    arr = image if isinstance(image, da.Array) else np.asarray(image)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ArchiveError(f"{where}: image must be a non-empty (Z, Y, X) array, got shape {arr.shape}")
    if arr.dtype not in IMAGE_DTYPES:
        raise ArchiveError(f"{where}: image dtype {arr.dtype} not supported (expected uint8, uint16 or float32)")
    return arr


def as_labels(labels: Any, shape: Sequence[int], where: str) -> np.ndarray:
    """Labels as a uint8 (Z, Y, X) array, checked against the image ``shape``."""
    lab = np.asarray(labels)
    if lab.shape != tuple(shape):
        raise ArchiveError(f"{where}: labels shape {lab.shape} does not match image shape {tuple(shape)}")
    if lab.dtype.kind not in "biu":
        raise ArchiveError(f"{where}: labels must be integers, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ArchiveError(f"{where}: label values must lie in 0..255, got {lab.min()}..{lab.max()}")
    return lab.astype(np.uint8, copy=False)


def labels_digest(labels: Any, annotated: Sequence[int]) -> str:
    """sha256 over the annotated B-scans of (Z, Y, X) labels, their indices included: what a volume's weight maps
    depend on. Written with the manual labels, so that no plan has to read them to learn it."""
    h = hashlib.sha256(np.asarray(annotated, dtype=np.int64).tobytes())
    for z in annotated:
        h.update(np.ascontiguousarray(labels[z]).tobytes())
    return h.hexdigest()


def annotated_bscans(lab: np.ndarray, annotated: Sequence[int] | None, where: str) -> list[int]:
    """Sorted annotated B-scan indices (all when None); unannotated B-scans must be all 0."""
    n = lab.shape[0]
    ann = list(range(n)) if annotated is None else sorted({int(i) for i in annotated})
    if any(not 0 <= i < n for i in ann):
        raise ArchiveError(f"{where}: annotated B-scans {ann} out of range 0..{n - 1}")
    rest = np.setdiff1d(np.arange(n), ann)
    nonzero = [int(i) for i in rest if lab[i].any()]
    if nonzero:
        raise ArchiveError(f"{where}: B-scans {nonzero} have labels but are not listed as annotated")
    return ann


def axis_scale(scale_um: Sequence[float] | None, where: str) -> dict[str, float]:
    if scale_um is None:
        return dict.fromkeys(AXES, 1.0)
    values = [float(s) for s in scale_um]
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ArchiveError(f"{where}: scale_um must be 3 positive finite (z, y, x) values, got {scale_um}")
    return dict(zip(AXES, values, strict=True))


def label_metadata(class_names: Mapping[int, str]) -> dict[str, Any]:
    """OME ``image-label`` metadata: :mod:`octseg.tasks.archive.classes` palette colours (0 transparent) and ``class``
    properties."""
    colors, properties = [], []
    for value, name in sorted((int(v), str(n)) for v, n in class_names.items()):
        if not 0 <= value <= 255:
            raise ArchiveError(f"class value {value} ({name!r}) outside 0..255")
        rgb = palette_color(value) if value else (0, 0, 0)
        colors.append({"label-value": value, "rgba": [*rgb, 255 if value else 0]})
        properties.append({"label-value": value, "class": name})
    return {"colors": colors, "properties": properties, "source": {"image": "../../"}}


def default_class_names(lab: np.ndarray) -> dict[int, str]:
    """``background`` for 0, ``class_<v>`` for every other value in ``lab``."""
    return {int(v): "background" if v == 0 else f"class_{int(v)}" for v in np.unique(lab)}


def utc_now() -> str:
    """The time now as an ISO 8601 UTC string to the second: what the archive's ``*_at`` attributes hold."""
    return datetime.now(UTC).isoformat(timespec="seconds")
