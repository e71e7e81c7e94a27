"""How a flow waits for its task runs and ends: every failure is a Failed task run in Prefect, the
batch goes on, and the flow run ends Failed (with its summary as data) when anything failed."""
from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed, State

from octseg.tasks.runtime.progress import progress_bar
from octseg.tasks.readers.sources import shown

__all__ = ["Outcomes", "as_finished", "collect", "failure_line", "finish", "summary_of"]


def failure_line(item: str, error: BaseException) -> str:
    """``"<item>: <what was wrong>"`` on one line; the item is not repeated when the error names it."""
    message = shown(" ".join(str(error).split()) or type(error).__name__)  # library messages may quote raw names
    item = shown(item)
    if item in message:
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


def finish(summary: Any) -> State:
    """The flow's final state: Completed, or Failed naming each failure when ``summary.failures``;
    the summary is the state's data either way (:func:`summary_of` reads it back)."""
    failures = list(summary.failures)
    if not failures:
        return Completed(data=summary, message=summary.headline())
    return Failed(data=summary, message=f"{len(failures)} failed: " + "; ".join(failures))


def summary_of(state: State) -> Any:
    """The summary a flow run returned, failed or not; a flow that crashed re-raises its error."""
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    if isinstance(result, State):  # a parent flow that returned its child's state
        return summary_of(result)
    return result
