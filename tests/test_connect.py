"""The HTTP port: every RPC over Connect (JSON and binary) and gRPC-Web, from plain HTTP
clients, with the gRPC port's semantics and error details. Real server, real ports, real
store; httpx speaks HTTP/1.1 as a browser's fetch would, `buf curl` speaks gRPC-Web."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from orchestrator.server.api.connect import SERVICE, connect_application, snake_case
from orchestrator.server.api.servicer import OrchestratorServicer
from orchestrator.server.app import Server
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ThreadedServer, echo_plan, make_settings, md, plan_of, running
from tests.test_fuzz_hostile import (  # the hostile-input fuzzing: its server and inputs
    Hostile,
    garbage,
    hostile_requests,
    hostile_server,  # noqa: F401 (a fixture, used by name)
)
from tests.test_security import key_file

ROOT = Path(__file__).resolve().parent.parent
BUF = shutil.which("buf", path=str(ROOT / ".venv" / "bin")) or shutil.which("buf")
PREFIX = f"/{SERVICE.full_name}/"
NEVER_GRPC_WEB = {str(c.value[0]) for c in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)}
JSON = Any

ASK = plan_of(
    {
        "stepId": "ask",
        "tool": "core.clarify",
        "parameters": {"category": "input", "prompt": "Which config?", "argument_name": "cfg"},
    },
    {"stepId": "after", "tool": "core.echo", "parameters": {"got": "{{ steps.ask.output }}"}},
)
SLOW = plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 30}})


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://{server.http_address}", timeout=30) as client:
        yield client


def headers(tenant: str, **extra: str) -> dict[str, str]:
    return {"x-tenant-id": tenant, **{k.replace("_", "-"): v for k, v in extra.items()}}


async def call(
    http: httpx.AsyncClient, method: str, body: JSON, tenant: str, **extra: str
) -> httpx.Response:
    """A Connect unary call in JSON: a plain POST."""
    return await http.post(
        PREFIX + method,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json", **headers(tenant, **extra)},
    )


def ok(response: httpx.Response) -> JSON:
    assert response.status_code == 200, response.text
    return response.json()


def error_info(body: JSON) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """The reason, ErrorInfo metadata and BadRequest violations of a Connect error body."""
    reason, metadata, violations = "", {}, []
    for detail in body.get("details", []):
        value = base64.b64decode(detail["value"] + "==")
        if detail["type"] == "google.rpc.ErrorInfo":
            info = error_details_pb2.ErrorInfo.FromString(value)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail["type"] == "google.rpc.BadRequest":
            bad = error_details_pb2.BadRequest.FromString(value)
            violations = [(v.field, v.description) for v in bad.field_violations]
    return reason, metadata, violations


def failed(response: httpx.Response, status: int, code: str, reason: str) -> JSON:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert error_info(body)[0] == reason, body
    return body


def frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The envelopes of a Connect or gRPC-Web stream: (flags, payload)."""
    at = 0
    while at < len(data):
        flags, size = struct.unpack(">BI", data[at : at + 5])
        yield flags, data[at + 5 : at + 5 + size]
        at += 5 + size


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


async def execute(http: httpx.AsyncClient, tenant: str, plan: pb.ExecutablePlan) -> str:
    body = {"executablePlan": json_format.MessageToDict(plan)}
    run_id: str = ok(await call(http, "Execute", body, tenant))["runId"]
    return run_id


async def wait_until(
    http: httpx.AsyncClient, tenant: str, run_id: str, check: Callable[[JSON], bool]
) -> JSON:
    """GetExecution over JSON until `check` holds for the execution."""
    seen: JSON = None
    for _ in range(300):
        seen = ok(await call(http, "GetExecution", {"runId": run_id}, tenant))
        if check(seen["execution"]):
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"{run_id}: {seen}")


async def wait_status(http: httpx.AsyncClient, tenant: str, run_id: str, status: str) -> JSON:
    return await wait_until(http, tenant, run_id, lambda e: bool(e["status"] == status))


# ---------------------------------------------------------------- every RPC


