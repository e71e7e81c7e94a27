"""Flow ``segment-archive``: the registered U-Net over every volume, resumable."""
from __future__ import annotations


from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import SegmentConfig
from octseg.flows.plans import plan_segmentation
from octseg.flows.runs import failure_line, finish
from octseg.flows.summary import SegmentSummary
from octseg.tasks.archive import open_archive
from octseg.tasks.progress import progress_bar
from octseg.tasks.segment import segment_volume_task
from octseg.tasks.registry import resolve_model
from octseg.tasks.tracking import resolve_tracking_uri

__all__ = ["segment_archive"]


def _n_bscans(archive, volume_id: str) -> int:
    """B-scans of a volume for its progress bar; 0 when unreadable (its task then fails with the error)."""
    try:
        return int(archive.image(volume_id).shape[0])
    except Exception:
        return 0


@flow(name="segment-archive")
def segment_archive(config: SegmentConfig) -> State:
    """Resolve the model first (no write before that succeeds), then segment volume by volume."""
    logger = get_run_logger()
    logger.info("segment config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    ref = resolve_model(config.model_uri, tracking_uri)  # raises before anything is written
    archive = open_archive(config.archive, create=False)
    qc_dir = config.qc_folder
    summary = SegmentSummary(str(config.archive), f"{ref.name} v{ref.version}", qc_dir=str(qc_dir))
    todo, summary.skipped = plan_segmentation(config, ref)
    for vid in todo:  # the task gets the pinned model reference and loads the weights once per process
        with progress_bar(f"segment {vid}", _n_bscans(archive, vid)) as update:
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
