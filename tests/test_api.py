"""The contract through a real server: every RPC's success path and every error it promises."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2

from orchestrator.server.app import Server
from orchestrator.server.plan import plan_hash
from orchestrator.server.settings import Settings
from orchestrator.server.store.schema import runs
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, load_plan, make_settings, md, plan_of, read_message
from tests.errors import details_of

if TYPE_CHECKING:
    Stub = pb_grpc.OrchestratorServiceAsyncStub

Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The contract tests hold runs in chosen states, so this server executes nothing
    (API-only); the engine has its own tests."""
    return make_settings(tmp_path, database_url, execute=False)


async def execute(
    stub: Stub, tenant: str, plan: pb.ExecutablePlan | None = None, **fields: Any
) -> pb.ExecuteResponse:
    request = pb.ExecuteRequest(executable_plan=plan or echo_plan(), **fields)
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant))
    return response


async def expect_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


# ---------------------------------------------------------------- Execute


@pytest.mark.parametrize("name", ["sequential.json", "parallel.json", "approval.json"])
async def test_execute_stores_example_plans(stub: Stub, tenant: str, name: str) -> None:
    plan = load_plan(name)
    parameters = struct_pb2.Struct()
    parameters.update({"name": "ada", "version": "1.2"})
    response = await execute(
        stub, tenant, plan, triggered_by="alice", correlation_id="corr-1", parameters=parameters
    )
    assert response.success
    uuid.UUID(response.run_id)
    assert response.correlation_id == "corr-1"
    assert response.created_at.seconds > 0
    assert response.estimated_duration.ToTimedelta().total_seconds() > 0
    execution = response.execution
    assert execution.run_id == response.run_id
    assert execution.tenant_id == tenant
    assert execution.plan_hash == plan_hash(plan)
    assert execution.triggered_by == "alice"
    assert [s.step_id for s in execution.steps] == [s.step_id for f in plan.flows for s in f.steps]
    got = await stub.GetExecution(
        pb.GetExecutionRequest(run_id=response.run_id), metadata=md(tenant)
    )
    assert got.execution.run_id == response.run_id
    assert got.execution.last_sequence >= 1


async def test_execute_returns_pending_run_with_seed_fields(stub: Stub, tenant: str) -> None:
    response = await execute(stub, tenant)
    assert response.status == pb.EXECUTION_STATUS_PENDING
    assert response.execution.status == pb.EXECUTION_STATUS_PENDING
    assert response.execution.progress == 0.0
    assert response.execution.last_sequence == 1
    assert response.execution.HasField("estimated_completion")
    assert response.execution.HasField("last_updated")


async def test_call_correlation_id_is_stored_when_request_has_none(stub: Stub, tenant: str) -> None:
    call = stub.Execute(
        pb.ExecuteRequest(executable_plan=echo_plan()),
        metadata=md(tenant, x_correlation_id="from-metadata"),
    )
    response = await call
    assert response.correlation_id == "from-metadata"
    initial = dict(await call.initial_metadata())
    assert initial["x-correlation-id"] == "from-metadata"


async def test_dry_run_is_completed_with_execution_order(stub: Stub, tenant: str) -> None:
    response = await execute(stub, tenant, load_plan("parallel.json"), dry_run=True)
    execution = response.execution
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert execution.dry_run
    order = list(cast(struct_pb2.ListValue, execution.results["execution_order"]))
    assert order[0] == "fetch" and order[-1] == "merge"
    assert set(order) == {"fetch", "left", "right", "merge"}
    assert all(s.status == pb.STEP_STATUS_SKIPPED for s in execution.steps)
    assert execution.progress == 1.0


