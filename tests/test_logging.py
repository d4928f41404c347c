"""Logs: the correlation id reaches the caller and every log line of its call; every line the
server writes is JSON, with the trace of the call it belongs to."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from orchestrator.client import NotFound, SyncOrchestratorClient
from orchestrator.server.logs import configure_logging
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, md, sqlite_url, until
from tests.process import ORCHESTRATOR, ServeProcess


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf)
    yield buf
    configure_logging("console", "info")


async def test_correlation_id_in_metadata_and_log_lines(
    stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, log_lines: io.StringIO
) -> None:
    call = stub.Execute(
        pb.ExecuteRequest(executable_plan=echo_plan()),
        metadata=md(tenant, x_correlation_id="corr-xyz"),
    )
    response = await call
    assert dict(await call.initial_metadata())["x-correlation-id"] == "corr-xyz"
    bad = stub.GetExecution(
        pb.GetExecutionRequest(run_id="missing"), metadata=md(tenant, x_correlation_id="corr-bad")
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await bad

    def lines_of() -> list[dict[str, Any]]:
        text = log_lines.getvalue()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def logged(correlation_id: str) -> bool:
        return any(
            x.get("correlation_id") == correlation_id and x["event"] == "rpc" for x in lines_of()
        )

    # The access line is written as the handler returns, which may trail the status on the
    # wire: an aborted call's status is sent by abort() itself.
    await until(lambda: logged("corr-bad"), 10.0, "the failed call's access line")
    lines = lines_of()
    mine = [x for x in lines if x.get("correlation_id") == "corr-xyz"]
    access = [x for x in mine if x["event"] == "rpc"]
    assert len(access) == 1
    assert access[0]["method"] == "/orchestrator.v1.OrchestratorService/Execute"
    assert access[0]["code"] == "OK"
    assert access[0]["tenant_id"] == tenant
    assert access[0]["run_id"] == response.run_id
    assert isinstance(access[0]["duration_ms"], float)
    failed = [x for x in lines if x.get("correlation_id") == "corr-bad" and x["event"] == "rpc"]
    assert failed[0]["code"] == "NOT_FOUND"


async def test_a_correlation_id_is_made_when_none_is_sent(
    stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str
) -> None:
    call = stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))
    await call
    made = dict(await call.initial_metadata())["x-correlation-id"]
    assert len(made) >= 32


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace collector on loopback: keeps what is posted."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    Collector.received = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.subprocess
def test_every_line_of_a_run_is_json_with_trace_ids(tmp_path: Path, collector: str) -> None:
    """The real server at --log-level debug: its own, SQLAlchemy's, alembic's and grpc's
    lines are all JSON; lines inside a call carry its trace; spans go out over OTLP/HTTP."""
    tenant = str(uuid.uuid4())
    server = ServeProcess(
        sqlite_url(tmp_path / "o.db"),
        tmp_path / "serve.log",
        "--log-level",
        "debug",
        env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        server.wait_serving()
        with SyncOrchestratorClient(server.address, tenant) as client:
            run = client.execute(echo_plan())
            assert client.wait(run.run_id, timeout=30).status == pb.EXECUTION_STATUS_COMPLETED
            with pytest.raises(NotFound):
                client.get(str(uuid.uuid4()))
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, or this fails
    loggers = {r.get("logger", "") for r in records}
    for library in ("sqlalchemy.", "alembic.", "grpc.", "orchestrator."):
        assert any(name.startswith(library) for name in loggers), (library, loggers)
    assert all({"event", "level", "timestamp"} <= r.keys() for r in records)
    calls = [r for r in records if r["event"] == "rpc"]
    assert {c["code"] for c in calls} >= {"OK", "NOT_FOUND"}
    for call in calls:
        assert len(call["trace_id"]) == 32 and len(call["span_id"]) == 16, call
    posts = [(path, kind) for path, kind, _ in Collector.received]
    assert posts and set(posts) == {("/v1/traces", "application/x-protobuf")}
    exported = set()
    for _, _, body in Collector.received:
        for resource in ExportTraceServiceRequest.FromString(body).resource_spans:
            for scope in resource.scope_spans:
                exported |= {span.trace_id.hex() for span in scope.spans}
    assert {c["trace_id"] for c in calls} <= exported


@pytest.mark.subprocess
def test_an_otlp_protocol_not_spoken_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
    done = subprocess.run(
        [ORCHESTRATOR, "serve", "--database-url", sqlite_url(tmp_path / "o.db")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: OTEL_EXPORTER_OTLP_PROTOCOL='http/json': must be one of grpc, http/protobuf"
    ]
