"""Flow ``ingest-volumes``: OCT files -> volumes of the OME-Zarr archive."""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, unmapped
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from octseg.flows.config import IngestConfig
from octseg.flows.runs import collect, finish
from octseg.flows.summary import IngestSummary
from octseg.tasks.archive import open_archive, volume_id_from_path
from octseg.tasks.ingest import ingest_source_task, is_up_to_date

__all__ = ["ingest_volumes", "plan_ingest"]


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


def plan_ingest(config: IngestConfig) -> tuple[list[str], IngestSummary]:
    """(sources to ingest, a summary listing those already in the archive unchanged)."""
    summary = IngestSummary(str(config.archive))
    if not (Path(config.archive) / "zarr.json").is_file():
        return [str(s) for s in config.sources], summary
    archive = open_archive(config.archive, create=False)
    todo = []
    for src in config.sources:
        try:
            done = is_up_to_date(src, archive, config.labels)
        except Exception:  # an unreadable file: the flow reports it
            done = False
        if done:
            summary.skipped.append(volume_id_from_path(src))
        else:
            todo.append(str(src))
    return todo, summary


@flow(name="ingest-volumes", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def ingest_volumes(config: IngestConfig) -> State:
    """Read every source in parallel and write it as one volume; a bad file fails its own task run."""
    logger = get_run_logger()
    logger.info("ingest config: %s", config.model_dump_json())
    open_archive(config.archive, create=True)
    sources = [Path(s) for s in config.sources]
    duplicates = _duplicate_ids(sources)
    todo = [str(s) for s in sources if s not in duplicates]
    labels = str(config.labels) if config.labels else None
    futures = ingest_source_task.map(todo, archive_path=unmapped(str(config.archive)), labels_dir=unmapped(labels))
    results, failures = collect(futures, todo, "ingest files")
    summary = IngestSummary.from_results(str(config.archive), results, failures + list(duplicates.values()))
    for failure in summary.failures:
        logger.error("failed: %s", failure)
    logger.info(summary.headline())
    return finish(summary)