async def test_validation_reports_every_problem_with_field_paths(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        {"stepId": "a", "tool": "core.echo", "dependsOn": ["b"]},
        {"stepId": "b", "tool": "core.echo", "dependsOn": ["a"]},
        {"stepId": "c", "tool": "no.such.tool", "dependsOn": ["ghost"]},
        {"stepId": "c", "tool": "core.echo"},
        parallel=True,
    )
    err = await expect_error(
        stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.domain == "orchestrator.v1"
    assert d.reason == "VALIDATION_FAILED"
    fields = [f for f, _ in d.violations]
    assert "executable_plan.flows[0].steps[2].tool" in fields
    assert "executable_plan.flows[0].steps[2].depends_on[0]" in fields
    assert "executable_plan.flows[0].steps[3].step_id" in fields
    assert any("cycle" in desc for _, desc in d.violations)
    assert len(d.violations) >= 4
    listed = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))
    assert len(listed.executions) == 0, "a rejected plan must not leave a run behind"


async def test_empty_plan_is_invalid(stub: Stub, tenant: str) -> None:
    err = await expect_error(stub.Execute(pb.ExecuteRequest(), metadata=md(tenant)))
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.violations


async def test_plan_hash_mismatch_is_invalid_and_match_is_accepted(stub: Stub, tenant: str) -> None:
    plan = echo_plan()
    good = await execute(stub, tenant, plan, plan_hash=plan_hash(plan))
    assert good.execution.plan_hash == plan_hash(plan)
    err = await expect_error(
        stub.Execute(
            pb.ExecuteRequest(executable_plan=plan, plan_hash="sha256:" + "0" * 64),
            metadata=md(tenant),
        )
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in d.violations] == ["plan_hash"]


async def test_a_parameter_the_plan_always_reads_is_required_at_submit(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of(
        {"stepId": "a", "tool": "core.echo", "parameters": {"m": "hi {{ params.name }}"}},
        {"stepId": "b", "tool": "core.echo", "conditions": ["params.go"]},
        # Guarded reads and steps whose conditions may skip them require nothing.
        {
            "stepId": "c",
            "tool": "core.echo",
            "parameters": {"m": "{{ has(params.x) ? params.x : 1 }}"},
        },
        {
            "stepId": "d",
            "tool": "core.echo",
            "conditions": ["has(params.y)"],
            "parameters": {"m": "{{ params.y }}"},
        },
    )
    err = await expect_error(
        stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.reason == "VALIDATION_FAILED"
    assert [f for f, _ in d.violations] == [
        "executable_plan.flows[0].steps[0].parameters.m",
        "executable_plan.flows[0].steps[1].conditions[0]",
    ]
    assert "params.name" in d.violations[0][1]
    parameters = struct_pb2.Struct()
    parameters.update({"name": "ada", "go": True})
    ok = await execute(stub, tenant, plan, parameters=parameters)
    assert ok.success


async def test_capability_validation_lists_every_violation(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        {"stepId": "a", "tool": "core.echo"},
        {"stepId": "b", "tool": "http.request", "parameters": {"url": "http://127.0.0.1/"}},
    )
    plan.security_context.allowed_tools.append("core.echo")
    err = await expect_error(
        stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant))
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.PERMISSION_DENIED
    fields = [f for f, _ in d.violations]
    assert "executable_plan.flows[0].steps[1].tool" in fields
    assert len(d.violations) >= 2, "tool not allowed and capability network.http not declared"
    # Turned off, the same plan is accepted.
    ok = await execute(stub, tenant, plan, validate_capabilities=False)
    assert ok.success


async def test_idempotency_key_returns_first_run(stub: Stub, tenant: str) -> None:
    first = await execute(stub, tenant, idempotency_key="k-1", correlation_id="one")
    again = await execute(stub, tenant, idempotency_key="k-1", correlation_id="two")
    assert again.run_id == first.run_id
    listed = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))
    assert [e.run_id for e in listed.executions] == [first.run_id]
    other_tenant = await execute(stub, str(uuid.uuid4()), idempotency_key="k-1")
    assert other_tenant.run_id != first.run_id


