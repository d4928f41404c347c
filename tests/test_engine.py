"""Plans really run: the engine through the gRPC API, on a real server and SQLite file."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from orchestrator.client import TERMINAL
from orchestrator.server.app import Server
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import load_plan, make_settings, md, plan_of
from tests.errors import details_of

if TYPE_CHECKING:
    Stub = pb_grpc.OrchestratorServiceAsyncStub

S = pb.StepStatus


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The engine tests call a local HTTP server on 127.0.0.1, so loopback is allowed."""
    return make_settings(tmp_path, database_url, http_allow="127.0.0.1/32")


async def run_sync(stub: Stub, tenant: str, plan: pb.ExecutablePlan, **fields: Any) -> pb.Execution:
    """Execute with async_execution=false: the final snapshot."""
    request = pb.ExecuteRequest(executable_plan=plan, async_execution=False)
    for key, value in fields.items():
        if key in ("parameters", "variables"):
            getattr(request, key).update(dict(value))
        elif key == "timeout":
            request.timeout.FromNanoseconds(int(value * 1e9))
        else:
            setattr(request, key, value)
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant), timeout=60)
    assert response.execution.status in TERMINAL, response.execution
    return response.execution


async def start(stub: Stub, tenant: str, plan: pb.ExecutablePlan, **fields: Any) -> str:
    request = pb.ExecuteRequest(executable_plan=plan, **fields)
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant))
    return response.run_id


async def until(
    stub: Stub, tenant: str, run_id: str, check: Callable[[pb.Execution], bool], limit: float = 15.0
) -> pb.Execution:
    """The run's snapshot once `check` holds (watching its events, not polling)."""

    async def watch() -> pb.Execution:
        async for item in stub.WatchExecution(
            pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant)
        ):
            if item.event.type == pb.EVENT_TYPE_HEARTBEAT:
                continue
            got = await stub.GetExecution(
                pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
            )
            if check(got.execution):
                return got.execution
        got = await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
        assert check(got.execution), got.execution
        return got.execution

    return await asyncio.wait_for(watch(), limit)


def steps(execution: pb.Execution) -> dict[str, pb.StepExecution]:
    return {s.step_id: s for s in execution.steps}


def output(step: pb.StepExecution) -> Any:
    return json_format.MessageToDict(step.output)


def seconds(ts: timestamp_pb2.Timestamp) -> float:
    return float(ts.ToNanoseconds()) / 1e9


def wait_step(step_id: str, secs: float, **extra: Any) -> dict[str, Any]:
    return {"stepId": step_id, "tool": "core.wait", "parameters": {"seconds": secs}, **extra}


def echo(step_id: str, params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "stepId": step_id,
        "tool": "core.echo",
        "parameters": params or {"id": step_id},
        **extra,
    }


# ---------------------------------------------------------------- example plans


async def test_sequential_example_runs_in_order_with_templates(stub: Stub, tenant: str) -> None:
    execution = await run_sync(
        stub, tenant, load_plan("sequential.json"), parameters={"name": "ada"}
    )
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    st = steps(execution)
    assert output(st["greet"]) == {"message": "hello ada"}
    assert output(st["report"]) == {"greeting": "hello ada", "length": 9}
    assert execution.progress == 1.0
    assert json_format.MessageToDict(execution.results)["report"]["length"] == 9
    order = ["greet", "remember", "report"]
    for before, after in itertools.pairwise(order):
        assert seconds(st[before].completed_at) <= seconds(st[after].started_at)
    assert all(s.attempts == 1 for s in execution.steps)


async def test_parallel_example_diamond(stub: Stub, tenant: str) -> None:
    execution = await run_sync(stub, tenant, load_plan("parallel.json"))
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    st = steps(execution)
    merged = output(st["merge"])
    assert merged["items"] == [1, 2, 3]
    assert merged["waited"] >= 0.4
    # left and right overlapped; merge started after both.
    assert seconds(st["left"].started_at) < seconds(st["right"].completed_at)
    assert seconds(st["right"].started_at) < seconds(st["left"].completed_at)
    assert seconds(st["merge"].started_at) >= max(
        seconds(st["left"].completed_at), seconds(st["right"].completed_at)
    )


