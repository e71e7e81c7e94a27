"""Bulk inference: a registered U-Net over archive volumes, written to ``labels/prediction``.

Resumable at volume granularity: a prediction is staged and moved into place only when complete,
and it records the model name and version, so a rerun skips volumes that model already segmented.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from octseg.tasks.archive.store import already_segmented, open_archive
from octseg.tasks.preprocess.normalized import bscan_reader
from octseg.tasks.segmentation.qc import overlay, save_png
from octseg.tasks.tracking.models import cached_unet, ModelRef
from octseg.tasks.runtime.retry import TRANSIENT_IO_RETRIES
from octseg.tasks.archive.claims import claim_volume, VolumeBusy
from octseg.tasks.archive.classes import class_names_of
from octseg.unet.config import InferenceConfig, UNetConfig
from octseg.unet.inference import segment_bscans, uses_tta

__all__ = ["SegmentResult", "check_model_classes", "segment_one", "segment_registered", "segment_volume_task", "segmentation_csv_path",
           "write_segmentation_csv"]


@dataclass
class SegmentResult:
    volume_id: str
    status: str  # "segmented" | "skipped" (done before) | "busy" (another run holds the volume)
    qc_image: str | None = None


def check_model_classes(archive, volume_id: str, class_names: dict[int, str]) -> None:
    """ValueError naming the volume when its manual labels hold a class the model does not predict."""
    manual = archive.manual_labels(volume_id)
    if manual is None or not manual[1]:
        return
    labels, annotated = manual
    top = max(int(np.asarray(labels.get_orthogonal_selection((sorted(annotated),))).max()), 0)
    if top not in class_names and top >= len(class_names):
        raise ValueError(f"{volume_id}: its manual labels hold class {top}, the model predicts "
                         f"{len(class_names)} classes {sorted(class_names.values())}; use a model trained on them")


def _segment_claimed(archive, volume_id: str, model, model_info: dict, class_names: dict[int, str],
                     inference: InferenceConfig, progress: Callable[[int, int], None]) -> np.ndarray:
    """Segment into a staged prediction and publish it; returns the foreground pixels per B-scan."""
    fingerprint = archive.image_fingerprint(volume_id)
    n, h, w = archive.image(volume_id).shape
    t0 = time.perf_counter()
    with archive.staged_prediction(volume_id, class_names=class_names, model_info=model_info,
                                   image_fingerprint=fingerprint) as staged:
        segment_bscans(model, bscan_reader(archive, volume_id), n, staged.write, inference,
                       chunk=staged.shard_bscans, image_hw=(h, w), progress=progress)
        staged.extra["seconds"] = round(time.perf_counter() - t0, 3)
        staged.extra["tta"] = uses_tta(model, inference)
        return staged.foreground.copy()


def segment_one(
    archive_path: str | Path,
    volume_id: str,
    model,
    model_info: dict,
    class_names: dict[int, str],
    inference: InferenceConfig,
    *,
    qc_dir: str | Path | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SegmentResult:
    """Segment one volume unless ``model_info``'s name and version already did it (on its current image).

    B-scans are read and normalised a shard ahead, segmented, and written shard by shard into a staged
    prediction (:func:`octseg.unet.inference.segment_bscans`), which is published only when complete and
    only if the image did not change meanwhile. The prediction's attributes carry a report: B-scans,
    pixels per class, foreground volume in mm^3 when the voxel size is known, seconds taken. The volume is
    claimed meanwhile (:mod:`octseg.tasks.archive.claims`): a volume another live run is segmenting is "busy".
    """
    archive = open_archive(archive_path, create=False)
    done = lambda: already_segmented(archive, volume_id, model_info["model_name"], model_info["model_version"])  # noqa: E731
    if not force and done():
        return SegmentResult(volume_id, "skipped")
    check_model_classes(archive, volume_id, class_names)
    try:
        with claim_volume(archive.path, volume_id) as claim:
            if not force and done():  # another run finished it while we were on our way
                return SegmentResult(volume_id, "skipped")
            foreground = _segment_claimed(archive, volume_id, model, model_info, class_names, inference,
                                          lambda d, t: (claim.renew(), progress and progress(d, t)))
    except VolumeBusy:
        return SegmentResult(volume_id, "busy")
    n = len(foreground)
    qc = None
    if qc_dir is not None:
        z = int(np.argmax(foreground)) if foreground.any() else n // 2
        qc = str(Path(qc_dir) / f"{volume_id}_bscan{z:03d}.png")
        save_png(overlay(np.asarray(archive.image(volume_id)[z]), np.asarray(archive.prediction(volume_id)[z])), qc)
    return SegmentResult(volume_id, "segmented", qc_image=qc)


PROGRESS_TOPIC = "octseg-segment-progress"


def segment_registered(archive_path: str, volume_id: str, ref: ModelRef, tracking_uri: str, *, requested_uri: str,
                       inference: InferenceConfig, qc_dir: str | None, force: bool,
                       progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    """:func:`segment_one` with the registered model ``ref``, loaded once per process: what a Dask worker
    runs for each volume (B-scan progress goes to the flow as Dask events), or the flow's own process."""
    from octseg.tasks.runtime.cluster import gpu_device_of_worker, publish

    info = {"model_name": ref.name, "model_version": ref.version, "run_id": ref.run_id, "model_uri": requested_uri}
    device = gpu_device_of_worker(inference.device)
    model = cached_unet(ref, tracking_uri, device)
    names = class_names_of(UNetConfig.from_dict(ref.unet_config).out_channels)
    if progress is None:
        def progress(done: int, total: int) -> None:
            publish(PROGRESS_TOPIC, {"volume": volume_id, "done": done, "total": total})
    return segment_one(archive_path, volume_id, model, info, names, inference, qc_dir=qc_dir, force=force,
                       progress=progress)


