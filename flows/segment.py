"""Flow ``segment-archive``: the registered U-Net over every volume, on Dask workers, resumable."""
from __future__ import annotations

import collections
import contextlib
import os
import threading

from prefect import flow, get_run_logger
from prefect.states import State

from octseg.flows.config import SegmentConfig
from octseg.flows.plans import plan_segmentation
from octseg.flows.runs import batch_task, finish, run_in_batches
from octseg.flows.summary import SegmentSummary
from octseg.tasks.runtime.batches import ItemOutcome
from octseg.tasks.runtime.cluster import client_for, dask_scheduler, worker_resources
from octseg.tasks.runtime.progress import progress_bars
from octseg.tasks.tracking.models import resolve_model
from octseg.tasks.segmentation.segment import PROGRESS_TOPIC, SegmentResult, segment_registered, write_segmentation_csv
from octseg.tasks.tracking.uri import resolve_tracking_uri

__all__ = ["segment_archive", "segment_item"]

SEGMENT_VOLUMES = batch_task("segment-volumes")


def segment_item(volume_id: str, *, archive_path: str, counter=None, **kwargs) -> SegmentResult:
    """One volume of a batch (on a Dask worker, or here with ``counter`` counting its B-scans)."""
    progress = None if counter is None else (lambda done, total: counter(volume_id, done))
    return segment_registered(archive_path, volume_id, progress=progress, **kwargs)


def _local_gpus(config: SegmentConfig) -> int:
    """GPUs a LocalCluster gives its workers (one each): those of this machine unless told otherwise."""
    if config.dask_address or config.gpu is False or config.inference.device == "cpu":
        return 0
    if ":" in config.inference.device:  # one named GPU: one worker on it
        return 1
    import torch

    return torch.cuda.device_count()


class _BScanCounter:
    """B-scans done across volumes and workers, fed by each volume's progress (local or Dask events). Only the
    volumes in progress are held; a finished volume's B-scans join the total."""

    def __init__(self, update) -> None:
        self.done: dict[str, int] = {}
        self.finished_bscans = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=1000)  # late events of finished volumes
        self.update, self.lock = update, threading.Lock()

    def __call__(self, volume_id: str, done: int) -> None:
        with self.lock:
            if volume_id in self.recent:
                return
            self.done[volume_id] = done
            self.update("B-scans", self.finished_bscans + sum(self.done.values()))

    def finish(self, volume_id: str, bscans: int) -> None:
        with self.lock:
            self.done.pop(volume_id, None)
            self.recent.append(volume_id)
            self.finished_bscans += bscans
            self.update("B-scans", self.finished_bscans + sum(self.done.values()))

    def event(self, event) -> None:  # distributed topic handler: (timestamp, message)
        message = event[1]
        self(message["volume"], message["done"])


def _segment_volumes(config, ref, tracking_uri, qc_dir, todo, sizes, scheduler, gpu, counter, update, summary) -> None:
    """The volumes in batches of Prefect task runs (:func:`~octseg.flows.runs.run_in_batches`): each volume a
    Dask task on the cluster (its workers pace them, two batches in flight), or one after another in this
    process (each would otherwise take its own memory budget at the same time)."""
    kwargs = dict(archive_path=str(config.archive), ref=ref, tracking_uri=tracking_uri, requested_uri=config.model_uri,
                  inference=config.inference, qc_dir=str(qc_dir), force=config.force)
    finished = 0

    def record(outcome: ItemOutcome) -> None:
        nonlocal finished
        finished += 1
        result = outcome.result
        if outcome.error is None:
            {"segmented": summary.segmented, "busy": summary.busy}.get(result.status, summary.skipped).append(
                outcome.item)
        counter.finish(outcome.item, sizes.pop(outcome.item, 0))
        update("volumes", finished)

    runner = {"scheduler_address": scheduler, "resources": {"GPU": 1} if gpu else None, "key": "segment"}
    if scheduler is None:
        kwargs["counter"] = counter
    summary.failures += run_in_batches(SEGMENT_VOLUMES, segment_item, todo, label="segment", on_outcome=record,
                                       per_task=config.per_task, in_flight=1 if scheduler is None else 2,
                                       runner=runner, **kwargs)


@flow(name="segment-archive")
def segment_archive(config: SegmentConfig) -> State:
    """Resolve the model first (no write before that succeeds); then the volumes to segment (found from the
    archive's catalogue) in batches of task runs, each volume on the Dask cluster (a LocalCluster unless an
    address is given; in this process with 0 workers)."""
    logger = get_run_logger()
    logger.info("segment config: %s", config.model_dump_json())
    tracking_uri = resolve_tracking_uri(config.tracking_uri)
    ref = resolve_model(config.model_uri, tracking_uri)  # raises before anything is written
    qc_dir = config.qc_folder
    summary = SegmentSummary(str(config.archive), f"{ref.name} v{ref.version}", qc_dir=str(qc_dir))
    sizes: dict[str, int] = {}
    todo, summary.skipped = plan_segmentation(config, ref, sizes)
    local = not todo or config.n_workers == 0 and not config.dask_address
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