async def test_approval_example_asks_then_runs(stub: Stub, tenant: str) -> None:
    m = md(tenant)
    run_id = await start(
        stub, tenant, load_plan("approval.json"), parameters=struct_of({"version": "1.2"})
    )
    waiting = await until(stub, tenant, run_id, lambda e: len(e.pending_clarifications) == 1)
    clar = waiting.pending_clarifications[0]
    assert clar.category == pb.CLARIFICATION_CATEGORY_MULTIPLE_CHOICE
    assert list(clar.options) == ["staging", "production"]
    assert steps(waiting)["choose"].status == S.STEP_STATUS_WAITING
    assert waiting.status == pb.EXECUTION_STATUS_RUNNING
    # A wrong multiple-choice answer is rejected and changes nothing.
    err = await expect_error(
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=clar.clarification_id,
                response=struct_pb2.Value(string_value="moon"),
            ),
            metadata=m,
        )
    )
    assert details_of(err).code == grpc.StatusCode.INVALID_ARGUMENT
    answered = await stub.RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=clar.clarification_id,
            responded_by="ops",
            response=struct_pb2.Value(string_value="staging"),
        ),
        metadata=m,
    )
    assert steps(answered.execution)["choose"].status == S.STEP_STATUS_COMPLETED
    assert output(steps(answered.execution)["choose"]) == "staging"
    approval = await until(
        stub,
        tenant,
        run_id,
        lambda e: any(
            c.category == pb.CLARIFICATION_CATEGORY_USER_VERIFICATION
            for c in e.pending_clarifications
        ),
    )
    gate = approval.pending_clarifications[0]
    assert gate.step_id == "deploy"
    await stub.RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=gate.clarification_id,
            response=struct_pb2.Value(bool_value=True),
        ),
        metadata=m,
    )
    done = await until(stub, tenant, run_id, lambda e: e.status in TERMINAL)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED
    assert output(steps(done)["deploy"]) == {"environment": "staging", "version": "1.2"}
    # Answered clarifications are answered once.
    err = await expect_error(
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=gate.clarification_id,
                response=struct_pb2.Value(bool_value=True),
            ),
            metadata=m,
        )
    )
    assert details_of(err).reason == "CLARIFICATION_NOT_PENDING"


async def test_rejected_approval_fails_step_and_run(stub: Stub, tenant: str) -> None:
    plan = plan_of(echo("before"), echo("guarded", requiresApproval=True), echo("after"))
    run_id = await start(stub, tenant, plan)
    waiting = await until(stub, tenant, run_id, lambda e: len(e.pending_clarifications) == 1)
    await stub.RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=waiting.pending_clarifications[0].clarification_id,
            response=struct_pb2.Value(bool_value=False),
            responded_by="boss",
        ),
        metadata=md(tenant),
    )
    done = await until(stub, tenant, run_id, lambda e: e.status in TERMINAL)
    assert done.status == pb.EXECUTION_STATUS_FAILED
    assert done.error_reason == "APPROVAL_REJECTED"
    st = steps(done)
    assert st["guarded"].status == S.STEP_STATUS_FAILED
    assert st["guarded"].error_reason == "APPROVAL_REJECTED"
    assert st["after"].status == S.STEP_STATUS_SKIPPED
    assert "guarded" in done.error_message