async def test_idempotency_key_with_other_request_is_already_exists(
    stub: Stub, tenant: str
) -> None:
    first = await execute(stub, tenant, idempotency_key="k-2")
    err = await expect_error(
        stub.Execute(
            pb.ExecuteRequest(executable_plan=echo_plan(4), idempotency_key="k-2"),
            metadata=md(tenant),
        )
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.ALREADY_EXISTS
    assert d.reason == "IDEMPOTENCY_KEY_REUSED"
    assert d.metadata["run_id"] == first.run_id


async def test_concurrent_duplicate_submissions_make_one_run(stub: Stub, tenant: str) -> None:
    responses = await asyncio.gather(
        *(execute(stub, tenant, idempotency_key="same") for _ in range(20))
    )
    assert len({r.run_id for r in responses}) == 1


# ---------------------------------------------------------------- tenancy


def all_calls(stub: Stub, run_id: str) -> dict[str, Callable[[Metadata], Awaitable[object]]]:
    return {
        "Execute": lambda m: stub.Execute(
            pb.ExecuteRequest(executable_plan=echo_plan()), metadata=m
        ),
        "GetExecution": lambda m: stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=m
        ),
        "ListExecutions": lambda m: stub.ListExecutions(pb.ListExecutionsRequest(), metadata=m),
        "Pause": lambda m: stub.Pause(pb.PauseRequest(run_id=run_id), metadata=m),
        "Resume": lambda m: stub.Resume(pb.ResumeRequest(run_id=run_id), metadata=m),
        "Cancel": lambda m: stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=m),
        "RespondToClarification": lambda m: stub.RespondToClarification(
            pb.RespondToClarificationRequest(run_id=run_id, clarification_id="x"), metadata=m
        ),
        "WatchExecution": lambda m: _first(
            stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=m)
        ),
        "WatchExecutions": lambda m: _first(
            stub.WatchExecutions(pb.WatchExecutionsRequest(), metadata=m)
        ),
    }


async def _first(stream: grpc.aio.UnaryStreamCall[Any, Any]) -> object:
    async for item in stream:
        stream.cancel()
        return item
    return None


@pytest.mark.parametrize(
    ("metadata", "code", "reason"),
    [
        ((), grpc.StatusCode.UNAUTHENTICATED, "TENANT_REQUIRED"),
        ((("x-tenant-id", "not-a-uuid"),), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TENANT_ID"),
    ],
)
async def test_every_rpc_requires_a_valid_tenant(
    stub: Stub, metadata: Metadata, code: grpc.StatusCode, reason: str
) -> None:
    for name, call in all_calls(stub, str(uuid.uuid4())).items():
        err = await expect_error(call(metadata))
        d = details_of(err)
        assert (d.code, d.reason) == (code, reason), name


async def test_other_tenants_runs_are_not_found_on_every_run_scoped_rpc(
    stub: Stub, tenant: str
) -> None:
    run = await execute(stub, tenant)
    intruder = md(str(uuid.uuid4()))
    calls = all_calls(stub, run.run_id)
    for name in (
        "GetExecution",
        "Pause",
        "Resume",
        "Cancel",
        "RespondToClarification",
        "WatchExecution",
    ):
        err = await expect_error(calls[name](intruder))
        d = details_of(err)
        assert d.code == grpc.StatusCode.NOT_FOUND, name
        assert d.reason == "EXECUTION_NOT_FOUND", name
        assert d.metadata["run_id"] == run.run_id
    # The owner still sees it untouched.
    got = await stub.GetExecution(pb.GetExecutionRequest(run_id=run.run_id), metadata=md(tenant))
    assert got.execution.status == pb.EXECUTION_STATUS_PENDING
    listed = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=intruder)
    assert list(listed.executions) == []


async def test_unknown_run_is_not_found(stub: Stub, tenant: str) -> None:
    err = await expect_error(
        stub.GetExecution(pb.GetExecutionRequest(run_id="nope"), metadata=md(tenant))
    )
    d = details_of(err)
    assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "EXECUTION_NOT_FOUND")
    assert d.metadata["correlation_id"]


async def test_missing_run_id_is_invalid_argument(stub: Stub, tenant: str) -> None:
    err = await expect_error(stub.GetExecution(pb.GetExecutionRequest(), metadata=md(tenant)))
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.violations == [("run_id", "required")]


# ---------------------------------------------------------------- ListExecutions


