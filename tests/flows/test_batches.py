"""Many items through Prefect in batches (octseg.flows.runs.run_in_batches), against the test harness: a bounded
window of batch task runs, Prefect's records growing with the batches and not with the items, and every failed
item named in Prefect (its own Failed task run) and in the flow run's message."""
from __future__ import annotations

import threading
import time

from prefect import flow
from prefect.context import FlowRunContext

from octseg.flows.runs import batch_task, finish, run_in_batches
from octseg.flows.summary import PreprocessSummary
from octseg.tasks.runtime.batches import batch_size

ACTIVE = {"now": 0, "most": 0}
LOCK = threading.Lock()
TASK = batch_task("test-items")


def work(item: str, *, fail: frozenset = frozenset()) -> str:
    with LOCK:
        ACTIVE["now"] += 1
        ACTIVE["most"] = max(ACTIVE["most"], ACTIVE["now"])
    try:
        time.sleep(0.002)
        if item in fail:
            raise ValueError(f"{item}: refused")
        return item.upper()
    finally:
        with LOCK:
            ACTIVE["now"] -= 1


@flow(name="test-batches")
def items_flow(items: list[str], fail: list[str], per_task: int | None = None, threads: int = 1,
               runner: dict | None = None):
    summary = PreprocessSummary("x")
    results, seen = [], []
    summary.failures = run_in_batches(TASK, work, items, label="item", per_task=per_task, in_flight=2,
                                      on_outcome=lambda o: (seen.append(o.item),
                                                            results.append(o.result) if o.error is None else None),
                                      runner={"threads": threads, **(runner or {})}, fail=frozenset(fail))
    summary.up_to_date = results
    summary.computed = {"links": len(FlowRunContext.get().run_results), "seen": seen}  # Prefect's records
    return finish(summary)


def _task_runs(state, expected: int) -> dict[str, str]:
    """Name -> final state of the flow run's task runs, once the server has recorded ``expected`` of them."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + 120
    with get_client(sync_client=True) as client:
        while True:
            runs = []
            while True:  # the API gives 200 at most per page
                page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
                    state.state_details.flow_run_id])), limit=200, offset=len(runs))
                runs += page
                if len(page) < 200:
                    break
            final = {t.name: t.state.type.value for t in runs if t.state is not None and t.state.is_final()}
            if len(final) >= expected or time.monotonic() > deadline:
                return final
            time.sleep(0.5)


def test_batch_size_grows_with_the_run() -> None:
    assert [batch_size(n) for n in (1, 100, 101, 1_000, 10_000, 100_000)] == [1, 1, 2, 10, 100, 200]
    assert batch_size(10_000, per_task=1) == 1


def test_large_runs_are_batched_and_failed_items_named(tmp_path) -> None:
    items = [f"v{i:04d}" for i in range(1200)]
    state = items_flow(items, ["v0007", "v1111"], return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_failed() and "v0007: refused" in state.message and "v1111: refused" in state.message
    assert len(summary.up_to_date) == 1198 and sorted(summary.failures) == ["v0007: refused", "v1111: refused"]
    runs = _task_runs(state, 102)
    batches = {name: s for name, s in runs.items() if ".." in name}
    assert len(batches) == 100 and set(batches.values()) == {"COMPLETED"}  # 12 items per task run
    assert "item-v0000..v0011 (12)" in batches
    assert runs["item-v0007"] == runs["item-v1111"] == "FAILED"  # each failed item is a task run of its own
    assert len(runs) == 102
    assert summary.computed["links"] <= 2 * 102  # Prefect links one result per task run, not one per item


def test_small_runs_keep_a_task_run_per_item(tmp_path) -> None:
    state = items_flow(["a", "b", "c"], ["b"], return_state=True)
    runs = _task_runs(state, 3)
    assert runs == {"item-a": "COMPLETED", "item-b": "FAILED", "item-c": "COMPLETED"}
    assert "b: refused" in state.message


def test_at_most_two_batches_in_flight(tmp_path) -> None:
    ACTIVE["most"] = 0
    state = items_flow([f"i{i}" for i in range(400)], [], per_task=25, threads=3, return_state=True)
    assert state.is_completed()
    assert ACTIVE["most"] <= 2 * 3  # two batches of three threads at a time, whatever the number of items


def test_a_batch_that_fails_whole_still_names_each_item(tmp_path) -> None:
    """The batch's task run itself fails (here a runner it cannot start, as a lost cluster would): each of its
    items is still a failure of its own (in the summary, the CLI's lines, the logs), every item gets its outcome
    (segment's counters and progress close), and the state message stays bounded."""
    from octseg.flows.runs import FAILURES_NAMED

    items = [f"w{i:04d}" for i in range(300)]
    state = items_flow(items, [], per_task=100, runner={"not_a_runner_option": 1}, return_state=True)
    summary = state.result(raise_on_failure=False)
    assert state.is_failed() and len(summary.failures) == 300 and summary.up_to_date == []
    assert sorted(summary.computed["seen"]) == items  # an outcome for every item
    assert all(line.startswith(f"{item}: TypeError") for line, item in zip(sorted(summary.failures), items))
    assert state.message.startswith("300 failed: w0") and f"and {300 - FAILURES_NAMED} more" in state.message
    assert len(state.message) < 200 * FAILURES_NAMED
    runs = _task_runs(state, 3)
    assert runs == {"item-w0000..w0099 (100)": "FAILED", "item-w0100..w0199 (100)": "FAILED",
                    "item-w0200..w0299 (100)": "FAILED"}  # the batches' own Failed runs, not 300 more


def test_a_failure_line_names_its_item_once() -> None:
    from octseg.flows.runs import failure_line

    assert failure_line("v1", ValueError("v1: refused")) == "v1: refused"
    assert failure_line("v1", ValueError("v10: refused")) == "v1: ValueError: v10: refused"  # another item's name
    assert failure_line("v1", ValueError("cannot read /in/v1.tif")) == "cannot read /in/v1.tif"


def test_a_damaged_chunk_is_said_to_be_the_archives_own_damage(tmp_path) -> None:
    """The checksum error Zarr raises on a damaged chunk gets what to do about it."""
    import numpy as np

    from octseg.flows.runs import failure_line
    from octseg.tasks.archive.store import open_archive

    archive = open_archive(tmp_path / "a.zarr")
    archive.write_volume("v", np.ones((2, 16, 16), np.uint8), provenance={"source": "v.tif", "source_sha256": "0" * 64,
                                                                          "reader": "tiff"})
    chunk = next(p for p in (tmp_path / "a.zarr" / "v").rglob("*") if p.is_file() and "/c/" in str(p))
    chunk.write_bytes(b"\x00" * 20)
    try:
        np.asarray(open_archive(tmp_path / "a.zarr", create=False).image("v")[:])
    except Exception as e:  # noqa: BLE001 - whatever the codec raises
        line = failure_line("v", e)
    else:
        raise AssertionError("a damaged chunk read without error")
    assert "damaged: remove the volume, then ingest its source again" in line, line
