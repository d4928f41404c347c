"""Let no one in where they don't belong (issue 7): API keys, TLS, tenant policy, limits,
outbound safety and secrets, through the gRPC API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.client import TERMINAL
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.errors import details_of
from tests.pki import make_pki
from tests.process import ServeProcess


async def finished(stub: Any, tenant: str, run_id: str, *extra: tuple[str, str]) -> pb.Execution:
    for _ in range(400):
        got = (
            await stub.GetExecution(
                pb.GetExecutionRequest(run_id=run_id), metadata=(*md(tenant), *extra)
            )
        ).execution
        if got.status in TERMINAL:
            return got  # type: ignore[no-any-return]
        await asyncio.sleep(0.025)
    raise AssertionError("the run did not finish")


async def expect(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return details_of(info.value)


# ---------------------------------------------------------------- API keys


def key_file(path: Path, keys: dict[str, list[str]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        "name": f"key-{i}",
                        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
                        "tenants": tenants,
                    }
                    for i, (secret, tenants) in enumerate(keys.items())
                ]
            }
        )
    )
    return path


async def test_api_keys_bound_to_tenants(tmp_path: Path, database_url: str) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    keys = key_file(tmp_path / "keys.json", {"alice-key": [alice], "ops-key": [alice, bob]})
    settings = make_settings(tmp_path, database_url, auth_keys=str(keys))
    log = tmp_path / "log.jsonl"
    from orchestrator.server.logs import configure_logging

    with log.open("w") as out:
        configure_logging("json", "info", stream=out)
        try:
            async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
                stub = pb_grpc.OrchestratorServiceStub(ch)
                request = pb.ExecuteRequest(
                    executable_plan=plan_of({"stepId": "a", "tool": "core.echo"})
                )
                for metadata in (
                    (),
                    (("authorization", "Bearer wrong"),),
                    (("authorization", "alice-key"),),
                ):
                    d = await expect(stub.Execute(request, metadata=(*md(alice), *metadata)))
                    assert (d.code, d.reason) == (
                        grpc.StatusCode.UNAUTHENTICATED,
                        "API_KEY_INVALID",
                    )
                d = await expect(
                    stub.Execute(
                        request, metadata=(*md(bob), ("authorization", "Bearer alice-key"))
                    )
                )
                assert (d.code, d.reason) == (
                    grpc.StatusCode.PERMISSION_DENIED,
                    "TENANT_NOT_ALLOWED",
                )
                ok = await stub.Execute(
                    request, metadata=(*md(alice), ("authorization", "Bearer alice-key"))
                )
                assert ok.success
                ops = await stub.ListExecutions(
                    pb.ListExecutionsRequest(),
                    metadata=(*md(bob), ("authorization", "Bearer ops-key")),
                )
                assert list(ops.executions) == []
                # Health and reflection stay open.
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                # The key file is re-read (SIGHUP calls this): a revoked key stops working.
                key_file(keys, {"ops-key": [bob]})
                srv.reload()
                d = await expect(
                    stub.GetExecution(
                        pb.GetExecutionRequest(run_id=ok.run_id),
                        metadata=(*md(alice), ("authorization", "Bearer alice-key")),
                    )
                )
                assert d.reason == "API_KEY_INVALID"
        finally:
            configure_logging("console", "info")
    text = log.read_text()
    assert "key-0" in text, "the key's name is logged"
    assert "alice-key" not in text and "ops-key" not in text, "keys are never logged"


@pytest.mark.subprocess
def test_sighup_reloads_keys_in_the_real_server(tmp_path: Path) -> None:
    tenant = str(uuid.uuid4())
    keys = key_file(tmp_path / "keys.json", {"old": [tenant]})
    proc = ServeProcess(
        f"sqlite+aiosqlite:///{tmp_path / 'o.db'}",
        tmp_path / "serve.log",
        env={"ORCHESTRATOR_AUTH_KEYS": str(keys)},
    )
    try:
        proc.wait_serving()
        with grpc.insecure_channel(proc.address) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)

            def listing(key: str) -> grpc.StatusCode:
                try:
                    stub.ListExecutions(
                        pb.ListExecutionsRequest(),
                        metadata=(("x-tenant-id", tenant), ("authorization", f"Bearer {key}")),
                    )
                    return grpc.StatusCode.OK
                except grpc.RpcError as err:
                    return err.code()

            assert listing("old") == grpc.StatusCode.OK
            assert listing("new") == grpc.StatusCode.UNAUTHENTICATED
            key_file(keys, {"new": [tenant]})
            proc.signal(signal.SIGHUP)
            for _ in range(100):
                if listing("new") == grpc.StatusCode.OK:
                    break
                import time

                time.sleep(0.05)
            assert listing("new") == grpc.StatusCode.OK
            assert listing("old") == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.kill()


# ---------------------------------------------------------------- TLS and mTLS


async def test_tls_and_mutual_tls(tmp_path: Path, database_url: str) -> None:
    pki = make_pki(tmp_path)
    tenant = str(uuid.uuid4())
    settings = make_settings(
        tmp_path,
        database_url,
        tls_cert=str(pki["server.pem"]),
        tls_key=str(pki["server.key"]),
        tls_client_ca=str(pki["ca.pem"]),
    )
    async with running(settings) as srv:
        client = grpc.ssl_channel_credentials(
            root_certificates=pki["ca.pem"].read_bytes(),
            private_key=pki["client.key"].read_bytes(),
            certificate_chain=pki["client.pem"].read_bytes(),
        )
        async with grpc.aio.secure_channel(srv.address, client) as ch:
            page = await pb_grpc.OrchestratorServiceStub(ch).ListExecutions(
                pb.ListExecutionsRequest(), metadata=md(tenant)
            )
            assert list(page.executions) == []
        no_client_cert = grpc.ssl_channel_credentials(root_certificates=pki["ca.pem"].read_bytes())
        for channel in (
            grpc.aio.secure_channel(srv.address, no_client_cert),
            grpc.aio.insecure_channel(srv.address),
        ):
            async with channel as ch:
                d = await expect(
                    pb_grpc.OrchestratorServiceStub(ch).ListExecutions(
                        pb.ListExecutionsRequest(), metadata=md(tenant), timeout=3
                    )
                )
                assert d.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# ---------------------------------------------------------------- tenant policy


class Recorder(BaseHTTPRequestHandler):
    """A local endpoint that records what it was sent."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    import threading

    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def http_plan(url: str, *before: dict[str, Any]) -> pb.ExecutablePlan:
    plan = plan_of(
        *before,
        {
            "stepId": "call",
            "tool": "http.request",
            "parameters": {"url": url, "timeout_seconds": 5},
        },
    )
    plan.security_context.allowed_tools.append("http.request")
    plan.security_context.required_capabilities.append("network.http")
    return plan


