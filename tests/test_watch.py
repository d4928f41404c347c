"""WatchExecution and WatchExecutions never lose their place (DESIGN §5)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
import sqlalchemy as sa

from orchestrator.server.app import Server
from orchestrator.server.settings import Settings
from orchestrator.server.store.schema import events
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, read_message
from tests.errors import details_of

if TYPE_CHECKING:
    Stub = pb_grpc.OrchestratorServiceAsyncStub


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url, heartbeat_seconds=0.3, max_watchers_per_tenant=400)


def steps_plan(n: int, seconds: float = 0.02, payload: int = 0) -> pb.ExecutablePlan:
    def step(i: int) -> dict[str, Any]:
        if payload:
            return {
                "stepId": f"s{i}",
                "tool": "core.echo",
                "parameters": {"i": i, "blob": "x" * payload},
            }
        return {"stepId": f"s{i}", "tool": "core.wait", "parameters": {"seconds": seconds}}

    return plan_of(*(step(i) for i in range(n)))


async def start(stub: Stub, tenant: str, plan: pb.ExecutablePlan) -> str:
    response = await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    return response.run_id


async def collect(
    stub: Stub, tenant: str, run_id: str, after: int = 0, limit: int | None = None
) -> tuple[list[pb.ExecutionEvent], grpc.StatusCode]:
    """Events of one watch (up to `limit`, then cut off), and how the stream ended."""
    got: list[pb.ExecutionEvent] = []
    call = stub.WatchExecution(
        pb.WatchExecutionRequest(run_id=run_id, after_sequence=after), metadata=md(tenant)
    )
    async for item in call:
        if item.event.type == pb.EVENT_TYPE_HEARTBEAT:
            continue
        got.append(item.event)
        if limit is not None and len(got) >= limit:
            call.cancel()
            return got, grpc.StatusCode.CANCELLED
    return got, await call.code()


async def status_changes(call: Any) -> list[tuple[str, int]]:
    """A WatchExecutions stream's (run id, status) changes up to its first heartbeat (it is
    caught up then), after which the call is cancelled."""
    changes: list[tuple[str, int]] = []
    async for item in call:
        if item.event.type == pb.EVENT_TYPE_HEARTBEAT:
            break
        changes.append((item.event.run_id, item.event.execution.status))
    call.cancel()
    return changes


def sequences(evs: list[pb.ExecutionEvent]) -> list[int]:
    return [e.sequence for e in evs if e.type != pb.EVENT_TYPE_SNAPSHOT]


async def test_a_watcher_sees_every_event_of_a_twenty_step_run(stub: Stub, tenant: str) -> None:
    run_id = await start(stub, tenant, steps_plan(20))
    got, code = await collect(stub, tenant, run_id)
    assert code == grpc.StatusCode.OK
    assert got[0].type == pb.EVENT_TYPE_SNAPSHOT
    seqs = sequences(got)
    assert seqs == list(range(got[0].sequence + 1, seqs[-1] + 1)), "in order, no gap"
    last = got[-1]
    assert last.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert last.execution.status == pb.EXECUTION_STATUS_COMPLETED
    final = (
        await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
    ).execution
    assert last.sequence == final.last_sequence
    started = [e.step_id for e in got if e.type == pb.EVENT_TYPE_STEP_STARTED]
    completed = [e.step_id for e in got if e.type == pb.EVENT_TYPE_STEP_COMPLETED]
    assert completed == [f"s{i}" for i in range(20)]
    assert set(started) <= set(completed)


async def test_cut_off_three_times_and_resumed_misses_nothing_and_repeats_nothing(
    stub: Stub, tenant: str
) -> None:
    run_id = await start(stub, tenant, steps_plan(20))
    seen: list[int] = []
    first, _ = await collect(stub, tenant, run_id, 0, limit=5)
    position = first[-1].sequence
    seen.extend(sequences(first))
    for cut in range(3):
        await asyncio.sleep(0.1 * (cut + 1))  # events keep coming while we are away
        part, _ = await collect(stub, tenant, run_id, position, limit=6)
        assert part[0].type != pb.EVENT_TYPE_SNAPSHOT
        seen.extend(e.sequence for e in part)
        position = part[-1].sequence
    rest, code = await collect(stub, tenant, run_id, position)
    assert code == grpc.StatusCode.OK
    seen.extend(e.sequence for e in rest)
    snapshot_at = first[0].sequence
    assert seen == list(range(snapshot_at + 1, seen[-1] + 1))
    full, _ = await collect(stub, tenant, run_id, 1)
    assert seen[-1] == full[-1].sequence


async def test_two_hundred_watchers_get_identical_complete_sequences(
    stub: Stub, tenant: str
) -> None:
    run_id = await start(stub, tenant, steps_plan(10))
    results = await asyncio.gather(*(collect(stub, tenant, run_id, 1) for _ in range(200)))
    reference = [(e.sequence, e.type, e.step_id) for e in results[0][0]]
    assert reference[-1][1] == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert [s for s, _, _ in reference] == list(range(2, reference[-1][0] + 1))
    for got, code in results:
        assert code == grpc.StatusCode.OK
        assert [(e.sequence, e.type, e.step_id) for e in got] == reference


async def test_a_slow_watcher_catches_up_from_the_store_without_growing_memory(
    stub: Stub, tenant: str, server: Server
) -> None:
    # The watcher opens the stream, reads the snapshot, then reads nothing while the run
    # writes ~4 MB of events; memory held for it must not grow with them.
    run_id = await start(
        stub,
        tenant,
        plan_of(
            {
                "stepId": "gate",
                "tool": "core.clarify",
                "parameters": {"category": "action", "prompt": "go?"},
            },
            *(
                {
                    "stepId": f"s{i}",
                    "tool": "core.echo",
                    "dependsOn": ["gate"],
                    "parameters": {"i": i, "blob": "x" * 20_000},
                }
                for i in range(200)
            ),
            parallel=True,
            maxConcurrency=8,
        ),
    )
    waiting = None
    while waiting is None or not waiting.pending_clarifications:
        waiting = (
            await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
        ).execution
        await asyncio.sleep(0.05)
    call = stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
    snapshot = await read_message(call)
    assert snapshot.event.type == pb.EVENT_TYPE_SNAPSHOT
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    await stub.RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=waiting.pending_clarifications[0].clarification_id,
            response=_value("go"),
        ),
        metadata=md(tenant),
    )
    async with asyncio.timeout(60):
        while run_id in server.engine.runs:  # noqa: ASYNC110 - the engine exposes no event for it
            await asyncio.sleep(0.05)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    total = 0
    async with server.db.reader.connect() as conn:
        total = int(
            (
                await conn.execute(
                    sa.select(sa.func.sum(sa.func.length(events.c.payload))).where(
                        events.c.run_id == run_id
                    )
                )
            ).scalar()
            or 0
        )
    print(
        f"\nslow watcher: events written {total / 1e6:.1f} MB, "
        f"Python memory held while it stalled {held / 1e6:.2f} MB"
    )
    assert total > 4_000_000
    assert held < 1_500_000, "memory grew with the events the watcher did not read"
    drained: list[pb.ExecutionEvent] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        item = cast(pb.WatchExecutionResponse, message)
        if item.event.type != pb.EVENT_TYPE_HEARTBEAT:
            drained.append(item.event)
    assert [e.sequence for e in drained] == list(
        range(snapshot.event.sequence + 1, drained[-1].sequence + 1)
    )
    assert drained[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED


def _value(text: str) -> Any:
    from google.protobuf import struct_pb2

    return struct_pb2.Value(string_value=text)


async def test_heartbeats_carry_the_position_on_an_idle_stream(stub: Stub, tenant: str) -> None:
    run_id = await start(
        stub,
        tenant,
        plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}}),
    )
    call = stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
    beats: list[pb.ExecutionEvent] = []
    position = 0
    async for item in call:
        event = item.event
        if event.type == pb.EVENT_TYPE_HEARTBEAT:
            beats.append(event)
            if len(beats) == 2:
                break
        else:
            position = max(position, event.sequence)
    call.cancel()
    assert all(b.sequence == position for b in beats)
    assert position >= 3  # created, started, clarification requested


async def test_pruned_events_start_with_a_resync_snapshot(
    stub: Stub, tenant: str, server: Server
) -> None:
    run_id = await start(stub, tenant, steps_plan(3))
    done, _ = await collect(stub, tenant, run_id, 1)
    async with server.db.writer.begin() as conn:  # what retention does to old events
        await conn.execute(
            sa.delete(events).where(events.c.run_id == run_id, events.c.sequence <= 4)
        )
    got, code = await collect(stub, tenant, run_id, 2)
    assert code == grpc.StatusCode.OK
    assert got[0].type == pb.EVENT_TYPE_SNAPSHOT and got[0].resync
    assert got[0].execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert got[0].sequence == done[-1].sequence
    assert len(got) == 1


async def test_watch_limit_per_tenant(tmp_path: Path) -> None:
    from orchestrator.server.app import build_server

    srv = await build_server(make_settings(tmp_path, max_watchers_per_tenant=3))
    await srv.start()
    tenant = str(uuid.uuid4())
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)
            run_id = await start(
                stub,
                tenant,
                plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}}),
            )
            calls = [
                stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
                for _ in range(3)
            ]
            for c in calls:
                await c.read()
            extra = stub.WatchExecutions(pb.WatchExecutionsRequest(), metadata=md(tenant))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await extra.read()
            d = details_of(info.value)
            assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_LIMIT")
            # Another tenant is not affected; a released stream frees a place.
            other = stub.WatchExecutions(
                pb.WatchExecutionsRequest(), metadata=md(str(uuid.uuid4()))
            )
            other.cancel()
            calls[0].cancel()
            await asyncio.sleep(0.2)
            again = stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant)
            )
            assert (await read_message(again)).event.type == pb.EVENT_TYPE_SNAPSHOT
            again.cancel()
            for c in calls[1:]:
                c.cancel()
    finally:
        await srv.stop(grace=0.2)


async def test_cancelled_streams_leave_nothing_behind(
    stub: Stub, tenant: str, server: Server
) -> None:
    run_id = await start(
        stub,
        tenant,
        plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}}),
    )
    await asyncio.sleep(0.2)
    baseline_tasks = len(asyncio.all_tasks())
    run_watches = [
        stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
        for _ in range(50)
    ]
    tenant_watches = [
        stub.WatchExecutions(pb.WatchExecutionsRequest(), metadata=md(tenant)) for _ in range(10)
    ]
    for c in run_watches:
        await read_message(c)
    await asyncio.sleep(0.3)
    assert server.hub.watchers == 60
    assert len(asyncio.all_tasks()) > baseline_tasks
    for run_watch in run_watches:
        run_watch.cancel()
    for tenant_watch in tenant_watches:
        tenant_watch.cancel()
    for _ in range(100):
        if server.hub.watchers == 0 and len(asyncio.all_tasks()) <= baseline_tasks:
            break
        await asyncio.sleep(0.05)
    assert server.hub.watchers == 0
    assert len(asyncio.all_tasks()) <= baseline_tasks


async def test_watch_executions_resumes_by_cursor_without_loss(stub: Stub, tenant: str) -> None:
    m = md(tenant)
    # From the list's cursor: a watch opened with none starts wherever the server is when it
    # handles the call, which can be after the run below began.
    page = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=m)
    call = stub.WatchExecutions(
        pb.WatchExecutionsRequest(after_cursor=page.watch_cursor), metadata=m
    )
    first_run = await start(stub, tenant, steps_plan(1, 0.01))
    first = await read_message(call)
    call.cancel()
    assert first.event.run_id == first_run
    # While nobody watches, runs come and go.
    run_ids = [await start(stub, tenant, steps_plan(2, 0.01)) for _ in range(5)]
    await asyncio.sleep(0.5)
    resumed = stub.WatchExecutions(pb.WatchExecutionsRequest(after_cursor=first.cursor), metadata=m)
    changes = await status_changes(resumed)
    for run_id in [first_run, *run_ids]:
        mine = [status for rid, status in changes if rid == run_id]
        expected = [pb.EXECUTION_STATUS_RUNNING, pb.EXECUTION_STATUS_COMPLETED]
        if run_id != first_run:
            expected = [pb.EXECUTION_STATUS_PENDING, *expected]
        assert mine == expected, (run_id, mine)
    assert len(changes) == len(set((r, s) for r, s in changes)), "nothing twice"


async def test_a_watch_from_the_lists_cursor_misses_nothing_that_changed_in_between(
    stub: Stub, tenant: str
) -> None:
    """List, then watch from the list's `watch_cursor` (Kubernetes' list-then-watch, the
    dashboard's way): a run that starts and ends between the two is in the watch, whole; a run
    that ended before the list is not."""
    m = md(tenant)

    async def finished_run() -> str:
        request = pb.ExecuteRequest(executable_plan=steps_plan(1, 0.01), async_execution=False)
        response = await stub.Execute(request, metadata=m)
        assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
        return response.run_id

    before = await finished_run()
    page = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=m)
    assert [e.run_id for e in page.executions] == [before]
    assert page.watch_cursor
    between = await finished_run()
    call = stub.WatchExecutions(
        pb.WatchExecutionsRequest(after_cursor=page.watch_cursor), metadata=m
    )
    assert await status_changes(call) == [
        (between, pb.EXECUTION_STATUS_PENDING),
        (between, pb.EXECUTION_STATUS_RUNNING),
        (between, pb.EXECUTION_STATUS_COMPLETED),
    ]


async def test_every_page_of_a_listing_gives_its_first_pages_watch_cursor(
    stub: Stub, tenant: str
) -> None:
    """A run that ends while a client pages through a long list is in the watch it starts
    from any page's `watch_cursor` (Kubernetes gives every page of a list one resourceVersion)."""
    m = md(tenant)
    for _ in range(3):
        request = pb.ExecuteRequest(executable_plan=steps_plan(1, 0.01), async_execution=False)
        await stub.Execute(request, metadata=m)
    first = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=2), metadata=m)
    request = pb.ExecuteRequest(executable_plan=steps_plan(1, 0.01), async_execution=False)
    paging = (await stub.Execute(request, metadata=m)).run_id
    second = await stub.ListExecutions(
        pb.ListExecutionsRequest(page_size=2, page_token=first.next_page_token), metadata=m
    )
    assert second.executions and second.watch_cursor == first.watch_cursor
    call = stub.WatchExecutions(
        pb.WatchExecutionsRequest(after_cursor=second.watch_cursor), metadata=m
    )
    assert [run_id for run_id, _ in await status_changes(call)] == [paging] * 3
    fresh = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=2), metadata=m)
    assert fresh.watch_cursor != first.watch_cursor
