"""Every step status change has its event (DESIGN §5), including skips and cancellations."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import md, plan_of

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

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
