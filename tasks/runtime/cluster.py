"""Dask for the flows: a LocalCluster for one flow run or a scheduler by address, one client per process.

Volumes (segment) and blocks of B-scans (preprocess) run on Dask workers; Prefect tasks in the flow's
process submit them and wait, so each volume stays a task run in Prefect. A worker that declares the
Dask resource ``GPU`` (``dask worker --resources GPU=1``) takes one volume at a time per GPU.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["QUIET_WORKERS", "client_for", "close_clients", "dask_scheduler", "gpu_device_of_worker", "publish", "worker_resources"]

_CLIENTS: dict[str, Any] = {}
QUIET_WORKERS = "octseg.quiet-workers"  # Dask config key: local workers log only critical errors
LOCAL_SCHEDULER_LOGS = {"distributed.admin.log-length": 500, "distributed.admin.low-level-log-length": 100,
                        "distributed.diagnostics.computations.max-history": 10}
_LOCK = threading.Lock()


@contextlib.contextmanager
def dask_scheduler(address: str | None, n_workers: int, *, threads: int | None = None,
                   gpus: int = 0) -> Iterator[str]:
    """Yield a scheduler address: ``address`` itself, or that of a LocalCluster started here with
    ``n_workers`` processes of one task slot each. ``threads``: BLAS/torch threads per worker (default:
    the cores shared out). ``gpus`` > 0 gives every worker the resource ``GPU=1``."""
    if address:
        yield address
        return
    from distributed import LocalCluster

    per_worker = threads or max(1, (os.cpu_count() or 1) // max(1, n_workers))
    env = {name: str(per_worker) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    resources = {"GPU": 1} if gpus else None
    import dask

    # the LocalCluster's scheduler lives in this (the flow's) process: keep its in-memory logs short, so that its
    # memory does not grow with the tasks of a long run (Dask keeps 10,000 events per topic by default)
    # a volume that fails on a worker is reported by the flow, in one line naming it; the worker's own
    # "Compute Failed" traceback (an ERROR) reaches the console only under --verbose (the commands set
    # QUIET_WORKERS); warnings and anything above an error (a worker out of memory, restarted) still do
    silence = logging.ERROR + 1 if dask.config.get(QUIET_WORKERS, False) else logging.WARNING
    with dask.config.set(LOCAL_SCHEDULER_LOGS), LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None, env=env,
            resources=resources, silence_logs=silence) as cluster:
        try:
            yield cluster.scheduler_address
        finally:
            close_clients(cluster.scheduler_address)


def client_for(address: str):
    """A :class:`distributed.Client` of ``address``, shared by the threads of this process."""
    from distributed import Client

    with _LOCK:
        client = _CLIENTS.get(address)
        if client is None or client.status in ("closed", "closing"):
            client = _CLIENTS[address] = Client(address, set_as_default=False)
        return client


def close_clients(address: str | None = None) -> None:
    """Close this process's client of ``address`` (all when None)."""
    with _LOCK:
        for key in [a for a in _CLIENTS if address is None or a == address]:
            with contextlib.suppress(Exception):
                _CLIENTS.pop(key).close()


def worker_count(address: str) -> int:
    """How many workers the scheduler at ``address`` has now."""
    return len(client_for(address).scheduler_info().get("workers", {}))


def worker_resources(address: str) -> set[str]:
    """The resource names any worker of the scheduler declares (e.g. ``{"GPU"}``)."""
    info = client_for(address).scheduler_info()
    return {name for worker in info.get("workers", {}).values() for name in (worker.get("resources") or {})}


def publish(topic: str, message: Any) -> bool:
    """Send ``message`` to the clients subscribed to ``topic`` when running inside a Dask worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return False
    worker.log_event(topic, message)
    return True


def gpu_device_of_worker(device: str) -> str:
    """The CUDA device of this worker: the worker's number modulo the GPUs (a LocalCluster's workers are
    named 0, 1, ...; ``dask worker --nworkers N --name gpu`` names them gpu-0, gpu-1, ...), so N workers
    on an N-GPU node use one GPU each. ``device`` unchanged elsewhere (or give each worker its own
    ``CUDA_VISIBLE_DEVICES``)."""
    if device not in ("auto", "cuda"):
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    import torch

    count = torch.cuda.device_count()
    number = re.search(r"(?:^|-)(\d+)$", str(name))  # LocalCluster: "0", "1"; `dask worker --nworkers N`: "...-0"
    if count < 2 or number is None:
        return device
    return f"cuda:{int(number.group(1)) % count}"