async def test_a_read_is_one_snapshot(server: Server, stub: Stub, tenant: str) -> None:
    """A read is several statements (a run, its steps, its clarifications); a commit between
    them must not show through. At PostgreSQL's READ COMMITTED it did: a snapshot showed a
    clarification pending beside its step still PENDING."""
    count = sa.select(sa.func.count()).select_from(runs).where(runs.c.tenant_id == tenant)
    async with server.db.reader.connect() as conn, conn.begin():
        before = (await conn.execute(count)).scalar()
        await execute(stub, tenant)  # committed by the writer while the read is open
        assert (await conn.execute(count)).scalar() == before


async def test_list_pages_stay_correct_while_runs_are_inserted(stub: Stub, tenant: str) -> None:
    created = [(await execute(stub, tenant)).run_id for _ in range(12)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListExecutions(
            pb.ListExecutionsRequest(page_size=5, page_token=token), metadata=md(tenant)
        )
        pages += 1
        seen.extend(e.run_id for e in page.executions)
        # Newer runs arrive between pages; they must not shift what the next page holds.
        for _ in range(3):
            await execute(stub, tenant)
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)), "no run twice"
    assert seen == list(reversed(created)), "none missing, newest first"


async def test_list_filters(stub: Stub, tenant: str) -> None:
    a = await execute(stub, tenant, triggered_by="alice")
    b = await execute(stub, tenant, triggered_by="bob", dry_run=True)
    await stub.Cancel(pb.CancelRequest(run_id=a.run_id), metadata=md(tenant))

    async def ids(flt: pb.ExecutionFilter) -> list[str]:
        page = await stub.ListExecutions(pb.ListExecutionsRequest(filter=flt), metadata=md(tenant))
        return [e.run_id for e in page.executions]

    assert await ids(pb.ExecutionFilter(triggered_by="bob")) == [b.run_id]
    assert await ids(pb.ExecutionFilter(statuses=[pb.EXECUTION_STATUS_CANCELLED])) == [a.run_id]
    assert await ids(
        pb.ExecutionFilter(statuses=[pb.EXECUTION_STATUS_COMPLETED, pb.EXECUTION_STATUS_CANCELLED])
    ) == [b.run_id, a.run_id]
    after = pb.ExecutionFilter()
    after.created_after.CopyFrom(b.created_at)
    assert await ids(after) == [b.run_id]
    assert await ids(pb.ExecutionFilter(plan_hash="sha256:none")) == []


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.ListExecutionsRequest(page_size=-1), "page_size"),
        (
            pb.ListExecutionsRequest(
                filter=pb.ExecutionFilter(statuses=[pb.ExecutionStatus.ValueType(99)])
            ),
            "filter.statuses[0]",
        ),
    ],
)
async def test_list_rejects_bad_requests(
    stub: Stub, tenant: str, request_: pb.ListExecutionsRequest, field: str
) -> None:
    err = await expect_error(stub.ListExecutions(request_, metadata=md(tenant)))
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in d.violations] == [field]


async def test_list_page_size_is_capped(stub: Stub, tenant: str) -> None:
    page = await stub.ListExecutions(
        pb.ListExecutionsRequest(page_size=100_000), metadata=md(tenant)
    )
    assert list(page.executions) == []


async def test_forged_or_foreign_page_tokens_are_invalid(stub: Stub, tenant: str) -> None:
    for _ in range(3):
        await execute(stub, tenant)
    page = await stub.ListExecutions(pb.ListExecutionsRequest(page_size=1), metadata=md(tenant))
    token = page.next_page_token
    assert token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    forged = [tampered, "garbage", token + "x"]
    for bad in forged:
        err = await expect_error(
            stub.ListExecutions(
                pb.ListExecutionsRequest(page_size=1, page_token=bad), metadata=md(tenant)
            )
        )
        d = details_of(err)
        assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"), bad
    # A real token used with another filter, or by another tenant, is refused too.
    for request_, who in (
        (
            pb.ListExecutionsRequest(page_token=token, filter=pb.ExecutionFilter(triggered_by="x")),
            tenant,
        ),
        (pb.ListExecutionsRequest(page_token=token), str(uuid.uuid4())),
    ):
        err = await expect_error(stub.ListExecutions(request_, metadata=md(who)))
        assert details_of(err).reason == "INVALID_PAGE_TOKEN"


