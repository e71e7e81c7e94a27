"""Many small units of work (a file to ingest, a volume to preprocess or segment) run in batches.

:func:`run_items` runs one batch: each item as its own Dask task on a cluster (a worker that frees takes
the next), or in threads of this process, or one after another; each attempt of an item that fails with
a transient error (:func:`~octseg.tasks.runtime.retry.is_transient`) is tried again after 1 s and 5 s
where it runs. An item's failure is its outcome, never the batch's: the batch goes on. Outcomes are
yielded as items finish and nothing of a finished item is kept, so memory does not grow with the batch.
:func:`batch_size` chooses how many items a batch holds.
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from octseg.tasks.runtime.retry import call_with_retries

__all__ = ["ItemOutcome", "MAX_BATCH", "TASK_RUNS_PER_RUN", "batch_size", "run_items"]

TASK_RUNS_PER_RUN = 100  # a run of up to this many items gets one task run per item; larger runs batch them
MAX_BATCH = 200  # items per batch at most: a batch's outcomes come back together


@dataclass
class ItemOutcome:
    """What one item gave: its result, or the exception it ended with."""

    item: str
    result: Any = None
    error: BaseException | None = None


def batch_size(n_items: int, per_task: int | None = None) -> int:
    """Items per batch: ``per_task`` when given; else 1 for runs of up to :data:`TASK_RUNS_PER_RUN` items (one
    task run each), growing with the run so that it makes about that many task runs, at most :data:`MAX_BATCH`
    items each (benchmarks/scale.py measures why: see the README's "At scale")."""
    if per_task:
        return per_task
    return max(1, min(MAX_BATCH, math.ceil(n_items / TASK_RUNS_PER_RUN)))


def run_items(fn: Callable[..., Any], items: Sequence[str], kwargs: Mapping[str, Any] | None = None, *,
              scheduler_address: str | None = None, threads: int = 1, resources: dict[str, float] | None = None,
              key: str = "item") -> Iterator[ItemOutcome]:
    """``fn(item, **kwargs)`` for each item, transient errors retried where it runs; an :class:`ItemOutcome`
    per item as each finishes. On the Dask cluster at ``scheduler_address`` (asking each task for
    ``resources``), else in ``threads`` threads (1: in order, in this thread)."""
    kwargs = dict(kwargs or {})
    if scheduler_address is not None:
        yield from _on_dask(fn, items, scheduler_address, resources, key, kwargs)
    elif threads > 1 and len(items) > 1:
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix=f"octseg-{key}") as pool:
            futures = {pool.submit(call_with_retries, fn, item, **kwargs): item for item in items}
            for future in as_completed(futures):
                item = futures.pop(future)
                error = future.exception()
                yield ItemOutcome(item, None if error else future.result(), error)
    else:
        for item in items:
            try:
                yield ItemOutcome(item, call_with_retries(fn, item, **kwargs))
            except Exception as e:
                yield ItemOutcome(item, error=e)


def _on_dask(fn, items, address, resources, key, kwargs) -> Iterator[ItemOutcome]:
    import queue

    from octseg.tasks.runtime.cluster import client_for

    client = client_for(address)
    done: queue.SimpleQueue = queue.SimpleQueue()
    futures = {}
    for item in items:
        future = client.submit(call_with_retries, fn, item, **kwargs, pure=False, resources=resources,
                               key=f"{key}-{uuid.uuid4().hex}")
        futures[future.key] = (future, item)
        future.add_done_callback(lambda f: done.put(f.key))
    while futures:
        future, item = futures.pop(done.get())
        if future.status == "error":
            outcome = ItemOutcome(item, error=future.exception())
        else:
            try:
                outcome = ItemOutcome(item, future.result())
            except Exception as e:  # cancelled (a lost worker), or a result that cannot come back
                outcome = ItemOutcome(item, error=e)
        future.release()
        yield outcome
