"""Flow ``preprocess-archive``: normalised images and border-weight maps, Dask-parallel."""
from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.states import State

from octseg.flows.config import PreprocessConfig
from octseg.flows.runs import collect, finish
from octseg.flows.summary import PreprocessSummary
from octseg.tasks.archive.store import select_volumes
from octseg.tasks.runtime.cluster import dask_scheduler, worker_count
from octseg.tasks.preprocess.derive import preprocess_volume_task

__all__ = ["preprocess_archive"]


@flow(name="preprocess-archive")
def preprocess_archive(config: PreprocessConfig) -> State:
    """Normalise every volume and compute weight maps of annotated B-scans; skip what is up to date."""
    logger = get_run_logger()
    logger.info("preprocess config: %s", config.model_dump_json())
    volumes = select_volumes(config.archive, config.volumes)
    with dask_scheduler(config.dask_address, config.n_workers) as address:
        # enough volumes to keep every worker busy: one task per volume, run whole on a worker (nothing but
        # submits left to this process); fewer: each volume's shard-aligned blocks spread over the workers
        spread = "volume" if len(volumes) >= max(1, worker_count(address)) else "blocks"
        logger.info("Dask scheduler at %s; one task per %s", address, "volume" if spread == "volume" else "block")
        futures = preprocess_volume_task.map(unmapped(str(config.archive)), volumes,
                                             scheduler_address=unmapped(address), weights=unmapped(config.weights),
                                             spread=unmapped(spread))
        results, failures = collect(futures, volumes, "preprocess volumes")
    summary = PreprocessSummary(str(config.archive), failures=failures)
    for r in results:
        if r.computed:
            summary.computed[r.volume_id] = r.computed
        else:
            summary.up_to_date.append(r.volume_id)
    for failure in summary.failures:
        logger.error("failed: %s", failure)
    logger.info(summary.headline())
    return finish(summary)
