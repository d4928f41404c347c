"""Tracing and metrics: RPC spans with step spans in the caller's trace; /metrics moves."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.server.app import Server
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import md, plan_of, running
from tests.process import free_port


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(settings: Settings, spans: InMemorySpanExporter) -> AsyncIterator[Server]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    settings.metrics_port = free_port()
    async with running(settings, tracer_provider=provider) as srv:
        yield srv


async def test_step_spans_join_the_callers_trace(
    traced: Server, spans: InMemorySpanExporter
) -> None:
    provider = TracerProvider()  # the caller's own tracer
    client_tracer = provider.get_tracer("test-client")
    tenant = str(uuid.uuid4())
    plan = plan_of(
        {"stepId": "first", "tool": "core.echo", "parameters": {"a": 1}},
        {
            "stepId": "second",
            "tool": "core.fail",
            "parameters": {"fail_times": 1},
            "retryPolicy": {"maxAttempts": 2, "initialDelay": "0.01s"},
        },
    )
    with client_tracer.start_as_current_span("caller") as caller:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        async with grpc.aio.insecure_channel(traced.address) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)
            response = await stub.Execute(
                pb.ExecuteRequest(executable_plan=plan, async_execution=False),
                metadata=(*md(tenant), ("traceparent", carrier["traceparent"])),
            )
    assert response.execution.status == pb.EXECUTION_STATUS_COMPLETED
    trace_id = caller.get_span_context().trace_id
    finished = spans.get_finished_spans()
    rpc = [s for s in finished if s.name == "/orchestrator.v1.OrchestratorService/Execute"]
    assert len(rpc) == 1
    assert rpc[0].context.trace_id == trace_id
    assert rpc[0].parent is not None and rpc[0].parent.span_id == caller.get_span_context().span_id
    steps = [s for s in finished if s.name.startswith("step ")]
    assert sorted(str((s.attributes or {})["orchestrator.step_id"]) for s in steps) == [
        "first",
        "second",
        "second",
    ]
    for span in steps:
        attributes = span.attributes or {}
        assert span.context.trace_id == trace_id, "a step's span joins the caller's trace"
        assert span.parent is not None and span.parent.span_id == rpc[0].context.span_id
        assert attributes["orchestrator.run_id"] == response.run_id
        assert attributes["orchestrator.tool"] in ("core.echo", "core.fail")
    attempts = sorted(
        (str((s.attributes or {})["orchestrator.attempt"]), s.status.status_code)
        for s in steps
        if (s.attributes or {})["orchestrator.step_id"] == "second"
    )
    assert attempts == [("1", trace.StatusCode.ERROR), ("2", trace.StatusCode.UNSET)]


async def test_metrics_move_after_a_run(traced: Server) -> None:
    tenant = str(uuid.uuid4())
    url = f"http://127.0.0.1:{traced.settings.metrics_port}/metrics"
    async with grpc.aio.insecure_channel(traced.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        await stub.Execute(
            pb.ExecuteRequest(
                executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}), async_execution=False
            ),
            metadata=md(tenant),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetExecution(pb.GetExecutionRequest(run_id="nope"), metadata=md(tenant))
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text

    def value(sample: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(sample + " "))
        return float(line.rsplit(" ", 1)[1])

    execute = 'method="/orchestrator.v1.OrchestratorService/Execute"'
    assert value(f'orchestrator_rpcs_total{{code="OK",{execute}}}') == 1
    assert (
        value(
            'orchestrator_rpcs_total{code="NOT_FOUND",'
            'method="/orchestrator.v1.OrchestratorService/GetExecution"}'
        )
        == 1
    )
    assert value(f"orchestrator_rpc_duration_seconds_count{{{execute}}}") == 1
    assert value('orchestrator_run_transitions_total{status="COMPLETED"}') == 1
    assert value('orchestrator_run_transitions_total{status="PENDING"}') == 1
    assert value('orchestrator_step_duration_seconds_count{tool="core.echo"}') == 1
    assert value("orchestrator_runs_in_flight") == 0
    assert value("orchestrator_watchers") == 0
    assert "orchestrator_lease_takeovers_total" in text
