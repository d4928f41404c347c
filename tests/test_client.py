"""The typed client library (async and sync) against a real server over a real channel."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format

from orchestrator.client import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OrchestratorClient,
    OrchestratorError,
    OutOfRange,
    PermissionDenied,
    SyncOrchestratorClient,
    Unavailable,
    event_type_name,
    outputs,
    results,
    step_status_name,
)
from orchestrator.server.app import Server
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import EXAMPLES, load_plan, make_settings, plan_of, sqlite_url
from tests.pki import make_pki
from tests.process import ServeProcess, free_port


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    # Heartbeats often enough to see them in a short test.
    return make_settings(tmp_path, database_url, heartbeat_seconds=0.2)


@pytest.fixture
async def client(server: Server, tenant: str) -> AsyncIterator[OrchestratorClient]:
    async with OrchestratorClient(server.address, tenant, correlation_id="corr-client") as c:
        yield c


def waits(n: int, seconds: float = 0.05) -> pb.ExecutablePlan:
    return plan_of(
        *(
            {"stepId": f"s{i}", "tool": "core.wait", "parameters": {"seconds": seconds}}
            for i in range(n)
        )
    )


def echo_dict(n: int = 2) -> dict[str, Any]:
    """A plan in proto3 JSON form, as a caller without the generated code would send it."""
    return {
        "planId": "dict",
        "flows": [
            {
                "flowId": "main",
                "steps": [
                    {"stepId": f"e{i}", "tool": "core.echo", "parameters": {"i": i}}
                    for i in range(n)
                ],
            }
        ],
        "securityContext": {"allowedTools": ["core.echo"]},
    }


CLARIFY = plan_of(
    {
        "stepId": "ask",
        "tool": "core.clarify",
        "parameters": {"category": "input", "prompt": "Which config?", "argument_name": "cfg"},
    },
    {"stepId": "after", "tool": "core.echo", "parameters": {"got": "{{ steps.ask.output }}"}},
)


def sequences(events: list[pb.ExecutionEvent]) -> list[int]:
    return [e.sequence for e in events if e.type != pb.EVENT_TYPE_SNAPSHOT]


def assert_exactly_once(events: list[pb.ExecutionEvent]) -> None:
    """A SNAPSHOT, then every later event once, in order, up to the terminal one."""
    assert events[0].type == pb.EVENT_TYPE_SNAPSHOT
    seqs = sequences(events)
    assert seqs == list(range(events[0].sequence + 1, events[0].sequence + 1 + len(seqs)))
    assert all(e.type != pb.EVENT_TYPE_HEARTBEAT for e in events)


# ---------------------------------------------------------------- execute / get


async def test_execute_takes_a_message_a_dict_or_a_file(
    client: OrchestratorClient, tmp_path: Path
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(echo_dict(3)))
    from_message = await client.execute(waits(1), triggered_by="alice")
    from_dict = await client.execute(echo_dict(2))
    from_file = await client.execute(str(path))
    from_pathlike = await client.execute(EXAMPLES / "parallel.json")
    for response in (from_message, from_dict, from_file, from_pathlike):
        assert response.success
        uuid.UUID(response.run_id)
    assert len({from_message.run_id, from_dict.run_id, from_file.run_id}) == 3
    got = await client.get(from_message.run_id)
    assert got.run_id == from_message.run_id
    assert got.triggered_by == "alice"
    # The client's correlation id went with the call and is stored on the run.
    assert got.correlation_id == "corr-client"
    assert [s.step_id for s in (await client.get(from_file.run_id)).steps] == ["e0", "e1", "e2"]


async def test_execute_wait_parameters_variables_and_timeout(client: OrchestratorClient) -> None:
    response = await client.execute(
        EXAMPLES / "sequential.json", parameters={"name": "ada"}, wait=True, timeout=30
    )
    assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
    # Plain Python values where a user wants them.
    assert results(response.execution)["greet"] == {"message": "hello ada"}
    assert outputs(response.execution)["report"] == {"greeting": "hello ada", "length": 9}
    assert step_status_name(response.execution.steps[0].status) == "COMPLETED"
    plan = plan_of({"stepId": "v", "tool": "core.echo", "parameters": {"x": "{{ vars.x }}"}})
    with_vars = await client.execute(plan, variables={"x": [1, "two"]}, wait=True)
    assert results(with_vars.execution)["v"] == {"x": [1, "two"]}
    names = [event_type_name(e.type) async for e in client.watch(with_vars.run_id, from_start=True)]
    assert names[0] == "RUN_STATUS_CHANGED" and "STEP_COMPLETED" in names
    timed_out = await client.execute(waits(1, seconds=5), wait=True, timeout=0.3)
    assert timed_out.execution.status == pb.EXECUTION_STATUS_FAILED
    assert timed_out.execution.error_reason == "DEADLINE_EXCEEDED"


async def test_dry_run_calls_no_tool(client: OrchestratorClient) -> None:
    response = await client.execute(load_plan("parallel.json"), dry_run=True)
    assert response.execution.dry_run
    assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert all(s.attempts == 0 for s in response.execution.steps)


async def test_invalid_plan_is_invalid_argument_with_violations(
    client: OrchestratorClient,
) -> None:
    plan = plan_of(
        {"stepId": "a", "tool": "core.echo", "dependsOn": ["ghost"]},
        {"stepId": "a", "tool": "core.echo"},
    )
    with pytest.raises(InvalidArgument) as info:
        await client.execute(plan)
    err = info.value
    assert isinstance(err, OrchestratorError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "VALIDATION_FAILED"
    assert err.domain == "orchestrator.v1"
    assert err.correlation_id == "corr-client"
    assert (
        FieldViolation("executable_plan.flows[0].steps[0].depends_on[0]", 'unknown step "ghost"')
        in err.violations
    )
    assert any(v.field == "executable_plan.flows[0].steps[1].step_id" for v in err.violations)
    assert str(err).startswith("INVALID_ARGUMENT VALIDATION_FAILED: ")


async def test_capabilities_are_checked_unless_switched_off(client: OrchestratorClient) -> None:
    plan = echo_dict(1)
    plan["securityContext"] = {"allowedTools": []}
    with pytest.raises(PermissionDenied) as info:
        await client.execute(plan)
    assert info.value.reason == "CAPABILITY_DENIED"
    assert info.value.violations
    response = await client.execute(plan, validate_capabilities=False, wait=True)
    assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED


async def test_unknown_run_is_not_found(client: OrchestratorClient) -> None:
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as info:
        await client.get(missing)
    assert info.value.reason == "EXECUTION_NOT_FOUND"
    assert info.value.metadata["run_id"] == missing
    assert info.value.code_name == "NOT_FOUND"


async def test_another_tenant_cannot_see_the_run(
    client: OrchestratorClient, server: Server
) -> None:
    run = await client.execute(echo_dict())
    async with OrchestratorClient(server.address, str(uuid.uuid4())) as other:
        with pytest.raises(NotFound):
            await other.get(run.run_id)
    async with OrchestratorClient(server.address, "not-a-uuid") as bad:
        with pytest.raises(InvalidArgument) as info:
            await bad.get(run.run_id)
    assert info.value.reason == "INVALID_TENANT_ID"


async def test_idempotency_key_returns_the_first_run(client: OrchestratorClient) -> None:
    first = await client.execute(echo_dict(), idempotency_key="key-1")
    again = await client.execute(echo_dict(), idempotency_key="key-1")
    assert again.run_id == first.run_id
    with pytest.raises(AlreadyExists) as info:
        await client.execute(echo_dict(3), idempotency_key="key-1")
    assert info.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_execute_with_a_key_is_retried_until_the_server_is_back(
    tmp_path: Path, tenant: str
) -> None:
    """UNAVAILABLE is retried only with an idempotency key: the server starts late."""
    from orchestrator.server.app import build_server

    port = free_port()
    settings = make_settings(tmp_path, port=port)
    async with OrchestratorClient(f"127.0.0.1:{port}", tenant) as c:
        with pytest.raises(Unavailable):
            await c.execute(echo_dict())  # no key: fails at once
        started: list[Server] = []

        async def start_late() -> None:
            await asyncio.sleep(0.5)
            srv = await build_server(settings)
            await srv.start()
            started.append(srv)

        late = asyncio.create_task(start_late())
        try:
            response = await c.execute(echo_dict(), idempotency_key="late", wait=True)
            assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
            assert (await c.get(response.run_id)).run_id == response.run_id
        finally:
            await late
            for srv in started:
                await srv.stop(grace=0.2)


# ---------------------------------------------------------------- list


async def test_list_pages_by_itself_and_stops_at_the_limit(
    client: OrchestratorClient, server: Server
) -> None:
    ids = [(await client.execute(echo_dict(1), dry_run=True)).run_id for _ in range(7)]
    waiting = await client.execute(waits(1, seconds=30))
    everything = [e.run_id async for e in client.list(page_size=3)]
    assert everything == [waiting.run_id, *reversed(ids)]  # newest first, over three pages
    limited = [e.run_id async for e in client.list(page_size=3, limit=5)]
    assert limited == everything[:5]
    done = [e.run_id async for e in client.list(statuses=["completed"], page_size=2)]
    assert done == list(reversed(ids))
    running = [
        e.run_id
        async for e in client.list(
            statuses=[pb.EXECUTION_STATUS_RUNNING, "EXECUTION_STATUS_PENDING"]
        )
    ]
    assert running == [waiting.run_id]
    assert [e async for e in client.list(limit=0)] == []
    async with OrchestratorClient(server.address, str(uuid.uuid4())) as other:
        assert [e async for e in other.list()] == []
    with pytest.raises(ValueError):
        [e async for e in client.list(statuses=["sleeping"])]
    await client.cancel(waiting.run_id)


# ---------------------------------------------------------------- pause / resume / cancel


async def test_pause_resume_cancel_and_their_preconditions(client: OrchestratorClient) -> None:
    run = await client.execute(waits(3, seconds=30))
    paused = await client.pause(run.run_id, reason="look")
    assert paused.success and paused.status == pb.EXECUTION_STATUS_PAUSED
    assert (await client.get(run.run_id)).status == pb.EXECUTION_STATUS_PAUSED
    with pytest.raises(FailedPrecondition) as info:
        await client.pause(run.run_id)
    assert info.value.reason == "PAUSE_FAILED"
    resumed = await client.resume(run.run_id)
    assert resumed.status == pb.EXECUTION_STATUS_RUNNING
    with pytest.raises(FailedPrecondition) as info:
        await client.resume(run.run_id)
    assert info.value.reason == "RESUME_FAILED"
    cancelled = await client.cancel(run.run_id, reason="enough")
    assert cancelled.status == pb.EXECUTION_STATUS_CANCELLED
    with pytest.raises(FailedPrecondition) as info:
        await client.cancel(run.run_id)
    assert info.value.reason == "CANCEL_FAILED"


async def test_pause_of_a_completed_run_is_failed_precondition(
    client: OrchestratorClient,
) -> None:
    run = await client.execute(echo_dict(), wait=True)
    with pytest.raises(FailedPrecondition) as info:
        await client.pause(run.run_id)
    assert info.value.reason == "PAUSE_FAILED"
    assert info.value.metadata["run_id"] == run.run_id
    with pytest.raises(NotFound):
        await client.cancel(str(uuid.uuid4()))


# ---------------------------------------------------------------- respond


async def test_respond_answers_with_any_json(client: OrchestratorClient) -> None:
    run = await client.execute(CLARIFY)
    async for event in client.watch(run.run_id):  # the request, or a snapshot after it
        if (
            event.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED
            or event.execution.pending_clarifications
        ):
            break
    else:
        pytest.fail("no clarification was requested")
    waiting = await client.get(run.run_id)
    (clar,) = waiting.pending_clarifications
    assert clar.prompt == "Which config?"
    answer = {"replicas": 3, "zones": ["a", "b"], "dry": False, "note": None}
    answered = await client.respond(run.run_id, clar.clarification_id, answer, responded_by="ops")
    ask = next(s for s in answered.steps if s.step_id == "ask")
    assert json_format.MessageToDict(ask.output) == answer
    final = await client.wait(run.run_id, timeout=15)
    assert final.status == pb.EXECUTION_STATUS_COMPLETED
    assert json_format.MessageToDict(final.results)["after"] == {"got": answer}
    with pytest.raises(OrchestratorError) as info:
        await client.respond(run.run_id, clar.clarification_id, "again")
    assert info.value.reason == "CLARIFICATION_NOT_PENDING"
    with pytest.raises(NotFound) as missing:
        await client.respond(run.run_id, "nope", 1)
    assert missing.value.reason == "CLARIFICATION_NOT_FOUND"


# ---------------------------------------------------------------- watch / wait


async def test_watch_yields_every_event_once_in_order_and_stops_at_the_end(
    client: OrchestratorClient,
) -> None:
    run = await client.execute(waits(5, seconds=0.3))
    events = [e async for e in client.watch(run.run_id)]  # > 1 s: heartbeats were sent
    assert_exactly_once(events)
    last = events[-1]
    assert last.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
    assert last.execution.status == pb.EXECUTION_STATUS_COMPLETED
    final = await client.get(run.run_id)
    assert last.sequence == final.last_sequence
    completed = [e.step_id for e in events if e.type == pb.EVENT_TYPE_STEP_COMPLETED]
    assert completed == [f"s{i}" for i in range(5)]
    # From a sequence: a replay of what came after it, no snapshot.
    replay = [e async for e in client.watch(run.run_id, after_sequence=3)]
    assert [e.sequence for e in replay] == list(range(4, final.last_sequence + 1))
    # A finished run: its snapshot, and the iterator ends.
    (snapshot,) = [e async for e in client.watch(run.run_id)]
    assert snapshot.type == pb.EVENT_TYPE_SNAPSHOT
    assert snapshot.execution.status == pb.EXECUTION_STATUS_COMPLETED
    # The whole history, from the first event, in place of a snapshot.
    history = [e async for e in client.watch(run.run_id, from_start=True)]
    assert [e.sequence for e in history] == list(range(1, final.last_sequence + 1))
    assert [e.type for e in history[-len(events) + 1 :]] == [e.type for e in events[1:]]
    with pytest.raises(OutOfRange):
        [e async for e in client.watch(run.run_id, after_sequence=final.last_sequence + 5)]
    with pytest.raises(NotFound):
        [e async for e in client.watch(str(uuid.uuid4()))]


async def test_watch_shows_heartbeats_only_when_asked(client: OrchestratorClient) -> None:
    run = await client.execute(waits(1, seconds=0.8))
    events = [e async for e in client.watch(run.run_id, heartbeats=True)]
    beats = [e for e in events if e.type == pb.EVENT_TYPE_HEARTBEAT]
    assert beats, "an idle stream got heartbeats"
    assert_exactly_once([e for e in events if e.type != pb.EVENT_TYPE_HEARTBEAT])


async def test_wait_returns_the_terminal_run_or_times_out(client: OrchestratorClient) -> None:
    done = await client.execute(waits(2))
    final = await client.wait(done.run_id)
    assert final.status == pb.EXECUTION_STATUS_COMPLETED
    assert len(final.steps) == 2  # the whole run, not the event's excerpt
    failing = await client.execute(
        plan_of({"stepId": "f", "tool": "core.fail", "parameters": {"message": "boom"}})
    )
    failed = await client.wait(failing.run_id, timeout=15)
    assert failed.status == pb.EXECUTION_STATUS_FAILED
    assert "boom" in failed.error_message
    slow = await client.execute(waits(1, seconds=30))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await client.wait(slow.run_id, timeout=0.5)
    assert time.monotonic() - started < 5
    await client.cancel(slow.run_id)
    assert (await client.wait(slow.run_id)).status == pb.EXECUTION_STATUS_CANCELLED


# ---------------------------------------------------------------- the sync client


def sync_scenario(address: str, tenant: str, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(echo_dict(2)))
    with SyncOrchestratorClient(address, tenant, correlation_id="corr-sync") as c:
        response = c.execute(path, wait=True, triggered_by="sync")
        assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
        got = c.get(response.run_id)
        assert (got.triggered_by, got.correlation_id) == ("sync", "corr-sync")
        assert c.execute(echo_dict(), idempotency_key="k").run_id == (
            c.execute(echo_dict(), idempotency_key="k").run_id
        )
        # watch: every event once, in order, ending at the terminal one.
        run = c.execute(waits(4, seconds=0.1))
        events = list(c.watch(run.run_id))
        assert_exactly_once(events)
        assert events[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED
        assert c.wait(run.run_id).status == pb.EXECUTION_STATUS_COMPLETED
        # list pages by itself.
        for _ in range(3):
            c.execute(echo_dict(1), dry_run=True)
        listed = [e.run_id for e in c.list(page_size=2)]
        assert len(listed) == 6 and len(set(listed)) == 6  # over three pages
        assert [e.run_id for e in c.list(page_size=2, limit=3)] == listed[:3]
        assert {e.run_id for e in c.list(statuses=["completed"])} == set(listed)
        # pause / resume / cancel, and typed errors.
        slow = c.execute(waits(2, seconds=30))
        assert c.pause(slow.run_id, "look").status == pb.EXECUTION_STATUS_PAUSED
        assert c.resume(slow.run_id).status == pb.EXECUTION_STATUS_RUNNING
        with pytest.raises(TimeoutError):
            c.wait(slow.run_id, timeout=0.4)
        assert c.cancel(slow.run_id, "stop").status == pb.EXECUTION_STATUS_CANCELLED
        assert c.wait(slow.run_id).status == pb.EXECUTION_STATUS_CANCELLED
        with pytest.raises(FailedPrecondition) as precondition:
            c.pause(response.run_id)
        assert precondition.value.reason == "PAUSE_FAILED"
        with pytest.raises(NotFound) as missing:
            c.get(str(uuid.uuid4()))
        assert missing.value.reason == "EXECUTION_NOT_FOUND"
        assert missing.value.correlation_id == "corr-sync"
        with pytest.raises(InvalidArgument) as invalid:
            c.execute(plan_of({"stepId": "x", "tool": "core.echo", "dependsOn": ["x"]}))
        assert invalid.value.violations[0].field == (
            "executable_plan.flows[0].steps[0].depends_on[0]"
        )
        with pytest.raises(NotFound):
            list(c.watch(str(uuid.uuid4())))


async def test_sync_client_does_everything_the_async_one_does(
    server: Server, tenant: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(sync_scenario, server.address, tenant, tmp_path)


def sync_respond(address: str, tenant: str) -> None:
    with SyncOrchestratorClient(address, tenant) as c:
        asking = c.execute(CLARIFY)
        for event in c.watch(asking.run_id):  # the request, or a snapshot after it
            if (
                event.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED
                or event.execution.pending_clarifications
            ):
                break
        (clar,) = c.get(asking.run_id).pending_clarifications
        after = c.respond(asking.run_id, clar.clarification_id, [1, "x"])
        ask = next(s for s in after.steps if s.step_id == "ask")
        output: Any = json_format.MessageToDict(ask.output)  # a Value: any JSON, here a list
        assert output == [1, "x"]
        assert c.wait(asking.run_id).status == pb.EXECUTION_STATUS_COMPLETED
        with pytest.raises(NotFound) as missing:
            c.respond(asking.run_id, "nope", True)
        assert missing.value.reason == "CLARIFICATION_NOT_FOUND"


async def test_sync_client_responds(server: Server, tenant: str) -> None:
    await asyncio.to_thread(sync_respond, server.address, tenant)


# ---------------------------------------------------------------- metadata and TLS


class Recorder:
    """A stand-in OrchestratorService that records each call's metadata and answers GetExecution."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def handler(self) -> grpc.GenericRpcHandler:
        async def get(request: pb.GetExecutionRequest, context: Any) -> pb.GetExecutionResponse:
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
            return pb.GetExecutionResponse(execution=pb.Execution(run_id=request.run_id))

        return grpc.method_handlers_generic_handler(
            "orchestrator.v1.OrchestratorService",
            {
                "GetExecution": grpc.unary_unary_rpc_method_handler(
                    get,
                    request_deserializer=pb.GetExecutionRequest.FromString,
                    response_serializer=pb.GetExecutionResponse.SerializeToString,
                )
            },
        )


