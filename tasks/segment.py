"""Bulk inference: a registered U-Net over archive volumes, written to ``labels/prediction``.

Resumable at volume granularity: a prediction is staged and moved into place only when complete,
and it records the model name and version, so a rerun skips volumes that model already segmented.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from octseg.tasks.archive import already_segmented, open_archive
from octseg.tasks.dataset import normalized_bscans
from octseg.tasks.qc import overlay, save_png
from octseg.tasks.registry import ModelRef, cached_unet
from octseg.tasks.retry import TRANSIENT_IO_RETRIES
from octseg.tasks.classes import class_names_of
from octseg.unet.config import InferenceConfig, UNetConfig
from octseg.unet.inference import segment_volume

__all__ = ["SegmentResult", "segment_one", "segment_volume_task"]


@dataclass
class SegmentResult:
    volume_id: str
    status: str  # "segmented" | "skipped"
    qc_image: str | None = None


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
    """Segment one volume unless ``model_info``'s name and version already did it."""
    archive = open_archive(archive_path, create=False)
    if not force and already_segmented(archive, volume_id, model_info["model_name"], model_info["model_version"]):
        return SegmentResult(volume_id, "skipped")
    image = normalized_bscans(archive, volume_id)
    labels = segment_volume(model, image, inference, progress=progress)
    archive.write_prediction(volume_id, labels, class_names=class_names, model_info=model_info)
    qc = None
    if qc_dir is not None:
        z = int(np.argmax((labels > 0).sum(axis=(1, 2)))) if labels.any() else len(labels) // 2
        qc = str(Path(qc_dir) / f"{volume_id}_bscan{z:03d}.png")
        save_png(overlay(np.asarray(archive.image(volume_id)[z]), labels[z]), qc)
    return SegmentResult(volume_id, "segmented", qc_image=qc)


@task(name="segment-volume", task_run_name="segment-{volume_id}", cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def segment_volume_task(archive_path: str, volume_id: str, ref: ModelRef, tracking_uri: str, *,
                        requested_uri: str, inference: InferenceConfig, qc_dir: str | None, force: bool,
                        progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    """Prefect wrapper of :func:`segment_one`; a failing volume fails this task run with its error."""
    info = {"model_name": ref.name, "model_version": ref.version, "run_id": ref.run_id, "model_uri": requested_uri}
    model = cached_unet(ref, tracking_uri, inference.device)
    names = class_names_of(UNetConfig.from_dict(ref.unet_config).out_channels)
    result = segment_one(archive_path, volume_id, model, info, names, inference, qc_dir=qc_dir, force=force,
                         progress=progress)
    get_run_logger().info("%s: %s", volume_id, result.status)
    return result
