"""The archive as a Python object: open or create one, read its volumes, write them atomically.

:class:`Archive` is the one way in: every read and write of the OME-Zarr layout (drawn in
:mod:`octseg.tasks.archive`) goes through it; the layout's constants and checks are
:mod:`~octseg.tasks.archive.layout`, the OME groups :mod:`~octseg.tasks.archive.ome`, the atomic moves
:mod:`~octseg.tasks.archive.staging`.
"""
from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr
from ome_zarr.writer import write_image

from octseg.tasks.archive.catalogue import Catalogue, catalogue_for, image_fingerprint_of, publishing
from octseg.tasks.archive.derived import DerivedArrays
from octseg.tasks.archive.layout import (
    AXES,
    AXIS_UNITS,
    OME_VERSION,
    ArchiveError,
    annotated_bscans,
    as_labels,
    axis_scale,
    bscan_shards,
    check_image,
    check_name,
    jsonable,
    labels_digest,
    require_keys,
    storage_options,
    utc_now,
    valid_name,
)
from octseg.tasks.archive.names import ARCHIVE_VERSION
from octseg.tasks.archive.ome import (
    StagedPrediction,
    compute_writes,
    level0,
    placeholder,
    store_now,
    write_boundaries,
    write_fundus,
    write_label_image,
)
from octseg.tasks.archive.shards import absent_shards
from octseg.tasks.archive.staging import replace_dir, replace_file, staging_dir

__all__ = ["ARCHIVE_VERSION", "REQUIRED_MODEL_INFO", "REQUIRED_PROVENANCE", "Archive", "already_segmented", "open_archive",
           "select_volumes"]

REQUIRED_PROVENANCE = ("source", "source_sha256", "reader")
REQUIRED_MODEL_INFO = ("model_name", "model_version", "run_id", "model_uri")