async def test_tenant_correlation_id_and_api_key_go_with_every_call(tenant: str) -> None:
    recorder = Recorder()
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers((recorder.handler(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        async with OrchestratorClient(
            f"127.0.0.1:{port}", tenant, correlation_id="c-1", api_key="s3cret"
        ) as c:
            assert (await c.get("r1")).run_id == "r1"
        seen = recorder.metadata[0]
        assert seen["x-tenant-id"] == tenant
        assert seen["x-correlation-id"] == "c-1"
        assert seen["authorization"] == "Bearer s3cret"
        with SyncOrchestratorClient(f"127.0.0.1:{port}", tenant) as s:
            assert (await asyncio.to_thread(s.get, "r2")).run_id == "r2"
        assert "authorization" not in recorder.metadata[1]
    finally:
        await srv.stop(0)


async def test_mutual_tls_with_certificate_files(tmp_path: Path, tenant: str) -> None:
    pki = make_pki(tmp_path)
    recorder = Recorder()
    srv = grpc.aio.server()
    srv.add_generic_rpc_handlers((recorder.handler(),))
    credentials = grpc.ssl_server_credentials(
        [(pki["server.key"].read_bytes(), pki["server.pem"].read_bytes())],
        root_certificates=pki["ca.pem"].read_bytes(),
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    await srv.start()
    address = f"127.0.0.1:{port}"
    try:
        async with OrchestratorClient(
            address,
            tenant,
            root_certificates=pki["ca.pem"],
            certificate_chain=pki["client.pem"],
            private_key=pki["client.key"],
        ) as c:
            assert (await c.get("tls")).run_id == "tls"
        # Without the client certificate the handshake fails; plaintext is refused too.
        async with OrchestratorClient(address, tenant, root_certificates=pki["ca.pem"]) as c:
            with pytest.raises(Unavailable):
                await c.get("no-client-cert")
        async with OrchestratorClient(address, tenant, rpc_timeout=1) as c:
            with pytest.raises(OrchestratorError):
                await c.get("plaintext")
        assert len(recorder.metadata) == 1
    finally:
        await srv.stop(0)
    with pytest.raises(ValueError):
        OrchestratorClient(address, tenant, certificate_chain=pki["client.pem"])


# ---------------------------------------------------------------- a server restarted mid-watch


def wait_until(check: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


@pytest.mark.subprocess
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_watch_reconnects_across_a_server_restart(
    tmp_path: Path, tenant: str, signum: signal.Signals
) -> None:
    url = sqlite_url(tmp_path / "o.db")
    first = ServeProcess(url, tmp_path / "first.log", "--shutdown-grace", "0")
    second: ServeProcess | None = None
    try:
        first.wait_serving()
        with SyncOrchestratorClient(first.address, tenant) as c:
            run = c.execute(waits(8, seconds=0.3))
            events: list[pb.ExecutionEvent] = []
            failures: list[BaseException] = []

            def consume() -> None:
                try:
                    for event in c.watch(run.run_id, timeout=90):
                        events.append(event)
                except BaseException as err:
                    failures.append(err)

            reader = threading.Thread(target=consume, daemon=True)
            reader.start()
            wait_until(lambda: sum(e.type == pb.EVENT_TYPE_STEP_COMPLETED for e in events) >= 2)
            first.signal(signum)
            first.wait(30)
            seen_before_restart = len(events)
            second = ServeProcess(
                url, tmp_path / "second.log", "--shutdown-grace", "0", port=first.port
            )
            second.wait_serving()
            reader.join(90)
            assert not reader.is_alive(), "the watch did not finish"
            assert not failures, failures
            final = c.get(run.run_id)
        assert_exactly_once(events)
        assert len(events) > seen_before_restart, "events arrived after the restart"
        last = events[-1]
        assert last.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
        assert last.execution.status == pb.EXECUTION_STATUS_COMPLETED
        assert last.sequence == final.last_sequence
        assert final.status == pb.EXECUTION_STATUS_COMPLETED
        completed = [e.step_id for e in events if e.type == pb.EVENT_TYPE_STEP_COMPLETED]
        # Steps finished before the crash are not run again; each completes once.
        assert sorted(completed) == sorted(f"s{i}" for i in range(8))
    finally:
        first.kill()
        if second is not None:
            second.kill()