async def test_plan_approval_comes_before_the_first_step(stub: Stub, tenant: str) -> None:
    plan = plan_of(echo("only"))
    plan.security_context.requires_approval = True
    run_id = await start(stub, tenant, plan)
    waiting = await until(stub, tenant, run_id, lambda e: len(e.pending_clarifications) == 1)
    assert waiting.pending_clarifications[0].step_id == ""
    assert steps(waiting)["only"].status == S.STEP_STATUS_PENDING
    await stub.RespondToClarification(
        pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=waiting.pending_clarifications[0].clarification_id,
            response=struct_pb2.Value(bool_value=True),
        ),
        metadata=md(tenant),
    )
    done = await until(stub, tenant, run_id, lambda e: e.status in TERMINAL)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED


# ---------------------------------------------------------------- scheduling


async def test_parallel_steps_overlap_and_respect_max_concurrency(stub: Stub, tenant: str) -> None:
    plan = plan_of(*(wait_step(f"w{i}", 0.3) for i in range(6)), parallel=True, maxConcurrency=2)
    execution = await run_sync(stub, tenant, plan)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    intervals = [(seconds(s.started_at), seconds(s.completed_at)) for s in execution.steps]
    overlap = max(sum(1 for a, b in intervals if a <= t < b) for t, _ in intervals)
    assert overlap == 2


async def test_diamond_dag(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("a"),
        echo("b", dependsOn=["a"]),
        echo("c", dependsOn=["a"]),
        echo(
            "d",
            {"b": "{{ steps.b.output.id }}", "c": "{{ steps.c.output.id }}"},
            dependsOn=["b", "c"],
        ),
        parallel=True,
    )
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert output(st["d"]) == {"b": "b", "c": "c"}
    for child in ("b", "c"):
        assert seconds(st[child].started_at) >= seconds(st["a"].completed_at)
        assert seconds(st["d"].started_at) >= seconds(st[child].completed_at)


async def test_cross_flow_dependency(stub: Stub, tenant: str) -> None:
    plan = json_format.ParseDict(
        {
            "flows": [
                {"flowId": "one", "steps": [wait_step("slow", 0.3)]},
                {
                    "flowId": "two",
                    "parallelExecution": True,
                    "steps": [
                        echo("fast"),
                        echo(
                            "needs_slow",
                            {"waited": "{{ steps.slow.output.waited_seconds }}"},
                            dependsOn=["slow"],
                        ),
                    ],
                },
            ],
            "securityContext": {"allowedTools": ["core.echo", "core.wait"]},
        },
        pb.ExecutablePlan(),
    )
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert seconds(st["needs_slow"].started_at) >= seconds(st["slow"].completed_at)
    assert seconds(st["fast"].completed_at) < seconds(st["slow"].completed_at)
    assert output(st["needs_slow"])["waited"] >= 0.3


async def test_skip_cascade(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("check", {"ok": False}),
        echo("a", conditions=["steps.check.output.ok == true"], dependsOn=["check"]),
        echo("b", dependsOn=["a"]),
        echo("c", dependsOn=["b"]),
        echo("other", conditions=["steps.check.output.ok == false"], dependsOn=["check"]),
        parallel=True,
    )
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert st["a"].status == S.STEP_STATUS_SKIPPED
    assert st["a"].error_reason == "CONDITION_FALSE"
    assert [st[x].status for x in ("b", "c")] == [S.STEP_STATUS_SKIPPED] * 2
    assert st["c"].error_reason == "DEPENDENCY_NOT_COMPLETED"
    assert st["other"].status == S.STEP_STATUS_COMPLETED
    assert execution.progress == 1.0


async def test_template_keeps_the_type_of_one_steps_output(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("source", {"count": 3, "tags": ["x", "y"], "nested": {"ok": True}}),
        echo(
            "sink",
            {
                "count": "{{ steps.source.output.count }}",
                "tags": "{{ steps.source.output.tags }}",
                "nested": "{{ steps.source.output.nested }}",
                "text": "n={{ steps.source.output.count }}",
                "next": "{{ steps.source.output.count + 1 }}",
            },
        ),
    )
    execution = await run_sync(stub, tenant, plan)
    sink = steps(execution)["sink"].output.struct_value
    assert sink["count"] == 3 and isinstance(sink["count"], float)
    assert list(cast(struct_pb2.ListValue, sink["tags"])) == ["x", "y"]
    assert cast(struct_pb2.Struct, sink["nested"])["ok"] is True
    assert sink["text"] == "n=3"
    assert sink["next"] == 4


