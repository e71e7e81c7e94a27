"""Ingest one scan source (file or folder of B-scans) into the archive as one volume.

:func:`ingest_source` does the work and raises for bad input (:class:`~octseg.tasks.readers.base.ReadError` or ValueError,
naming the file), so its Prefect task run ends Failed while the flow goes on with the
other files. A source the archive already holds is skipped without decoding unless
new masks are given for it; an existing volume is never overwritten by a different file that maps
to the same volume id (see :func:`ingest_source`). :func:`ingest_source_task` is the thin Prefect
wrapper; it retries transient I/O errors (:mod:`octseg.tasks.runtime.retry`). The rules for a volume
the archive already holds are :mod:`octseg.tasks.ingest.rules`.
"""
from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import get_run_logger, task

from octseg.tasks.archive.claims import claim_volume
from octseg.tasks.archive.classes import DEFAULT_CLASS_NAMES
from octseg.tasks.archive.layout import volume_id_from_path
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.identifiers import content_volume_id, has_identifier, redact
from octseg.tasks.ingest.known import (
    bad_reason,
    is_bad_input,
    known_sha256,
    read_settings,
    refused_under,
    remember_bad,
    remember_read,
    source_parts,
    source_stamp,
)
from octseg.tasks.ingest.masks import read_masks, unmatched_masks
from octseg.tasks.ingest.rules import (
    MASK_READING,
    existing_volume,
    held_copy,
    labels_sha256,
    path_digest,
    reader_settings,
    reread_only,
    unchanged,
)
from octseg.tasks.readers.base import ScanVolume
from octseg.tasks.readers.limits import DEFAULT_MAX_VOXELS
from octseg.tasks.readers.registry import SHA256_LATER, read_volume, source_sha256
from octseg.tasks.readers.sources import shown, source_problem
from octseg.tasks.runtime.retry import TRANSIENT_IO_RETRIES

__all__ = ["IngestResult", "ingest_source", "ingest_source_task", "is_up_to_date"]

LOGGER = logging.getLogger(__name__)
_UNREAD = object()  # masks not read yet (None: read, and there are none)
CLAIM_WAIT_SECONDS = 600.0  # how long an ingest waits for another run writing the same volume id


@dataclass
class IngestResult:
    """What happened to one source."""

    source: str
    volume_id: str | None
    status: Literal["written", "skipped"]
    n_bscans: int = 0
    annotated: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the reader repaired or dropped


def is_up_to_date(source: str | Path, archive, labels_dir: str | Path | None = None,
                  options: Mapping[str, Any] | None = None, *, meta: Mapping[str, Any] | None = None,
                  remembered: Mapping[str, Any] | None = None) -> bool:
    """True when ``archive`` holds ``source`` (same bytes, under the id its name gives) and ingest would skip it.
    ``meta``: the provenance of that volume when the caller has it (from the catalogue). The source is not
    read when the catalogue remembers it with its present stamp (``remembered``: its sources, if at hand)."""
    src = Path(source)
    if meta is None:
        volume_id = volume_id_from_path(src)
        if not archive.has_volume(volume_id):
            return False
        meta = archive.volume_meta(volume_id)
    sha = known_sha256(archive.catalogue(), src, remembered) or source_sha256(src)
    return unchanged(meta, sha, labels_sha256(labels_dir, src), options or {})


def _skipped(archive, volume_id: str, src: Path) -> IngestResult:
    manual = archive.manual_labels(volume_id)
    return IngestResult(str(src), volume_id, "skipped", archive.image(volume_id).shape[0], manual[1] if manual else [])


