"""Flow ``segment-archive``: the registered U-Net over every volume, on Dask workers, resumable."""
from __future__ import annotations

import contextlib
import os
import threading

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import SegmentConfig
from octseg.flows.plans import plan_segmentation
from octseg.flows.runs import Outcomes, as_finished, finish
from octseg.flows.summary import SegmentSummary
from octseg.tasks.archive.store import open_archive
from octseg.tasks.runtime.cluster import client_for, dask_scheduler, worker_resources
from octseg.tasks.runtime.progress import progress_bars
from octseg.tasks.tracking.models import resolve_model
from octseg.tasks.segmentation.segment import PROGRESS_TOPIC, segment_volume_task, write_segmentation_csv
from octseg.tasks.tracking.uri import resolve_tracking_uri

__all__ = ["segment_archive"]


def _n_bscans(archive, volume_id: str) -> int:
    """B-scans of a volume for the progress bar; 0 when unreadable (its task then fails with the error)."""
    try:
        return int(archive.image(volume_id).shape[0])
    except Exception:
        return 0


def _local_gpus(config: SegmentConfig) -> int:
    """GPUs a LocalCluster gives its workers (one each): those of this machine unless told otherwise."""
    if config.dask_address or config.gpu is False or config.inference.device == "cpu":
        return 0
    if ":" in config.inference.device:  # one named GPU: one worker on it
        return 1
    import torch

    return torch.cuda.device_count()


class _BScanCounter:
    """B-scans done across volumes and workers, fed by each volume's progress (local or Dask events)."""

    def __init__(self, update) -> None:
        self.done: dict[str, int] = {}
        self.update, self.lock = update, threading.Lock()

    def __call__(self, volume_id: str, done: int) -> None:
        with self.lock:
            self.done[volume_id] = done
            self.update("B-scans", sum(self.done.values()))

    def event(self, event) -> None:  # distributed topic handler: (timestamp, message)
        message = event[1]
        self(message["volume"], message["done"])


def _segment_volumes(config, ref, tracking_uri, qc_dir, todo, sizes, scheduler, gpu, counter, update, summary) -> None:
    """One task run per volume: submitted together when Dask runs them (its workers pace them), one after
    another in this process (each would otherwise take its own memory budget at the same time)."""
    kwargs = dict(requested_uri=config.model_uri, inference=config.inference, qc_dir=str(qc_dir), force=config.force,
                  scheduler_address=scheduler, gpu=gpu)
    outcomes = Outcomes(get_run_logger())

    def record(vid: str, run) -> None:
        result = outcomes.add(vid, run)
        if result is not None:
            {"segmented": summary.segmented, "busy": summary.busy}.get(result.status, summary.skipped).append(vid)
            counter(vid, sizes[vid])

    if scheduler is None:
        for finished, vid in enumerate(todo, start=1):
            record(vid, segment_volume_task(str(config.archive), vid, ref, tracking_uri, **kwargs,
                                            progress=lambda d, t, v=vid: counter(v, d), return_state=True))
            update("volumes", finished)
    else:
        futures = [segment_volume_task.submit(str(config.archive), vid, ref, tracking_uri, **kwargs) for vid in todo]
        for finished, (vid, future) in enumerate(as_finished(futures, todo), start=1):
            record(vid, future)
            update("volumes", finished)
    summary.failures += outcomes.failures


@flow(name="segment-archive")
def segment_archive(config: SegmentConfig) -> State:
    """Resolve the model first (no write before that succeeds); then one task run per volume, each run
    on the Dask cluster (a LocalCluster unless an address is given; in this process with 0 workers)."""
    logger = get_run_logger()
    logger.info("segment config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    ref = resolve_model(config.model_uri, tracking_uri)  # raises before anything is written
    archive = open_archive(config.archive, create=False)
    qc_dir = config.qc_folder
    summary = SegmentSummary(str(config.archive), f"{ref.name} v{ref.version}", qc_dir=str(qc_dir))
    todo, summary.skipped = plan_segmentation(config, ref)
    sizes = {vid: _n_bscans(archive, vid) for vid in todo}
    local = config.n_workers == 0 and not config.dask_address
    gpus = _local_gpus(config)
    workers = config.n_workers or gpus or min(4, os.cpu_count() or 1)
    cluster = contextlib.nullcontext(None) if local else dask_scheduler(config.dask_address, workers, gpus=gpus)
    with cluster as scheduler, progress_bars({"volumes": len(todo), "B-scans": sum(sizes.values())}) as update:
        counter = _BScanCounter(update)
        gpu = bool(config.gpu)
        if scheduler is not None:
            logger.info("Dask scheduler at %s", scheduler)
            gpu = config.gpu if config.gpu is not None else "GPU" in worker_resources(scheduler)
            client_for(scheduler).subscribe_topic(PROGRESS_TOPIC, counter.event)
        try:
            _segment_volumes(config, ref, tracking_uri, qc_dir, todo, sizes, scheduler, gpu, counter, update, summary)
        finally:
            if scheduler is not None:
                client_for(scheduler).unsubscribe_topic(PROGRESS_TOPIC)
    if summary.segmented:
        summary.report = str(write_segmentation_csv(config.archive))
    logger.info(summary.headline())
    return finish(summary)
