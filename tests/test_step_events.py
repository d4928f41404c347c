"""Every step status change has its event (DESIGN §5), including skips and cancellations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running

if TYPE_CHECKING:
    from orchestrator.server.app import Server

    Stub = pb_grpc.OrchestratorServiceAsyncStub


async def history(stub: Stub, tenant: str, run_id: str) -> list[pb.ExecutionEvent]:
    """Every event after the first ("run created", which changes no step)."""
    return [
        m.event
        async for m in stub.WatchExecution(
            pb.WatchExecutionRequest(run_id=run_id, after_sequence=1), metadata=md(tenant)
        )
    ]


def last_step_event(events: list[pb.ExecutionEvent], step_id: str) -> pb.ExecutionEvent:
    mine = [e for e in events if e.step_id == step_id and e.type != pb.EVENT_TYPE_SNAPSHOT]
    assert mine, f"no event for step {step_id}"
    return mine[-1]


async def test_steps_not_reached_after_a_failure_have_their_event(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        {"stepId": "a", "tool": "core.echo"},
        {"stepId": "boom", "tool": "core.fail", "parameters": {"retryable": False}},
        {"stepId": "c", "tool": "core.echo"},
        {"stepId": "d", "tool": "core.echo"},
    )
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan, async_execution=False), metadata=md(tenant)
    )
    run = response.execution
    assert run.status == pb.EXECUTION_STATUS_FAILED
    events = await history(stub, tenant, run.run_id)
    for step in run.steps:
        event = last_step_event(events, step.step_id)
        (delta,) = [s for s in event.execution.steps if s.step_id == step.step_id]
        assert delta.status == step.status
    for sid in ("c", "d"):
        event = last_step_event(events, sid)
        assert event.type == pb.EVENT_TYPE_STEP_SKIPPED
        assert event.execution.steps[0].error_reason == "NOT_REACHED"
    # The run's terminal event is the last one.
    assert events[-1].type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert [e.sequence for e in events] == list(range(2, run.last_sequence + 1))


async def test_steps_cancelled_with_their_run_have_their_event(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        {"stepId": "nap", "tool": "core.wait", "parameters": {"seconds": 30}},
        {"stepId": "after", "tool": "core.echo"},
    )
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)
    )
    run_id = response.run_id
    for _ in range(300):
        got: pb.GetExecutionResponse = await stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
        )
        if got.execution.steps[0].status == pb.STEP_STATUS_RUNNING:
            break
        await asyncio.sleep(0.01)
    await stub.Cancel(pb.CancelRequest(run_id=run_id, reason="enough"), metadata=md(tenant))
    events = await history(stub, tenant, run_id)
    for sid in ("nap", "after"):
        event = last_step_event(events, sid)
        assert event.type == pb.EVENT_TYPE_STEP_FAILED
        assert event.execution.steps[0].status == pb.STEP_STATUS_CANCELLED
    assert events[-1].type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert events[-1].execution.status == pb.EXECUTION_STATUS_CANCELLED


async def test_an_instant_step_is_one_write_with_both_events(
    server: Server, stub: Stub, tenant: str
) -> None:
    """core.echo finishes before its start is committed: start and outcome are one unit of
    work (one commit, so one timestamp), STEP_STARTED then STEP_COMPLETED, no gap."""
    steps = 6
    plan = plan_of(
        *({"stepId": f"s{i}", "tool": "core.echo", "parameters": {"i": i}} for i in range(steps))
    )
    units = server.writer.units
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan, async_execution=False), metadata=md(tenant)
    )
    run = response.execution
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    # create, open, one per step, finish (and a heartbeat or claim that may fall in between);
    # a start and an outcome written apart would be 2 per step.
    assert server.writer.units - units <= steps + 3 + 2
    events = await history(stub, tenant, run.run_id)
    assert [e.sequence for e in events] == list(range(2, run.last_sequence + 1))
    for i in range(steps):
        mine = [e for e in events if e.step_id == f"s{i}"]
        assert [e.type for e in mine] == [pb.EVENT_TYPE_STEP_STARTED, pb.EVENT_TYPE_STEP_COMPLETED]
        started, completed = mine
        assert completed.sequence == started.sequence + 1
        assert started.timestamp == completed.timestamp  # one commit
        assert started.execution.steps[0].status == pb.STEP_STATUS_RUNNING
        assert completed.execution.steps[0].status == pb.STEP_STATUS_COMPLETED
        assert completed.execution.steps[0].output.struct_value["i"] == i


async def test_a_step_waiting_for_a_slot_is_not_started(tmp_path: Path, tenant: str) -> None:
    """A step takes its step slot, then starts: one waiting for a slot stays PENDING."""
    settings = make_settings(tmp_path, max_steps_in_flight=1)
    plan = plan_of({"stepId": "nap", "tool": "core.wait", "parameters": {"seconds": 30}})
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        first, second = [
            (
                await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
            ).run_id
            for _ in range(2)
        ]
        statuses: dict[str, int] = {}

        async def look() -> None:
            for run_id in (first, second):
                got: pb.GetExecutionResponse = await stub.GetExecution(
                    pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
                )
                statuses[run_id] = got.execution.steps[0].status

        for _ in range(300):
            await look()
            if pb.STEP_STATUS_RUNNING in statuses.values():
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # time enough for the other's start to commit, were it made
        await look()
        assert sorted(statuses.values()) == sorted([pb.STEP_STATUS_RUNNING, pb.STEP_STATUS_PENDING])
