"""Labels, plan identity and views: runs found by what they are, listed without their bulk."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import grpc
import pytest

from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import md, plan_of, read_message
from tests.errors import details_of

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    Stub = pb_grpc.OrchestratorServiceAsyncStub


def bulky_plan() -> pb.ExecutablePlan:
    plan = plan_of(
        *(
            {"stepId": f"s{i}", "tool": "core.echo", "parameters": {"blob": "x" * 2000}}
            for i in range(3)
        )
    )
    plan.plan_id, plan.name, plan.version = "nightly-etl", "Nightly ETL", "1.4.0"
    return plan


async def submit(stub: Stub, tenant: str, **labels: str) -> pb.Execution:
    request = pb.ExecuteRequest(executable_plan=bulky_plan(), async_execution=False, labels=labels)
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant), timeout=60)
    return response.execution


async def listed(stub: Stub, tenant: str, **request: object) -> pb.ListExecutionsResponse:
    response: pb.ListExecutionsResponse = await stub.ListExecutions(
        pb.ListExecutionsRequest(**request),  # type: ignore[arg-type]
        metadata=md(tenant),
    )
    return response


async def test_labels_and_plan_identity_round_trip_and_filter(stub: Stub, tenant: str) -> None:
    prod = await submit(stub, tenant, env="prod", team="data")
    staging = await submit(stub, tenant, env="staging", team="data")
    other = pb.ExecuteRequest(executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}))
    other.async_execution = False
    await stub.Execute(other, metadata=md(tenant))
    await submit(stub, str(uuid.uuid4()), env="prod", team="data")  # another tenant's

    assert dict(prod.labels) == {"env": "prod", "team": "data"}
    got: pb.GetExecutionResponse = await stub.GetExecution(
        pb.GetExecutionRequest(run_id=prod.run_id), metadata=md(tenant)
    )
    execution = got.execution
    assert dict(execution.labels) == {"env": "prod", "team": "data"}
    assert (execution.plan_id, execution.plan_name, execution.plan_version) == (
        "nightly-etl",
        "Nightly ETL",
        "1.4.0",
    )

    def ids(response: pb.ListExecutionsResponse) -> list[str]:
        return [e.run_id for e in response.executions]

    both = pb.ExecutionFilter(labels={"team": "data"})
    assert ids(await listed(stub, tenant, filter=both)) == [staging.run_id, prod.run_id]
    one = pb.ExecutionFilter(labels={"team": "data", "env": "prod"})
    assert ids(await listed(stub, tenant, filter=one)) == [prod.run_id]
    none = pb.ExecutionFilter(labels={"team": "data", "env": "dev"})
    assert ids(await listed(stub, tenant, filter=none)) == []
    by_plan = pb.ExecutionFilter(plan_id="nightly-etl")
    assert ids(await listed(stub, tenant, filter=by_plan)) == [staging.run_id, prod.run_id]
    listed_prod = (await listed(stub, tenant, filter=one)).executions[0]
    assert dict(listed_prod.labels) == {"env": "prod", "team": "data"}
    assert listed_prod.plan_name == "Nightly ETL"


async def test_watch_executions_filters_by_labels(stub: Stub, tenant: str) -> None:
    prod_only = pb.ExecutionFilter(labels={"env": "prod"})
    # Watched from the list's cursor, the stream misses nothing submitted after the list.
    cursor = (await listed(stub, tenant, filter=prod_only)).watch_cursor
    stream = stub.WatchExecutions(
        pb.WatchExecutionsRequest(filter=prod_only, after_cursor=cursor), metadata=md(tenant)
    )
    await submit(stub, tenant, env="staging")
    prod = await submit(stub, tenant, env="prod")
    seen: list[str] = []
    while True:
        message: pb.WatchExecutionsResponse = await read_message(stream)
        if message.event.type == pb.EVENT_TYPE_HEARTBEAT:
            continue
        seen.append(message.event.run_id)
        if message.event.execution.status == pb.EXECUTION_STATUS_COMPLETED:
            break
    stream.cancel()
    assert set(seen) - {""} == {prod.run_id}


async def test_basic_view_is_a_tenth_of_full(stub: Stub, tenant: str) -> None:
    for _ in range(10):
        await submit(stub, tenant)
    basic = await listed(stub, tenant, page_size=10)
    full = await listed(stub, tenant, page_size=10, view=pb.EXECUTION_VIEW_FULL)
    explicit = await listed(stub, tenant, page_size=10, view=pb.EXECUTION_VIEW_BASIC)
    assert basic == explicit
    assert len(basic.executions) == len(full.executions) == 10
    assert basic.ByteSize() * 10 < full.ByteSize(), (basic.ByteSize(), full.ByteSize())
    for run in basic.executions:
        assert not run.results.fields
        assert run.steps and all(not s.HasField("output") for s in run.steps)
        assert {s.status for s in run.steps} == {pb.STEP_STATUS_COMPLETED}
    assert all(len(run.results.fields) == 3 for run in full.executions)


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"-bad": "x"}, "labels['-bad']"),
        ({"k": "has space"}, "labels['k']"),
        ({"k" * 64: "v"}, f"labels['{'k' * 64}']"),
        ({"Upper.Case/k": "v"}, "labels['Upper.Case/k']"),
        ({"k": "v" * 64}, "labels['k']"),
    ],
)
async def test_bad_labels_are_invalid_argument_per_label(
    stub: Stub, tenant: str, labels: dict[str, str], field: str
) -> None:
    good = {"example.com/team": "data", "empty": ""}
    request = pb.ExecuteRequest(executable_plan=bulky_plan(), labels={**good, **labels})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Execute(request, metadata=md(tenant))
    details = details_of(err.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details.violations] == [field]

    with pytest.raises(grpc.aio.AioRpcError) as bad_filter:
        await listed(stub, tenant, filter=pb.ExecutionFilter(labels=labels))
    assert [f for f, _ in details_of(bad_filter.value).violations] == [f"filter.{field}"]


async def test_too_many_labels_and_an_unknown_view_are_invalid(stub: Stub, tenant: str) -> None:
    labels = {f"k{i}": "v" for i in range(65)}
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Execute(
            pb.ExecuteRequest(executable_plan=bulky_plan(), labels=labels), metadata=md(tenant)
        )
    assert [f for f, _ in details_of(err.value).violations] == ["labels"]
    with pytest.raises(grpc.aio.AioRpcError) as view:
        await listed(stub, tenant, view=7)
    assert [f for f, _ in details_of(view.value).violations] == ["view"]
