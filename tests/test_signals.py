"""Signals: SignalExecution delivers durably and once per request id; core.wait_for_signal
takes them in order, keeps those sent early, and fails SIGNAL_TIMEOUT when none comes."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from orchestrator.client import TERMINAL
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import md, plan_of
from tests.errors import details_of
from tests.test_durability import Cluster, call, events, execution, finished, wait_for

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    Stub = pb_grpc.OrchestratorServiceAsyncStub


def wait_step(step_id: str, name: str, timeout: float | None = None, **extra: Any) -> Any:
    parameters: dict[str, Any] = {"signal_name": name}
    if timeout is not None:
        parameters["timeout_seconds"] = timeout
    return {"stepId": step_id, "tool": "core.wait_for_signal", "parameters": parameters, **extra}


def as_json(message: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(message)


def value(data: Any) -> struct_pb2.Value:
    return json_format.ParseDict(data, struct_pb2.Value())


async def execute(stub: Stub, tenant: str, plan: pb.ExecutablePlan) -> str:
    response = await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    return response.run_id


async def signal(
    stub: Stub, tenant: str, run_id: str, name: str, payload: Any, request_id: str = ""
) -> pb.SignalExecutionResponse:
    request = pb.SignalExecutionRequest(
        run_id=run_id, signal_name=name, payload=value(payload), request_id=request_id
    )
    response: pb.SignalExecutionResponse = await stub.SignalExecution(request, metadata=md(tenant))
    return response


async def get(stub: Stub, tenant: str, run_id: str) -> pb.Execution:
    response = await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
    return response.execution


async def settled(stub: Stub, tenant: str, run_id: str, within: float = 20) -> pb.Execution:
    deadline = time.monotonic() + within
    while True:
        execution = await get(stub, tenant, run_id)
        if execution.status in TERMINAL:
            return execution
        assert time.monotonic() < deadline, f"run {run_id} did not finish"
        await asyncio.sleep(0.02)


async def step_running(stub: Stub, tenant: str, run_id: str, index: int) -> None:
    deadline = time.monotonic() + 10
    while (await get(stub, tenant, run_id)).steps[index].status != pb.STEP_STATUS_RUNNING:
        assert time.monotonic() < deadline, "the step did not start waiting"
        await asyncio.sleep(0.02)


async def event_types(stub: Stub, tenant: str, run_id: str) -> list[int]:
    stream = stub.WatchExecution(
        pb.WatchExecutionRequest(run_id=run_id, after_sequence=1), metadata=md(tenant)
    )
    return [r.event.type async for r in stream if r.event.type != pb.EVENT_TYPE_HEARTBEAT]


async def test_a_waiting_run_takes_the_signal_payload_as_output_and_completes(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of(
        wait_step("wait", "payment"),
        {"stepId": "use", "tool": "core.echo", "parameters": {"got": "{{ steps.wait.output }}"}},
    )
    run_id = await execute(stub, tenant, plan)
    await step_running(stub, tenant, run_id, 0)
    sent = await signal(stub, tenant, run_id, "payment", {"amount": 12, "ok": True}, "cb-1")
    assert not sent.duplicate
    assert sent.execution.run_id == run_id
    done = await settled(stub, tenant, run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    assert as_json(done.steps[0].output) == {"amount": 12, "ok": True}
    assert as_json(done.steps[1].output) == {"got": {"amount": 12, "ok": True}}
    types = await event_types(stub, tenant, run_id)
    assert types.count(pb.EVENT_TYPE_SIGNAL_RECEIVED) == 1
    # The signal's event comes before the step it completed.
    assert types.index(pb.EVENT_TYPE_SIGNAL_RECEIVED) < types.index(pb.EVENT_TYPE_STEP_COMPLETED)


async def test_signals_sent_before_the_wait_are_kept_and_taken_in_order(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of(
        {"stepId": "first", "tool": "core.wait", "parameters": {"seconds": 0.5}},
        wait_step("a", "tick", 10),
        wait_step("b", "tick", 10),
        wait_step("other", "tock", 10),
    )
    run_id = await execute(stub, tenant, plan)
    for i, (name, payload) in enumerate([("tick", 1), ("tock", "x"), ("tick", 2)]):
        await signal(stub, tenant, run_id, name, payload, f"r{i}")
    assert (await get(stub, tenant, run_id)).steps[1].status == pb.STEP_STATUS_PENDING
    done = await settled(stub, tenant, run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    outputs = [as_json(s.output) for s in done.steps[1:]]
    assert outputs == [1, 2, "x"]


async def test_a_duplicate_request_id_is_delivered_once(stub: Stub, tenant: str) -> None:
    plan = plan_of(wait_step("one", "go", 10), wait_step("two", "go", 0.5))
    run_id = await execute(stub, tenant, plan)
    first = await signal(stub, tenant, run_id, "go", "hello", "same-key")
    again = await signal(stub, tenant, run_id, "go", "hello", "same-key")
    assert (first.duplicate, again.duplicate) == (False, True)
    done = await settled(stub, tenant, run_id)
    # The second step got nothing: its wait timed out.
    assert done.status == pb.EXECUTION_STATUS_FAILED
    assert done.steps[0].status == pb.STEP_STATUS_COMPLETED
    assert done.steps[0].output.string_value == "hello"
    assert done.steps[1].status == pb.STEP_STATUS_FAILED
    assert done.steps[1].error_reason == "SIGNAL_TIMEOUT"
    types = await event_types(stub, tenant, run_id)
    assert types.count(pb.EVENT_TYPE_SIGNAL_RECEIVED) == 1


async def test_a_signal_timeout_is_retried_by_policy(stub: Stub, tenant: str) -> None:
    retry = {"maxAttempts": 2, "initialDelay": "0.01s", "maxDelay": "0.05s"}
    run_id = await execute(stub, tenant, plan_of(wait_step("w", "late", 0.2, retryPolicy=retry)))
    done = await settled(stub, tenant, run_id)
    assert done.status == pb.EXECUTION_STATUS_FAILED
    assert done.steps[0].attempts == 2
    assert done.steps[0].error_reason == "RETRIES_EXHAUSTED"
    assert "no signal 'late'" in done.steps[0].error
    # A signal during the second attempt's wait would have been taken.
    run_id = await execute(stub, tenant, plan_of(wait_step("w", "late", 3, retryPolicy=retry)))
    deadline = time.monotonic() + 10
    while (await get(stub, tenant, run_id)).steps[0].attempts < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await signal(stub, tenant, run_id, "late", [1, 2])
    done = await settled(stub, tenant, run_id)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    assert as_json(done.steps[0].output) == [1, 2]


async def test_signals_to_finished_unknown_or_foreign_runs_are_refused(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of({"stepId": "e", "tool": "core.echo", "parameters": {}})
    run_id = await execute(stub, tenant, plan)
    await settled(stub, tenant, run_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await signal(stub, tenant, run_id, "late", 1)
    details = details_of(refused.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.reason == "SIGNAL_FAILED"
    assert details.metadata["current_status"] == "COMPLETED"
    for who, run in ((tenant, str(uuid.uuid4())), (str(uuid.uuid4()), run_id), (tenant, "x")):
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await signal(stub, who, run, "any", 1)
        assert details_of(missing.value).code == grpc.StatusCode.NOT_FOUND


async def test_bad_signals_name_their_fields(stub: Stub, tenant: str) -> None:
    run_id = await execute(stub, tenant, plan_of(wait_step("w", "x", 5)))
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    cases = [
        (pb.SignalExecutionRequest(run_id=run_id), "signal_name"),
        (pb.SignalExecutionRequest(run_id=run_id, signal_name="n" * 129), "signal_name"),
        (
            pb.SignalExecutionRequest(run_id=run_id, signal_name="n", request_id="r" * 300),
            "request_id",
        ),
        (pb.SignalExecutionRequest(run_id=run_id, signal_name="n", payload=value(deep)), "payload"),
        (pb.SignalExecutionRequest(signal_name="n"), "run_id"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.SignalExecution(request, metadata=md(tenant))
        details = details_of(bad.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v[0] for v in details.violations] == [field]
    # A step with bad parameters fails at once, without retries.
    bad_run = await execute(
        stub, tenant, plan_of({"stepId": "w", "tool": "core.wait_for_signal", "parameters": {}})
    )
    done = await settled(stub, tenant, bad_run)
    assert done.steps[0].error_reason == "INVALID_PARAMETERS"
    await stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(tenant))


@pytest.mark.subprocess
def test_a_sigkill_between_signal_and_consumption_loses_nothing(
    database_url: str, tmp_path: Path
) -> None:
    cluster = Cluster(database_url, tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("r1")
        early = plan_of(
            {"stepId": "first", "tool": "core.wait", "parameters": {"seconds": 1.5}},
            wait_step("wait", "paid", 120),
            {
                "stepId": "use",
                "tool": "core.echo",
                "parameters": {"got": "{{ steps.wait.output }}"},
            },
        )
        buffered = call(cluster, "r1", "Execute", pb.ExecuteRequest(executable_plan=early), tenant)
        parked = call(
            cluster,
            "r1",
            "Execute",
            pb.ExecuteRequest(executable_plan=plan_of(wait_step("wait", "go", 120))),
            tenant,
        )
        wait_for(
            lambda: (
                execution(cluster, "r1", parked.run_id, tenant).steps[0].status
                == pb.STEP_STATUS_RUNNING
            ),
            10,
            "the parked step to wait",
        )
        # Sent while the plan is still in its first step: kept in the store, then killed.
        request = pb.SignalExecutionRequest(
            run_id=buffered.run_id, signal_name="paid", payload=value({"n": 1}), request_id="k1"
        )
        assert not call(cluster, "r1", "SignalExecution", request, tenant).duplicate
        cluster.procs["r1"].kill()
        cluster.start("r1")
        # The parked run waits on across the restart; a signal then a kill at once.
        go = pb.SignalExecutionRequest(
            run_id=parked.run_id, signal_name="go", payload=value("now"), request_id="k2"
        )
        assert not call(cluster, "r1", "SignalExecution", go, tenant).duplicate
        cluster.procs["r1"].kill()
        cluster.start("r1")
        # Resent after the crash (the caller could not know): delivered once all the same.
        assert call(cluster, "r1", "SignalExecution", request, tenant).duplicate
        assert call(cluster, "r1", "SignalExecution", go, tenant).duplicate
        done = finished(cluster, "r1", buffered.run_id, tenant, 30)
        assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
        assert as_json(done.steps[2].output) == {"got": {"n": 1}}
        other = finished(cluster, "r1", parked.run_id, tenant, 30)
        assert other.status == pb.EXECUTION_STATUS_COMPLETED, other.error_message
        assert other.steps[0].output.string_value == "now"
        for run_id in (buffered.run_id, parked.run_id):
            types = [e.type for e in events(cluster, "r1", run_id, tenant)]
            assert types.count(pb.EVENT_TYPE_SIGNAL_RECEIVED) == 1
    finally:
        cluster.stop_all()