def test_every_rpc_of_the_service_is_served_by_the_shared_code_path() -> None:
    """From the descriptor, not a list: a new RPC is served once its code is generated."""
    servicer = OrchestratorServicer(None, None, None)  # type: ignore[arg-type]
    app: Any = connect_application(servicer, [], 1024)
    endpoints = app._resolve_endpoints(app._service)  # what the generated app serves
    assert set(endpoints) == {PREFIX + m.name for m in SERVICE.methods}
    for method in SERVICE.methods:
        endpoint = endpoints[PREFIX + method.name]
        assert endpoint.function.__qualname__.startswith(("_unary", "_stream")), method.name
    assert snake_case("RespondToClarification") == "respond_to_clarification"
    assert snake_case("GetHTTPStatus") == "get_http_status"


async def test_each_unary_rpc_over_json(http: httpx.AsyncClient, tenant: str) -> None:
    """Execute, Get, List, Pause, Resume, Cancel, RespondToClarification and Retry: plain
    JSON POSTs, answered as the gRPC port answers them."""
    run_id = await execute(http, tenant, ASK)
    got = ok(await call(http, "GetExecution", {"runId": run_id}, tenant))
    assert got["execution"]["runId"] == run_id
    listed = ok(await call(http, "ListExecutions", {}, tenant))
    assert [e["runId"] for e in listed["executions"]] == [run_id]

    waiting = await wait_until(http, tenant, run_id, lambda e: bool(e.get("pendingClarifications")))
    clarification = waiting["execution"]["pendingClarifications"][0]
    paused = ok(await call(http, "Pause", {"runId": run_id, "reason": "look"}, tenant))
    assert paused["success"] is True, paused
    assert ok(await call(http, "Resume", {"runId": run_id}, tenant))["success"] is True
    await wait_status(http, tenant, run_id, "EXECUTION_STATUS_RUNNING")
    answer = {
        "runId": run_id,
        "clarificationId": clarification["clarificationId"],
        "response": "prod",
    }
    ok(await call(http, "RespondToClarification", answer, tenant))
    done = await wait_status(http, tenant, run_id, "EXECUTION_STATUS_COMPLETED")
    outputs = {s["stepId"]: s.get("output") for s in done["execution"]["steps"]}
    assert outputs["after"] == {"got": "prod"}, outputs

    slow = await execute(http, tenant, SLOW)
    cancelled = ok(await call(http, "Cancel", {"runId": slow, "reason": "enough"}, tenant))
    assert cancelled["success"] is True, cancelled
    await wait_status(http, tenant, slow, "EXECUTION_STATUS_CANCELLED")
    retried = ok(await call(http, "RetryExecution", {"runId": slow}, tenant))
    assert retried["execution"]["status"] == "EXECUTION_STATUS_RUNNING", retried


async def test_every_unary_rpc_answers_an_empty_request_precisely(
    http: httpx.AsyncClient, tenant: str
) -> None:
    """`{}` to every unary RPC of the descriptor: a 2xx or a precise 4xx, never a 500."""
    for method in SERVICE.methods:
        if method.server_streaming:
            continue
        response = await call(http, method.name, {}, tenant)
        assert response.status_code < 500, (method.name, response.text)
        if response.status_code != 200:
            assert error_info(response.json())[0], (method.name, response.text)


