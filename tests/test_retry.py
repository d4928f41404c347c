"""RetryExecution: a failed, cancelled or (from named steps) completed run goes on in place."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from orchestrator.client import TERMINAL
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import md, plan_of
from tests.errors import details_of

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    Stub = pb_grpc.OrchestratorServiceAsyncStub

S = pb.StepStatus


def echo(step_id: str, **extra: Any) -> dict[str, Any]:
    return {"stepId": step_id, "tool": "core.echo", "parameters": {"step": step_id}, **extra}


def five_steps_failing_third() -> pb.ExecutablePlan:
    return plan_of(
        echo("s1"),
        echo("s2"),
        {
            "stepId": "s3",
            "tool": "core.fail",
            "parameters": {"fail_times": 1, "retryable": False, "message": "downstream is down"},
        },
        echo("s4"),
        echo("s5"),
    )


async def execute(stub: Stub, tenant: str, plan: pb.ExecutablePlan) -> pb.Execution:
    request = pb.ExecuteRequest(executable_plan=plan, async_execution=False)
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant), timeout=60)
    return response.execution


async def terminal(stub: Stub, tenant: str, run_id: str) -> pb.Execution:
    for _ in range(600):
        got: pb.GetExecutionResponse = await stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
        )
        if got.execution.status in TERMINAL:
            return got.execution
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} did not finish")


async def retry(stub: Stub, tenant: str, run_id: str, *restart: str) -> pb.Execution:
    response: pb.RetryExecutionResponse = await stub.RetryExecution(
        pb.RetryExecutionRequest(run_id=run_id, restart_step_ids=restart, reason="fixed it"),
        metadata=md(tenant),
    )
    return response.execution


async def events(stub: Stub, tenant: str, run_id: str, after: int = 0) -> list[pb.ExecutionEvent]:
    out = []
    async for message in stub.WatchExecution(
        pb.WatchExecutionRequest(run_id=run_id, after_sequence=after), metadata=md(tenant)
    ):
        out.append(message.event)
    return out


def steps_of(execution: pb.Execution) -> dict[str, pb.StepExecution]:
    return {s.step_id: s for s in execution.steps}


async def test_a_failed_run_retried_completes_without_redoing_completed_steps(
    stub: Stub, tenant: str
) -> None:
    failed = await execute(stub, tenant, five_steps_failing_third())
    assert failed.status == pb.EXECUTION_STATUS_FAILED
    before = steps_of(failed)
    assert [before[s].status for s in ("s1", "s2", "s3", "s4", "s5")] == [
        S.STEP_STATUS_COMPLETED,
        S.STEP_STATUS_COMPLETED,
        S.STEP_STATUS_FAILED,
        S.STEP_STATUS_SKIPPED,
        S.STEP_STATUS_SKIPPED,
    ]

    retried = await retry(stub, tenant, failed.run_id)
    assert retried.run_id == failed.run_id
    assert retried.status == pb.EXECUTION_STATUS_RUNNING
    assert retried.retry_count == 1
    assert not retried.error_message
    assert retried.progress == pytest.approx(2 / 5)
    assert steps_of(retried)["s3"].status == S.STEP_STATUS_PENDING

    done = await terminal(stub, tenant, failed.run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    assert done.retry_count == 1
    after = steps_of(done)
    for sid in ("s1", "s2"):  # kept, not called again
        assert after[sid].attempts == 1
        assert after[sid].started_at == before[sid].started_at
        assert after[sid].output == before[sid].output
    assert after["s3"].attempts == 2  # attempts count on: core.fail's second attempt succeeds
    assert after["s3"].output.struct_value.fields["attempts"].number_value == 2
    assert {after[s].status for s in after} == {S.STEP_STATUS_COMPLETED}
    assert set(done.results.keys()) == {"s1", "s2", "s3", "s4", "s5"}

    history = await events(stub, tenant, failed.run_id, after=0)
    log = await events(stub, tenant, failed.run_id, after=failed.last_sequence)
    assert history[0].type == pb.EVENT_TYPE_SNAPSHOT
    assert [e.sequence for e in log] == list(
        range(failed.last_sequence + 1, done.last_sequence + 1)
    )
    first = log[0]
    assert first.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert first.execution.status == pb.EXECUTION_STATUS_RUNNING
    assert "fixed it" in first.message
    reset = [e.step_id for e in log if e.type == pb.EVENT_TYPE_STEP_RETRYING]
    assert reset == ["s3", "s4", "s5"]
    started = [e.step_id for e in log if e.type == pb.EVENT_TYPE_STEP_STARTED]
    assert started == ["s3", "s4", "s5"]


async def test_a_cancelled_run_retried_mid_wait_completes(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("first"),
        {"stepId": "nap", "tool": "core.wait", "parameters": {"seconds": 0.5}},
        echo("last"),
    )
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)
    )
    run_id = response.run_id
    for _ in range(200):
        got: pb.GetExecutionResponse = await stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
        )
        if steps_of(got.execution)["nap"].status == S.STEP_STATUS_RUNNING:
            break
        await asyncio.sleep(0.01)
    await stub.Cancel(pb.CancelRequest(run_id=run_id, reason="oops"), metadata=md(tenant))
    cancelled = await terminal(stub, tenant, run_id)
    assert cancelled.status == pb.EXECUTION_STATUS_CANCELLED
    assert steps_of(cancelled)["nap"].status == S.STEP_STATUS_CANCELLED

    retried = await retry(stub, tenant, run_id)
    assert retried.status == pb.EXECUTION_STATUS_RUNNING
    done = await terminal(stub, tenant, run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    after = steps_of(done)
    assert after["first"].attempts == 1
    assert after["nap"].status == S.STEP_STATUS_COMPLETED
    # The wait starts over: a retried timer is a fresh one.
    assert after["nap"].output.struct_value.fields["waited_seconds"].number_value >= 0.45
    assert after["last"].status == S.STEP_STATUS_COMPLETED


async def test_a_completed_run_retried_from_a_step_reruns_it_and_its_dependents(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of(
        echo("a"),
        echo("b", dependsOn=["a"]),
        echo("c", dependsOn=["b"]),
        echo("d", dependsOn=["a"]),
        parallel=True,
    )
    done = await execute(stub, tenant, plan)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await retry(stub, tenant, done.run_id)  # nothing named: nothing to retry
    assert details_of(refused.value).code == grpc.StatusCode.FAILED_PRECONDITION
    assert details_of(refused.value).reason == "RETRY_FAILED"

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await retry(stub, tenant, done.run_id, "b", "nope")
    assert details_of(unknown.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details_of(unknown.value).violations] == ["restart_step_ids[1]"]

    await retry(stub, tenant, done.run_id, "b")
    again = await terminal(stub, tenant, done.run_id)
    assert again.status == pb.EXECUTION_STATUS_COMPLETED
    attempts = {s.step_id: s.attempts for s in again.steps}
    assert attempts == {"a": 1, "b": 2, "c": 2, "d": 1}


async def test_a_retried_step_gets_its_retry_policy_afresh(stub: Stub, tenant: str) -> None:
    policy = {"maxAttempts": 2, "initialDelay": "0.01s", "maxDelay": "0.02s"}
    plan = plan_of(
        {
            "stepId": "flaky",
            "tool": "core.fail",
            "parameters": {"fail_times": 3, "message": "still down"},
            "retryPolicy": policy,
        }
    )
    failed = await execute(stub, tenant, plan)
    assert failed.status == pb.EXECUTION_STATUS_FAILED
    assert steps_of(failed)["flaky"].attempts == 2
    assert steps_of(failed)["flaky"].error_reason == "RETRIES_EXHAUSTED"
    # Two more attempts, as the policy says, not one: attempt 3 fails, attempt 4 succeeds.
    await retry(stub, tenant, failed.run_id)
    done = await terminal(stub, tenant, failed.run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    assert steps_of(done)["flaky"].attempts == 4


async def test_retry_of_a_running_run_is_refused(stub: Stub, tenant: str) -> None:
    plan = plan_of({"stepId": "nap", "tool": "core.wait", "parameters": {"seconds": 30}})
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await retry(stub, tenant, response.run_id)
    details = details_of(refused.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "RETRY_FAILED"
    assert details.metadata["current_status"] in ("PENDING", "RUNNING")
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await retry(stub, str(__import__("uuid").uuid4()), response.run_id)
    assert details_of(other.value).code == grpc.StatusCode.NOT_FOUND
    await stub.Cancel(pb.CancelRequest(run_id=response.run_id), metadata=md(tenant))


async def test_two_concurrent_retries_make_one(stub: Stub, tenant: str) -> None:
    failed = await execute(stub, tenant, five_steps_failing_third())
    results = await asyncio.gather(
        *(retry(stub, tenant, failed.run_id) for _ in range(4)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, pb.Execution)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 1 and len(lost) == 3, results
    assert {details_of(e).reason for e in lost} == {"RETRY_FAILED"}
    done = await terminal(stub, tenant, failed.run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED
    assert done.retry_count == 1


async def test_a_watcher_across_the_retry_sees_every_event_once(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("s1"),
        {"stepId": "gate", "tool": "core.wait", "parameters": {"seconds": 0.2}},
        {"stepId": "s3", "tool": "core.fail", "parameters": {"fail_times": 1, "retryable": False}},
        echo("s4"),
    )
    response: pb.ExecuteResponse = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)
    )
    run_id = response.run_id
    seen = await events(stub, tenant, run_id, after=0)  # ends after the run fails
    assert seen[-1].execution.status == pb.EXECUTION_STATUS_FAILED
    last = seen[-1].sequence
    await retry(stub, tenant, run_id)
    seen += await events(stub, tenant, run_id, after=last)  # reconnects with its last sequence
    sequences = [e.sequence for e in seen[1:]]
    assert sequences == list(range(seen[1].sequence, seen[-1].sequence + 1))
    assert seen[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED
    statuses = [e.execution.status for e in seen if e.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED]
    assert statuses[-3:] == [
        pb.EXECUTION_STATUS_FAILED,
        pb.EXECUTION_STATUS_RUNNING,
        pb.EXECUTION_STATUS_COMPLETED,
    ]