async def test_core_set_makes_variables(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        {"stepId": "set", "tool": "core.set", "parameters": {"region": "eu", "n": 2}},
        echo(
            "use", {"where": "{{ vars.region }}", "n": "{{ vars.n }}", "given": "{{ vars.given }}"}
        ),
    )
    request_vars = {"given": "yes"}
    execution = await run_sync(stub, tenant, plan, variables=struct_of(request_vars))
    assert output(steps(execution)["use"]) == {"where": "eu", "n": 2, "given": "yes"}


# ---------------------------------------------------------------- failures


def retrying(step: dict[str, Any], attempts: int) -> dict[str, Any]:
    return {
        **step,
        "retryPolicy": {"maxAttempts": attempts, "initialDelay": "0.01s", "maxDelay": "0.05s"},
    }


async def test_retry_then_success_on_attempt_three(stub: Stub, tenant: str) -> None:
    flaky = retrying(
        {
            "stepId": "flaky",
            "tool": "core.fail",
            "parameters": {"fail_times": 2, "message": "not yet"},
        },
        5,
    )
    execution = await run_sync(stub, tenant, plan_of(flaky))
    st = steps(execution)["flaky"]
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert st.attempts == 3
    assert output(st) == {"attempts": 3}
    events = [
        r.event
        async for r in stub.WatchExecution(
            pb.WatchExecutionRequest(run_id=execution.run_id, after_sequence=1), metadata=md(tenant)
        )
    ]
    assert [e.type for e in events].count(pb.EVENT_TYPE_STEP_RETRYING) == 2


async def test_retries_exhausted_fail_the_run_naming_the_step(stub: Stub, tenant: str) -> None:
    broken = retrying(
        {"stepId": "broken", "tool": "core.fail", "parameters": {"message": "always"}}, 3
    )
    execution = await run_sync(stub, tenant, plan_of(broken, echo("after")))
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_FAILED
    assert execution.error_reason == "STEP_FAILED"
    assert "broken" in execution.error_message and "always" in execution.error_message
    assert st["broken"].attempts == 3
    assert st["broken"].error_reason == "RETRIES_EXHAUSTED"
    assert st["after"].status == S.STEP_STATUS_SKIPPED


async def test_non_retryable_error_fails_at_once(stub: Stub, tenant: str) -> None:
    step = retrying({"stepId": "fatal", "tool": "core.fail", "parameters": {"retryable": False}}, 5)
    execution = await run_sync(stub, tenant, plan_of(step))
    assert steps(execution)["fatal"].attempts == 1
    assert execution.status == pb.EXECUTION_STATUS_FAILED


async def test_step_timeout_cancels_the_tool(stub: Stub, tenant: str) -> None:
    started = time.monotonic()
    execution = await run_sync(stub, tenant, plan_of(wait_step("slow", 30, timeout="0.2s")))
    assert time.monotonic() - started < 5
    st = steps(execution)["slow"]
    assert execution.status == pb.EXECUTION_STATUS_FAILED
    assert st.error_reason == "TIMEOUT"
    assert "timed out" in st.error


async def test_run_timeout_fails_with_deadline_exceeded(stub: Stub, tenant: str) -> None:
    started = time.monotonic()
    execution = await run_sync(stub, tenant, plan_of(wait_step("w", 30)), timeout=0.5)
    assert time.monotonic() - started < 5
    assert execution.status == pb.EXECUTION_STATUS_FAILED
    assert execution.error_reason == "DEADLINE_EXCEEDED"
    assert steps(execution)["w"].status == S.STEP_STATUS_CANCELLED


