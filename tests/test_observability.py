"""Tracing and metrics: RPC spans with step spans in the caller's trace; /metrics moves."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from orchestrator.server.app import Server
from orchestrator.server.metrics import Metrics
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import md, plan_of, running
from tests.process import free_port

ROOT = Path(__file__).resolve().parent.parent


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
        run_id = (
            (await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant)))
            .executions[0]
            .run_id
        )
        watched = stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
        sent = len([event async for event in watched])
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetExecution(pb.GetExecutionRequest(run_id="nope"), metadata=md(tenant))
    async with httpx.AsyncClient() as client:
        text = (await client.get(url)).text

    def value(sample: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(sample + " "))
        return float(line.rsplit(" ", 1)[1])

    service = 'grpc_service="orchestrator.v1.OrchestratorService"'
    execute = f'grpc_method="Execute",{service},grpc_type="unary"'
    assert value(f"grpc_server_started_total{{{execute}}}") == 1
    assert value(f'grpc_server_handled_total{{grpc_code="OK",{execute}}}') == 1
    assert value(f"grpc_server_msg_received_total{{{execute}}}") == 1
    assert value(f"grpc_server_msg_sent_total{{{execute}}}") == 1
    get = f'grpc_code="NOT_FOUND",grpc_method="GetExecution",{service},grpc_type="unary"'
    assert value(f"grpc_server_handled_total{{{get}}}") == 1
    assert value(f"grpc_server_handling_seconds_count{{{execute}}}") == 1
    watch = f'grpc_method="WatchExecution",{service},grpc_type="server_stream"'
    assert value(f"grpc_server_msg_sent_total{{{watch}}}") == sent
    assert value(f'grpc_server_handled_total{{grpc_code="OK",{watch}}}') == 1
    assert value(f"grpc_server_stream_handling_seconds_count{{{watch}}}") == 1
    assert f"grpc_server_handling_seconds_count{{{watch}}}" not in text
    assert value("process_cpu_seconds_total") > 0
    assert value("process_resident_memory_bytes") > 0
    assert "python_gc_collections_total" in text and "python_info" in text
    # The store's writer: every commit timed and sized; nothing waiting now; the store is up.
    commits = value("orchestrator_store_commit_seconds_count")
    # Execute, then the instant step and the end of the run in one write (at least).
    assert commits >= 2
    assert value("orchestrator_store_commit_units_count") == commits
    assert value("orchestrator_store_commit_units_sum") >= commits
    assert value("orchestrator_store_writer_queue_depth") == 0
    assert value("orchestrator_store_up") == 1
    assert value("orchestrator_steps_in_flight") == 0
    assert value('orchestrator_run_transitions_total{status="COMPLETED"}') == 1
    assert value('orchestrator_run_transitions_total{status="PENDING"}') == 1
    assert value('orchestrator_step_duration_seconds_count{tool="core.echo"}') == 1
    assert value("orchestrator_runs_in_flight") == 0
    assert value("orchestrator_watchers") == 0
    assert "orchestrator_lease_takeovers_total" in text


def test_the_dashboard_reads_only_series_the_server_exports() -> None:
    dashboard = json.loads((ROOT / "dashboards" / "orchestrator.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {
        re.sub(r"_(bucket|count|sum|total)$", "", name)
        for expr in exprs
        for name in re.findall(r"\b((?:grpc_server|orchestrator|process|python)_[a-z_]+)", expr)
    }
    exported = {family.name for family in Metrics().registry.collect()}
    assert queried <= exported, queried - exported
    # The panels cover the gRPC server, the engine, the store and the process.
    assert {"grpc_server_handled", "orchestrator_store_commit_seconds"} <= queried
    assert {"orchestrator_steps_in_flight", "process_cpu_seconds"} <= queried
