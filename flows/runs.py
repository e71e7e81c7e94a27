"""How a flow runs its units of work and ends: every failure is a Failed task run in Prefect naming its
item, the batch goes on, and the flow run ends Failed (with its summary as data) when anything failed.

:func:`run_in_batches` is how ingest, preprocess and segment run their files or volumes: consecutive
batches of items (:func:`~octseg.tasks.runtime.batches.batch_size`: one item per task run for runs of up
to 100 items, larger batches for larger runs), each batch one Prefect task run whose items run on the Dask
cluster or in threads (:func:`~octseg.tasks.runtime.batches.run_items`). A bounded window of batches is in
flight: the next is submitted as one finishes, and a finished batch's future is dropped once its outcomes
are counted, so the flow's memory and Prefect's records grow with the number of batches, not of items.
A failed item is always its own Failed task run, ``<label>-<item>``, with its error: a batch of one is
that task run itself; in a larger batch the failed item's task run is recorded when the batch ends. A batch
whose task run fails as a whole (a crash, a lost cluster) is itself that Failed run, named after its items,
and each of its items is still a failure line of its own (logged, in the summary, in the CLI's output).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed, State

from octseg.tasks.runtime.batches import ItemOutcome, batch_size, run_items
from octseg.tasks.runtime.progress import progress_bar
from octseg.tasks.readers.sources import shown

__all__ = ["Batch", "Outcomes", "as_finished", "batch_task", "collect", "failure_line", "finish", "run_in_batches",
           "summary_of"]


# library errors that mean the archive's own bytes are damaged, and what to do about it
DAMAGED = ("Stored and computed checksum do not match",)
DAMAGED_HINT = (" (the archive's stored data of this volume is damaged: remove the volume, then ingest its source "
                "again)")


def failure_line(item: str, error: BaseException) -> str:
    """``"<item>: <what was wrong>"`` on one line; the item is not repeated when the error names it."""
    message = shown(" ".join(str(error).split()) or type(error).__name__)  # library messages may quote raw names
    if any(sign in message for sign in DAMAGED):
        message += DAMAGED_HINT
    item = shown(item)
    if re.search(rf"(?<![\w-]){re.escape(item)}(?![\w-])", message):  # named as itself, not inside another name
        return message
    return f"{item}: {type(error).__name__}: {message}"


class Outcomes:
    """What a batch of task runs gave, as each finishes: the results of those that completed, and one line
    per failed run naming its item (logged as it comes when a ``logger`` is given)."""

    def __init__(self, logger: Any | None = None) -> None:
        self.results: list[Any] = []
        self.failures: list[str] = []
        self.logger = logger

    def add(self, item: str, run: PrefectFuture | State) -> Any | None:
        """Record the finished task run ``run`` (a future, or a state from ``return_state=True``) of ``item``;
        its result, or None when it failed."""
        outcome = run.result(raise_on_failure=False)
        if isinstance(outcome, BaseException):
            self.failures.append(failure_line(item, outcome))
            if self.logger is not None:
                self.logger.error("failed: %s", self.failures[-1])
            return None
        self.results.append(outcome)
        return outcome


def as_finished(futures: Sequence[PrefectFuture], items: Sequence[str]) -> Iterator[tuple[str, PrefectFuture]]:
    """``(item, future)`` for each future as it finishes; ``items[i]`` belongs to ``futures[i]``."""
    item_of: Mapping[Hashable, str] = {id(f): item for f, item in zip(futures, items)}
    for future in as_completed(futures):
        yield item_of[id(future)], future


def collect(futures: Sequence[PrefectFuture], items: Sequence[str], description: str) -> tuple[list[Any], list[str]]:
    """Wait for every future (a progress bar counts them); the results of those that completed, and one
    line per failed task run naming its item (``items[i]`` belongs to ``futures[i]``)."""
    outcomes = Outcomes()
    with progress_bar(description, len(futures)) as update:
        for done, (item, future) in enumerate(as_finished(futures, items), start=1):
            outcomes.add(item, future)
            update(done, len(futures))
    return outcomes.results, outcomes.failures


FAILURES_NAMED = 50  # in the flow run's state message; the summary, the CLI and the run's logs have them all


def finish(summary: Any) -> State:
    """The flow's final state: Completed, or Failed naming the failures when ``summary.failures`` (the first
    :data:`FAILURES_NAMED` of them, and how many more: the message is one database row, bounded even when a
    run of 100,000 volumes fails whole); the summary is the state's data either way (:func:`summary_of`)."""
    failures = list(summary.failures)
    if not failures:
        return Completed(data=summary, message=summary.headline())
    named = "; ".join(line if len(line) <= 300 else line[:299] + "…" for line in failures[:FAILURES_NAMED])
    more = len(failures) - FAILURES_NAMED
    if more > 0:
        named += f"; and {more} more (listed in the flow run's logs and the command's output)"
    return Failed(data=summary, message=f"{len(failures)} failed: {named}")