# ---------------------------------------------------------------- Pause / Resume / Cancel


async def test_pause_resume_cancel_success_paths(stub: Stub, tenant: str) -> None:
    run = await execute(stub, tenant)
    m = md(tenant)
    paused = await stub.Pause(pb.PauseRequest(run_id=run.run_id, reason="look"), metadata=m)
    assert (paused.success, paused.status) == (True, pb.EXECUTION_STATUS_PAUSED)
    assert paused.message == "Execution paused successfully"
    assert paused.timestamp.seconds > 0
    resumed = await stub.Resume(pb.ResumeRequest(run_id=run.run_id), metadata=m)
    assert resumed.status == pb.EXECUTION_STATUS_RUNNING
    cancelled = await stub.Cancel(pb.CancelRequest(run_id=run.run_id, reason="done"), metadata=m)
    assert cancelled.status == pb.EXECUTION_STATUS_CANCELLED
    got = await stub.GetExecution(pb.GetExecutionRequest(run_id=run.run_id), metadata=m)
    execution = got.execution
    assert execution.status == pb.EXECUTION_STATUS_CANCELLED
    assert execution.HasField("completed_at")
    assert all(s.status == pb.STEP_STATUS_CANCELLED for s in execution.steps)
    # created, paused, resumed, one event per cancelled step, cancelled
    assert execution.last_sequence == 4 + len(execution.steps)


async def _run_in(stub: Stub, tenant: str, state: str) -> str:
    m = md(tenant)
    if state == "COMPLETED":
        return (await execute(stub, tenant, dry_run=True)).run_id
    run_id = (await execute(stub, tenant)).run_id
    if state in ("PAUSED", "RUNNING"):
        await stub.Pause(pb.PauseRequest(run_id=run_id), metadata=m)
    if state == "RUNNING":
        await stub.Resume(pb.ResumeRequest(run_id=run_id), metadata=m)
    if state == "CANCELLED":
        await stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=m)
    return run_id


ALLOWED = {
    ("PENDING", "Pause"): "PAUSED",
    ("PENDING", "Cancel"): "CANCELLED",
    ("RUNNING", "Pause"): "PAUSED",
    ("RUNNING", "Cancel"): "CANCELLED",
    ("PAUSED", "Resume"): "RUNNING",
    ("PAUSED", "Cancel"): "CANCELLED",
}
REASONS = {"Pause": "PAUSE_FAILED", "Resume": "RESUME_FAILED", "Cancel": "CANCEL_FAILED"}


@pytest.mark.parametrize("state", ["PENDING", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED"])
@pytest.mark.parametrize("action", ["Pause", "Resume", "Cancel"])
async def test_every_control_transition(stub: Stub, tenant: str, state: str, action: str) -> None:
    run_id = await _run_in(stub, tenant, state)
    m = md(tenant)
    request = getattr(pb, f"{action}Request")(run_id=run_id)
    target = ALLOWED.get((state, action))
    if target is not None:
        response = await getattr(stub, action)(request, metadata=m)
        assert pb.ExecutionStatus.Name(response.status) == f"EXECUTION_STATUS_{target}"
    else:
        err = await expect_error(getattr(stub, action)(request, metadata=m))
        d = details_of(err)
        assert d.code == grpc.StatusCode.FAILED_PRECONDITION
        assert d.reason == REASONS[action]
        assert d.metadata["current_status"] == state
        assert d.metadata["run_id"] == run_id
        target = state
    got = await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=m)
    assert pb.ExecutionStatus.Name(got.execution.status) == f"EXECUTION_STATUS_{target}"


async def test_concurrent_cancel_and_resume_exactly_one_wins_the_paused_run(
    stub: Stub, tenant: str
) -> None:
    m = md(tenant)
    for _ in range(10):
        run_id = await _run_in(stub, tenant, "PAUSED")
        results = await asyncio.gather(
            stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=m),
            stub.Resume(pb.ResumeRequest(run_id=run_id), metadata=m),
            return_exceptions=True,
        )
        events = [
            r.event
            async for r in stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=run_id, after_sequence=2), metadata=m
            )
        ]
        statuses = [
            e.execution.status for e in events if e.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
        ]
        # Exactly one transition leaves PAUSED (the one right after it in the log).
        leaving_paused = statuses[0]
        cancel, resume = results
        if leaving_paused == pb.EXECUTION_STATUS_CANCELLED:
            assert isinstance(cancel, pb.CancelResponse)
            assert isinstance(resume, grpc.aio.AioRpcError)
            d = details_of(resume)
            assert (d.reason, d.metadata["current_status"]) == ("RESUME_FAILED", "CANCELLED")
            assert statuses == [pb.EXECUTION_STATUS_CANCELLED]
        else:
            # Resume won PAUSED; the Cancel then applied to the RUNNING run it found.
            assert leaving_paused == pb.EXECUTION_STATUS_RUNNING
            assert isinstance(resume, pb.ResumeResponse)
            assert isinstance(cancel, pb.CancelResponse)
            assert statuses == [pb.EXECUTION_STATUS_RUNNING, pb.EXECUTION_STATUS_CANCELLED]


