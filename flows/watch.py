"""Flow ``watch-inbox``: what a schedule runs every hour on a drop folder.

Files new to the archive (by content) and no longer being written are ingested, preprocessed and
segmented with the champion, each stage its own flow run (subflows of this one); a run with nothing
new ends at once and says so.
"""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import IngestConfig, PreprocessConfig, SegmentConfig, WatchConfig
from octseg.flows.ingest import ingest_config_for, ingest_volumes
from octseg.flows.preprocess import preprocess_archive
from octseg.flows.runs import failure_line, finish, summary_of
from octseg.flows.segment import segment_archive
from octseg.flows.summary import WatchSummary
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.inbox import remember_problems, scan_inbox
from octseg.tasks.ingest.known import read_settings

__all__ = ["VOLUMES_PER_RUN", "watch_inbox"]

VOLUMES_PER_RUN = 10_000


def _stage(name: str, run, summary: WatchSummary):
    """A stage's summary; its failures (or its crash) become the watch run's failures."""
    try:
        result = summary_of(run())
    except Exception as e:  # e.g. no champion to segment with: the new volumes stay ingested
        summary.failures.append(failure_line(name, e))
        return None
    summary.failures.extend(result.failures)
    return result


@flow(name="watch-inbox")
def watch_inbox(config: WatchConfig) -> State:
    """Scan the inbox; ingest, preprocess and segment what is new and settled."""
    logger = get_run_logger()
    open_archive(config.archive, create=True)  # so that what fails is remembered beside it
    settings = read_settings(config.reader_options.model_dump(), config.max_voxels)
    scan = scan_inbox(config.inbox, config.archive, settle_seconds=config.settle_seconds, labels=config.labels,
                      settings=settings)
    summary = WatchSummary(str(config.inbox), str(config.archive), known=len(scan.known),
                           unsettled=len(scan.unsettled), failures=list(scan.unreadable),
                           known_bad=len(scan.known_bad))
    logger.info("inbox: %d new, %d known, %d known bad (unchanged), %d still being written", len(scan.new),
                len(scan.known), len(scan.known_bad), len(scan.unsettled))
    remember_problems(config.archive, scan.problems, settings)  # reported this once, counted as known bad after
    if scan.new:
        base = IngestConfig(sources=tuple(scan.new[:1]), archive=config.archive, labels=config.labels,
                            reader_options=config.reader_options, max_voxels=config.max_voxels,
                            dask_address=config.dask_address)
        with ingest_config_for(base, scan.new) as ingest_cfg:
            ingest = _stage("ingest", lambda: ingest_volumes(ingest_cfg, return_state=True), summary)
        summary.ingested = list(ingest.written) if ingest else []
    # the new volumes, at most VOLUMES_PER_RUN per preprocess and segment run (a flow run's parameters hold 512 KB)
    for start in range(0, len(summary.ingested), VOLUMES_PER_RUN):
        volumes = tuple(summary.ingested[start : start + VOLUMES_PER_RUN])
        _stage("preprocess", lambda: preprocess_archive(PreprocessConfig(
            archive=config.archive, volumes=volumes, dask_address=config.dask_address, weights=config.weights),
            return_state=True), summary)
        segment = _stage("segment", lambda: segment_archive(SegmentConfig(
            archive=config.archive, volumes=volumes, model_uri=config.model_uri, tracking_uri=config.tracking_uri,
            dask_address=config.dask_address, n_workers=config.n_workers, inference=config.inference),
            return_state=True), summary)
        summary.segmented += list(segment.segmented) if segment else []
    logger.info(summary.headline())
    return finish(summary)
