"""Flow ``preprocess-archive``: normalised images and border-weight maps, Dask-parallel."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import flow, get_run_logger, unmapped
from prefect.futures import as_completed

from octseg.flows.config import PreprocessConfig
from octseg.flows.summary import PreprocessSummary
from octseg.tasks.archive import open_archive
from octseg.tasks.preprocess import preprocess_volume_task
from octseg.tasks.progress import progress_bar

__all__ = ["preprocess_archive", "dask_scheduler"]


@contextlib.contextmanager
def dask_scheduler(address: str | None, n_workers: int = 2) -> Iterator[str]:
    """Yield a scheduler address: ``address`` itself, or that of a LocalCluster started here."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def select_volumes(archive_path, volumes: tuple[str, ...] | None) -> list[str]:
    """The named volumes (each must exist) or every volume of the archive."""
    available = open_archive(archive_path, create=False).volume_ids()
    if volumes is None:
        return available
    missing = sorted(set(volumes) - set(available))
    if missing:
        raise ValueError(f"volume(s) {missing} not in archive {archive_path}; it holds {available}")
    return list(volumes)


@flow(name="preprocess-archive")
def preprocess_archive(config: PreprocessConfig) -> PreprocessSummary:
    """Normalise every volume and compute weight maps of annotated B-scans; skip what is up to date."""
    logger = get_run_logger()
    logger.info("preprocess config: %s", config.model_dump_json())
    volumes = select_volumes(config.archive, config.volumes)
    with dask_scheduler(config.dask_address, config.n_workers) as address:
        logger.info("Dask scheduler at %s", address)
        futures = preprocess_volume_task.map(
            unmapped(str(config.archive)),
            volumes,
            scheduler_address=unmapped(address),
            w0=unmapped(config.w0),
            sigma=unmapped(config.sigma),
            class_weights=unmapped(config.class_weights),
        )
        results = []
        with progress_bar("preprocess volumes", len(futures)) as update:
            for done, future in enumerate(as_completed(futures), start=1):
                results.append(future.result())
                update(done, len(futures))
    summary = PreprocessSummary(str(config.archive))
    for r in results:
        if r.error:
            summary.failures.append(r.error)
        elif r.computed:
            summary.computed[r.volume_id] = r.computed
        else:
            summary.up_to_date.append(r.volume_id)
    for failure in summary.failures:
        logger.error("failed: %s", failure)
    logger.info(summary.headline())
    return summary