# ---------------------------------------------------------------- RespondToClarification


async def test_respond_to_unknown_clarification_is_not_found(stub: Stub, tenant: str) -> None:
    run = await execute(stub, tenant)
    err = await expect_error(
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(
                run_id=run.run_id,
                clarification_id="nope",
                response=struct_pb2.Value(bool_value=True),
            ),
            metadata=md(tenant),
        )
    )
    d = details_of(err)
    assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "CLARIFICATION_NOT_FOUND")
    err = await expect_error(
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(run_id=str(uuid.uuid4()), clarification_id="nope"),
            metadata=md(tenant),
        )
    )
    assert details_of(err).reason == "EXECUTION_NOT_FOUND"
    err = await expect_error(
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(run_id=run.run_id), metadata=md(tenant)
        )
    )
    assert details_of(err).code == grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------- watching


async def test_watch_snapshot_then_events_until_terminal(stub: Stub, tenant: str) -> None:
    run = await execute(stub, tenant)
    m = md(tenant)
    stream = stub.WatchExecution(pb.WatchExecutionRequest(run_id=run.run_id), metadata=m)
    first = (await read_message(stream)).event
    assert first.type == pb.EVENT_TYPE_SNAPSHOT
    assert first.sequence == 1
    assert first.execution.status == pb.EXECUTION_STATUS_PENDING
    await stub.Pause(pb.PauseRequest(run_id=run.run_id), metadata=m)
    await stub.Cancel(pb.CancelRequest(run_id=run.run_id), metadata=m)
    rest = []
    while (item := await stream.read()) is not grpc.aio.EOF:
        rest.append(cast(pb.WatchExecutionResponse, item).event)
    # Paused, then one STEP_FAILED per step cancelled with the run, then the run cancelled.
    steps = len(run.execution.steps)
    last = 3 + steps
    assert [e.sequence for e in rest] == list(range(2, last + 1))
    assert [e.type for e in rest[1:-1]] == [pb.EVENT_TYPE_STEP_FAILED] * steps
    assert {s.status for e in rest[1:-1] for s in e.execution.steps} == {pb.STEP_STATUS_CANCELLED}
    assert [e.execution.status for e in (rest[0], rest[-1])] == [
        pb.EXECUTION_STATUS_PAUSED,
        pb.EXECUTION_STATUS_CANCELLED,
    ]
    assert await stream.code() == grpc.StatusCode.OK
    # Replay from a sequence: no snapshot, exactly the later events.
    replay = [
        r.event
        async for r in stub.WatchExecution(
            pb.WatchExecutionRequest(run_id=run.run_id, after_sequence=1), metadata=m
        )
    ]
    assert [e.sequence for e in replay] == list(range(2, last + 1))
    # A finished run watched from its end ends at once.
    done = [
        r
        async for r in stub.WatchExecution(
            pb.WatchExecutionRequest(run_id=run.run_id, after_sequence=last), metadata=m
        )
    ]
    assert done == []


