"""Flow ``ingest-volumes``: OCT files -> volumes of the OME-Zarr archive."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from octseg.flows.config import IngestConfig
from octseg.flows.summary import IngestSummary
from octseg.tasks.archive import open_archive, volume_id_from_path
from octseg.tasks.ingest import IngestResult, ingest_source_task
from octseg.tasks.progress import progress_bar

__all__ = ["ingest_volumes"]


def _duplicate_ids(sources: list[Path]) -> dict[Path, str]:
    """Sources whose volume id is already taken by an earlier source in the batch -> error text."""
    seen: dict[str, Path] = {}
    dup: dict[Path, str] = {}
    for src in sources:
        vid = volume_id_from_path(src)
        if vid in seen:
            dup[src] = f"{src}: volume id {vid!r} is already used by {seen[vid]} in this batch; rename one of them"
        else:
            seen[vid] = src
    return dup


@flow(name="ingest-volumes", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def ingest_volumes(config: IngestConfig) -> IngestSummary:
    """Read every source in parallel and write it as one volume; bad files are reported, not fatal."""
    logger = get_run_logger()
    logger.info("ingest config: %s", config.model_dump_json())
    open_archive(config.archive, create=True)
    sources = [Path(s) for s in config.sources]
    duplicates = _duplicate_ids(sources)
    todo = [s for s in sources if s not in duplicates]
    futures = ingest_source_task.map(
        [str(s) for s in todo], archive_path=unmapped(str(config.archive)), labels_dir=unmapped(
            str(config.labels) if config.labels else None
        )
    )
    results: list[IngestResult] = []
    with progress_bar("ingest files", len(futures)) as update:
        for done, future in enumerate(as_completed(futures), start=1):
            results.append(future.result())
            update(done, len(futures))
    results += [IngestResult(source=str(s), volume_id=None, status="failed", error=msg) for s, msg in duplicates.items()]
    summary = IngestSummary.from_results(str(config.archive), results)
    for failure in summary.failures:
        logger.error("failed: %s", failure)
    logger.info(summary.headline())
    return summary
