"""The octseg archive: the one module that knows the on-disk Zarr layout.

An archive is a Zarr v3 group; each volume is an OME-NGFF 0.5 image written with ``ome_zarr``::

    <archive>/                      group, attrs {"octseg": {"archive_version": 1}}
      <volume_id>/                  OME-NGFF image group, attrs["octseg"] = provenance
        s0                          image (Z, Y, X) = (B-scan, depth, A-scan), dtype kept
        labels/                     OME "labels" group (plus the "version" ome-zarr omits)
          manual/s0                 uint8 ground truth, attrs octseg.annotated_bscans
          prediction/s0             uint8 segmentation, attrs octseg = model info + complete
        derived/<name>              plain (Z, Y, X) arrays, attrs octseg.complete + fingerprint

Every array is chunked one B-scan per chunk ``(1, Y, X)`` and sharded ``(8, Y, X)`` (clipped to Z);
writers of derived arrays must align their Dask chunks to :meth:`Archive.shard_bscans`, since two
writers into one shard corrupt it. Axes are ``z, y, x`` in micrometres; the scale is 1.0 where the
source did not give it (``octseg.scale_known: false``). There is a single resolution level: OCT
volumes are small, and labels must have as many levels as their image (ome_zarr_models checks).

Nothing partial: volumes and predictions are built in a staging folder beside the archive
(``<parent>/.<archive name>.staging/<uuid>/``, same file system) and renamed into place. A
replaced volume loses its prediction and derived arrays, which belonged to the old image.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr
from ome_zarr.writer import write_image, write_labels

__all__ = ["ARCHIVE_VERSION", "AXES", "Archive", "ArchiveError", "bscan_chunks", "bscan_shards", "open_archive",
           "volume_id_from_path"]

ARCHIVE_VERSION = 1
OME_VERSION = "0.5"
AXES = ("z", "y", "x")  # B-scan, depth, A-scan
UNIT = "micrometer"
SHARD_BSCANS = 8
IMAGE_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.float32))
REQUIRED_PROVENANCE = ("source", "source_sha256", "reader")
REQUIRED_MODEL_INFO = ("model_name", "model_version", "run_id", "model_uri")
_STRIP_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".npy", ".png", ".jpeg", ".jpg")
_RESERVED = {"zarr.json"}
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_UNITS = dict.fromkeys(AXES, UNIT)
_PALETTE = [(255, 0, 0), (0, 200, 0), (0, 90, 255), (255, 200, 0), (255, 0, 255), (0, 220, 220)]


class ArchiveError(ValueError):
    """An archive operation failed; the message names the path and what was wrong."""


def volume_id_from_path(path: str | os.PathLike[str]) -> str:
    """Volume id of a source: file stem without ``.ome.tif``/``.tif(f)``/``.npy``/image suffix, or
    a folder's name, reduced to ``[A-Za-z0-9._-]`` with no leading dots; never empty."""
    p = Path(path)
    name = p.name
    if not p.is_dir():
        for suffix in _STRIP_SUFFIXES:
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                break
    vid = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")[:200] or "volume"
    return "_" + vid if vid in _RESERVED else vid


def bscan_chunks(shape: Sequence[int]) -> tuple[int, int, int]:
    """Chunk shape of a (Z, Y, X) array: one B-scan, ``(1, Y, X)``."""
    return (1, int(shape[1]), int(shape[2]))


def bscan_shards(shape: Sequence[int]) -> tuple[int, int, int]:
    """Shard shape of a (Z, Y, X) array: ``(min(8, Z), Y, X)``."""
    return (max(1, min(SHARD_BSCANS, int(shape[0]))), int(shape[1]), int(shape[2]))


