"""OME-NGFF groups of one volume, written in a staging folder: image, labels, fundus, boundaries, a prediction.

ome-zarr writes the metadata and creates the arrays; the data of a NumPy array goes in through
:func:`store_now` (the fast shard writer, :mod:`octseg.tasks.archive.shards`, where the layout allows),
never through ome-zarr's per-shard Dask tasks, which were the slowest part of ingest.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from ome_zarr.writer import write_image, write_labels

from octseg.tasks.archive.layout import (
    AXES,
    AXIS_UNITS,
    IMAGE_DTYPES,
    OME_VERSION,
    UNIT,
    ArchiveError,
    bscan_shards,
    default_class_names,
    label_metadata,
    storage_options,
)
from octseg.tasks.archive.shards import write_shards

__all__ = ["StagedPrediction", "compute_writes", "level0", "placeholder", "store_now", "write_boundaries",
           "write_fundus", "write_label_image"]


def placeholder(data: np.ndarray | da.Array) -> da.Array:
    """What ome-zarr's writers get for a NumPy array: a lazy stand-in of its shape and dtype, so they write
    the metadata and create the array while the data goes in by :func:`store_now` in one parallel zarr write
    (dask's per-shard store tasks, run synchronously, were the slowest part of ingest)."""
    return data if isinstance(data, da.Array) else da.zeros(data.shape, dtype=data.dtype,
                                                            chunks=bscan_shards(data.shape))


def store_now(group: zarr.Group, data: np.ndarray | da.Array, jobs: list[Any]) -> list[Any]:
    """Write a NumPy ``data`` into the group's level-0 array now (the placeholder's jobs are dropped);
    a Dask array keeps its delayed ``jobs``."""
    if isinstance(data, da.Array):
        return jobs
    # every chunk is written: testing each against the fill value first took as long as compressing it
    array = level0(group).with_config({"write_empty_chunks": True})
    if not write_shards(array, data):  # whole shard files, the bytes zarr would write; else through zarr
        array[...] = data
    array.attrs["octseg"] = {**array.attrs.get("octseg", {}), "every_shard": True}  # a missing one is damage
    return []


def write_label_image(group: zarr.Group, name: str, lab: np.ndarray, scale: dict[str, float],
                      class_names: Mapping[int, str] | None, octseg: dict[str, Any]) -> list[Any]:
    """Create ``group/labels/<name>`` (uint8, image chunking) with its metadata and fix the labels
    group; returns the delayed data writes (see :func:`compute_writes`)."""
    jobs = write_labels(placeholder(lab), group, name=name, scaler=None, scale_factors=[], axes=list(AXES),
                        scale=scale, axes_units=AXIS_UNITS, storage_options=storage_options(lab.shape, lab.dtype),
                        compute=False, label_metadata=label_metadata(class_names or default_class_names(lab)))
    labels_group = group["labels"]
    labels_group.attrs["ome"] = {**labels_group.attrs["ome"], "version": OME_VERSION}
    group["labels"][name].attrs["octseg"] = octseg
    return store_now(group["labels"][name], lab, jobs)


def write_fundus(group: zarr.Group, fundus: np.ndarray, scale_um: Sequence[float] | None, where: str) -> list[Any]:
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


def write_boundaries(group: zarr.Group, boundaries: Mapping[str, np.ndarray], source: str | None,
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


def compute_writes(jobs: list[Any]) -> None:
    """Run delayed writes in this thread: after a failure no worker may still write into the staging
    folder, and the caller's Dask cluster (if any) is not sent whole arrays."""
    dask.compute(*jobs, scheduler="synchronous")


def level0(group: zarr.Group) -> zarr.Array:
    """The full-resolution array of an OME multiscale group."""
    return group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]


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
