"""The correlation id reaches the caller and every log line of its call."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import grpc
import pytest

from orchestrator.server.logs import configure_logging
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, md


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
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines() if line.strip()]
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
