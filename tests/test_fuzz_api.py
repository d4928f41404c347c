"""Hypothesis-made malformed requests through the real API: a precise error, never INTERNAL or
UNKNOWN, and a rejected request leaves no run behind."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ThreadedServer

IDS = st.sampled_from(["a", "b", "c", "d", "", "a b", "x" * 200, "ü", "s-1", "{{"])
TOOLS = st.sampled_from(
    ["core.echo", "core.wait", "core.fail", "http.request", "", "nope", "core.clarify", "core.set"]
)
TEXT = st.text(max_size=30) | st.sampled_from(
    [
        "{{ steps.a.output }}",
        "{{",
        "}}",
        "{{ 1 + }}",
        "{{ params.x }} and {{ vars.y }}",
        "{{ steps.ghost.output.k }}",
        "{{ __import__('os') }}",
    ]
)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@st.composite
def durations(draw: st.DrawFn) -> duration_pb2.Duration | None:
    if draw(st.booleans()):
        return None
    seconds = draw(st.integers(-(10**6), 10**6))
    nanos = draw(st.integers(-999_999_999, 999_999_999))
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        nanos = -nanos
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


@st.composite
def steps(draw: st.DrawFn) -> pb.Step:
    step = pb.Step(
        step_id=draw(IDS),
        tool=draw(TOOLS),
        depends_on=draw(st.lists(IDS, max_size=3)),
        conditions=draw(st.lists(TEXT, max_size=2)),
        requires_approval=draw(st.booleans()),
    )
    params = draw(st.dictionaries(st.text(max_size=8), JSONISH, max_size=4))
    json_format.ParseDict(params, step.parameters)
    timeout = draw(durations())
    if timeout is not None:
        step.timeout.CopyFrom(timeout)
    if draw(st.booleans()):
        step.retry_policy.max_attempts = draw(st.integers(-5, 200))
        step.retry_policy.exponential_base = draw(st.floats(-3, 10, allow_nan=False))
        for name in ("initial_delay", "max_delay"):
            d = draw(durations())
            if d is not None:
                getattr(step.retry_policy, name).CopyFrom(d)
    return step


@st.composite
def requests(draw: st.DrawFn) -> pb.ExecuteRequest:
    plan = pb.ExecutablePlan(plan_id=draw(st.text(max_size=10)))
    for _ in range(draw(st.integers(0, 3))):
        plan.flows.append(
            pb.Flow(
                flow_id=draw(IDS),
                steps=draw(st.lists(steps(), max_size=5)),
                parallel_execution=draw(st.booleans()),
                max_concurrency=draw(st.integers(-3, 5)),
                on_failure=draw(st.sampled_from(["", "stop", "continue", "explode"])),
                rollback_steps=draw(st.lists(IDS, max_size=2)),
            )
        )
    plan.security_context.allowed_tools.extend(draw(st.lists(TOOLS, max_size=4)))
    config: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "timeout": JSONISH | st.sampled_from(["30s", "-1s", "abc", 5, -5, 0]),
                "retry_policy": JSONISH,
            },
        )
    )
    json_format.ParseDict(config, plan.configuration)
    request = pb.ExecuteRequest(
        executable_plan=plan,
        plan_hash=draw(st.sampled_from(["", "sha256:abc", "md5:x"])),
        dry_run=draw(st.booleans()),
    )
    timeout = draw(durations())
    if timeout is not None:
        request.timeout.CopyFrom(timeout)
    if draw(st.booleans()):
        request.validate_capabilities = draw(st.booleans())
    return request


ACCEPTABLE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests())
def test_malformed_plans_never_yield_internal_or_unknown(
    threaded_server: ThreadedServer, request: pb.ExecuteRequest
) -> None:
    tenant = str(uuid.uuid4())
    metadata = (("x-tenant-id", tenant),)
    request.async_execution = True
    with grpc.insecure_channel(threaded_server.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        try:
            response = stub.Execute(request, metadata=metadata, timeout=30)
        except grpc.RpcError as err:
            assert err.code() in ACCEPTABLE, (err.code(), err.details())
            listed = stub.ListExecutions(pb.ListExecutionsRequest(), metadata=metadata)
            assert list(listed.executions) == [], "a rejected request left a run behind"
        else:
            assert response.success
            got = stub.GetExecution(
                pb.GetExecutionRequest(run_id=response.run_id), metadata=metadata
            )
            assert got.execution.last_sequence >= 1
