"""Derived arrays: what preprocessing writes beside a volume's image, each complete only once marked so.

``<volume>/derived/<name>`` is a plain (Z, Y, X) array with the image's chunks and shards; its
``octseg.complete`` becomes true, with the ``fingerprint`` of its inputs, as the last write
(:meth:`DerivedArrays.mark_derived_complete`), so a rerun can tell a finished, current array from one
a killed run left half written. :class:`~octseg.tasks.archive.store.Archive` has these methods.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from octseg.tasks.archive.catalogue import catalogue_for, publishing
from octseg.tasks.archive.layout import (
    AXES,
    ArchiveError,
    bscan_chunks,
    bscan_shards,
    check_name,
    compressors_for,
    jsonable,
    utc_now,
)

__all__ = ["DerivedArrays"]


class DerivedArrays:
    """The derived-array methods of an archive at ``path`` whose volumes' images ``image(volume_id)`` gives."""

    path: Path

    def image(self, volume_id: str) -> zarr.Array:
        raise NotImplementedError

    def _derived_path(self, volume_id: str, name: str) -> Path:
        check_name(name, "derived array name")
        return self.path / volume_id / "derived" / name

    def create_derived(self, volume_id: str, name: str, dtype: str | np.dtype[Any],
                       attrs: Mapping[str, Any] | None = None) -> zarr.Array:
        """Create (replacing) ``<volume>/derived/<name>``: writable, the image's (Z, Y, X) shape and
        chunking, zero-filled, ``octseg.complete: false`` until :meth:`mark_derived_complete`."""
        path = self._derived_path(volume_id, name)
        shape = self.image(volume_id).shape
        catalogue_for(self.path).mark_doubt(volume_id)  # until mark_derived_complete records it again
        group = zarr.open_group(path.parent, mode="a", zarr_format=3, use_consolidated=False)
        octseg = {**jsonable(dict(attrs or {}), f"{path}: attrs"), "complete": False, "every_shard": True}
        return group.create_array(name, shape=shape, dtype=dtype, chunks=bscan_chunks(shape),
                                  shards=bscan_shards(shape), fill_value=0, dimension_names=AXES,
                                  compressors=compressors_for(dtype),
                                  attributes={"octseg": octseg}, overwrite=True).with_config(
            {"write_empty_chunks": True})  # testing each chunk against the fill value cost as much as compressing it

    def open_derived(self, volume_id: str, name: str) -> zarr.Array | None:
        """A derived array (Z, Y, X), read-only, complete or not; None when it does not exist."""
        path = self._derived_path(volume_id, name)
        return zarr.open_array(path, mode="r", zarr_format=3) if (path / "zarr.json").is_file() else None

    def _derived_attrs(self, volume_id: str, name: str) -> dict[str, Any]:
        arr = self.open_derived(volume_id, name)
        return dict(arr.attrs.get("octseg", {})) if arr is not None else {}

    def mark_derived_complete(self, volume_id: str, name: str, fingerprint: Mapping[str, Any],
                              attrs: Mapping[str, Any] | None = None) -> None:
        """Record, last of all writes, that a derived array is complete for inputs ``fingerprint``."""
        path = self._derived_path(volume_id, name)
        if self.open_derived(volume_id, name) is None:
            raise ArchiveError(f"{path}: no such derived array (create_derived first)")
        arr = zarr.open_array(path, mode="r+", zarr_format=3)
        octseg = {**arr.attrs.get("octseg", {}), **jsonable(dict(attrs or {}), f"{path}: attrs")}
        octseg.update(fingerprint=jsonable(dict(fingerprint), f"{path}: fingerprint"),
                      complete=True, completed_at=utc_now())
        with publishing(self.path, volume_id):
            arr.attrs["octseg"] = octseg

    def derived_is_complete(self, volume_id: str, name: str) -> bool:
        """True when the derived array exists and was marked complete (for any fingerprint)."""
        return self._derived_attrs(volume_id, name).get("complete") is True

    def derived_is_current(self, volume_id: str, name: str, fingerprint: Mapping[str, Any]) -> bool:
        """True only when the derived array exists, is complete, and has this ``fingerprint``."""
        expected = jsonable(dict(fingerprint), f"{volume_id}/derived/{name}: fingerprint")
        octseg = self._derived_attrs(volume_id, name)
        return octseg.get("complete") is True and octseg.get("fingerprint") == expected