def ingest_source(source: str | Path, archive_path: str | Path, labels_dir: str | Path | None = None, *,
                  options: Mapping[str, Any] | None = None,
                  max_voxels: int | None = DEFAULT_MAX_VOXELS) -> IngestResult:
    """Read ``source`` (and its masks under ``labels_dir``) and write it as one archive volume.

    When the archive already holds the volume id (``status`` in brackets):

    * same source bytes (SHA-256), wherever the file now lies: kept as it is ("skipped") when no
      ``labels_dir`` is given, when ``labels_dir`` holds no masks for the source, or when its
      masks have the stored fingerprint; the manual labels, derived arrays and prediction stay.
      Masks that are new or changed re-write the volume ("written"). Masks are never dropped from
      unchanged bytes: to remove them, remove the volume.
    * different bytes from the same path (the resolved ``source`` in the provenance): the file was
      updated, so the volume is re-written ("written") with the masks under ``labels_dir``, if any;
      the old labels and derived arrays no longer fit the image and go (a warning is logged).
    * different bytes from a different path (e.g. ``scan 1.tif`` and ``scan_1.tif``, both id
      ``scan_1``): "failed", naming both files; the stored volume is left alone. Two runs ingesting
      such files at the same moment behave the same: the volume id is claimed (waiting for the
      other run) before the check, so the second fails naming both files.

    ``options`` are the reader options (``IngestConfig.reader_options``: Duke's ``grader``, and
    ``keep_identifiers``). Patient identifiers found in a vendor header are not written unless
    ``keep_identifiers``: a file
    whose name contains them gets the volume id ``<reader>-<sha256[:12]>``, and the stored source
    path has them redacted (see :mod:`octseg.tasks.ingest.identifiers`). Masks under ``labels_dir`` take
    precedence over the ground truth a file carries (Duke ``.mat``: the ``grader`` option's fluid).
    Volumes larger than ``max_voxels`` are refused from their headers.

    Raises :class:`~octseg.tasks.readers.base.ReadError` (bad file) or ValueError (id clash), both naming the file.
    """
    src = Path(source)
    problem = source_problem(src)
    if problem:
        raise ValueError(problem)
    options = dict(options or {})
    parts = source_parts(src)
    stamp = source_stamp(src, parts)  # the catalogue remembers the file by it (checked again after hashing)
    with ThreadPoolExecutor(1, thread_name_prefix="octseg-sha256") as hasher:
        hashing = hasher.submit(source_sha256, src)  # meanwhile the file is decoded and written
        labels_fp = labels_sha256(labels_dir, src)
        archive = open_archive(archive_path)
        path_id = volume_id_from_path(src)
        if archive.has_volume(path_id) and unchanged(archive.volume_meta(path_id), hashing.result(), labels_fp,
                                                     options):
            result = _skipped(archive, path_id, src)  # unchanged: not decoded again
        else:
            try:
                volume = read_volume(src, sha256=SHA256_LATER, max_voxels=max_voxels, options=options)
            except Exception as e:
                if is_bad_input(e):  # remembered, so the drop folder does not read it again until it changes
                    sha = hashing.result() if hashing.exception() is None else None
                    remember_bad(archive.catalogue(), src, stamp, parts, sha, bad_reason(e, src),
                                 refused_under(read_settings(options, max_voxels), e))
                raise
            result = _write(archive, src, volume, hashing, labels_dir, labels_fp, options, stamp)
    remember_read(archive.catalogue(), src, stamp, parts, hashing.result(), result.volume_id)
    return result