async def test_on_failure_continue_skips_dependents_and_finishes_the_rest(
    stub: Stub, tenant: str
) -> None:
    plan = plan_of(
        {"stepId": "bad", "tool": "core.fail"},
        echo("needs_bad", dependsOn=["bad"]),
        echo("independent"),
        parallel=True,
        onFailure="continue",
    )
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert st["bad"].status == S.STEP_STATUS_FAILED
    assert st["needs_bad"].status == S.STEP_STATUS_SKIPPED
    assert st["independent"].status == S.STEP_STATUS_COMPLETED
    assert "bad" in execution.error_message


async def test_rollback_steps_run_in_order_when_the_flow_fails(stub: Stub, tenant: str) -> None:
    plan = plan_of(
        echo("provision"),
        {"stepId": "configure", "tool": "core.fail", "parameters": {"message": "bad config"}},
        echo("undo_configure"),
        wait_step("undo_provision", 0.05),
        echo("never"),
        rollbackSteps=["undo_configure", "undo_provision"],
    )
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)
    assert execution.status == pb.EXECUTION_STATUS_FAILED
    assert st["undo_configure"].status == S.STEP_STATUS_COMPLETED
    assert st["undo_provision"].status == S.STEP_STATUS_COMPLETED
    assert seconds(st["undo_provision"].started_at) >= seconds(st["undo_configure"].completed_at)
    assert seconds(st["undo_configure"].started_at) >= seconds(st["configure"].completed_at)
    assert st["never"].status == S.STEP_STATUS_SKIPPED


async def test_rollback_steps_do_not_run_when_nothing_fails(stub: Stub, tenant: str) -> None:
    plan = plan_of(echo("a"), echo("undo_a"), rollbackSteps=["undo_a"])
    execution = await run_sync(stub, tenant, plan)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert steps(execution)["undo_a"].status == S.STEP_STATUS_SKIPPED


# ---------------------------------------------------------------- http.request


class Recorder(BaseHTTPRequestHandler):
    """A local endpoint: answers 503 to the first `fail` calls, then 200 with JSON."""

    calls: list[dict[str, Any]]
    fail: int

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.calls.append({"headers": dict(self.headers), "body": body, "path": self.path})
        if len(self.calls) <= self.fail:
            self.send_response(503)
            self.end_headers()
            return
        payload = json.dumps({"received": json.loads(body or b"null"), "n": len(self.calls)})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_endpoint() -> Iterator[tuple[str, type[Recorder]]]:
    handler = type("Handler", (Recorder,), {"calls": [], "fail": 1})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_http_request_retries_503_and_sends_idempotency_key(
    stub: Stub, tenant: str, http_endpoint: tuple[str, type[Recorder]]
) -> None:
    url, handler = http_endpoint
    step = retrying(
        {
            "stepId": "call",
            "tool": "http.request",
            "parameters": {
                "method": "POST",
                "url": url,
                "json": {"hello": "{{ params.who }}"},
                "timeout_seconds": 5,
            },
        },
        3,
    )
    plan = plan_of(step)
    plan.security_context.allowed_tools.append("http.request")
    plan.security_context.required_capabilities.append("network.http")
    execution = await run_sync(stub, tenant, plan, parameters={"who": "world"})
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED, execution.error_message
    st = steps(execution)["call"]
    assert st.attempts == 2
    result = output(st)
    assert result["status"] == 200
    assert result["json"] == {"received": {"hello": "world"}, "n": 2}
    keys = {c["headers"]["Idempotency-Key"] for c in handler.calls}
    assert keys == {f"{execution.run_id}/call"}, "the same key on every attempt"