async def test_tenant_policy_at_submit_and_before_each_call(
    tmp_path: Path, database_url: str, endpoint: str
) -> None:
    trusted, other = str(uuid.uuid4()), str(uuid.uuid4())
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"tenants": {trusted: {"capabilities": ["network.http"]}}}))
    settings = make_settings(
        tmp_path, database_url, tenant_policy=str(policy), http_allow="127.0.0.1/32"
    )
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        plan = http_plan(endpoint + "/x")
        d = await expect(stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(other)))
        assert (d.code, d.reason) == (grpc.StatusCode.PERMISSION_DENIED, "CAPABILITY_DENIED")
        assert any("network.http" in desc for _, desc in d.violations)
        # Turning capability validation off does not get round the tenant policy.
        d = await expect(
            stub.Execute(
                pb.ExecuteRequest(executable_plan=plan, validate_capabilities=False),
                metadata=md(other),
            )
        )
        assert d.reason == "CAPABILITY_DENIED"
        done = await finished(
            stub,
            trusted,
            (
                await stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(trusted))
            ).run_id,
        )
        assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
        # A grant withdrawn while a run waits is enforced before its next call.
        gated = http_plan(
            endpoint + "/y",
            {"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "go?"}},
        )
        run_id = (
            await stub.Execute(pb.ExecuteRequest(executable_plan=gated), metadata=md(trusted))
        ).run_id
        for _ in range(200):
            waiting = (
                await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(trusted))
            ).execution
            if waiting.pending_clarifications:
                break
            await asyncio.sleep(0.025)
        policy.write_text(json.dumps({"tenants": {trusted: {"capabilities": []}}}))
        srv.reload()
        await stub.RespondToClarification(
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=waiting.pending_clarifications[0].clarification_id,
                response=struct_pb2.Value(string_value="yes"),
            ),
            metadata=md(trusted),
        )
        done = await finished(stub, trusted, run_id)
        call = next(s for s in done.steps if s.step_id == "call")
        assert call.status == pb.STEP_STATUS_FAILED
        assert call.error_reason == "CAPABILITY_DENIED"
        assert len(Recorder.seen) == 1, "the withdrawn grant stopped the call"