def _write(archive, src: Path, volume: ScanVolume, hashing: Future[str], labels_dir: str | Path | None,
           labels_fp: str | None, options: Mapping[str, Any], stamp: str | None = None) -> IngestResult:
    """The write half of :func:`ingest_source`: the volume id, the check against a stored volume, the write.
    ``hashing`` gives the source's SHA-256; it is waited for only where a decision needs it, else the hash
    is computed while the pixels are written."""
    keep_identifiers = bool(options.get("keep_identifiers", False))
    private = bool(volume.identifiers) and not keep_identifiers
    named = private and has_identifier(src.name, volume.identifiers)
    volume_id = content_volume_id(volume.reader, hashing.result()) if named else volume_id_from_path(src)
    hide = (lambda text: redact(text, volume.identifiers)) if private else (lambda text: text)
    masks: Any = _UNREAD
    with claim_volume(archive.path, volume_id, wait=CLAIM_WAIT_SECONDS, doing="ingesting"), \
            contextlib.ExitStack() as content:
        if archive.has_volume(volume_id):
            meta = archive.volume_meta(volume_id)
            action, error = existing_volume(meta, volume_id, src, hashing.result(), labels_fp, options)
            if action == "skip":
                return _skipped(archive, volume_id, src)
            if action == "fail":
                raise ValueError(error)
            if reread_only(meta, hashing.result(), labels_fp, options):
                masks = _given_masks(labels_dir, src, volume)
                kept = _kept_if_same(archive, volume_id, src, volume, masks, meta, labels_fp, options, hide)
                if kept is not None:
                    return kept
            if labels_fp is None and meta.get("labels_sha256") is not None and volume.manual_labels is None:
                LOGGER.warning("%s changed: re-writing volume %r drops its manual labels (no masks given)",
                               shown(src), volume_id)
        else:  # a new id: is it a copy of a scan the archive holds under another id?
            # ("+" is in no volume id: the claim on the content cannot clash with a volume's)
            content.enter_context(claim_volume(archive.path, f"+{hashing.result()[:32]}", wait=CLAIM_WAIT_SECONDS,
                                               doing="ingesting"))
            twin = held_copy(archive.catalogue(), volume_id, hashing.result(), labels_fp, options)
            if twin is not None:
                copy = _skipped(archive, twin, src)
                copy.warnings = [f"{shown(src)} is the same scan (same bytes, same masks): not stored again as "
                                 f"{volume_id!r}"]
                return copy
        if masks is _UNREAD:
            masks = _given_masks(labels_dir, src, volume)
        labels, annotated = masks if masks is not None else (None, [])
        provenance = {**volume.meta, "source": hide(str(src.resolve())), "reader": volume.reader,
                      "labels_dir": hide(str(Path(labels_dir).resolve())) if labels_fp is not None else None,
                      "labels_sha256": labels_fp, "mask_reading": MASK_READING if labels_fp is not None else None,
                      "n_bscans": int(volume.image.shape[0]),
                      "warnings": [hide(w) for w in volume.warnings],
                      "has_identifiers": bool(volume.identifiers), "identifiers_kept": bool(keep_identifiers)}
        provenance.update(reader_settings(volume.reader, options))  # e.g. Duke's grader
        if keep_identifiers and volume.identifiers:
            provenance["identifiers"] = dict(volume.identifiers)

        def hashed() -> dict[str, Any]:  # once the pixels are written
            volume.sha256 = hashing.result()
            return {"source_sha256": volume.sha256, "source_path_digest": path_digest(src, volume.sha256[:16]),
                    "source_stat": _stat_record(stamp)}

        binary = labels is not None and labels.max() <= 1
        archive.write_volume(volume_id, volume.image, scale_um=volume.scale_um, provenance=provenance,
                             provenance_later=hashed, manual_labels=labels,
                             annotated=annotated if masks is not None else None,
                             class_names=dict(DEFAULT_CLASS_NAMES) if binary else None,
                             boundaries=volume.layers or None, boundaries_source=volume.layers_source,
                             fundus=volume.fundus, fundus_scale_um=volume.fundus_scale_um)
    return IngestResult(str(src), volume_id, "written", volume.image.shape[0], list(annotated), list(volume.warnings))


def _given_masks(labels_dir: str | Path | None, src: Path, volume: ScanVolume) -> tuple[Any, list[int]] | None:
    """The volume's masks: from ``labels_dir`` (mask files naming no B-scan are said in its warnings), else those
    its file carries (Duke ``.mat``), else None."""
    masks = read_masks(labels_dir, volume) if labels_dir is not None else None
    stray = unmatched_masks(labels_dir, src) if labels_dir is not None else []
    if stray:
        volume.warnings.append(f"{len(stray)} mask file(s) name no B-scan of this folder and were left out: "
                               + ", ".join(stray[:5]) + (", ..." if len(stray) > 5 else ""))
    if masks is None and volume.manual_labels is not None:
        masks = (volume.manual_labels, volume.annotated)
    if masks is None and labels_dir is not None:
        volume.warnings.append("the labels folder holds no masks for it: ingested without manual labels")
    return masks