async def test_http_request_4xx_is_not_retried(
    stub: Stub, tenant: str, http_endpoint: tuple[str, type[Recorder]]
) -> None:
    url, handler = http_endpoint
    handler.fail = 0
    step = retrying(
        {
            "stepId": "call",
            "tool": "http.request",
            "parameters": {"method": "POST", "url": url, "json": {}, "expected_status": 201},
        },
        3,
    )
    plan = plan_of(step)
    plan.security_context.allowed_tools.append("http.request")
    plan.security_context.required_capabilities.append("network.http")
    execution = await run_sync(stub, tenant, plan)
    st = steps(execution)["call"]
    assert execution.status == pb.EXECUTION_STATUS_FAILED
    assert st.attempts == 1 and "200" in st.error


# ---------------------------------------------------------------- control


async def test_pause_lets_the_step_in_flight_finish_and_starts_no_new_one(
    stub: Stub, tenant: str
) -> None:
    m = md(tenant)
    run_id = await start(stub, tenant, plan_of(wait_step("first", 0.5), echo("second")))
    await until(stub, tenant, run_id, lambda e: steps(e)["first"].status == S.STEP_STATUS_RUNNING)
    paused = await stub.Pause(pb.PauseRequest(run_id=run_id), metadata=m)
    assert paused.status == pb.EXECUTION_STATUS_PAUSED
    held = await until(
        stub, tenant, run_id, lambda e: steps(e)["first"].status == S.STEP_STATUS_COMPLETED
    )
    await asyncio.sleep(0.5)
    held = (await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=m)).execution
    assert held.status == pb.EXECUTION_STATUS_PAUSED
    assert steps(held)["second"].status == S.STEP_STATUS_PENDING
    await stub.Resume(pb.ResumeRequest(run_id=run_id), metadata=m)
    done = await until(stub, tenant, run_id, lambda e: e.status in TERMINAL)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED
    st = steps(done)
    assert seconds(st["second"].started_at) > seconds(st["first"].completed_at) + 0.4


async def test_cancel_during_a_long_wait_is_immediate(
    stub: Stub, tenant: str, server: Server
) -> None:
    run_id = await start(stub, tenant, plan_of(wait_step("long", 60), echo("after")))
    await until(stub, tenant, run_id, lambda e: steps(e)["long"].status == S.STEP_STATUS_RUNNING)
    started = time.monotonic()
    cancelled = await stub.Cancel(
        pb.CancelRequest(run_id=run_id, reason="enough"), metadata=md(tenant)
    )
    assert cancelled.status == pb.EXECUTION_STATUS_CANCELLED
    # The tool call itself is gone, not just the status. The engine offers no event for a run's
    # task ending (its public `runs` map is the signal), so poll it, bounded so it cannot hang.
    async with asyncio.timeout(5):
        while run_id in server.engine.runs:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    assert elapsed < 1.0
    got = (
        await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
    ).execution
    assert got.status == pb.EXECUTION_STATUS_CANCELLED
    assert steps(got)["long"].status == S.STEP_STATUS_CANCELLED
    assert steps(got)["after"].status == S.STEP_STATUS_CANCELLED


async def test_cancel_withdraws_pending_clarifications(stub: Stub, tenant: str) -> None:
    run_id = await start(
        stub, tenant, load_plan("approval.json"), parameters=struct_of({"version": "1.2"})
    )
    await until(stub, tenant, run_id, lambda e: len(e.pending_clarifications) == 1)
    await stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(tenant))
    got = (
        await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
    ).execution
    assert list(got.pending_clarifications) == []
    assert got.status == pb.EXECUTION_STATUS_CANCELLED


async def test_async_execution_false_returns_the_final_snapshot(stub: Stub, tenant: str) -> None:
    response = await stub.Execute(
        pb.ExecuteRequest(
            executable_plan=plan_of(wait_step("w", 0.2), echo("e")), async_execution=False
        ),
        metadata=md(tenant),
    )
    assert response.status == pb.EXECUTION_STATUS_COMPLETED
    assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert response.execution.HasField("completed_at")