def _storage(shape: Sequence[int]) -> dict[str, tuple[int, int, int]]:
    return {"chunks": bscan_chunks(shape), "shards": bscan_shards(shape)}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _octseg_version() -> str:
    try:
        return importlib.metadata.version("octseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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


def _label_metadata(class_names: Mapping[int, str]) -> dict[str, Any]:
    """OME ``image-label`` metadata: colours (0 transparent) and ``class`` properties."""
    colors, properties = [], []
    for value, name in sorted((int(v), str(n)) for v, n in class_names.items()):
        if not 0 <= value <= 255:
            raise ArchiveError(f"class value {value} ({name!r}) outside 0..255")
        rgb = _PALETTE[(value - 1) % len(_PALETTE)] if value else (0, 0, 0)
        colors.append({"label-value": value, "rgba": [*rgb, 255 if value else 0]})
        properties.append({"label-value": value, "class": name})
    return {"colors": colors, "properties": properties, "source": {"image": "../../"}}


def _default_class_names(lab: np.ndarray) -> dict[int, str]:
    return {int(v): "background" if v == 0 else f"class_{int(v)}" for v in np.unique(lab)}


def _write_label_image(group: zarr.Group, name: str, lab: np.ndarray, scale: dict[str, float],
                       class_names: Mapping[int, str] | None, octseg: dict[str, Any]) -> list[Any]:
    """Create ``group/labels/<name>`` (uint8, image chunking) with its metadata and fix the labels
    group; returns the delayed data writes (see :func:`_compute`)."""
    jobs = write_labels(lab, group, name=name, scaler=None, scale_factors=[], axes=list(AXES), scale=scale,
                        axes_units=_UNITS, storage_options=_storage(lab.shape), compute=False,
                        label_metadata=_label_metadata(class_names or _default_class_names(lab)))
    labels_group = group["labels"]
    labels_group.attrs["ome"] = {**labels_group.attrs["ome"], "version": OME_VERSION}
    group["labels"][name].attrs["octseg"] = octseg
    return jobs


def _compute(jobs: list[Any]) -> None:
    """Run delayed writes in this thread: after a failure no worker may still write into the staging
    folder, and the caller's Dask cluster (if any) is not sent whole arrays."""
    dask.compute(*jobs, scheduler="synchronous")


def _level0(group: zarr.Group) -> zarr.Array:
    """The full-resolution array of an OME multiscale group."""
    return group[group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]]