def summary_of(state: State) -> Any:
    """The summary a flow run returned, failed or not; a flow that crashed re-raises its error."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if isinstance(result, State):  # a parent flow that returned its child's state
        return summary_of(result)
    return result


# ---- many items: batches of them, a bounded window in flight ---------------------------------------------

@dataclass
class Batch:
    """What one batch task run returns: the outcome of each of its items (one object, so Prefect links one
    result to the task run, not one per item)."""

    outcomes: list[ItemOutcome] = field(default_factory=list)


def _run_batch(fn: Callable[..., Any], items: list[str], run_name: str, options: dict[str, Any],
               kwargs: dict[str, Any]) -> Batch:
    """Run a batch's items (see :func:`~octseg.tasks.runtime.batches.run_items`); a batch of one item fails
    with that item's error, so its task run is the item's own."""
    batch = Batch(list(run_items(fn, items, kwargs, **options)))
    if len(items) == 1 and batch.outcomes[0].error is not None:
        raise batch.outcomes[0].error
    failed = sum(o.error is not None for o in batch.outcomes)
    if len(items) > 1:
        get_run_logger().info("%s: %d done, %d failed", run_name, len(items) - failed, failed)
    return batch


def batch_task(name: str):
    """The Prefect task of one batch of ``name`` items (e.g. ``segment-volumes``); its runs are named after
    their items. No Prefect retries: each item's transient errors are retried where it runs."""
    return task(_run_batch, name=name, task_run_name="{run_name}", cache_policy=NO_CACHE)


@task(name="failed-item", task_run_name="{run_name}", cache_policy=NO_CACHE)
def _failed_item(run_name: str, error: BaseException) -> None:
    """The Failed task run of an item that failed inside a larger batch: its own record, with its error."""
    raise error


def _run_name(label: str, items: Sequence[str]) -> str:
    if len(items) == 1:
        return f"{label}-{items[0]}"
    return f"{label}-{items[0]}..{items[-1]} ({len(items)})"


def run_in_batches(task_fn, fn: Callable[..., Any], items: Sequence[str], *, label: str,
                   on_outcome: Callable[[ItemOutcome], None], per_task: int | None = None, in_flight: int = 2,
                   runner: Mapping[str, Any] | None = None, **kwargs: Any) -> list[str]:
    """Run ``fn(item, **kwargs)`` over ``items`` in batches, each a run of ``task_fn`` (a :func:`batch_task`),
    at most ``in_flight`` batches at a time; ``on_outcome`` gets each item's outcome as its batch finishes.
    ``runner`` goes to :func:`~octseg.tasks.runtime.batches.run_items` (``scheduler_address``, ``threads``,
    ``resources``, ``key``). Returns one failure line per failed item (logged as it comes), each also a Failed
    task run: ``<label>-<item>``, or the batch's own when its task run failed as a whole."""
    logger = get_run_logger()
    size = batch_size(len(items), per_task)
    batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
    failures: list[str] = []
    window: dict[PrefectFuture, list[str]] = {}
    runner = dict(runner or {})

    def submit(chunk: list[str]) -> None:
        window[task_fn.submit(fn, chunk, _run_name(label, chunk), runner, kwargs)] = chunk

    def settle(future: PrefectFuture, chunk: list[str]) -> None:
        result = future.result(raise_on_failure=False)
        whole = isinstance(result, BaseException)  # the batch's task run itself failed (a crash, a lost cluster)
        outcomes = [ItemOutcome(item, error=result) for item in chunk] if whole else result.outcomes
        for outcome in outcomes:
            if outcome.error is not None:
                failures.append(failure_line(outcome.item, outcome.error))
                logger.error("failed: %s", failures[-1])
                if len(chunk) > 1 and not whole:  # a whole failed batch is its own Failed run, items named
                    _failed_item(_run_name(label, [outcome.item]), outcome.error, return_state=True)
            on_outcome(outcome)

    pending = iter(batches)
    for chunk in pending:
        submit(chunk)
        if len(window) >= max(1, in_flight):
            break
    while window:
        future = next(as_completed(list(window)))
        settle(future, window.pop(future))
        for chunk in pending:  # one in, one out
            submit(chunk)
            break
    return failures