async def test_watch_beyond_last_event_is_out_of_range(stub: Stub, tenant: str) -> None:
    run = await execute(stub, tenant)
    err = await expect_error(
        _first(
            stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=run.run_id, after_sequence=5), metadata=md(tenant)
            )
        )
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.OUT_OF_RANGE
    assert d.metadata["last_sequence"] == "1"


async def test_watch_executions_streams_status_changes_and_resumes_by_cursor(
    stub: Stub, tenant: str
) -> None:
    m = md(tenant)
    stream = stub.WatchExecutions(pb.WatchExecutionsRequest(), metadata=m)
    # Make sure the stream is subscribed before the changes happen.
    await asyncio.sleep(0.2)
    run = await execute(stub, tenant)
    await stub.Pause(pb.PauseRequest(run_id=run.run_id), metadata=m)
    first = await read_message(stream)
    second = await read_message(stream)
    stream.cancel()
    assert first.event.run_id == run.run_id
    assert first.event.execution.status == pb.EXECUTION_STATUS_PENDING
    assert second.event.execution.status == pb.EXECUTION_STATUS_PAUSED
    # Changes made while nobody watched are delivered from the cursor, in order.
    await stub.Resume(pb.ResumeRequest(run_id=run.run_id), metadata=m)
    await stub.Cancel(pb.CancelRequest(run_id=run.run_id), metadata=m)
    resumed = stub.WatchExecutions(
        pb.WatchExecutionsRequest(after_cursor=second.cursor), metadata=m
    )
    got = [(await read_message(resumed)).event.execution.status for _ in range(2)]
    resumed.cancel()
    assert got == [pb.EXECUTION_STATUS_RUNNING, pb.EXECUTION_STATUS_CANCELLED]
    # Another tenant's cursor or a forged one is refused.
    err = await expect_error(
        _first(
            stub.WatchExecutions(
                pb.WatchExecutionsRequest(after_cursor=second.cursor),
                metadata=md(str(uuid.uuid4())),
            )
        )
    )
    assert details_of(err).reason == "INVALID_CURSOR"


# ---------------------------------------------------------------- health and reflection


async def test_health_serving_and_not_serving_while_draining(server: Server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "orchestrator.v1.OrchestratorService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        await server.health.enter_graceful_shutdown()
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_nine_rpcs(channel: grpc.aio.Channel, version: str) -> None:
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def ask(**kw: str) -> reflection_pb2.ServerReflectionResponse:
        responses = [r async for r in call(iter([reflection_pb2.ServerReflectionRequest(**kw)]))]
        return responses[0]

    services = (await ask(list_services="")).list_services_response.service
    names = {s.name for s in services}
    assert "orchestrator.v1.OrchestratorService" in names
    assert "grpc.health.v1.Health" in names
    files = await ask(file_containing_symbol="orchestrator.v1.OrchestratorService")
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in files.file_descriptor_response.file_descriptor_proto
    ]
    service = next(s for p in protos for s in p.service if s.name == "OrchestratorService")
    assert sorted(m.name for m in service.method) == sorted(
        [
            "Execute",
            "GetExecution",
            "ListExecutions",
            "Pause",
            "Resume",
            "Cancel",
            "RespondToClarification",
            "WatchExecution",
            "WatchExecutions",
            "RetryExecution",
            "SignalExecution",
            "CreateWebhook",
            "ListWebhooks",
            "DeleteWebhook",
            "ListWebhookDeliveries",
        ]
    )


async def test_over_long_request_strings_are_invalid_not_internal(stub: Stub, tenant: str) -> None:
    long = "x" * 300
    err = await expect_error(
        stub.Execute(
            pb.ExecuteRequest(
                executable_plan=echo_plan(),
                triggered_by=long,
                correlation_id=long,
                idempotency_key=long,
            ),
            metadata=md(tenant),
        )
    )
    d = details_of(err)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(f for f, _ in d.violations) == [
        "correlation_id",
        "idempotency_key",
        "triggered_by",
    ]
