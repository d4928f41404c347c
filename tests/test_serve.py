"""The real `orchestrator serve`: starts from nothing, drains on SIGTERM, exits 0."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import echo_plan, plan_of, sqlite_url
from tests.process import ServeProcess

pytestmark = pytest.mark.subprocess


def test_sigterm_drains_in_flight_calls_and_exits_zero(tmp_path: Path) -> None:
    server = ServeProcess(
        sqlite_url(tmp_path / "o.db"), tmp_path / "serve.log", "--shutdown-grace", "5"
    )
    try:
        server.wait_serving()
        metadata = (("x-tenant-id", str(uuid.uuid4())),)
        with grpc.insecure_channel(server.address) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)
            waiting = plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 60}})
            run = stub.Execute(pb.ExecuteRequest(executable_plan=waiting), metadata=metadata)
            stream = stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=run.run_id), metadata=metadata
            )
            first = next(stream)
            assert first.event.type == pb.EVENT_TYPE_SNAPSHOT
            ended: list[grpc.StatusCode] = []

            def drain() -> None:
                try:
                    for _ in stream:
                        pass
                    ended.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    ended.append(err.code())

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.wait(30)
            elapsed = time.monotonic() - started
            reader.join(10)
        assert code == 0
        # A stream still open at the grace deadline is ended UNAVAILABLE: the client reconnects.
        assert ended == [grpc.StatusCode.UNAVAILABLE]
        # The step in flight and the open watch held the drain until the grace period ran out.
        assert 4 <= elapsed < 20
        log = server.log_path.read_text()
        assert "server.draining" in log and "server.stopped" in log
    finally:
        server.kill()


def test_restart_on_the_same_store_keeps_runs(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "o.db")
    metadata = (("x-tenant-id", str(uuid.uuid4())),)
    first = ServeProcess(url, tmp_path / "a.log")
    try:
        first.wait_serving()
        with grpc.insecure_channel(first.address) as ch:
            run = pb_grpc.OrchestratorServiceStub(ch).Execute(
                pb.ExecuteRequest(executable_plan=echo_plan(), dry_run=True), metadata=metadata
            )
        first.signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        first.kill()
    second = ServeProcess(url, tmp_path / "b.log")
    try:
        second.wait_serving()
        with grpc.insecure_channel(second.address) as ch:
            got = pb_grpc.OrchestratorServiceStub(ch).GetExecution(
                pb.GetExecutionRequest(run_id=run.run_id), metadata=metadata
            )
        assert got.execution.status == pb.EXECUTION_STATUS_COMPLETED
    finally:
        second.kill()
