"""Ingest one scan source (file or folder of B-scans) into the archive as one volume.

:func:`ingest_source` does the work and raises for bad input (:class:`~octseg.tasks.readers.ReadError` or ValueError,
naming the file), so its Prefect task run ends Failed while the flow goes on with the other files. A source the archive already holds is skipped without decoding unless
new masks are given for it; an existing volume is never overwritten by a different file that maps
to the same volume id (see :func:`ingest_source`). :func:`ingest_source_task` is the thin Prefect
wrapper; it retries transient I/O errors (:mod:`octseg.tasks.retry`).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prefect import get_run_logger, task

from octseg.tasks.archive import open_archive, volume_id_from_path
from octseg.tasks.classes import DEFAULT_CLASS_NAMES
from octseg.tasks.readers import mask_files, read_masks, read_volume, source_sha256
from octseg.tasks.retry import TRANSIENT_IO_RETRIES

__all__ = ["IngestResult", "ingest_source", "ingest_source_task", "is_up_to_date", "labels_sha256"]

LOGGER = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What happened to one source."""

    source: str
    volume_id: str | None
    status: Literal["written", "skipped"]
    n_bscans: int = 0
    annotated: list[int] = field(default_factory=list)


def labels_sha256(labels_dir: str | Path | None, source: str | Path) -> str | None:
    """SHA-256 over the source's mask files (B-scan index, name and bytes); None without masks."""
    found = mask_files(labels_dir, source) if labels_dir is not None else {}
    if not found:
        return None
    digest = hashlib.sha256()
    for z, path in sorted(found.items()):
        digest.update(f"{z}:{path.name}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _existing_volume(meta: dict, volume_id: str, src: Path, sha: str,
                     labels_fp: str | None) -> tuple[Literal["skip", "write", "fail"], str | None]:
    """What to do with a source whose volume id the archive already holds, and the error if "fail".

    See :func:`ingest_source` for the rule.
    """
    stored_source = meta.get("source")
    if meta.get("source_sha256") != sha:
        if stored_source != str(src.resolve()):
            return "fail", (f"{src}: volume id {volume_id!r} already holds {stored_source} (different "
                            f"content); rename one of them or remove the volume")
        return "write", None  # the same file, updated in place
    if labels_fp is None or labels_fp == meta.get("labels_sha256"):
        return "skip", None  # same bytes (perhaps moved): keep the volume and its ground truth
    return "write", None  # new or changed masks


def is_up_to_date(source: str | Path, archive, labels_dir: str | Path | None = None) -> bool:
    """True when ``archive`` already holds ``source`` (same bytes) and ingest would skip it."""
    src = Path(source)
    volume_id = volume_id_from_path(src)
    if not archive.has_volume(volume_id):
        return False
    action, _ = _existing_volume(archive.volume_meta(volume_id), volume_id, src, source_sha256(src),
                                 labels_sha256(labels_dir, src))
    return action == "skip"


def ingest_source(source: str | Path, archive_path: str | Path,
                  labels_dir: str | Path | None = None) -> IngestResult:
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
      ``scan_1``): "failed", naming both files; the stored volume is left alone.

    Raises :class:`~octseg.tasks.readers.ReadError` (bad file) or ValueError (id clash), both naming the file.
    """
    src = Path(source)
    volume_id = volume_id_from_path(src)
    sha, labels_fp = source_sha256(src), labels_sha256(labels_dir, src)
    archive = open_archive(archive_path)
    if archive.has_volume(volume_id):
        meta = archive.volume_meta(volume_id)
        action, error = _existing_volume(meta, volume_id, src, sha, labels_fp)
        if action == "skip":
            manual = archive.manual_labels(volume_id)
            return IngestResult(str(src), volume_id, "skipped", archive.image(volume_id).shape[0],
                                manual[1] if manual else [])
        if action == "fail":
            raise ValueError(error)
        if labels_fp is None and meta.get("labels_sha256") is not None:
            LOGGER.warning("%s changed: re-writing volume %r drops its manual labels (no masks given)",
                           src, volume_id)
    volume = read_volume(src, sha256=sha)
    masks = read_masks(labels_dir, volume) if labels_dir is not None else None
    labels, annotated = masks if masks is not None else (None, [])
    provenance = {"source": str(src.resolve()), "source_sha256": volume.sha256, "reader": volume.reader,
                  "labels_dir": str(Path(labels_dir).resolve()) if masks is not None else None,
                  "labels_sha256": labels_fp, "n_bscans": int(volume.image.shape[0])}
    binary = labels is not None and labels.max() <= 1
    archive.write_volume(volume_id, volume.image, scale_um=volume.scale_um, provenance=provenance,
                         manual_labels=labels, annotated=annotated if masks is not None else None,
                         class_names=dict(DEFAULT_CLASS_NAMES) if binary else None)
    return IngestResult(str(src), volume_id, "written", volume.image.shape[0], list(annotated))


@task(name="ingest-source", task_run_name="ingest-{source}", **TRANSIENT_IO_RETRIES)
def ingest_source_task(source: str, archive_path: str, labels_dir: str | None = None) -> IngestResult:
    """Prefect wrapper of :func:`ingest_source`; a bad file fails this task run with its error."""
    result = ingest_source(source, archive_path, labels_dir)
    get_run_logger().info("%s -> %s: %s (%d B-scans, %d annotated)", source, result.volume_id, result.status,
                          result.n_bscans, len(result.annotated))
    return result