@task(name="segment-volume", task_run_name="segment-{volume_id}", cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def segment_volume_task(archive_path: str, volume_id: str, ref: ModelRef, tracking_uri: str, *,
                        requested_uri: str, inference: InferenceConfig, qc_dir: str | None, force: bool,
                        scheduler_address: str | None = None, gpu: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    """Prefect task of one volume: on the Dask cluster at ``scheduler_address`` (asking for the resource
    ``GPU=1`` when ``gpu``), else in this process. A failing volume fails this task run with its error."""
    kwargs = {"requested_uri": requested_uri, "inference": inference, "qc_dir": qc_dir, "force": force}
    if scheduler_address is None:
        result = segment_registered(archive_path, volume_id, ref, tracking_uri, progress=progress, **kwargs)
    else:
        from octseg.tasks.runtime.cluster import client_for

        future = client_for(scheduler_address).submit(
            segment_registered, archive_path, volume_id, ref, tracking_uri, **kwargs, pure=False,
            key=f"segment-{volume_id}-{uuid.uuid4().hex[:8]}", resources={"GPU": 1} if gpu else None)
        result = future.result()
    get_run_logger().info("%s: %s", volume_id, result.status)
    return result


def segmentation_csv_path(archive_path: str | Path) -> Path:
    """``<archive>.reports/segmentation.csv`` beside the archive."""
    archive = Path(archive_path)
    return archive.with_name(archive.name + ".reports") / "segmentation.csv"


def write_segmentation_csv(archive_path: str | Path) -> Path:
    """One row per volume with a complete prediction: volume id, B-scans, pixels per class, the volume of
    each foreground class in mm^3 (empty when the archive does not know the voxel size), model name and
    version, whether flip TTA was on, seconds taken, when it was written. Replaced atomically."""
    import csv
    import os
    import tempfile

    archive = open_archive(archive_path, create=False)
    rows, classes, foreground = [], [], []
    for vid, info in archive.prediction_infos().items():  # from the catalogue, not every volume
        report = info.get("report")
        if not report:
            continue
        rows.append((vid, info, report))
        classes += [c for c in report["pixels"] if c not in classes]
        foreground += [c for c in report["volume_mm3"] if c not in foreground]
    header = ["volume_id", "bscans", *[f"pixels_{c}" for c in classes], *[f"{c}_mm3" for c in foreground],
              "model_name", "model_version", "tta", "seconds", "written_at"]
    path = segmentation_csv_path(archive_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".segmentation-", suffix=".csv", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            for vid, info, report in rows:
                mm3 = [report["volume_mm3"].get(c) for c in foreground]
                out.writerow([vid, report["bscans"], *[report["pixels"].get(c, "") for c in classes],
                              *["" if v is None else v for v in mm3], info["model_name"], info["model_version"],
                              report.get("tta", False), report.get("seconds", ""), info.get("written_at", "")])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