# ---------------------------------------------------------------- limits


async def test_plan_limits(tmp_path: Path, database_url: str) -> None:
    tenant = str(uuid.uuid4())
    settings = make_settings(
        tmp_path,
        database_url,
        max_steps_per_plan=10,
        max_struct_depth=5,
        max_request_bytes=64 * 1024,
    )
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        many = plan_of(*({"stepId": f"s{i}", "tool": "core.echo"} for i in range(11)))
        d = await expect(stub.Execute(pb.ExecuteRequest(executable_plan=many), metadata=md(tenant)))
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT
        assert d.violations[0][0] == "executable_plan.flows"
        nested: dict[str, Any] = {"leaf": 1}
        for _ in range(6):
            nested = {"deeper": nested}
        deep = plan_of({"stepId": "a", "tool": "core.echo", "parameters": nested})
        d = await expect(stub.Execute(pb.ExecuteRequest(executable_plan=deep), metadata=md(tenant)))
        assert d.violations == [
            ("executable_plan.flows[0].steps[0].parameters", "nested deeper than 5 levels")
        ]
        big = plan_of({"stepId": "a", "tool": "core.echo", "parameters": {"x": "y" * 70_000}})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Execute(pb.ExecuteRequest(executable_plan=big), metadata=md(tenant))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        listed = await stub.ListExecutions(pb.ListExecutionsRequest(), metadata=md(tenant))
        assert list(listed.executions) == []


async def test_template_output_and_cel_cost_limits(tmp_path: Path, database_url: str) -> None:
    tenant = str(uuid.uuid4())
    settings = make_settings(tmp_path, database_url, max_template_output_bytes=10_000)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        plan = plan_of(
            {
                "stepId": "blow",
                "tool": "core.echo",
                "parameters": {"x": "{{ params.chunk + params.chunk + params.chunk }}"},
            },
        )
        request = pb.ExecuteRequest(executable_plan=plan)
        request.parameters.update({"chunk": "z" * 4000})
        done = await finished(
            stub, tenant, (await stub.Execute(request, metadata=md(tenant))).run_id
        )
        assert done.steps[0].error_reason == "TEMPLATE_TOO_LARGE"
        costly = plan_of(
            {
                "stepId": "loop",
                "tool": "core.echo",
                "parameters": {
                    "n": "{{ params.items.map(a, params.items.map(b, params.items.map(c, 1)))"
                    ".size() }}"
                },
            }
        )
        request = pb.ExecuteRequest(executable_plan=costly)
        request.parameters.update({"items": list(range(500))})
        done = await finished(
            stub, tenant, (await stub.Execute(request, metadata=md(tenant))).run_id
        )
        assert done.status == pb.EXECUTION_STATUS_FAILED
        assert "too costly" in done.steps[0].error


