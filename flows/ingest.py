"""Flow ``ingest-volumes``: OCT files -> volumes of the OME-Zarr archive."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from octseg.flows.config import IngestConfig
from octseg.flows.plans import duplicate_ids
from octseg.flows.runs import collect, finish
from octseg.flows.summary import IngestSummary
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import ingest_source_task

__all__ = ["ingest_volumes"]


@flow(name="ingest-volumes", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def ingest_volumes(config: IngestConfig) -> State:
    """Read every source in parallel and write it as one volume; a bad file fails its own task run.

    The files are read by this process's threads, or by the workers of ``config.dask_address``
    (the cluster preprocess and segment use) when one is given."""
    logger = get_run_logger()
    logger.info("ingest config: %s", config.model_dump_json())
    open_archive(config.archive, create=True)
    sources = [Path(s) for s in config.sources]
    duplicates = duplicate_ids(sources)
    todo = [str(s) for s in sources if s not in duplicates]
    labels = str(config.labels) if config.labels else None
    futures = ingest_source_task.map(todo, archive_path=unmapped(str(config.archive)), labels_dir=unmapped(labels),
                                     options=unmapped(config.reader_options.model_dump()),
                                     max_voxels=unmapped(config.max_voxels),
                                     scheduler_address=unmapped(config.dask_address))
    results, failures = collect(futures, todo, "ingest files")
    summary = IngestSummary.from_results(str(config.archive), results, failures + list(duplicates.values()))
    for failure in summary.failures:
        logger.error("failed: %s", failure)
    for warning in summary.warnings:
        logger.warning("warning: %s", warning)
    logger.info(summary.headline())
    return finish(summary)