async def test_binary_is_byte_for_byte_the_grpc_answer(
    server: Server, http: httpx.AsyncClient, tenant: str, stub: pb_grpc.OrchestratorServiceAsyncStub
) -> None:
    run = await stub.Execute(pb.ExecuteRequest(executable_plan=echo_plan(2)), metadata=md(tenant))
    request = pb.GetExecutionRequest(run_id=run.run_id)
    await wait_status(http, tenant, run.run_id, "EXECUTION_STATUS_COMPLETED")
    over_grpc = await stub.GetExecution(request, metadata=md(tenant))
    response = await http.post(
        PREFIX + "GetExecution",
        content=request.SerializeToString(),
        headers={"content-type": "application/proto", **headers(tenant)},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/proto"
    over_http = pb.GetExecutionResponse.FromString(response.content)
    # The same finished run by both ports (a snapshot's derived timestamps may be computed at
    # read time, so whole-message equality would be a race).
    for got in (over_http, over_grpc):
        got.execution.ClearField("last_updated")
        got.execution.ClearField("estimated_completion")
    assert over_http.execution.steps == over_grpc.execution.steps
    assert over_http.execution.status == over_grpc.execution.status == pb.EXECUTION_STATUS_COMPLETED
    assert over_http.execution.run_id == run.run_id


# ---------------------------------------------------------------- errors and metadata


async def test_cross_tenant_is_not_found_with_its_error_info(
    http: httpx.AsyncClient, tenant: str
) -> None:
    run_id = await execute(http, tenant, echo_plan(1))
    other = str(uuid.uuid4())
    body = failed(
        await call(http, "GetExecution", {"runId": run_id}, other, x_correlation_id="c-1"),
        404,
        "not_found",
        "EXECUTION_NOT_FOUND",
    )
    _, metadata, _ = error_info(body)
    assert metadata["run_id"] == run_id
    assert metadata["correlation_id"] == "c-1"
    for method in ("Pause", "Cancel", "RetryExecution"):
        failed(
            await call(http, method, {"runId": run_id}, other),
            404,
            "not_found",
            "EXECUTION_NOT_FOUND",
        )


async def test_tenant_correlation_id_and_field_violations(
    http: httpx.AsyncClient, tenant: str
) -> None:
    response = await http.post(
        PREFIX + "ListExecutions", content=b"{}", headers={"content-type": "application/json"}
    )
    failed(response, 401, "unauthenticated", "TENANT_REQUIRED")
    failed(
        await call(http, "ListExecutions", {}, "nope"), 400, "invalid_argument", "INVALID_TENANT_ID"
    )

    response = await call(http, "ListExecutions", {}, tenant, x_correlation_id="corr-42")
    assert response.headers["x-correlation-id"] == "corr-42"

    bad_plan = {"executablePlan": {"planId": "p", "flows": [{"flowId": "f", "steps": [{}]}]}}
    body = failed(
        await call(http, "Execute", bad_plan, tenant), 400, "invalid_argument", "VALIDATION_FAILED"
    )
    violations = error_info(body)[2]
    assert violations and all(field.startswith("executable_plan") for field, _ in violations)
    failed(
        await call(http, "GetExecution", {"runId": 7, "nope": 1}, tenant),
        400,
        "invalid_argument",
        "VALIDATION_FAILED",
    )
    response = await http.post(
        PREFIX + "GetExecution",
        content=b"\x0a\xff\xff",
        headers={"content-type": "application/proto", **headers(tenant)},
    )
    assert response.status_code == 400


async def test_api_keys_over_http(tmp_path: Path) -> None:
    tenant = str(uuid.uuid4())
    keys = key_file(tmp_path / "keys.json", {"s3cret": [tenant]})
    async with (
        running(make_settings(tmp_path, auth_keys=str(keys))) as srv,
        httpx.AsyncClient(base_url=f"http://{srv.http_address}") as http,
    ):
        failed(
            await call(http, "ListExecutions", {}, tenant),
            401,
            "unauthenticated",
            "API_KEY_INVALID",
        )
        failed(
            await call(http, "ListExecutions", {}, tenant, authorization="Bearer wrong"),
            401,
            "unauthenticated",
            "API_KEY_INVALID",
        )
        ok(await call(http, "ListExecutions", {}, tenant, authorization="Bearer s3cret"))
        other = str(uuid.uuid4())
        response = await call(http, "ListExecutions", {}, other, authorization="Bearer s3cret")
        assert response.status_code == 403, response.text


# ---------------------------------------------------------------- streams


async def test_watch_execution_over_connect_to_its_end(
    http: httpx.AsyncClient, tenant: str
) -> None:
    run_id = await execute(http, tenant, echo_plan(3))
    response = await http.post(
        PREFIX + "WatchExecution",
        content=envelope(json.dumps({"runId": run_id}).encode()),
        headers={"content-type": "application/connect+json", **headers(tenant)},
    )
    assert response.status_code == 200
    messages = list(frames(response.content))
    *events, (end_flags, end) = messages
    assert end_flags == 2 and json.loads(end) == {}, end
    decoded = [json.loads(payload)["event"] for _, payload in events]
    # A snapshot, then events (or the snapshot alone if the run was done first): the steps'
    # latest states, read from both, are the finished run's.
    steps = {
        step["stepId"]: step["status"]
        for event in decoded
        for step in event["execution"].get("steps", [])
    }
    assert steps == {f"s{i}": "STEP_STATUS_COMPLETED" for i in range(3)}, decoded
    assert decoded[-1]["execution"]["status"] == "EXECUTION_STATUS_COMPLETED", decoded[-1]
    # Binary: the frames the control plane serialized, as they are.
    response = await http.post(
        PREFIX + "WatchExecution",
        content=envelope(pb.WatchExecutionRequest(run_id=run_id).SerializeToString()),
        headers={"content-type": "application/connect+proto", **headers(tenant)},
    )
    *events, (end_flags, _) = list(frames(response.content))
    assert end_flags == 2
    last = pb.WatchExecutionResponse.FromString(events[-1][1])
    assert last.event.execution.status == pb.EXECUTION_STATUS_COMPLETED


async def test_watch_error_ends_the_stream_with_its_details(
    http: httpx.AsyncClient, tenant: str
) -> None:
    response = await http.post(
        PREFIX + "WatchExecution",
        content=envelope(json.dumps({"runId": str(uuid.uuid4())}).encode()),
        headers={"content-type": "application/connect+json", **headers(tenant)},
    )
    ((flags, end),) = list(frames(response.content))
    assert flags == 2
    error = json.loads(end)["error"]
    assert error["code"] == "not_found"
    assert error_info(error)[0] == "EXECUTION_NOT_FOUND"


# ---------------------------------------------------------------- gRPC-Web


def buf_curl(
    address: str, method: str, data: JSON, tenant: str
) -> subprocess.CompletedProcess[str]:
    assert BUF is not None
    return subprocess.run(
        [
            BUF,
            "curl",
            "--protocol",
            "grpcweb",
            "--schema",
            str(ROOT / "protos"),
            "-H",
            f"x-tenant-id: {tenant}",
            "--data",
            json.dumps(data),
            f"http://{address}{PREFIX}{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.skipif(BUF is None, reason="buf is installed with the dev extras")
async def test_grpc_web_through_buf_curl(
    server: Server, http: httpx.AsyncClient, tenant: str
) -> None:
    run_id = await execute(http, tenant, echo_plan(2))
    address = server.http_address
    watched = await asyncio.to_thread(
        buf_curl, address, "WatchExecution", {"runId": run_id}, tenant
    )
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(chunk)["event"] for chunk in _json_documents(watched.stdout)]
    assert events[-1]["execution"]["status"] == "EXECUTION_STATUS_COMPLETED", events
    got = await asyncio.to_thread(buf_curl, address, "GetExecution", {"runId": run_id}, tenant)
    assert json.loads(got.stdout)["execution"]["status"] == "EXECUTION_STATUS_COMPLETED"
    missing = await asyncio.to_thread(
        buf_curl, address, "GetExecution", {"runId": run_id}, str(uuid.uuid4())
    )
    assert missing.returncode != 0
    error = json.loads(missing.stderr)
    assert error["code"] == "not_found", error
    assert error_info(error)[0] == "EXECUTION_NOT_FOUND", error


def _json_documents(text: str) -> Iterator[str]:
    """buf curl prints one pretty JSON document per stream message."""
    decoder = json.JSONDecoder()
    at = 0
    text = text.strip()
    while at < len(text):
        _, end = decoder.raw_decode(text, at)
        yield text[at:end]
        at = end
        while at < len(text) and text[at].isspace():
            at += 1


# ---------------------------------------------------------------- the port itself


async def test_cors_is_off_unless_origins_are_named(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    site = {"origin": "https://dash.example"}
    response = await http.options(PREFIX + "ListExecutions", headers=site)
    assert "access-control-allow-origin" not in response.headers
    async with (
        running(make_settings(tmp_path, cors_origin="https://dash.example")) as srv,
        httpx.AsyncClient(base_url=f"http://{srv.http_address}") as other,
    ):
        preflight = await other.options(PREFIX + "ListExecutions", headers=site)
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://dash.example"
        assert "x-tenant-id" in preflight.headers["access-control-allow-headers"]
        tenant = str(uuid.uuid4())
        response = await call(other, "ListExecutions", {}, tenant, **{"origin": site["origin"]})
        assert response.headers["access-control-allow-origin"] == "https://dash.example"
        stranger = await other.options(PREFIX + "ListExecutions", headers={"origin": "https://x"})
        assert "access-control-allow-origin" not in stranger.headers


async def test_the_dashboard_is_served_from_the_package(http: httpx.AsyncClient) -> None:
    page = await http.get("/", params={"tenant": str(uuid.uuid4())})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<div id="app">' in page.text and 'src="app.js"' in page.text
    script = await http.get("/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "Enter a tenant to see its runs." in script.text
    assert (await http.head("/")).status_code == 200


async def test_no_http_and_static_paths(tmp_path: Path, http: httpx.AsyncClient) -> None:
    for path in ("/../pyproject.toml", "/%2e%2e/app.py", "/nope.js", "/app.py"):
        assert (await http.get(path)).status_code == 404, path
    assert (await http.post("/", content=b"x")).status_code == 405
    assert (
        await http.post(
            PREFIX + "Nope", content=b"{}", headers={"content-type": "application/json"}
        )
    ).status_code == 404
    async with running(make_settings(tmp_path, http=False)) as srv:
        assert srv.http is None and srv.http_address == ""


async def test_stop_ends_open_watch_streams(tmp_path: Path) -> None:
    # connectrpc sends a stream's headers with its first message: here the first heartbeat.
    async with running(make_settings(tmp_path, heartbeat_seconds=0.2)) as srv:
        http = httpx.AsyncClient(base_url=f"http://{srv.http_address}", timeout=30)
        tenant = str(uuid.uuid4())
        async with http.stream(
            "POST",
            PREFIX + "WatchExecutions",
            content=envelope(b"{}"),
            headers={"content-type": "application/connect+json", **headers(tenant)},
        ) as response:
            assert response.status_code == 200
            await srv.stop(grace=0.2)
            with pytest.raises((httpx.HTTPError, StopAsyncIteration)):
                async for _ in response.aiter_raw():
                    pass
                raise StopAsyncIteration
        await http.aclose()


# ---------------------------------------------------------------- hostile input


@pytest.fixture(scope="module")
def hostile_http(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """The hostile-input fuzzing's server (it executes what it accepts), over HTTP."""
    served: ThreadedServer = request.getfixturevalue("hostile_server")
    assert served.server is not None
    address = served.server.http_address
    with httpx.Client(base_url=f"http://{address}", timeout=60) as client:
        yield client


def _no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code != 200:
        body = response.json()
        assert body["code"] not in ("internal", "unknown"), body


@hypothesis_settings(
    max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(hostile=hostile_requests(), as_json=st.booleans())
def test_hostile_execute_requests_over_http(
    hostile_http: httpx.Client, hostile: Hostile, as_json: bool
) -> None:
    tenant = str(uuid.uuid4())
    if as_json:
        try:
            content = json_format.MessageToJson(hostile.request).encode()
        except json_format.SerializeToJsonError:
            assume(False)  # no JSON for it (a Duration out of range): binary covers it
        kind = "application/json"
    else:
        content, kind = hostile.request.SerializeToString(), "application/proto"
    response = hostile_http.post(
        PREFIX + "Execute", content=content, headers={"content-type": kind, **headers(tenant)}
    )
    _no_server_error(response)


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
@given(
    data=garbage() | st.binary(max_size=64),
    method=st.sampled_from([m.name for m in SERVICE.methods]),
    kind=st.sampled_from(
        [
            "application/proto",
            "application/json",
            "application/connect+proto",
            "application/grpc-web+proto",
            "text/plain",
        ]
    ),
)
def test_garbage_on_every_method_over_http(
    hostile_http: httpx.Client, data: bytes, method: str, kind: str
) -> None:
    response = hostile_http.post(
        PREFIX + method, content=data, headers={"content-type": kind, **headers(str(uuid.uuid4()))}
    )
    assert response.status_code < 500, response.text[:500]
    if kind.startswith("application/grpc-web"):
        status = response.headers.get("grpc-status") or _grpc_web_status(response.content)
        assert status not in NEVER_GRPC_WEB, response.content[:300]
    elif response.status_code != 200 and response.headers.get("content-type", "").endswith("json"):
        assert response.json()["code"] not in ("internal", "unknown"), response.text


def _grpc_web_status(body: bytes) -> str:
    for flags, payload in frames(body):
        if flags & 0x80:
            for line in payload.decode().split("\r\n"):
                if line.lower().startswith("grpc-status:"):
                    return line.split(":", 1)[1].strip()
    return ""
