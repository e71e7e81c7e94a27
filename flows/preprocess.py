"""Flow ``preprocess-archive``: normalised images and border-weight maps, Dask-parallel."""
from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import PreprocessConfig
from octseg.flows.plans import plan_preprocess
from octseg.flows.runs import batch_task, finish, run_in_batches
from octseg.tasks.preprocess.derive import PreprocessResult, preprocess_volume
from octseg.tasks.runtime.batches import ItemOutcome
from octseg.tasks.runtime.cluster import dask_scheduler, worker_count
from octseg.tasks.runtime.progress import progress_bar
from octseg.unet.config import WeightMapConfig

__all__ = ["preprocess_archive", "preprocess_item"]

PREPROCESS_VOLUMES = batch_task("preprocess-volumes")


def preprocess_item(volume_id: str, *, archive_path: str, scheduler_address: str | None,
                    weights: WeightMapConfig) -> PreprocessResult:
    """One volume of a batch: whole on a Dask worker (``scheduler_address`` None), or its blocks spread over
    the cluster at ``scheduler_address`` from this process."""
    return preprocess_volume(archive_path, volume_id, scheduler_address, weights)


@flow(name="preprocess-archive")
def preprocess_archive(config: PreprocessConfig) -> State:
    """Normalise every volume and compute weight maps of annotated B-scans; skip what is up to date (found
    from the archive's catalogue, each volume checked again as it is preprocessed)."""
    logger = get_run_logger()
    logger.info("preprocess config: %s", config.model_dump_json())
    volumes, summary = plan_preprocess(config)
    if not volumes:
        logger.info(summary.headline())
        return finish(summary)
    with dask_scheduler(config.dask_address, config.n_workers) as address, \
            progress_bar("preprocess volumes", len(volumes)) as update:
        # enough volumes to keep every worker busy: one Dask task per volume, run whole on a worker (nothing but
        # submits left to this process); fewer: each volume's shard-aligned blocks spread over the workers
        whole = len(volumes) >= max(1, worker_count(address))
        logger.info("Dask scheduler at %s; one task per %s", address, "volume" if whole else "block")
        finished = 0

        def record(outcome: ItemOutcome) -> None:
            nonlocal finished
            finished += 1
            update(finished, len(volumes))
            if outcome.error is None:
                result = outcome.result
                if result.computed:
                    summary.computed[result.volume_id] = result.computed
                else:
                    summary.up_to_date.append(result.volume_id)

        runner = {"scheduler_address": address if whole else None, "key": "preprocess"}
        summary.failures += run_in_batches(
            PREPROCESS_VOLUMES, preprocess_item, volumes, label="preprocess", on_outcome=record,
            per_task=config.per_task, in_flight=2 if whole else 1, runner=runner,
            archive_path=str(config.archive), scheduler_address=None if whole else address, weights=config.weights)
    logger.info(summary.headline())
    return finish(summary)
