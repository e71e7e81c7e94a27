"""Flow ``ingest-volumes``: OCT files -> volumes of the OME-Zarr archive."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import IngestConfig
from octseg.flows.plans import duplicate_ids
from octseg.flows.runs import batch_task, finish, run_in_batches
from octseg.flows.summary import IngestSummary
from octseg.tasks.archive.store import open_archive
from octseg.tasks.ingest.source import IngestResult, ingest_source
from octseg.tasks.runtime.batches import ItemOutcome
from octseg.tasks.runtime.progress import progress_bar

__all__ = ["MANIFEST_ABOVE", "ingest_config_for", "ingest_item", "ingest_volumes"]

INGEST_FILES = batch_task("ingest-files")
THREADS = 4  # files read and written at once by this process, all batches together
MANIFEST_ABOVE = 1000  # more sources than this travel to the flow run in a file: its parameters hold 512 KB


@contextlib.contextmanager
def ingest_config_for(config: IngestConfig, sources: list[str]) -> Iterator[IngestConfig]:
    """``config`` for these ``sources``: in its parameters when they are few, else in a temporary file
    (``sources_file``) removed afterwards, since Prefect refuses a flow run whose parameters exceed 512 KB."""
    if len(sources) <= MANIFEST_ABOVE:
        yield config.model_copy(update={"sources": tuple(Path(s) for s in sources), "sources_file": None})
        return
    fd, name = tempfile.mkstemp(prefix="octseg-sources-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(f"{s}\n" for s in sources))
        yield config.model_copy(update={"sources": (), "sources_file": Path(name)})
    finally:
        Path(name).unlink(missing_ok=True)


def ingest_item(source: str, *, archive_path: str, labels_dir: str | None, options: dict[str, Any],
                max_voxels: int | None) -> IngestResult:
    """One file of a batch (in a thread here, or on a Dask worker that sees the same paths)."""
    return ingest_source(source, archive_path, labels_dir, options=options, max_voxels=max_voxels)


@flow(name="ingest-volumes", log_prints=False)
def ingest_volumes(config: IngestConfig) -> State:
    """Read every source in parallel and write it as one volume; a bad file fails its own task run.

    The files are read by this process's threads, or by the workers of ``config.dask_address``
    (the cluster preprocess and segment use) when one is given."""
    logger = get_run_logger()
    logger.info("ingest config: %s", config.model_dump_json())
    open_archive(config.archive, create=True)
    sources = list(config.all_sources())
    duplicates = duplicate_ids(sources)
    todo = [str(s) for s in sources if s not in duplicates]
    summary = IngestSummary(str(config.archive), failures=list(duplicates.values()))
    with progress_bar("ingest files", len(todo)) as update:
        finished = 0

        def record(outcome: ItemOutcome) -> None:
            nonlocal finished
            finished += 1
            update(finished, len(todo))
            if outcome.error is None:
                result = outcome.result
                (summary.written if result.status == "written" else summary.skipped).append(result.volume_id)
                summary.warnings.extend(f"{result.volume_id}: {w}" for w in result.warnings)

        runner = ({"scheduler_address": config.dask_address, "key": "ingest"} if config.dask_address
                  else {"threads": THREADS // 2, "key": "ingest"})  # two batches in flight: THREADS threads in all
        summary.failures = run_in_batches(
            INGEST_FILES, ingest_item, todo, label="ingest", on_outcome=record, per_task=config.per_task,
            in_flight=2, runner=runner, archive_path=str(config.archive),
            labels_dir=str(config.labels) if config.labels else None, options=config.reader_options.model_dump(),
            max_voxels=config.max_voxels) + summary.failures
    for failure in duplicates.values():
        logger.error("failed: %s", failure)
    for warning in summary.warnings:
        logger.warning("warning: %s", warning)
    logger.info(summary.headline())
    return finish(summary)
