"""Private to :mod:`octseg.tasks.archive`: the layout's constants, input checks, OME metadata and staged writes.

:mod:`octseg.tasks.archive` owns the on-disk layout (its docstring describes it) and re-exports the public
names defined here; import them from there. This module exists only to keep that one owner readable.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from ome_zarr.writer import write_image, write_labels
from zarr.codecs import BloscCodec, ZstdCodec

from octseg.tasks._shards import write_shards
from octseg.tasks.claims import heartbeat, holder_record, process_gone
from octseg.tasks.classes import palette_color

__all__ = ["STAGING_STALE_SECONDS", "sweep_staging", "AXES", "StagedPrediction", "compressors_for", "IMAGE_DTYPES", "OME_VERSION", "SHARD_BSCANS", "UNIT", "ArchiveError", "bscan_chunks",
           "bscan_shards", "label_metadata"]

OME_VERSION = "0.5"
AXES = ("z", "y", "x")  # B-scan, depth, A-scan
UNIT = "micrometer"
SHARD_BSCANS = 8
IMAGE_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.float32))
_RESERVED = {"zarr.json"}
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_UNITS = dict.fromkeys(AXES, UNIT)


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


def _storage(shape: Sequence[int], dtype: Any) -> dict[str, Any]:
    return {"chunks": bscan_chunks(shape), "shards": bscan_shards(shape), "compressors": compressors_for(dtype)}


def _placeholder(data: np.ndarray | da.Array) -> da.Array:
    """What ome-zarr's writers get for a NumPy array: a lazy stand-in of its shape and dtype, so they write
    the metadata and create the array while the data goes in by :func:`_store` in one parallel zarr write
    (dask's per-shard store tasks, run synchronously, were the slowest part of ingest)."""
    return data if isinstance(data, da.Array) else da.zeros(data.shape, dtype=data.dtype,
                                                            chunks=bscan_shards(data.shape))


def _store(group: zarr.Group, data: np.ndarray | da.Array, jobs: list[Any]) -> list[Any]:
    """Write a NumPy ``data`` into the group's level-0 array now (the placeholder's jobs are dropped);
    a Dask array keeps its delayed ``jobs``."""
    if isinstance(data, da.Array):
        return jobs
    # every chunk is written: testing each against the fill value first took as long as compressing it
    level0 = _level0(group).with_config({"write_empty_chunks": True})
    if not write_shards(level0, data):  # whole shard files, the bytes zarr would write; else through zarr
        level0[...] = data
    return []


class StagedPrediction:
    """A prediction being written (see :meth:`Archive.staged_prediction`): shard-aligned writes, class counts."""

    def __init__(self, array: zarr.Array, class_names: dict[int, str], scale_um: tuple[float, float, float] | None):
        self.array, self.class_names, self.scale_um = array, class_names, scale_um
        self.shard_bscans = int((array.shards or array.chunks)[0])
        self.counts = np.zeros(256, dtype=np.int64)  # pixels per label value
        self.foreground = np.zeros(array.shape[0], dtype=np.int64)  # non-background pixels per B-scan
        self.written = 0
        self.extra: dict[str, Any] = {}  # more report fields from the caller (e.g. seconds)

    def write(self, z0: int, labels: np.ndarray) -> None:
        """Store B-scans ``z0 .. z0 + len(labels) - 1``; ``z0`` starts a shard (two writers never share one)."""
        if z0 % self.shard_bscans:
            raise ArchiveError(f"prediction writes must start at a shard boundary ({self.shard_bscans} B-scans), "
                               f"got {z0}")
        labels = np.asarray(labels, dtype=np.uint8)
        self.array[z0 : z0 + len(labels)] = labels
        self.counts += np.bincount(labels.ravel(), minlength=256)
        self.foreground[z0 : z0 + len(labels)] = (labels > 0).reshape(len(labels), -1).sum(axis=1)
        self.written += len(labels)

    def report(self) -> dict[str, Any]:
        """B-scans, pixels per class and, when the voxel size is known, each foreground class's volume in mm^3."""
        if self.written != self.array.shape[0]:
            raise ArchiveError(f"prediction incomplete: {self.written} of {self.array.shape[0]} B-scans written")
        pixels = {name: int(self.counts[v]) for v, name in sorted(self.class_names.items())}
        voxel_mm3 = None if self.scale_um is None else float(np.prod(self.scale_um)) * 1e-9
        volumes = {name: (None if voxel_mm3 is None else round(int(self.counts[v]) * voxel_mm3, 6))
                   for v, name in sorted(self.class_names.items()) if v}
        return {"bscans": int(self.array.shape[0]), "pixels": pixels, "volume_mm3": volumes, **self.extra}


def _jsonable(value: Any, what: str) -> Any:
    """``value`` as JSON would give it back (tuples -> lists), so stored and given compare equal."""
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ArchiveError(f"{what} must be JSON-serialisable: {e}") from e


def _require(mapping: Mapping[str, Any], keys: Sequence[str], what: str) -> dict[str, Any]:
    """``mapping`` as JSON-ready dict, after checking that it has every key of ``keys``."""
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ArchiveError(f"{what} lacks {missing} (required: {list(keys)})")
    return _jsonable(dict(mapping), what)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _ID_RE.fullmatch(name) or name in _RESERVED:
        raise ArchiveError(f"{what} {name!r} is not a valid name (expected [A-Za-z0-9._-], no leading dot)")


def _check_image(image: np.ndarray | da.Array, where: str) -> np.ndarray | da.Array:
    arr = image if isinstance(image, da.Array) else np.asarray(image)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise ArchiveError(f"{where}: image must be a non-empty (Z, Y, X) array, got shape {arr.shape}")
    if arr.dtype not in IMAGE_DTYPES:
        raise ArchiveError(f"{where}: image dtype {arr.dtype} not supported (expected uint8, uint16 or float32)")
    return arr


def _as_labels(labels: Any, shape: Sequence[int], where: str) -> np.ndarray:
    """Labels as a uint8 (Z, Y, X) array, checked against the image ``shape``."""
    lab = np.asarray(labels)
    if lab.shape != tuple(shape):
        raise ArchiveError(f"{where}: labels shape {lab.shape} does not match image shape {tuple(shape)}")
    if lab.dtype.kind not in "biu":
        raise ArchiveError(f"{where}: labels must be integers, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() > 255):
        raise ArchiveError(f"{where}: label values must lie in 0..255, got {lab.min()}..{lab.max()}")
    return lab.astype(np.uint8, copy=False)


def _annotated(lab: np.ndarray, annotated: Sequence[int] | None, where: str) -> list[int]:
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


def _scale(scale_um: Sequence[float] | None, where: str) -> dict[str, float]:
    if scale_um is None:
        return dict.fromkeys(AXES, 1.0)
    values = [float(s) for s in scale_um]
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ArchiveError(f"{where}: scale_um must be 3 positive finite (z, y, x) values, got {scale_um}")
    return dict(zip(AXES, values, strict=True))


def label_metadata(class_names: Mapping[int, str]) -> dict[str, Any]:
    """OME ``image-label`` metadata: :mod:`octseg.tasks.classes` palette colours (0 transparent) and ``class``
    properties."""
    colors, properties = [], []
    for value, name in sorted((int(v), str(n)) for v, n in class_names.items()):
        if not 0 <= value <= 255:
            raise ArchiveError(f"class value {value} ({name!r}) outside 0..255")
        rgb = palette_color(value) if value else (0, 0, 0)
        colors.append({"label-value": value, "rgba": [*rgb, 255 if value else 0]})
        properties.append({"label-value": value, "class": name})
    return {"colors": colors, "properties": properties, "source": {"image": "../../"}}


def _default_class_names(lab: np.ndarray) -> dict[int, str]:
    return {int(v): "background" if v == 0 else f"class_{int(v)}" for v in np.unique(lab)}


def _write_label_image(group: zarr.Group, name: str, lab: np.ndarray, scale: dict[str, float],
                       class_names: Mapping[int, str] | None, octseg: dict[str, Any]) -> list[Any]:
    """Create ``group/labels/<name>`` (uint8, image chunking) with its metadata and fix the labels
    group; returns the delayed data writes (see :func:`_compute`)."""
    jobs = write_labels(_placeholder(lab), group, name=name, scaler=None, scale_factors=[], axes=list(AXES),
                        scale=scale, axes_units=_UNITS, storage_options=_storage(lab.shape, lab.dtype), compute=False,
                        label_metadata=label_metadata(class_names or _default_class_names(lab)))
    labels_group = group["labels"]
    labels_group.attrs["ome"] = {**labels_group.attrs["ome"], "version": OME_VERSION}
    group["labels"][name].attrs["octseg"] = octseg
    return _store(group["labels"][name], lab, jobs)


def _write_fundus(group: zarr.Group, fundus: np.ndarray, scale_um: Sequence[float] | None, where: str) -> list[Any]:
    """The SLO/NIR localizer as a 2-D OME image ``<volume>/fundus`` (y, x); returns the delayed writes."""
    img = np.asarray(fundus)
    if img.ndim != 2 or img.dtype not in IMAGE_DTYPES:
        raise ArchiveError(f"{where}: fundus must be a 2-D uint8, uint16 or float32 image, got {img.shape} {img.dtype}")
    valid = scale_um is not None and len(scale_um) == 2 and all(np.isfinite(s) and s > 0 for s in scale_um)
    scale = [float(s) for s in scale_um] if valid else [1.0, 1.0]
    sub = group.create_group("fundus")
    sub.attrs["octseg"] = {"scale_known": valid}
    return write_image(img, sub, scale_factors=[], axes=["y", "x"], scale=dict(zip("yx", scale, strict=True)),
                       axes_units={"y": UNIT, "x": UNIT}, storage_options={"chunks": img.shape},
                       name="fundus", compute=False)


def _write_boundaries(group: zarr.Group, boundaries: Mapping[str, np.ndarray], source: str | None,
                      shape: Sequence[int], where: str) -> None:
    """Layer boundaries as one float32 array ``<volume>/boundaries`` (layer, z, x): the row (y, pixels
    from the top, 0-based) of each boundary in each A-scan, NaN where it was not drawn."""
    names = list(boundaries)
    stack = np.stack([np.asarray(boundaries[n], dtype=np.float32) for n in names])
    if stack.shape[1:] != (shape[0], shape[2]):
        raise ArchiveError(f"{where}: boundaries of shape {stack.shape[1:]} do not fit the image (Z, X) = "
                           f"{(shape[0], shape[2])}")
    arr = group.create_array("boundaries", shape=stack.shape, dtype="float32", chunks=stack.shape,
                             fill_value=float("nan"))
    arr[...] = stack
    arr.attrs["octseg"] = {"layers": names, "source": source, "axes": ["layer", "z", "x"],
                           "unit": "row (pixels from the top of the B-scan, 0-based)"}


def _compute(jobs: list[Any]) -> None:
    """Run delayed writes in this thread: after a failure no worker may still write into the staging
    folder, and the caller's Dask cluster (if any) is not sent whole arrays."""
    dask.compute(*jobs, scheduler="synchronous")


def _level0(group: zarr.Group) -> zarr.Array:
    """The full-resolution array of an OME multiscale group."""
    return group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]


_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux 3.15+, ext4/xfs/btrfs/tmpfs/...)
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b``; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace_dir(new: Path, target: Path, aside: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` ends in ``aside``. Readers see the old or the new
    folder, never neither: the two are swapped in one ``renameat2(RENAME_EXCHANGE)``. Where the file
    system cannot swap, the two renames are journalled in ``new``'s staging folder first, and
    :func:`sweep_staging` completes an interrupted replacement (the new folder goes into place)."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        os.replace(new, aside)  # ``new`` now holds the old folder
        return
    journal = aside.parent / _JOURNAL  # ``aside`` lies in the staging folder
    journal.write_text(json.dumps({"new": str(new.relative_to(aside.parent)), "target": str(target)}))
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise
    finally:
        journal.unlink(missing_ok=True)


_JOURNAL = "replace.json"  # in a staging folder: a two-rename replacement in progress
_OWNER = "owner.json"  # in a staging folder: who stages there (host, pid, start)
STAGING_STALE_SECONDS = 900.0  # a staging folder whose owner file was not touched for this long is abandoned


def _staging_owner_alive(stage: Path) -> bool:
    """A staging folder is in use while its owner file is touched (a heartbeat, every minute) and, on
    this host and PID namespace, its process runs in this boot."""
    try:
        owner = json.loads((stage / _OWNER).read_text())
        age = time.time() - (stage / _OWNER).stat().st_mtime
    except FileNotFoundError:
        try:  # being created (owner not written yet) or very old: judge by the folder's age
            return time.time() - stage.stat().st_mtime < 60
        except FileNotFoundError:
            return True  # removed meanwhile by its owner
    except (OSError, ValueError):
        return True
    if age >= STAGING_STALE_SECONDS:
        return False  # no heartbeat: its writer is gone, on whatever host
    if owner.get("boot") not in (None, _boot_id()) and owner.get("host") == socket.gethostname():
        return False  # written before this machine rebooted
    return not process_gone(owner)


def _boot_id() -> str | None:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return None


def sweep_staging(root: Path) -> list[Path]:
    """Remove the staging folders of dead writers beside the archive ``root`` (a ``kill -9`` leaves them),
    first completing a journalled replacement they had begun; returns the folders removed."""
    base = root.parent / f".{root.name}.staging"
    removed = []
    try:
        stages = [p for p in base.iterdir() if p.is_dir()]
    except OSError:
        return removed
    for stage in stages:
        if _staging_owner_alive(stage):
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            journal = json.loads((stage / _JOURNAL).read_text())
            target, new = Path(journal["target"]), stage / journal["new"]
            if not target.exists() and (new / "zarr.json").is_file():
                os.replace(new, target)  # the old folder was moved aside: finish putting the new one in place
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    with contextlib.suppress(OSError):
        base.rmdir()
    return removed


@contextlib.contextmanager
def _staging_dir(root: Path) -> Iterator[Path]:
    """A fresh folder beside the archive ``root`` (same file system), removed afterwards in any case.

    It holds an owner file (host, pid, boot), so :func:`sweep_staging`, run here first, can tell the
    leftovers of a killed writer from the folders of live ones.
    """
    sweep_staging(root)
    base = root.parent / f".{root.name}.staging"
    stage = base / uuid.uuid4().hex
    for attempt in range(3):  # another writer may remove an empty `base` between our mkdirs
        try:
            stage.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    try:
        (stage / _OWNER).write_text(json.dumps({**json.loads(holder_record()), "boot": _boot_id()}))
        with heartbeat(stage / _OWNER):
            yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        with contextlib.suppress(OSError):
            base.rmdir()  # fails while another writer still stages: fine