async def test_tenant_quota_and_execute_rate(tmp_path: Path, database_url: str) -> None:
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    settings = make_settings(
        tmp_path, database_url, max_runs_per_tenant=2, execute_rate=5, execute_burst=4
    )
    waiting = plan_of({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}})
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        for _ in range(2):
            await stub.Execute(pb.ExecuteRequest(executable_plan=waiting), metadata=md(tenant))
        d = await expect(
            stub.Execute(pb.ExecuteRequest(executable_plan=waiting), metadata=md(tenant))
        )
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_QUOTA_EXCEEDED")
        assert d.metadata["limit"] == "2"
        # Another tenant has its own quota; the rate limit then bites with a retry delay.
        await stub.Execute(pb.ExecuteRequest(executable_plan=waiting), metadata=md(other))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            for _ in range(10):
                await stub.Execute(
                    pb.ExecuteRequest(executable_plan=waiting, dry_run=True), metadata=md(other)
                )
        d = details_of(info.value)
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        raw = dict(info.value.trailing_metadata() or ())["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(raw)
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1


# ---------------------------------------------------------------- outbound safety


async def test_http_request_refuses_private_destinations(
    tmp_path: Path, database_url: str, endpoint: str
) -> None:
    tenant = str(uuid.uuid4())
    port = endpoint.rsplit(":", 1)[1]
    async with (
        running(make_settings(tmp_path, database_url)) as srv,
        grpc.aio.insecure_channel(srv.address) as ch,
    ):
        stub = pb_grpc.OrchestratorServiceStub(ch)
        for url in (
            endpoint + "/x",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.1.2.3/",
            f"http://localhost:{port}/",
            "http://[::1]/",
        ):
            done = await finished(
                stub,
                tenant,
                (
                    await stub.Execute(
                        pb.ExecuteRequest(executable_plan=http_plan(url)), metadata=md(tenant)
                    )
                ).run_id,
            )
            step = done.steps[0]
            assert step.error_reason == "DESTINATION_NOT_ALLOWED", (url, step.error)
        assert Recorder.seen == [], "nothing left the server"
    allow = make_settings(tmp_path, database_url, http_allow="127.0.0.1/32")
    async with running(allow) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        done = await finished(
            stub,
            tenant,
            (
                await stub.Execute(
                    pb.ExecuteRequest(executable_plan=http_plan(endpoint + "/x")),
                    metadata=md(tenant),
                )
            ).run_id,
        )
        assert done.status == pb.EXECUTION_STATUS_COMPLETED
        # A redirect to a place not allowed is checked too (127.0.0.2 is loopback, not allowed).
        bounce = endpoint + f"/redirect?to=http://127.0.0.2:{port}/x"
        done = await finished(
            stub,
            tenant,
            (
                await stub.Execute(
                    pb.ExecuteRequest(executable_plan=http_plan(bounce)), metadata=md(tenant)
                )
            ).run_id,
        )
        assert done.steps[0].error_reason == "DESTINATION_NOT_ALLOWED"
        assert len(Recorder.seen) == 2


# ---------------------------------------------------------------- secrets


async def test_secrets_reach_the_tool_only(
    tmp_path: Path, database_url: str, endpoint: str
) -> None:
    tenant = str(uuid.uuid4())
    secret = "s3cr3t-token-value"
    settings = make_settings(tmp_path, database_url, http_allow="127.0.0.1/32")
    plan = http_plan(
        endpoint + "/x",
        {
            "stepId": "echo",
            "tool": "core.echo",
            "parameters": {"auth": "Bearer {{ params.token }}"},
        },
    )
    plan.flows[0].steps[1].parameters.update({"headers": {"Authorization": "{{ params.token }}"}})
    request = pb.ExecuteRequest(executable_plan=plan)
    request.parameters.update({"token": f"secret:{secret}"})
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        done = await finished(
            stub, tenant, (await stub.Execute(request, metadata=md(tenant))).run_id
        )
        assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
        assert Recorder.seen[0]["Authorization"] == secret, "the tool got the secret"
        assert json_format.MessageToDict(done.steps[0].output) == {"auth": "Bearer [REDACTED]"}
        assert secret not in str(done)
        watched = [
            r.event
            async for r in stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=done.run_id, after_sequence=1), metadata=md(tenant)
            )
        ]
        assert watched and all(secret not in str(e) for e in watched)
        # A restricted plan treats every parameter as secret.
        restricted = plan_of(
            {
                "stepId": "echo",
                "tool": "core.echo",
                "parameters": {"account": "{{ params.account }}"},
            }
        )
        restricted.security_context.data_classification = "restricted"
        request = pb.ExecuteRequest(executable_plan=restricted)
        request.parameters.update({"account": "ACC-0042-PRIVATE"})
        done = await finished(
            stub, tenant, (await stub.Execute(request, metadata=md(tenant))).run_id
        )
        assert "ACC-0042-PRIVATE" not in str(done)
