"""How a flow waits for its task runs and ends: every failure is a Failed task run in Prefect, the
batch goes on, and the flow run ends Failed (with its summary as data) when anything failed."""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed, State

from octseg.tasks.runtime.progress import progress_bar
from octseg.tasks.readers.sources import shown

__all__ = ["collect", "failure_line", "finish", "summary_of"]


def failure_line(item: str, error: BaseException) -> str:
    """``"<item>: <what was wrong>"`` on one line; the item is not repeated when the error names it."""
    message = shown(" ".join(str(error).split()) or type(error).__name__)  # library messages may quote raw names
    item = shown(item)
    if item in message:
        return message
    return f"{item}: {type(error).__name__}: {message}"


def collect(futures: Sequence[PrefectFuture], items: Sequence[str], description: str) -> tuple[list[Any], list[str]]:
    """Wait for every future (a progress bar counts them); the results of those that completed, and one
    line per failed task run naming its item (``items[i]`` belongs to ``futures[i]``)."""
    item_of: Mapping[Hashable, str] = {id(f): item for f, item in zip(futures, items)}
    results, failures = [], []
    with progress_bar(description, len(futures)) as update:
        for done, future in enumerate(as_completed(futures), start=1):
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, BaseException):
                failures.append(failure_line(item_of[id(future)], outcome))
            else:
                results.append(outcome)
            update(done, len(futures))
    return results, failures


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