def _kept_if_same(archive, volume_id: str, src: Path, volume: ScanVolume, masks, meta: Mapping[str, Any],
                  labels_fp: str | None, options: Mapping[str, Any], hide) -> IngestResult | None:
    """A volume read again only because the reading rules changed: when today's reading gives what the archive
    holds (image, voxel size, masks, layers, fundus), it is kept with its derived arrays and prediction and
    records the rules' versions and today's warnings; else None (it is written again). Masks that came from a
    labels folder not given now cannot be read again with their image: a ValueError, the volume kept as it was."""
    if volume.reader != meta.get("reader"):
        return None  # another reader takes the file now
    if not _same_arrays(archive, volume_id, volume, masks):
        if labels_fp is None and meta.get("labels_sha256") is not None:
            raise ValueError(f"{shown(src)}: read under newer rules, its pixels differ from volume {volume_id!r}, "
                             f"whose masks came from a labels folder: ingest it again with --labels so they are "
                             f"read with it (the volume is kept as it was)")
        LOGGER.warning("%s: read under newer rules, volume %r changes: written again (its derived arrays and "
                       "prediction go)", shown(src), volume_id)
        return None
    changes: dict[str, Any] = {**reader_settings(volume.reader, options), "warnings": [hide(w) for w in volume.warnings]}
    if labels_fp is not None:
        changes["mask_reading"] = MASK_READING
    archive.restamp(volume_id, changes)
    LOGGER.info("%s: read again under newer rules, same pixels: volume %r kept", shown(src), volume_id)
    kept = _skipped(archive, volume_id, src)
    kept.warnings = list(volume.warnings)
    return kept


def _same_arrays(archive, volume_id: str, volume: ScanVolume, masks: tuple[np.ndarray, list[int]] | None) -> bool:
    """Whether ``volume`` (and ``masks``) as read now equal what the archive holds for ``volume_id``."""
    def equal(stored, new) -> bool:
        return stored is not None and stored.shape == new.shape and stored.dtype == new.dtype and \
            np.array_equal(stored[...], new)

    if not equal(archive.image(volume_id), volume.image) or archive.scale_um(volume_id) != (
            None if volume.scale_um is None else tuple(float(v) for v in volume.scale_um)):
        return False
    if masks is not None:
        held = archive.manual_labels(volume_id)
        if held is None or list(held[1]) != list(masks[1]) or not equal(held[0], masks[0]):
            return False
    stored_layers = archive.boundaries(volume_id)
    if set(stored_layers) != set(volume.layers or {}) or not all(
            np.array_equal(stored_layers[k], np.asarray(v, np.float32), equal_nan=True) for k, v in (volume.layers or {}).items()):
        return False
    fundus = archive.fundus(volume_id)
    return (fundus is None) == (volume.fundus is None) and (volume.fundus is None or equal(fundus, volume.fundus))


def _stat_record(stamp: str | None) -> dict[str, int] | None:
    """Size, mtime (ns) and inode of the source file as it was read (the first field of its stamp)."""
    if not stamp:
        return None
    ino, size, mtime_ns = (int(v) for v in stamp.split("|", 1)[0].split(":")[:3])
    return {"size": size, "mtime_ns": mtime_ns, "ino": ino}


@task(name="ingest-source", task_run_name="ingest-{source}", **TRANSIENT_IO_RETRIES)
def ingest_source_task(source: str, archive_path: str, labels_dir: str | None = None,
                       options: dict[str, Any] | None = None, max_voxels: int | None = DEFAULT_MAX_VOXELS,
                       scheduler_address: str | None = None) -> IngestResult:
    """Prefect wrapper of :func:`ingest_source`; a bad file fails this task run with its error.

    With ``scheduler_address`` the file is read and written by a worker of that Dask cluster (which
    must see the same paths); this task run waits for it."""
    kwargs = dict(options=options, max_voxels=max_voxels)
    if scheduler_address:
        from octseg.tasks.runtime.cluster import client_for

        future = client_for(scheduler_address).submit(ingest_source, source, archive_path, labels_dir, **kwargs,
                                                      pure=False, key=f"ingest-{uuid.uuid4().hex}")
        result = future.result()
    else:
        result = ingest_source(source, archive_path, labels_dir, **kwargs)
    logger = get_run_logger()
    logger.info("%s -> %s: %s (%d B-scans, %d annotated)", shown(source), result.volume_id, result.status,
                result.n_bscans, len(result.annotated))
    for warning in result.warnings:
        logger.warning("%s: %s", shown(source), warning)
    return result
