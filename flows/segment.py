"""Flow ``segment-archive``: the registered U-Net over every volume, resumable."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import SegmentConfig
from octseg.flows.preprocess import select_volumes
from octseg.flows.runs import failure_line, finish
from octseg.flows.summary import SegmentSummary
from octseg.tasks.archive import open_archive
from octseg.tasks.progress import progress_bar
from octseg.tasks.segment import already_segmented, segment_volume_task
from octseg.tasks.registry import ModelRef, resolve_model
from octseg.tasks.tracking import resolve_tracking_uri

__all__ = ["segment_archive", "default_qc_dir", "plan_segmentation"]


def default_qc_dir(archive: Path) -> Path:
    """QC overlays live beside the archive: ``<archive>.qc/``."""
    archive = Path(archive)
    return archive.with_name(archive.name + ".qc")


def plan_segmentation(config: SegmentConfig, ref: ModelRef) -> tuple[list[str], list[str]]:
    """(volumes to segment, volumes this model version already segmented) of the selection."""
    archive = open_archive(config.archive, create=False)
    todo, done = [], []
    for vid in select_volumes(config.archive, config.volumes):
        finished = not config.force and already_segmented(archive, vid, ref.name, ref.version)
        (done if finished else todo).append(vid)
    return todo, done


@flow(name="segment-archive")
def segment_archive(config: SegmentConfig) -> State:
    """Resolve the model first (no write before that succeeds), then segment volume by volume."""
    logger = get_run_logger()
    logger.info("segment config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    ref = resolve_model(config.model_uri, tracking_uri)  # raises before anything is written
    archive = open_archive(config.archive, create=False)
    qc_dir = config.qc_dir or default_qc_dir(config.archive)
    summary = SegmentSummary(str(config.archive), f"{ref.name} v{ref.version}", qc_dir=str(qc_dir))
    todo, summary.skipped = plan_segmentation(config, ref)
    for vid in todo:  # the task gets the pinned model reference and loads the weights once per process
        with progress_bar(f"segment {vid}", archive.image(vid).shape[0]) as update:
            state = segment_volume_task(
                str(config.archive), vid, ref, tracking_uri, requested_uri=config.model_uri,
                inference=config.inference, qc_dir=str(qc_dir), force=config.force, progress=update,
                return_state=True,
            )
        outcome = state.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            summary.failures.append(failure_line(vid, outcome))
            logger.error("failed: %s", summary.failures[-1])
        else:
            (summary.segmented if outcome.status == "segmented" else summary.skipped).append(vid)
    logger.info(summary.headline())
    return finish(summary)