async def test_async_execution_false_is_bounded_by_the_call_deadline(
    stub: Stub, tenant: str
) -> None:
    started = time.monotonic()
    response = await stub.Execute(
        pb.ExecuteRequest(executable_plan=plan_of(wait_step("w", 30)), async_execution=False),
        metadata=md(tenant),
        timeout=1.5,
    )
    assert time.monotonic() - started < 1.5
    assert response.execution.status == pb.EXECUTION_STATUS_RUNNING


# ---------------------------------------------------------------- scale


async def test_two_hundred_steps_in_twenty_parallel_flows(stub: Stub, tenant: str) -> None:
    flows = []
    for f in range(20):
        flow_steps = [echo(f"f{f}s0")]
        flow_steps += [echo(f"f{f}s{i}", dependsOn=[f"f{f}s{i - 1}"]) for i in range(1, 10)]
        flows.append({"flowId": f"flow{f}", "parallelExecution": f % 2 == 0, "steps": flow_steps})
    plan = json_format.ParseDict(
        {"flows": flows, "securityContext": {"allowedTools": ["core.echo"]}}, pb.ExecutablePlan()
    )
    execution = await run_sync(stub, tenant, plan)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert len(execution.steps) == 200
    assert all(s.status == S.STEP_STATUS_COMPLETED for s in execution.steps)


async def test_five_hundred_concurrent_runs_all_complete(stub: Stub, tenant: str) -> None:
    plan = plan_of(echo("a"), echo("b", {"from": "{{ steps.a.output.id }}"}), echo("c"))

    async def submit() -> str:
        # 500 at once is past the tenant's Execute burst (400): retry as a client would.
        while True:
            try:
                return await start(stub, tenant, plan)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                await asyncio.sleep(0.05)

    run_ids = await asyncio.gather(*(submit() for _ in range(500)))
    assert len(set(run_ids)) == 500
    deadline = time.monotonic() + 120
    while True:
        done = 0
        token = ""
        while True:
            page = await stub.ListExecutions(
                pb.ListExecutionsRequest(
                    page_size=500,
                    page_token=token,
                    filter=pb.ExecutionFilter(statuses=[pb.EXECUTION_STATUS_COMPLETED]),
                ),
                metadata=md(tenant),
            )
            done += len(page.executions)
            token = page.next_page_token
            if not token:
                break
        if done == 500 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert done == 500
    sample = (
        await stub.GetExecution(pb.GetExecutionRequest(run_id=run_ids[-1]), metadata=md(tenant))
    ).execution
    assert output(steps(sample)["b"]) == {"from": "a"}


# ---------------------------------------------------------------- third-party tools


async def test_entry_point_tool_runs_in_a_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """A distribution on sys.path that declares an `orchestrator.tools` entry point."""
    (tmp_path / "shout_tool.py").write_text(
        "from orchestrator.server.tools import Tool\n"
        "async def shout(ctx, params):\n"
        "    return {'text': str(params.get('text', '')).upper(), 'step': ctx.step_id}\n"
        "def make():\n"
        "    return Tool('test.shout', shout, capabilities=frozenset({'text.transform'}))\n"
    )
    dist = tmp_path / "shout_tool-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-tool\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[orchestrator.tools]\nshout = shout_tool:make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from orchestrator.server.app import build_server

    srv = await build_server(settings)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(srv.address) as ch:
            plan = plan_of(
                {"stepId": "loud", "tool": "test.shout", "parameters": {"text": "hello"}}
            )
            plan.security_context.allowed_tools.append("test.shout")
            plan.security_context.required_capabilities.append("text.transform")
            execution = await run_sync(
                pb_grpc.OrchestratorServiceStub(ch), "0" * 8 + "-0000-4000-8000-" + "0" * 12, plan
            )
    finally:
        await srv.stop(grace=0.2)
        sys.modules.pop("shout_tool", None)
    assert execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert output(steps(execution)["loud"]) == {"text": "HELLO", "step": "loud"}


# ---------------------------------------------------------------- helpers


def struct_of(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


async def expect_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value