def _octseg_version() -> str:
    try:
        return importlib.metadata.version("octseg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Archive(DerivedArrays):
    """An opened archive. Every call reopens the Zarr nodes it needs, so nothing goes stale."""

    path: Path

    # ----- the archive's fixed evaluation set -----
    def evaluation_set(self) -> list[str] | None:
        """Volume ids fixed as this archive's evaluation set (``octseg.evaluation_set``), or None."""
        attrs = zarr.open_group(self.path, mode="r", use_consolidated=False).attrs.get("octseg", {})
        fixed = attrs.get("evaluation_set") if isinstance(attrs, dict) else None
        return list(fixed) if fixed else None

    def set_evaluation_set(self, volume_ids: Sequence[str]) -> None:
        """Fix ``volume_ids`` (each annotated and in the archive) as the evaluation set: training holds
        them out and the champion is chosen by its score on them."""
        missing = sorted(set(volume_ids) - set(self.volume_ids()))
        if missing:
            raise ArchiveError(f"{self.path}: cannot fix an evaluation set with volumes not in it: {missing}")
        unannotated = sorted(v for v in volume_ids if not (self.manual_labels(v) or (None, []))[1])
        if unannotated:
            raise ArchiveError(f"{self.path}: evaluation volumes need manual labels: {unannotated}")
        group = zarr.open_group(self.path, mode="a", use_consolidated=False)
        group.attrs["octseg"] = {**dict(group.attrs.get("octseg", {})), "evaluation_set": sorted(set(volume_ids))}

    # ----- the catalogue -----
    def catalogue(self) -> Catalogue:
        """The archive's catalogue (:mod:`~octseg.tasks.archive.catalogue`): what plans read instead of every volume."""
        return catalogue_for(self.path)

    def prediction_infos(self) -> dict[str, dict[str, Any]]:
        """Volume id -> the attributes of its complete prediction (as :meth:`prediction_info`), for every volume
        that has one; from the catalogue, each entry checked against the volume's and the prediction's files."""
        entries = self.catalogue().entries(verify=("volume", "prediction"), details=True)
        return {vid: dict(e.prediction) for vid, e in entries.items() if e.p_complete and e.prediction}

    # ----- reading -----
    def volume_ids(self) -> list[str]:
        """Sorted ids of the volumes in the archive."""
        return sorted(e.name for e in os.scandir(self.path) if e.is_dir() and self.has_volume(e.name))

    def has_volume(self, volume_id: str) -> bool:
        """Whether a (complete: volumes appear atomically) volume of that id exists."""
        return valid_name(volume_id) and (self.path / volume_id / "zarr.json").is_file()

    def _group(self, *parts: str, mode: str = "r") -> zarr.Group:
        check_name(parts[0], "volume id")
        path = self.path.joinpath(*parts)
        if not (path / "zarr.json").is_file():
            raise ArchiveError(f"{path}: no such {'volume' if len(parts) == 1 else 'group'} in the archive")
        try:
            return zarr.open_group(path, mode=mode, zarr_format=3, use_consolidated=False)
        except ValueError as e:  # json.JSONDecodeError, or metadata zarr refuses
            raise ArchiveError(f"{path / 'zarr.json'}: damaged metadata ({type(e).__name__}: {e})") from e

    def volume_meta(self, volume_id: str) -> dict[str, Any]:
        """The volume's provenance attributes (``octseg``: source, source_sha256, reader, ...)."""
        return dict(self._group(volume_id).attrs.get("octseg", {}))

    def image(self, volume_id: str) -> zarr.Array:
        """The image, (Z, Y, X) = (B-scan, depth, A-scan), opened read-only."""
        return level0(self._group(volume_id))

    def check_whole(self, volume_id: str, array: zarr.Array | None = None, what: str = "image") -> None:
        """ArchiveError naming the missing files when shard files of the volume's image (or of ``array``, its
        ``what``) are gone, which zarr would read as zeros: before anything is computed from it."""
        missing = absent_shards(self.image(volume_id) if array is None else array)
        if missing:
            raise ArchiveError(f"{self.path / volume_id}: {len(missing)} shard file(s) of its {what} are missing "
                               f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): the archive is "
                               f"damaged; remove the volume folder and ingest its source again")

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
        return level0(group), list(group.attrs["octseg"]["annotated_bscans"])

    def labels_fingerprint(self, volume_id: str, meta: dict[str, Any] | None = None) -> str | None:
        """What names the manual labels' content (None when not annotated): the masks' sha256 ingest recorded
        (``--labels``; the volume is rewritten when they change), else the digest written with the labels
        (:func:`~.layout.labels_digest`), else, for volumes written before octseg recorded it, that digest
        computed from the labels. ``meta``: the volume's :meth:`volume_meta` when the caller has it already."""
        group = self._label_group(volume_id, "manual")
        if group is None:
            return None
        meta = self.volume_meta(volume_id) if meta is None else meta
        if meta.get("labels_sha256"):
            return str(meta["labels_sha256"])
        info = group.attrs.get("octseg", {})
        return info.get("labels_digest") or labels_digest(level0(group), list(info["annotated_bscans"]))

    def prediction(self, volume_id: str) -> zarr.Array | None:
        """The predicted labels (Z, Y, X) uint8, or None when no complete prediction exists."""
        group = self._label_group(volume_id, "prediction")
        complete = group is not None and group.attrs.get("octseg", {}).get("complete") is True
        return level0(group) if complete else None

    def prediction_info(self, volume_id: str) -> dict[str, Any] | None:
        """Model name/version, run id, model uri and time of the prediction; None if there is none."""
        group = self._label_group(volume_id, "prediction")
        info = dict(group.attrs.get("octseg", {})) if group is not None else {}
        return info if info.get("complete") else None

    # ----- writing (atomic) -----
    def write_volume(self, volume_id: str, image: np.ndarray | da.Array, *,
                     scale_um: Sequence[float] | None = None, provenance: Mapping[str, Any],
                     provenance_later: Callable[[], Mapping[str, Any]] | None = None,
                     manual_labels: np.ndarray | None = None, annotated: Sequence[int] | None = None,
                     class_names: Mapping[int, str] | None = None,
                     boundaries: Mapping[str, np.ndarray] | None = None, boundaries_source: str | None = None,
                     fundus: np.ndarray | None = None, fundus_scale_um: Sequence[float] | None = None) -> None:
        """Write (or replace) a volume atomically: image (Z, Y, X), optional ground truth and vendor extras.

        ``provenance`` needs ``source``, ``source_sha256`` and ``reader``; the octseg version, the
        ingest time and ``scale_known`` are added. ``provenance_later``: called once the pixels are
        written, its items join ``provenance`` (values computed meanwhile, e.g. the source's SHA-256; an
        error there writes nothing). ``annotated`` defaults to all B-scans; others
        must be 0 in ``manual_labels``. ``class_names`` maps label value -> class name.
        ``boundaries``: layer name -> (Z, X) row of the boundary in each A-scan (NaN: none), stored as
        ``boundaries`` (see the module docstring). ``fundus``: the 2-D SLO/NIR image, an OME image ``fundus``.
        """
        where = str(self.path / volume_id)
        check_name(volume_id, "volume id")
        arr = check_image(image, where)
        scale = axis_scale(scale_um, where)
        lab = ann = None
        if manual_labels is not None:
            lab = as_labels(manual_labels, arr.shape, f"{where}: manual labels")
            ann = annotated_bscans(lab, annotated, f"{where}: manual labels")
        def described(later: Mapping[str, Any]) -> dict[str, Any]:
            return {**require_keys({**provenance, **later}, REQUIRED_PROVENANCE, f"{where}: provenance"),
                    "volume_id": volume_id, "octseg_version": _octseg_version(), "ingested_at": utc_now(),
                    "scale_known": scale_um is not None, "n_bscans": int(arr.shape[0])}

        if provenance_later is None:
            described({})  # checked before any byte is written
        with staging_dir(self.path) as stage:
            try:
                group = zarr.open_group(stage / "new", mode="w", zarr_format=3)
                jobs = store_now(group, arr, write_image(
                    placeholder(arr), group, scale_factors=[], axes=list(AXES), scale=scale, axes_units=AXIS_UNITS,
                    storage_options=storage_options(arr.shape, arr.dtype), name=volume_id, compute=False))
                if lab is not None:
                    jobs += write_label_image(group, "manual", lab, scale, class_names,
                                              {"annotated_bscans": ann, "labels_digest": labels_digest(lab, ann)})
                if fundus is not None:
                    jobs += write_fundus(group, fundus, fundus_scale_um, where)
                compute_writes(jobs)
                if boundaries:
                    write_boundaries(group, boundaries, boundaries_source, arr.shape, where)
                group.attrs["octseg"] = described(provenance_later() if provenance_later is not None else {})
                with publishing(self.path, volume_id):  # its catalogue entry: in doubt, then read from the volume
                    replace_dir(stage / "new", self.path / volume_id, stage / "old")
            except Exception as e:
                raise ArchiveError(f"{where}: writing the volume failed, archive unchanged "
                                   f"({type(e).__name__}: {e})") from e

    def restamp(self, volume_id: str, changes: Mapping[str, Any]) -> None:
        """Merge ``changes`` into the volume's provenance, rewriting its ``zarr.json`` alone (atomically): for a
        volume read again that gave the same pixels. Its image fingerprint, and so its derived arrays, stay."""
        self._group(volume_id)  # exists, and its metadata is whole
        path = self.path / volume_id / "zarr.json"
        doc = json.loads(path.read_text())
        attrs = doc.setdefault("attributes", {})
        attrs["octseg"] = {**attrs.get("octseg", {}), **jsonable(dict(changes), f"{path}: provenance")}
        with publishing(self.path, volume_id):
            replace_file(path, json.dumps(doc, indent=2))

    def boundaries(self, volume_id: str) -> dict[str, np.ndarray]:
        """Stored layer boundaries, name -> (Z, X) float32 rows (NaN: none); empty when the source had none."""
        group = self._group(volume_id)
        if "boundaries" not in group:
            return {}
        arr = group["boundaries"]
        return dict(zip(arr.attrs["octseg"]["layers"], arr[...], strict=True))

    def fundus(self, volume_id: str) -> zarr.Array | None:
        """The stored SLO/NIR localizer (2-D), or None."""
        group = self._group(volume_id)
        return level0(group["fundus"]) if "fundus" in group else None

    def image_fingerprint(self, volume_id: str) -> str:
        """Identifies the volume's current image: its source's sha256 and when it was ingested. A
        prediction records it; one made from another image (the volume was re-ingested) is not current."""
        return image_fingerprint_of(self.volume_meta(volume_id))

    @contextlib.contextmanager
    def staged_prediction(self, volume_id: str, *, class_names: Mapping[int, str], model_info: Mapping[str, Any],
                          image_fingerprint: str) -> Iterator[StagedPrediction]:
        """Write ``labels/prediction`` shard by shard into a staging folder; publish it when the block ends.

        Yields a :class:`StagedPrediction` whose ``write(z0, labels)`` stores whole shards of B-scans
        (see :attr:`StagedPrediction.shard_bscans`) and counts pixels per class. On leaving the block the
        prediction is published only if the volume's image is still the one ``image_fingerprint`` names
        (ArchiveError otherwise, nothing published); an exception inside the block publishes nothing.
        ``model_info`` needs ``model_name``, ``model_version``, ``run_id`` and ``model_uri``.
        """
        where = str(self.path / volume_id / "labels" / "prediction")
        shape = tuple(self.image(volume_id).shape)
        info = {**require_keys(model_info, REQUIRED_MODEL_INFO, f"{where}: model_info"),
                "image_fingerprint": image_fingerprint}
        with staging_dir(self.path) as stage:
            tmp = zarr.open_group(stage / "tmp", mode="w", zarr_format=3)
            stand_in = da.zeros(shape, dtype=np.uint8, chunks=bscan_shards(shape))  # metadata only: never computed
            write_label_image(tmp, "prediction", stand_in, self._scale_dict(volume_id), class_names,
                               {**info, "complete": False})
            group = zarr.open_group(stage / "tmp" / "labels" / "prediction", mode="r+", zarr_format=3)
            staged = StagedPrediction(level0(group), dict(class_names), self.scale_um(volume_id))
            yield staged
            if self.image_fingerprint(volume_id) != image_fingerprint:
                raise ArchiveError(f"{where}: the volume was re-ingested while it was segmented; the prediction "
                                   "of the old image is discarded (segment it again)")
            try:
                group.attrs["octseg"] = {**info, "written_at": utc_now(), "complete": True, "report": staged.report()}
                with publishing(self.path, volume_id):
                    self._publish_label(stage, volume_id, "prediction")
            except Exception as e:
                raise ArchiveError(f"{where}: writing the prediction failed ({type(e).__name__}: {e})") from e

    def write_prediction(self, volume_id: str, labels: np.ndarray, *, class_names: Mapping[int, str],
                         model_info: Mapping[str, Any]) -> None:
        """Write (or replace) ``labels/prediction`` atomically: (Z, Y, X) labels of the image's shape,
        recorded as made from the volume's current image."""
        where = str(self.path / volume_id / "labels" / "prediction")
        lab = as_labels(labels, self.image(volume_id).shape, where)
        with self.staged_prediction(volume_id, class_names=class_names, model_info=model_info,
                                    image_fingerprint=self.image_fingerprint(volume_id)) as staged:
            for z0 in range(0, len(lab), staged.shard_bscans):
                staged.write(z0, lab[z0 : z0 + staged.shard_bscans])

    def _publish_label(self, stage: Path, volume_id: str, name: str) -> None:
        """Move the staged ``stage/tmp/labels/<name>`` into the volume, then list it in ``labels``."""
        labels_dir = self.path / volume_id / "labels"
        if not (labels_dir / "zarr.json").is_file():
            os.replace(stage / "tmp" / "labels", labels_dir)  # staged group already lists only `name`
            return
        replace_dir(stage / "tmp" / "labels" / name, labels_dir / name, stage / "old")
        group = self._group(volume_id, "labels", mode="r+")
        ome = dict(group.attrs.get("ome", {}))
        names = list(ome.get("labels", []))
        if name not in names:
            names.append(name)
        group.attrs["ome"] = {**ome, "version": OME_VERSION, "labels": names}


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
    root.parent.mkdir(parents=True, exist_ok=True)
    draft = root.parent / f".{root.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:  # built aside and renamed into place whole: two processes creating one archive both open it
        zarr.open_group(draft, mode="w", zarr_format=3).attrs["octseg"] = {"archive_version": ARCHIVE_VERSION}
        try:
            os.rename(draft, root)  # atomic; succeeds over a missing or empty folder only
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (root / "zarr.json").is_file():
                raise ArchiveError(f"{root}: cannot create the archive ({e.strerror or e})") from e
            return open_archive(root, create=False)  # another process created it first
    finally:
        shutil.rmtree(draft, ignore_errors=True)
    return Archive(root)


def select_volumes(archive_path: str | os.PathLike[str], volumes: Sequence[str] | None) -> list[str]:
    """The named volumes (each must exist) or every volume of the archive."""
    available = open_archive(archive_path, create=False).volume_ids()
    if volumes is None:
        return available
    missing = sorted(set(volumes) - set(available))
    if missing:
        raise ValueError(f"volume(s) {missing} not in archive {archive_path}; it holds {available}")
    return list(volumes)


def already_segmented(archive: Archive, volume_id: str, model_name: str, model_version: str) -> bool:
    """True when ``volume_id`` holds a complete prediction by this model name and version, made from the
    volume's current image (a re-ingested volume is segmented again)."""
    done = archive.prediction_info(volume_id)
    return (bool(done) and (done.get("model_name"), str(done.get("model_version"))) == (model_name, str(model_version))
            and done.get("image_fingerprint") == archive.image_fingerprint(volume_id))