def _replace_dir(new: Path, target: Path, aside: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is first moved to ``aside``."""
    if not target.exists():
        os.replace(new, target)
        return
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(aside, target)
        raise


@dataclass(frozen=True)
class Archive:
    """An opened archive. Every call reopens the Zarr nodes it needs, so nothing goes stale."""

    path: Path

    # ----- reading -----
    def volume_ids(self) -> list[str]:
        """Sorted ids of the volumes in the archive."""
        return sorted(e.name for e in os.scandir(self.path) if e.is_dir() and self.has_volume(e.name))

    def has_volume(self, volume_id: str) -> bool:
        """Whether a (complete: volumes appear atomically) volume of that id exists."""
        valid = bool(_ID_RE.fullmatch(volume_id)) and volume_id not in _RESERVED
        return valid and (self.path / volume_id / "zarr.json").is_file()

    def _group(self, *parts: str, mode: str = "r") -> zarr.Group:
        _check_name(parts[0], "volume id")
        path = self.path.joinpath(*parts)
        if not (path / "zarr.json").is_file():
            raise ArchiveError(f"{path}: no such {'volume' if len(parts) == 1 else 'group'} in the archive")
        return zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=False)

    def volume_meta(self, volume_id: str) -> dict[str, Any]:
        """The volume's provenance attributes (``octseg``: source, source_sha256, reader, ...)."""
        return dict(self._group(volume_id).attrs.get("octseg", {}))

    def image(self, volume_id: str) -> zarr.Array:
        """The image, (Z, Y, X) = (B-scan, depth, A-scan), opened read-only."""
        return _level0(self._group(volume_id))

    def shard_bscans(self, volume_id: str) -> int:
        """B-scans per shard of the volume's arrays: align Dask writes to this many B-scans."""
        arr = self.image(volume_id)
        return int((arr.shards or arr.chunks)[0])

    def _scale_dict(self, volume_id: str) -> dict[str, float]:
        dataset = self._group(volume_id).attrs["ome"]["multiscales"][0]["datasets"][0]
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        return dict(zip(AXES, (float(s) for s in scale), strict=True))

    def scale_um(self, volume_id: str) -> tuple[float, float, float] | None:
        """Voxel size (z, y, x) in micrometres, or None when the source did not give it."""
        if not self.volume_meta(volume_id).get("scale_known", False):
            return None
        scale = self._scale_dict(volume_id)
        return (scale["z"], scale["y"], scale["x"])

    def _label_group(self, volume_id: str, name: str) -> zarr.Group | None:
        if not (self.path / volume_id / "labels" / name / "zarr.json").is_file():
            return None
        if name not in self._group(volume_id, "labels").attrs.get("ome", {}).get("labels", []):
            return None
        return self._group(volume_id, "labels", name)

    def manual_labels(self, volume_id: str) -> tuple[zarr.Array, list[int]] | None:
        """Ground truth (Z, Y, X) uint8 and the annotated B-scans, or None when not annotated."""
        group = self._label_group(volume_id, "manual")
        if group is None:
            return None
        return _level0(group), list(group.attrs["octseg"]["annotated_bscans"])

    def prediction(self, volume_id: str) -> zarr.Array | None:
        """The predicted labels (Z, Y, X) uint8, or None when no complete prediction exists."""
        group = self._label_group(volume_id, "prediction")
        complete = group is not None and group.attrs.get("octseg", {}).get("complete") is True
        return _level0(group) if complete else None

    def prediction_info(self, volume_id: str) -> dict[str, Any] | None:
        """Model name/version, run id, model uri and time of the prediction; None if there is none."""
        group = self._label_group(volume_id, "prediction")
        info = dict(group.attrs.get("octseg", {})) if group is not None else {}
        return info if info.get("complete") else None

    # ----- writing (atomic) -----
    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        """A fresh folder beside the archive (same file system), removed afterwards in any case."""
        base = self.path.parent / f".{self.path.name}.staging"
        stage = base / uuid.uuid4().hex
        for attempt in range(3):  # another writer may remove an empty `base` between our mkdirs
            try:
                stage.mkdir(parents=True)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            with contextlib.suppress(OSError):
                base.rmdir()  # fails while another writer still stages: fine

    def write_volume(self, volume_id: str, image: np.ndarray | da.Array, *,
                     scale_um: Sequence[float] | None = None, provenance: Mapping[str, Any],
                     manual_labels: np.ndarray | None = None, annotated: Sequence[int] | None = None,
                     class_names: Mapping[int, str] | None = None) -> None:
        """Write (or replace) a volume atomically: image (Z, Y, X), optional ground truth.

        ``provenance`` needs ``source``, ``source_sha256`` and ``reader``; the octseg version, the
        ingest time and ``scale_known`` are added. ``annotated`` defaults to all B-scans; others
        must be 0 in ``manual_labels``. ``class_names`` maps label value -> class name.
        """
        where = str(self.path / volume_id)
        _check_name(volume_id, "volume id")
        arr = _check_image(image, where)
        scale = _scale(scale_um, where)
        lab = ann = None
        if manual_labels is not None:
            lab = _as_labels(manual_labels, arr.shape, f"{where}: manual labels")
            ann = _annotated(lab, annotated, f"{where}: manual labels")
        meta = {**_require(provenance, REQUIRED_PROVENANCE, f"{where}: provenance"), "volume_id": volume_id,
                "octseg_version": _octseg_version(), "ingested_at": _now(), "scale_known": scale_um is not None}
        with self._staging() as stage:
            try:
                group = zarr.open_group(stage / "new", mode="w", zarr_format=3)
                jobs = write_image(arr, group, scale_factors=[], axes=list(AXES), scale=scale, axes_units=_UNITS,
                                   storage_options=_storage(arr.shape), name=volume_id, compute=False)
                if lab is not None:
                    jobs += _write_label_image(group, "manual", lab, scale, class_names, {"annotated_bscans": ann})
                _compute(jobs)
                group.attrs["octseg"] = meta
                _replace_dir(stage / "new", self.path / volume_id, stage / "old")
            except Exception as e:
                raise ArchiveError(f"{where}: writing the volume failed, archive unchanged "
                                   f"({type(e).__name__}: {e})") from e

    def write_prediction(self, volume_id: str, labels: np.ndarray, *, class_names: Mapping[int, str],
                         model_info: Mapping[str, Any]) -> None:
        """Write (or replace) ``labels/prediction`` atomically: (Z, Y, X) labels of the image's shape.

        ``model_info`` needs ``model_name``, ``model_version``, ``run_id`` and ``model_uri``.
        """
        where = str(self.path / volume_id / "labels" / "prediction")
        lab = _as_labels(labels, self.image(volume_id).shape, where)
        info = {**_require(model_info, REQUIRED_MODEL_INFO, f"{where}: model_info"), "written_at": _now(),
                "complete": True}
        with self._staging() as stage:
            try:
                tmp = zarr.open_group(stage / "tmp", mode="w", zarr_format=3)
                _compute(_write_label_image(tmp, "prediction", lab, self._scale_dict(volume_id), class_names, info))
                self._publish_label(stage, volume_id, "prediction")
            except Exception as e:
                raise ArchiveError(f"{where}: writing the prediction failed ({type(e).__name__}: {e})") from e

    def _publish_label(self, stage: Path, volume_id: str, name: str) -> None:
        """Move the staged ``stage/tmp/labels/<name>`` into the volume, then list it in ``labels``."""
        labels_dir = self.path / volume_id / "labels"
        if not (labels_dir / "zarr.json").is_file():
            os.replace(stage / "tmp" / "labels", labels_dir)  # staged group already lists only `name`
            return
        _replace_dir(stage / "tmp" / "labels" / name, labels_dir / name, stage / "old")
        group = self._group(volume_id, "labels", mode="r+")
        ome = dict(group.attrs.get("ome", {}))
        names = list(ome.get("labels", []))
        if name not in names:
            names.append(name)
        group.attrs["ome"] = {**ome, "version": OME_VERSION, "labels": names}

    # ----- derived arrays -----
    def _derived_path(self, volume_id: str, name: str) -> Path:
        _check_name(name, "derived array name")
        return self.path / volume_id / "derived" / name

    def create_derived(self, volume_id: str, name: str, dtype: str | np.dtype[Any],
                       attrs: Mapping[str, Any] | None = None) -> zarr.Array:
        """Create (replacing) ``<volume>/derived/<name>``: writable, the image's (Z, Y, X) shape and
        chunking, zero-filled, ``octseg.complete: false`` until :meth:`mark_derived_complete`."""
        path = self._derived_path(volume_id, name)
        shape = self.image(volume_id).shape
        group = zarr.open_group(path.parent, mode="a", zarr_format=3, use_consolidated=False)
        octseg = {**_jsonable(dict(attrs or {}), f"{path}: attrs"), "complete": False}
        return group.create_array(name, shape=shape, dtype=dtype, chunks=bscan_chunks(shape),
                                  shards=bscan_shards(shape), fill_value=0, dimension_names=AXES,
                                  attributes={"octseg": octseg}, overwrite=True)

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
        octseg = {**arr.attrs.get("octseg", {}), **_jsonable(dict(attrs or {}), f"{path}: attrs")}
        octseg.update(fingerprint=_jsonable(dict(fingerprint), f"{path}: fingerprint"),
                      complete=True, completed_at=_now())
        arr.attrs["octseg"] = octseg

    def derived_is_complete(self, volume_id: str, name: str) -> bool:
        """True when the derived array exists and was marked complete (for any fingerprint)."""
        return self._derived_attrs(volume_id, name).get("complete") is True

    def derived_is_current(self, volume_id: str, name: str, fingerprint: Mapping[str, Any]) -> bool:
        """True only when the derived array exists, is complete, and has this ``fingerprint``."""
        expected = _jsonable(dict(fingerprint), f"{volume_id}/derived/{name}: fingerprint")
        octseg = self._derived_attrs(volume_id, name)
        return octseg.get("complete") is True and octseg.get("fingerprint") == expected


def open_archive(path: str | os.PathLike[str], create: bool = True) -> Archive:
    """Open the archive at ``path``; create it (an empty or missing folder) when ``create``."""
    root = Path(path).expanduser().resolve()
    if (root / "zarr.json").is_file():
        try:
            version = zarr.open_group(root, mode="r", use_consolidated=False).attrs.get("octseg", {})
        except Exception as e:
            raise ArchiveError(f"{root}: not a readable Zarr group ({type(e).__name__}: {e})") from e
        version = version.get("archive_version") if isinstance(version, dict) else None
        if version != ARCHIVE_VERSION:
            raise ArchiveError(f"{root}: not an octseg archive (octseg.archive_version is {version!r}, "
                               f"expected {ARCHIVE_VERSION})")
        return Archive(root)
    if not create:
        raise ArchiveError(f"{root}: no archive here (no zarr.json) and create=False")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ArchiveError(f"{root}: exists and is not an empty folder; refusing to create an archive in it")
    root.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(root, mode="a", zarr_format=3)
    group.attrs["octseg"] = {"archive_version": ARCHIVE_VERSION}
    return Archive(root)
