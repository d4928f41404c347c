"""Hostile input through the real API (issue 7, Fuzzing), on a server that executes what it
accepts: hypothesis-made ExecuteRequests (deep and huge Structs, odd unicode, cycles, template
and CEL bombs, wrong types in every field, very large plans), hostile values in every other
request, raw garbage bytes on every method path, and random sequences of control calls over
many runs.

The invariants, checked after every example: no INTERNAL or UNKNOWN, the server stays healthy
(grpc health SERVING), no run half-written (its steps all there, none open once it is
terminal, attempts matching the STEP_STARTED events) and every run's event sequence gap-free.

`tests/test_fuzz_api.py` covers malformed plans on an API-only replica; this module goes after
what hostile input does once runs execute. The tests at the end pin what fuzzing found, as
regression tests.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import structlog
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from orchestrator.server.app import build_server
from orchestrator.server.logs import configure_logging
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import ThreadedServer, make_settings, plan_of
from tests.errors import Details, details_of
from tests.stores import drop_postgres_database, postgres_database

JSON = Any
Metadata = tuple[tuple[str, str], ...]

SERVICE = "orchestrator.v1.OrchestratorService"
REQUEST_TYPES: dict[str, type[Message]] = {
    "Execute": pb.ExecuteRequest,
    "GetExecution": pb.GetExecutionRequest,
    "ListExecutions": pb.ListExecutionsRequest,
    "Pause": pb.PauseRequest,
    "Resume": pb.ResumeRequest,
    "Cancel": pb.CancelRequest,
    "RespondToClarification": pb.RespondToClarificationRequest,
    "WatchExecution": pb.WatchExecutionRequest,
    "WatchExecutions": pb.WatchExecutionsRequest,
}
STREAMING = frozenset({"WatchExecution", "WatchExecutions"})
NEVER = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
TERMINAL = frozenset(
    {pb.EXECUTION_STATUS_COMPLETED, pb.EXECUTION_STATUS_FAILED, pb.EXECUTION_STATUS_CANCELLED}
)
OPEN_STEPS = frozenset({pb.STEP_STATUS_PENDING, pb.STEP_STATUS_RUNNING, pb.STEP_STATUS_WAITING})
STATUS_NAMES: dict[int, str] = {
    pb.EXECUTION_STATUS_PENDING: "PENDING",
    pb.EXECUTION_STATUS_RUNNING: "RUNNING",
    pb.EXECUTION_STATUS_PAUSED: "PAUSED",
    pb.EXECUTION_STATUS_COMPLETED: "COMPLETED",
    pb.EXECUTION_STATUS_FAILED: "FAILED",
    pb.EXECUTION_STATUS_CANCELLED: "CANCELLED",
}
# Accepted hostile runs get this run timeout, so that whatever they wait on (a person, a
# huge core.wait, a back-off of years) ends them quickly: DEADLINE_EXCEEDED is a clean end.
RUN_TIMEOUT_SECONDS = 0.2
MAX_REQUEST_BYTES = 4 * 1024 * 1024

# Bounds: none for open bugs. Where the generators narrow (short run timeouts, no DNS names),
# it is to keep each example fast; the comments there say so.


# --- the server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    """A server that executes, on SQLite, with heartbeats every 0.02 s so that a watcher
    knows at once when it has caught up with a live run. It logs JSON lines, warnings and
    up, as `orchestrator serve` would: structlog's unconfigured console renderer prints each
    traceback with every local, which takes seconds for a big plan and stalls the loop."""
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    configure_logging("json", "warning", sys.stderr)
    server = ThreadedServer(
        make_settings(tmp_path_factory.mktemp("hostile"), execute=True, heartbeat_seconds=0.02)
    )
    try:
        yield server
    finally:
        server.stop()
        if was_configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()


@pytest.fixture(scope="module")
def hostile_channel(hostile_server: ThreadedServer) -> Iterator[grpc.Channel]:
    # Responses may exceed gRPC's default 4 MiB (an echoed near-4 MiB plan is bigger than
    # its request); what the server sends is under test here, not the client's limit.
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(hostile_server.address, options=options) as ch:
        yield ch


def md(tenant: str) -> Metadata:
    return (("x-tenant-id", tenant),)


def new_tenant() -> str:
    return str(uuid.uuid4())


def stub_of(channel: grpc.Channel) -> pb_grpc.OrchestratorServiceStub:
    return pb_grpc.OrchestratorServiceStub(channel)


def as_is(data: bytes) -> bytes:
    return data


def raw_unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """A call to `method` that sends and returns bytes, whatever they are."""
    return channel.unary_unary(f"/{SERVICE}/{method}", as_is, as_is)


def raw_stream(channel: grpc.Channel, method: str) -> grpc.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(f"/{SERVICE}/{method}", as_is, as_is)


def assert_healthy(channel: grpc.Channel) -> None:
    """grpc health says SERVING, overall and for the service, within 5 s."""
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service


def failure(err: grpc.RpcError) -> Details:
    """The status of a failed call, which must be neither INTERNAL nor UNKNOWN and must not
    leak a traceback. (A sync call's error offers the same code(), details() and
    trailing_metadata() that `details_of` reads from an aio one.)"""
    details = details_of(cast(grpc.aio.AioRpcError, err))
    assert details.code not in NEVER, (details.code, details.message)
    assert "Traceback" not in details.message
    return details


def domain_failure(err: grpc.RpcError, *codes: grpc.StatusCode) -> Details:
    """A failure raised by the service itself (one of `codes`, when given), with an
    ErrorInfo."""
    details = failure(err)
    assert not codes or details.code in codes, (details.code, details.message)
    assert details.domain == "orchestrator.v1", details
    assert details.reason, details
    return details


# --- reading runs and checking their invariants -------------------------------------------


def read_events(
    stub: pb_grpc.OrchestratorServiceStub,
    tenant: str,
    run_id: str,
    after: int,
    *,
    deadline: float = 15.0,
) -> tuple[list[pb.ExecutionEvent], bool]:
    """The events of WatchExecution(after) until the stream ends (True) or has caught up with
    a live run (False): a heartbeat, which carries the stream's position."""
    call = stub.WatchExecution(
        pb.WatchExecutionRequest(run_id=run_id, after_sequence=after),
        metadata=md(tenant),
        timeout=deadline,
    )
    events: list[pb.ExecutionEvent] = []
    for response in call:
        event = response.event
        if event.type == pb.EVENT_TYPE_HEARTBEAT:
            position = events[-1].sequence if events else after
            assert event.sequence == position, (event.sequence, position)
            call.cancel()
            return events, False
        events.append(event)
    return events, True


def check_run(
    stub: pb_grpc.OrchestratorServiceStub,
    tenant: str,
    run_id: str,
    step_ids: set[str] | None = None,
) -> pb.Execution:
    """Everything a run must be, whatever was done to it: whole (every step of the plan, none
    open once terminal, attempts matching STEP_STARTED events), with a gap-free event log
    that ends with the terminal event, a snapshot at its last sequence and nothing after it."""
    execution = stub.GetExecution(
        pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant), timeout=15
    ).execution
    assert execution.run_id == run_id and execution.tenant_id == tenant
    assert execution.status in STATUS_NAMES, execution.status
    listed = [step.step_id for step in execution.steps]
    assert len(listed) == len(set(listed)), "a step is listed twice"
    if step_ids is not None:
        assert set(listed) == step_ids, "the run's steps are not the plan's"
    assert 0.0 <= execution.progress <= 1.0
    assert execution.last_sequence >= 1
    terminal = execution.status in TERMINAL
    if terminal:
        open_steps = [s.step_id for s in execution.steps if s.status in OPEN_STEPS]
        assert not open_steps, f"terminal run with open steps {open_steps}: half-written"
        assert not execution.pending_clarifications, "terminal run still asks a person"
        assert execution.error_reason != "INTERNAL_ERROR", execution.error_message
        crashed = [s.step_id for s in execution.steps if s.error_reason == "INTERNAL_ERROR"]
        assert not crashed, f"steps {crashed} crashed inside the server"

    events, ended = read_events(stub, tenant, run_id, after=1)
    sequences = [event.sequence for event in events]
    assert sequences == list(range(2, 2 + len(events))), f"gap in the event log: {sequences}"
    assert all(event.type != pb.EVENT_TYPE_SNAPSHOT for event in events)
    assert all(event.run_id in ("", run_id) for event in events)
    if terminal:
        assert ended, "the stream of a terminal run did not end"
        assert len(events) == execution.last_sequence - 1, (len(events), execution)
        if events:
            last = events[-1]
            assert last.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
            assert last.execution.status == execution.status
        started = Counter(e.step_id for e in events if e.type == pb.EVENT_TYPE_STEP_STARTED)
        asked = {e.step_id for e in events if e.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED}
        for step in execution.steps:
            # Asking is core.clarify's one attempt; every other attempt has its STEP_STARTED.
            expected = started[step.step_id]
            if step.tool == "core.clarify":
                expected = max(expected, int(step.step_id in asked))
            assert step.attempts == expected, (step.step_id, step.attempts, expected)
    else:
        assert len(events) >= execution.last_sequence - 1, "events went missing"

    snapshot, ended = read_events(stub, tenant, run_id, after=0)
    assert snapshot and snapshot[0].type == pb.EVENT_TYPE_SNAPSHOT
    assert snapshot[0].sequence >= execution.last_sequence
    assert [e.sequence for e in snapshot[1:]] == list(
        range(snapshot[0].sequence + 1, snapshot[0].sequence + len(snapshot))
    )
    if terminal:
        assert ended and len(snapshot) == 1
        assert snapshot[0].sequence == execution.last_sequence
        with pytest.raises(grpc.RpcError) as beyond:
            read_events(stub, tenant, run_id, after=execution.last_sequence + 1)
        details = domain_failure(beyond.value, grpc.StatusCode.OUT_OF_RANGE)
        assert details.reason == "SEQUENCE_OUT_OF_RANGE"
    return execution


def list_runs(stub: pb_grpc.OrchestratorServiceStub, tenant: str) -> list[pb.Execution]:
    """Every run of the tenant, page by page."""
    runs: list[pb.Execution] = []
    token = ""
    for _ in range(1000):
        page = stub.ListExecutions(
            pb.ListExecutionsRequest(page_size=7, page_token=token), metadata=md(tenant), timeout=15
        )
        runs.extend(page.executions)
        token = page.next_page_token
        if not token:
            return runs
    raise AssertionError("ListExecutions never reached its last page")


# --- building hostile values --------------------------------------------------------------


def nested(depth: int, leaf: JSON, *, key: str = "k", as_list: bool = False) -> JSON:
    """`leaf` inside `depth` levels of objects (or lists): a Struct value of that depth."""
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {key: value}
    return value


def struct_of(value: dict[str, JSON]) -> struct_pb2.Struct:
    # Struct.update builds in place: json_format and message copies refuse deep values.
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def duration(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


# Unicode that breaks naive code: bidi overrides, zero-width joiners, combining marks, NUL,
# astral planes, noncharacters, line breaks; injection-looking text; template markers.
ODD_STRINGS = [
    "\u202e\u0645\u0631\u062d\u0628\u0627\u202c",
    "zero\u200b\u200c\u200dwidth\u2060",
    "\ufeffbom",
    "e\u0301\u0302\u0303\u0304\u0305",
    "n\x00ul",
    "\U0001f469\u200d\U0001f4bb\U0001f600",
    "\U0010ffff\ufffe\uffff",
    "line\r\nbreak\t\x0b\x0c",
    "'; DROP TABLE runs; --",
    "../../etc/passwd",
    "%s%n%x{0}",
    "secret:hunter2",
    "{{",
    "}}",
    "{{ params }}",
    "\u0130\u0131\ufb00",
]
ODD_TEXT = (
    st.text(st.characters(codec="utf-8"), max_size=20)
    | st.sampled_from(ODD_STRINGS)
    | st.builds(lambda s, n: s * n, st.sampled_from(ODD_STRINGS), st.integers(2, 300))
)
# Where the server caps a field at 256 characters (responded_by, triggered_by, ...).
SHORT_TEXT = st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(ODD_STRINGS)
IDS = st.sampled_from(["a", "b", "c", "d", "e", "a", "b", "", "s-1", "x.y", "-x", "9"]) | ODD_TEXT
NUMBERS = st.sampled_from([0, -1, 1, 0.5, 1e-300, 1e300, -1e300, 2**53 + 1, 2**63, -(2**64)])
LEAVES = st.none() | st.booleans() | NUMBERS | st.floats(-1e6, 1e6) | ODD_TEXT
# Durations, including ones out of protobuf's range and with mixed signs.
DURATIONS = st.sampled_from(
    [
        (0, 0),
        (0, 1),
        (0, 1_000_000),
        (1, 0),
        (10**6, 0),
        (315_576_000_000, 0),
        (315_576_000_001, 0),
        (2**62, 0),
        (-1, 0),
        (0, -1),
        (1, -5),
        (0, 1_000_000_000),
        (-(2**62), 0),
    ]
)


# Struct nesting, around and far past the server's limit and protobuf's (100 messages).
DEPTHS = st.integers(1, 40) | st.sampled_from([60, 100, 200])
# Where templates are not wanted.
PLAIN_LEAVES = LEAVES.filter(lambda v: not isinstance(v, str) or "{{" not in v)
JSONISH = st.recursive(
    PLAIN_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(ODD_TEXT, children, max_size=3)
    ),
    max_leaves=8,
)


def cel_chain(term: str, n: int, op: str = "+") -> str:
    return f" {op} ".join([term] * n)


@st.composite
def cel_sources(draw: st.DrawFn) -> str:
    """CEL that tries to hurt: deep nesting, huge literals, nested comprehensions, strings
    growing in them, long concatenations, overflow, division by zero, odd types, regexes,
    unknown names."""
    kind = draw(st.integers(0, 13))
    n = draw(st.integers(1, 600))
    items = ",".join(str(i) for i in range(draw(st.integers(0, 1500))))
    if kind == 0:
        return "(" * n + "1" + ")" * n
    if kind == 1:
        return f"[{items}]"
    if kind == 2:
        size = draw(st.integers(1, 250))
        lst = "[" + ",".join(str(i) for i in range(size)) + "]"
        depth = draw(st.integers(1, 4))
        expression = "x0"
        for level in range(depth, 0, -1):
            expression = f"{lst}.map(x{level}, {expression if level < depth else 'x1'})"
        return f"size({expression})"
    if kind == 3:
        term = draw(st.sampled_from(["'ab'", "1", "1.5", "[1]", "params", "params.x"]))
        return cel_chain(term, n)
    if kind == 4:
        literal = "'" + "x" * draw(st.integers(0, 3000)) + "'"
        k = draw(st.integers(1, 40))
        return (
            f"[{literal}].map(a, [{cel_chain('a', k)}].map(b, [{cel_chain('b', k)}]"
            f".map(c, size({cel_chain('c', k)}))))[0][0][0]"
        )
    if kind == 5:
        return "[" * min(n, 3) + "1" + "]" * min(n, 3)
    if kind == 6:
        return "{" * min(n, 40) + "}" * min(n, 40)
    if kind == 7:
        return "'" + "a" * draw(st.integers(0, 30)) + "!'.matches('(a+)+$')"
    if kind == 8:
        return "x" * n
    return draw(
        st.sampled_from(
            [
                "9223372036854775807 + 1",
                "-9223372036854775808 / -1",
                "-9223372036854775808 % -1",
                "1 / 0",
                "1.0 / 0.0",
                "0.0 / 0.0",
                "18446744073709551615u + 1u",
                "1 + 'a'",
                "b'\\xff\\xfe'",
                "timestamp('9999-12-31T23:59:59Z') + duration('1s')",
                "duration('-315576000001s')",
                "{1: 2, true: 3}",
                "{[1]: 2}",
                "[1, 2][5]",
                "params.missing.deeper",
                "steps.nope.output",
                "steps['\\u202e'].output",
                "size(params) > 0 ? params : vars",
                "has(params.x)",
                "dyn(1) == dyn('1')",
                "int('99999999999999999999')",
                "double('nan')",
                "string(b'\\xff')",
                "__import__('os').system('true')",
                "params.__class__",
                "'\\u0000'",
                "}}",
                "{{ 1 }}",
                "",
                "   ",
            ]
        )
    )


@st.composite
def templates(draw: st.DrawFn) -> str:
    """Strings that hold templates, one or very many, well or badly formed."""
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return "{{ " + draw(cel_sources()) + " }}"
    if kind == 1:
        return "x {{ " + draw(cel_sources()) + " }} y"
    if kind == 2:
        return "{{ 1 }}" * draw(st.integers(1, 2000))
    if kind == 3:
        return "{{" * draw(st.integers(1, 500)) + "1" + "}}" * draw(st.integers(0, 500))
    if kind == 4:
        ref = draw(st.sampled_from(["a", "b", "c", "d", "e", "ghost"]))
        return draw(
            st.sampled_from(
                [
                    f"{{{{ steps.{ref}.output }}}}",
                    f"{{{{ steps['{ref}'].output }}}} and {{{{ vars }}}}",
                    f"{{{{ [steps.{ref}.output, params, vars] }}}}",
                    "{{ params }}{{ vars }}",
                ]
            )
        )
    if kind == 5:
        return "{{ '" + "}}" * draw(st.integers(1, 50)) + "' }}"
    return draw(ODD_TEXT)


# --- hostile ExecuteRequests --------------------------------------------------------------

TOOLS = ["core.echo", "core.set", "core.wait", "core.fail", "core.clarify", "http.request"]
# No name here resolves through DNS: the server must refuse them all (loopback, metadata,
# private, not http, malformed), and fast.
HOSTILE_URLS = [
    "http://127.0.0.1:1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:80/",
    "http://2130706433/",
    "http://0x7f.0.0.1/",
    "http://10.0.0.1/",
    "http://localhost/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:6379/_INFO",
    "http://user:pass@127.0.0.1@169.254.169.254/",
    "http://[::1",
    "http://\u202e/",
    "http://\x00/",
    "http://" + "a" * 300 + "/",
    "",
]


@st.composite
def tool_parameters(draw: st.DrawFn, tool: str, templated: bool) -> dict[str, JSON]:
    """Parameters for `tool`, with the wrong type in any of them, and templates when
    `templated`."""
    leaves = LEAVES if templated else PLAIN_LEAVES
    value = templates() | leaves if templated else leaves
    wrong = leaves | st.lists(leaves, max_size=2) | st.dictionaries(ODD_TEXT, leaves, max_size=2)
    if tool == "core.wait":
        if draw(st.booleans()):
            return {"seconds": draw(st.sampled_from([0, 0.01, -1, 1e300, "5", "0.01"]) | wrong)}
        until = st.sampled_from(
            ["2000-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2024-02-30T00:00:00Z", "0001"]
        )
        return {"until": draw(until | wrong)}
    if tool == "core.fail":
        return draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "message": value | wrong,
                    "fail_times": st.sampled_from([0, 1, 2, -1, 1e308, "x"]) | wrong,
                    "retryable": wrong,
                },
            )
        )
    if tool == "core.clarify":
        category = st.sampled_from(["input", "multiple_choice", "user_verification", "custom"])
        return draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "category": category | wrong,
                    "prompt": value | wrong,
                    "options": st.lists(ODD_TEXT, max_size=3) | wrong,
                    "argument_name": value | wrong,
                },
            )
        )
    if tool == "http.request":
        return draw(
            st.fixed_dictionaries(
                {"url": st.sampled_from(HOSTILE_URLS) | wrong},
                optional={
                    "method": st.sampled_from(["GET", "POST", "BREW", ""]) | wrong,
                    "headers": st.dictionaries(ODD_TEXT, leaves, max_size=2) | wrong,
                    "timeout_seconds": st.sampled_from([0.05, -1, 0, 1e300]) | wrong,
                    "json": value,
                    "expected_status": wrong,
                },
            )
        )
    return draw(st.dictionaries(ODD_TEXT, value | JSONISH, max_size=4))


@st.composite
def retry_policies(draw: st.DrawFn) -> pb.RetryPolicy:
    policy = pb.RetryPolicy(
        max_attempts=draw(st.sampled_from([0, 1, 2, 3, 100, 101, -1, 2**31 - 1, -(2**31)])),
        exponential_base=draw(
            st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e308, -1.0, math.inf, math.nan])
        ),
        jitter=draw(st.booleans()),
    )
    for name in ("initial_delay", "max_delay"):
        if draw(st.booleans()):
            getattr(policy, name).CopyFrom(duration(*draw(DURATIONS)))
    return policy


@st.composite
def sane_retry_policies(draw: st.DrawFn) -> pb.RetryPolicy:
    policy = pb.RetryPolicy(
        max_attempts=draw(st.integers(0, 3)),
        exponential_base=draw(st.sampled_from([0.0, 1.0, 1.5])),
        jitter=draw(st.booleans()),
    )
    policy.initial_delay.FromNanoseconds(draw(st.integers(0, 50)) * 1_000_000)
    return policy


@st.composite
def hostile_steps(draw: st.DrawFn, templated: bool, deep: bool, sane: bool) -> pb.Step:
    """A step with hostile parameters and, unless `sane`, hostile structure too."""
    tool = draw(st.sampled_from(TOOLS) if sane else st.sampled_from(TOOLS) | ODD_TEXT)
    step = pb.Step(
        step_id=draw(IDS),
        name=draw(ODD_TEXT),
        description=draw(ODD_TEXT),
        tool=tool,
        requires_approval=draw(st.integers(0, 9)) == 0,
    )
    if not sane:
        step.depends_on.extend(draw(st.lists(IDS, max_size=3)))
    step.parameters.update(draw(tool_parameters(tool, templated)))
    if templated and draw(st.integers(0, 3 if sane else 1)) == 0:
        source = cel_sources() if sane else cel_sources() | ODD_TEXT
        step.conditions.extend(draw(st.lists(source, min_size=1, max_size=2)))
    if deep:
        depth = draw(DEPTHS)
        leaf = draw(st.sampled_from(["leaf", 1, None, True, "x" * 5000]))
        step.parameters.update({"deep": nested(depth - 1, leaf, as_list=draw(st.booleans()))})
        if draw(st.booleans()):
            keys = draw(st.integers(0, 5000))
            width = draw(st.integers(0, 200))
            step.metadata.update({f"k{i}\u200b": "v" * width for i in range(keys)})
    if draw(st.booleans()):
        step.retry_policy.CopyFrom(draw(sane_retry_policies() if sane else retry_policies()))
    if draw(st.booleans()):
        if sane:
            step.timeout.FromNanoseconds(draw(st.integers(10, 5000)) * 1_000_000)
        else:
            step.timeout.CopyFrom(duration(*draw(DURATIONS)))
    return step


@st.composite
def sane_flows(draw: st.DrawFn, plan: pb.ExecutablePlan, templated: bool, deep: bool) -> None:
    """One well-formed flow of up to 6 steps (unique ids, dependencies on earlier steps, the
    tools allowed): what gets through validation and runs, hostile parameters and all."""
    parallel = draw(st.booleans())
    flow = plan.flows.add(
        flow_id="main",
        parallel_execution=parallel,
        max_concurrency=draw(st.integers(0, 3)),
        on_failure=draw(st.sampled_from(["", "stop", "continue"])),
    )
    ids = ["a", "b", "c", "d", "e", "f"][: draw(st.integers(1, 6))]
    for index, step_id in enumerate(ids):
        step = flow.steps.add()
        step.CopyFrom(draw(hostile_steps(templated, deep, sane=True)))
        step.step_id = step_id
        if parallel and index:
            earlier = st.sampled_from(ids[:index])
            step.depends_on.extend(draw(st.lists(earlier, unique=True, max_size=2)))
    if len(ids) > 1 and draw(st.integers(0, 3)) == 0:
        rollback = ids[-1]
        flow.rollback_steps.append(rollback)
        for step in flow.steps:
            if rollback in step.depends_on:
                step.depends_on.remove(rollback)
    tools = sorted({step.tool for step in flow.steps})
    plan.security_context.allowed_tools.extend(tools)
    if "http.request" in tools:
        plan.security_context.required_capabilities.append("network.http")


def configuration_values() -> st.SearchStrategy[dict[str, JSON]]:
    wrong = PLAIN_LEAVES | st.lists(PLAIN_LEAVES, max_size=2)
    return st.fixed_dictionaries(
        {},
        optional={
            "timeout": st.sampled_from(["30s", "1e5s", "-1s", "abc", "0.5s", 5, -5, 0]) | wrong,
            "retry_policy": st.fixed_dictionaries(
                {},
                optional={
                    "maxAttempts": st.sampled_from([2, "many", 1e20, -3]) | wrong,
                    "initialDelay": st.sampled_from(["0.01s", "1e20s", "-1s", 5]) | wrong,
                    "exponentialBase": wrong,
                    "surprise": wrong,
                },
            )
            | wrong,
            "\u202eodd": wrong,
        },
    )


def valid_duration(seconds: int, nanos: int) -> bool:
    return 0 <= seconds <= 315_576_000_000 and 0 <= nanos < 10**9 and (seconds or nanos) > 0


@dataclass
class Hostile:
    """A hostile request and the steps a run of it must have, if accepted."""

    request: pb.ExecuteRequest
    step_ids: set[str] = field(default_factory=set)


@st.composite
def hostile_requests(draw: st.DrawFn) -> Hostile:
    """ExecuteRequests with hostile values in every field: template and CEL bombs, deep and
    huge Structs, or both. Half have a well-formed plan around their hostile values, so that
    they get past validation and run."""
    templated = draw(st.integers(0, 3)) > 0
    deep = draw(st.integers(0, 2)) == 0
    sane = draw(st.booleans())
    request = pb.ExecuteRequest()
    plan = request.executable_plan
    plan.plan_id, plan.name, plan.version, plan.description, plan.main_flow = (
        draw(ODD_TEXT) for _ in range(5)
    )
    context = plan.security_context
    if sane:
        draw(sane_flows(plan, templated, deep))
    else:
        budget = 12
        for _ in range(draw(st.integers(0, 3))):
            flow = plan.flows.add(
                flow_id=draw(st.sampled_from(["main", "side", "main", ""]) | ODD_TEXT),
                name=draw(ODD_TEXT),
                parallel_execution=draw(st.booleans()),
                max_concurrency=draw(st.sampled_from([0, 1, 2, -1, 2**31 - 1, -(2**31)])),
                on_failure=draw(st.sampled_from(["", "stop", "continue", "STOP", "\u202estop"])),
                rollback_steps=draw(st.lists(IDS, max_size=2)),
            )
            for _ in range(draw(st.integers(0, min(4, budget)))):
                flow.steps.add().CopyFrom(draw(hostile_steps(templated, deep, sane=False)))
                budget -= 1
        used = [step.tool for flow in plan.flows for step in flow.steps]
        context.allowed_tools.extend(draw(st.sampled_from([used, [*used, "\u200b"], []])))
        if "http.request" in used and draw(st.booleans()):
            context.required_capabilities.append("network.http")
        context.required_capabilities.extend(draw(st.lists(ODD_TEXT, max_size=1)))
    context.requires_approval = draw(st.integers(0, 19)) == 0
    context.data_classification = draw(st.sampled_from(["", "public", "restricted"]) | ODD_TEXT)
    if not sane:
        plan.configuration.update(draw(configuration_values()))
    elif draw(st.booleans()):
        retry: dict[str, JSON] = {"maxAttempts": draw(st.integers(1, 3)), "initialDelay": "0.01s"}
        plan.configuration.update(
            {"timeout": draw(st.sampled_from(["30s", 5])), "retry_policy": retry}
        )
    if draw(st.integers(0, 3)) == 0:  # an operand for `params.x + params.x + ...`
        request.parameters.update({"x": "y" * draw(st.sampled_from([10, 10_000, 1_000_000]))})
    for struct in (request.parameters, request.variables, plan.variables):
        if draw(st.booleans()):
            struct.update(draw(st.dictionaries(ODD_TEXT, PLAIN_LEAVES, max_size=3)))
        if deep and draw(st.booleans()):
            depth = draw(DEPTHS)
            struct.update({"deep": nested(depth - 1, "leaf")})
    text = SHORT_TEXT if sane else ODD_TEXT
    if not sane:
        request.plan_hash = draw(st.sampled_from(["", "sha256:" + "0" * 64, "md5:x"]) | ODD_TEXT)
    request.triggered_by = draw(text)
    request.correlation_id = draw(text)
    request.idempotency_key = draw(text)
    request.dry_run = draw(st.integers(0, 4)) == 0
    if draw(st.booleans()):
        request.validate_capabilities = draw(st.booleans())
    timeout = None if sane else draw(st.none() | DURATIONS)
    if timeout is not None and not valid_duration(*timeout):
        request.timeout.CopyFrom(duration(*timeout))
    else:
        # A valid timeout is shortened: an accepted run must end within the example.
        request.timeout.FromNanoseconds(int(RUN_TIMEOUT_SECONDS * 1e9))
    request.async_execution = False
    step_ids = {step.step_id for flow in plan.flows for step in flow.steps}
    return Hostile(request, step_ids)


def execute_hostile(channel: grpc.Channel, hostile: Hostile) -> None:
    """Send one hostile request: a precise refusal that leaves no run behind, or a run that
    ends cleanly with every invariant holding. Then the server must be healthy."""
    stub = stub_of(channel)
    tenant = new_tenant()
    try:
        response = stub.Execute(hostile.request, metadata=md(tenant), timeout=30)
    except grpc.RpcError as err:
        details = failure(err)
        event(f"refused: {details.code.name} {details.reason}")
        if details.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not details.reason:
            # gRPC's own refusal of a message over max_receive_message_length.
            assert hostile.request.ByteSize() > MAX_REQUEST_BYTES, details
        else:
            details = domain_failure(
                err, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
            )
            if details.reason in ("VALIDATION_FAILED", "CAPABILITY_DENIED"):
                # One violation per problem, capped (status details ride in trailers).
                assert 1 <= len(details.violations) <= 51, details.violations
        assert list_runs(stub, tenant) == [], "a refused request left a run behind"
    else:
        assert response.success and response.run_id
        assert response.execution.run_id == response.run_id
        assert hostile.request.ByteSize() <= MAX_REQUEST_BYTES
        execution = check_run(stub, tenant, response.run_id, hostile.step_ids)
        assert execution.status in TERMINAL, "the run outlived its timeout"
        event(f"accepted: {STATUS_NAMES[execution.status]} {execution.error_reason}")
        assert [run.run_id for run in list_runs(stub, tenant)] == [response.run_id]
    assert_healthy(channel)


@settings(
    max_examples=550,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(hostile=hostile_requests())
def test_hostile_execute_requests(hostile_channel: grpc.Channel, hostile: Hostile) -> None:
    execute_hostile(hostile_channel, hostile)


@st.composite
def large_plans(draw: st.DrawFn) -> Hostile:
    """Plans of thousands of steps (the limit is 1,000), up to and over the 4 MiB request
    limit: chains, fan-ins, one huge cycle, duplicate ids, self-dependencies."""
    n = draw(st.sampled_from([999, 1000, 1001, 2500, 5000]) | st.integers(900, 6000))
    shape = draw(st.sampled_from(["chain", "fan_in", "cycle", "duplicates", "self", "flat"]))
    pad = draw(st.sampled_from([0, 10, 1000, 4000, 4300]))
    steps: list[dict[str, JSON]] = []
    for i in range(n):
        step: dict[str, JSON] = {"stepId": f"s{i}", "tool": "core.echo"}
        if shape == "chain" and i:
            step["dependsOn"] = [f"s{i - 1}"]
        elif shape == "fan_in" and i == n - 1:
            step["dependsOn"] = [f"s{j}" for j in range(n - 1)]
        elif shape == "cycle":
            step["dependsOn"] = [f"s{(i + 1) % n}"]
        elif shape == "duplicates":
            step["stepId"] = f"s{i % 3}"
        elif shape == "self":
            step["dependsOn"] = [f"s{i}"]
        if pad:
            step["parameters"] = {"pad": "\u202e" * (pad // 3)}
        steps.append(step)
    request = pb.ExecuteRequest(
        executable_plan=plan_of(*steps, parallel=shape in ("fan_in", "cycle", "self")),
        dry_run=draw(st.booleans()),
    )
    return Hostile(request, {str(step["stepId"]) for step in steps})


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile=large_plans())
def test_very_large_plans(hostile_channel: grpc.Channel, hostile: Hostile) -> None:
    """Refused precisely and fast, or accepted whole; an accepted one is cancelled at once
    (1,000 steps take the engine many seconds) and must be whole and consistent."""
    stub = stub_of(hostile_channel)
    tenant = new_tenant()
    started = time.monotonic()
    try:
        response = stub.Execute(hostile.request, metadata=md(tenant), timeout=60)
    except grpc.RpcError as err:
        details = failure(err)
        assert details.code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ), details
        if details.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert hostile.request.ByteSize() > MAX_REQUEST_BYTES
        else:
            assert 1 <= len(details.violations) <= 51
        assert time.monotonic() - started < 10, "refusing a large plan took too long"
        assert list_runs(stub, tenant) == []
    else:
        assert len(hostile.step_ids) <= 1000 and hostile.request.ByteSize() <= MAX_REQUEST_BYTES
        if response.execution.status not in TERMINAL:
            try:
                stub.Cancel(pb.CancelRequest(run_id=response.run_id), metadata=md(tenant))
            except grpc.RpcError as err:  # it may have finished (a dry run, a small one)
                assert domain_failure(err, grpc.StatusCode.FAILED_PRECONDITION).reason == (
                    "CANCEL_FAILED"
                )
        execution = check_run(stub, tenant, response.run_id, hostile.step_ids)
        assert execution.status in TERMINAL
    assert_healthy(hostile_channel)


# --- raw garbage bytes --------------------------------------------------------------------


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Bytes that are not, or only nearly, a request: random, truncated or overlong
    length-delimited fields, varints that never end, deep group nesting, a valid request
    with flipped bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=256))
    if kind == 1:
        return bytes([0x0A]) + draw(st.binary(min_size=1, max_size=10))
    if kind == 2:
        return b"\x10" + b"\xff" * draw(st.integers(1, 20))
    if kind == 3:
        depth = draw(st.integers(1, 300))
        return b"\x0b" * depth + b"\x0c" * draw(st.integers(0, depth))  # start/end group
    if kind == 4:
        field_number = draw(st.integers(1, 2**29 - 1))
        wire_type = draw(st.integers(0, 7))
        tag = bytearray()
        value = field_number << 3 | wire_type
        while True:
            low, value = value & 0x7F, value >> 7
            tag.append(low | (0x80 if value else 0))
            if not value:
                break
        return bytes(tag) + draw(st.binary(max_size=16))
    valid = pb.ExecuteRequest(executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}))
    data = bytearray(valid.SerializeToString())
    for index in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=4)):
        data[index] ^= draw(st.integers(1, 255))
    return bytes(data)


def parses(method: str, data: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(data)
    except DecodeError:
        return False
    return True


RESPONSE_TYPES: dict[str, type[Message]] = {
    "Execute": pb.ExecuteResponse,
    "GetExecution": pb.GetExecutionResponse,
    "ListExecutions": pb.ListExecutionsResponse,
    "Pause": pb.PauseResponse,
    "Resume": pb.ResumeResponse,
    "Cancel": pb.CancelResponse,
    "RespondToClarification": pb.RespondToClarificationResponse,
    "WatchExecution": pb.WatchExecutionResponse,
    "WatchExecutions": pb.WatchExecutionsResponse,
}


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(sorted(REQUEST_TYPES)),
    data=garbage(),
    metadata=st.sampled_from(["tenant", "none", "bad"]),
)
def test_garbage_bytes_on_every_method_path(
    hostile_channel: grpc.Channel, method: str, data: bytes, metadata: str
) -> None:
    """Bytes that do not parse as the method's request are INVALID_ARGUMENT (grpc.aio itself
    would answer UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>: ...",
    which the server's tolerant request decoder prevents); bytes that do parse get a precise
    status from the service, or a well-formed answer. Either way the server stays healthy."""
    call_metadata: Metadata = {
        "tenant": md(new_tenant()),
        "none": (),
        "bad": (("x-tenant-id", "not-a-uuid"),),
    }[metadata]
    try:
        if method in STREAMING:
            stream = raw_stream(hostile_channel, method)(data, metadata=call_metadata, timeout=10)
            answer = next(stream, None)
            stream.cancel()
        else:
            answer = raw_unary(hostile_channel, method)(data, metadata=call_metadata, timeout=10)
    except grpc.RpcError as err:
        details = domain_failure(err)
        if not parses(method, data):
            assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.reason == "VALIDATION_FAILED", details
    else:
        assert parses(method, data) and metadata == "tenant", "garbage was answered"
        if answer is not None:
            RESPONSE_TYPES[method].FromString(answer)
        if method == "WatchExecutions":  # nothing happens in a new tenant but heartbeats
            assert answer is not None
            frame = pb.WatchExecutionsResponse.FromString(answer)
            assert frame.event.type == pb.EVENT_TYPE_HEARTBEAT and frame.cursor
    assert_healthy(hostile_channel)


# --- hostile values in the other requests -------------------------------------------------


@dataclass
class WaitingRun:
    """A tenant with one run waiting on a person, to aim hostile control calls at."""

    tenant: str
    run_id: str
    clarification_id: str


@pytest.fixture(scope="module")
def waiting_run(hostile_channel: grpc.Channel) -> WaitingRun:
    stub = stub_of(hostile_channel)
    tenant = new_tenant()
    plan = plan_of(
        {
            "stepId": "ask",
            "tool": "core.clarify",
            "parameters": {"category": "multiple_choice", "options": ["red", "green"]},
        }
    )
    request = pb.ExecuteRequest(executable_plan=plan)
    request.timeout.FromSeconds(86_400)  # it must outlive the module, however long it runs
    run_id = stub.Execute(request, metadata=md(tenant)).run_id
    for _ in range(200):
        execution = stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
        pending = execution.execution.pending_clarifications
        if pending:
            return WaitingRun(tenant, run_id, pending[0].clarification_id)
        time.sleep(0.02)
    raise AssertionError("the clarification never came")


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    return st.builds(
        timestamp_pb2.Timestamp,
        seconds=st.sampled_from([0, -1, 1, 253402300799, 253402300800, -62135596801, 2**62]),
        nanos=st.sampled_from([0, 1, 999_999_999, 1_000_000_000, -1]),
    )


@st.composite
def filters(draw: st.DrawFn) -> pb.ExecutionFilter:
    flt = pb.ExecutionFilter(
        statuses=[
            pb.ExecutionStatus.ValueType(status)
            for status in draw(st.lists(st.sampled_from([0, 1, 4, 6, 7, 99, -1]), max_size=3))
        ],
        plan_hash=draw(ODD_TEXT),
        triggered_by=draw(ODD_TEXT),
    )
    for name in ("created_after", "created_before"):
        if draw(st.booleans()):
            getattr(flt, name).CopyFrom(draw(timestamps()))
    return flt


@st.composite
def answers(draw: st.DrawFn) -> struct_pb2.Value | None:
    """Clarification answers of every type: missing, odd text, any double (NaN and the
    infinities too), lists, and maps nested past every limit."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return None
    value = struct_pb2.Value()
    if kind == 1:
        value.string_value = draw(st.sampled_from(["red", "green", "RED", "red\u200b"]) | ODD_TEXT)
    elif kind == 2:
        value.number_value = draw(st.floats())
    elif kind == 3:
        value.list_value.extend(draw(st.lists(PLAIN_LEAVES, max_size=3)))
    else:
        value.struct_value.update({"v": nested(draw(DEPTHS), draw(LEAVES))})
    return value


RUN_IDS = st.sampled_from(["", "run", "00000000-0000-0000-0000-000000000000"]) | ODD_TEXT


@st.composite
def control_calls(draw: st.DrawFn, target: WaitingRun) -> tuple[str, Message]:
    """One call to any method but Execute, its fields hostile, sometimes aimed at a real run
    (which must survive it)."""
    method = draw(st.sampled_from(sorted(set(REQUEST_TYPES) - {"Execute"})))
    run_id = draw(st.just(target.run_id) | RUN_IDS)
    reason = draw(ODD_TEXT)
    if method == "GetExecution":
        return method, pb.GetExecutionRequest(run_id=run_id)
    if method == "ListExecutions":
        request = pb.ListExecutionsRequest(
            page_size=draw(st.sampled_from([0, 1, 500, 501, -1, 2**31 - 1, -(2**31)])),
            page_token=draw(st.sampled_from(["", "x", "eyJwayI6MX0", "a.b.c"]) | ODD_TEXT),
        )
        if draw(st.booleans()):
            request.filter.CopyFrom(draw(filters()))
        return method, request
    if method in ("Pause", "Resume", "Cancel"):
        # The real run is spared Cancel (it would end the target of every later example).
        if method == "Cancel" and run_id == target.run_id:
            run_id = str(uuid.uuid4())
        make = {"Pause": pb.PauseRequest, "Resume": pb.ResumeRequest, "Cancel": pb.CancelRequest}
        return method, make[method](run_id=run_id, reason=reason)
    if method == "RespondToClarification":
        respond = pb.RespondToClarificationRequest(
            run_id=run_id,
            clarification_id=draw(st.just(target.clarification_id) | RUN_IDS),
            responded_by=draw(ODD_TEXT),
        )
        answer = draw(answers())
        if answer is not None:
            respond.response.CopyFrom(answer)
        if respond.response.string_value in ("red", "green"):
            respond.response.string_value += "?"  # a right answer would end the target run
        return method, respond
    if method == "WatchExecution":
        after = draw(st.sampled_from([0, 1, 2, 3, 10**6, -1, 2**63 - 1, -(2**63)]))
        return method, pb.WatchExecutionRequest(run_id=run_id, after_sequence=after)
    watch_all = pb.WatchExecutionsRequest(
        after_cursor=draw(st.sampled_from(["", "x", "eyJpZCI6MX0"]) | ODD_TEXT)
    )
    if draw(st.booleans()):
        watch_all.filter.CopyFrom(draw(filters()))
    return method, watch_all


@settings(max_examples=750, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_control_requests(
    hostile_channel: grpc.Channel, waiting_run: WaitingRun, data: st.DataObject
) -> None:
    """Odd run ids, forged page tokens and cursors, filters naming statuses that do not
    exist, timestamps out of range, sequences out of range, wrong answers of every type:
    precise statuses only, and the real run they are aimed at (paused and resumed at
    random, never cancelled or answered) stays whole and waiting."""
    method, request = data.draw(control_calls(waiting_run))
    tenant = data.draw(st.sampled_from([waiting_run.tenant, new_tenant()]))
    payload = request.SerializeToString()
    try:
        if method in STREAMING:
            stream = raw_stream(hostile_channel, method)(payload, metadata=md(tenant), timeout=10)
            next(stream, None)
            stream.cancel()
        else:
            raw_unary(hostile_channel, method)(payload, metadata=md(tenant), timeout=10)
    except grpc.RpcError as err:
        domain_failure(err)
    if data.draw(st.integers(0, 9)) == 0:
        execution = check_run(
            stub_of(hostile_channel), waiting_run.tenant, waiting_run.run_id, {"ask"}
        )
        assert execution.status in (pb.EXECUTION_STATUS_RUNNING, pb.EXECUTION_STATUS_PAUSED)
        assert [c.clarification_id for c in execution.pending_clarifications] == [
            waiting_run.clarification_id
        ]
    assert_healthy(hostile_channel)


# --- random sequences of control calls over many runs -------------------------------------


@dataclass(frozen=True)
class Kind:
    """A small plan for the control-call machine."""

    steps: tuple[dict[str, JSON], ...]
    parallel: bool = False

    @property
    def step_ids(self) -> set[str]:
        return {str(step["stepId"]) for step in self.steps}

    def plan(self) -> pb.ExecutablePlan:
        return plan_of(*self.steps, parallel=self.parallel)


CHOICE = {"category": "multiple_choice", "prompt": "colour?", "options": ["red", "green"]}
KINDS: dict[str, Kind] = {
    "echo": Kind(({"stepId": "a", "tool": "core.echo"}, {"stepId": "b", "tool": "core.echo"})),
    "wait": Kind(
        (
            {"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 0.15}},
            {"stepId": "after", "tool": "core.echo", "parameters": {"w": "{{ steps.w.output }}"}},
        )
    ),
    "choice": Kind(
        (
            {"stepId": "ask", "tool": "core.clarify", "parameters": CHOICE},
            {"stepId": "use", "tool": "core.echo", "parameters": {"v": "{{ steps.ask.output }}"}},
        )
    ),
    "input": Kind(({"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}},)),
    "approve": Kind(({"stepId": "go", "tool": "core.echo", "requiresApproval": True},)),
    "fail": Kind(
        (
            {
                "stepId": "f",
                "tool": "core.fail",
                "retryPolicy": {"maxAttempts": 2, "initialDelay": "0.05s"},
            },
            {"stepId": "never", "tool": "core.echo"},
        )
    ),
    "flaky": Kind(
        (
            {
                "stepId": "f",
                "tool": "core.fail",
                "parameters": {"fail_times": 1},
                "retryPolicy": {"maxAttempts": 3, "initialDelay": "0.02s"},
            },
        )
    ),
    "mixed": Kind(
        (
            {"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 0.1}},
            {"stepId": "ask", "tool": "core.clarify", "parameters": CHOICE},
            {"stepId": "end", "tool": "core.echo", "dependsOn": ["w", "ask"]},
        ),
        parallel=True,
    ),
}


# The statuses in which each control call is refused (DESIGN §4), and its result.
REFUSED_IN = {
    "pause": {"PAUSED", "COMPLETED", "FAILED", "CANCELLED"},
    "resume": {"PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"},
    "cancel": {"COMPLETED", "FAILED", "CANCELLED"},
}
AFTER = {
    "pause": pb.EXECUTION_STATUS_PAUSED,
    "resume": pb.EXECUTION_STATUS_RUNNING,
    "cancel": pb.EXECUTION_STATUS_CANCELLED,
}


@dataclass
class Run:
    """What the machine knows of a run: only the controller (this machine) pauses, resumes
    and cancels it, so whatever it learned stays true until it acts again."""

    kind: str
    # Paused by us and not resumed or cancelled since: it stays PAUSED, unless a step that was
    # in flight fails it (PAUSED -> FAILED is in the transition table).
    paused: bool = False
    terminal: int = 0  # the terminal status, once seen
    answered: set[str] = field(default_factory=set)


class ControlCalls(RuleBasedStateMachine):
    """Execute, Pause, Resume, Cancel, RespondToClarification, GetExecution, WatchExecution
    and ListExecutions in random order over many runs of one tenant."""

    runs = Bundle("runs")

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__()
        self.channel = channel
        self.stub = stub_of(channel)
        self.tenant = new_tenant()
        self.known: dict[str, Run] = {}
        # The tenant's feed of status changes, read from before the first run exists: it
        # must show every run from its creation (sequence 1) to its end.
        self.feed = self.stub.WatchExecutions(
            pb.WatchExecutionsRequest(), metadata=self.md, timeout=300
        )
        first = next(self.feed)  # a heartbeat: the feed's position is fixed
        assert first.event.type == pb.EVENT_TYPE_HEARTBEAT
        self.changes: list[pb.ExecutionEvent] = []
        self.feed_error: list[grpc.RpcError] = []
        self.reader = threading.Thread(target=self.read_feed, daemon=True)
        self.reader.start()

    def read_feed(self) -> None:
        try:
            for frame in self.feed:
                if frame.event.type != pb.EVENT_TYPE_HEARTBEAT:
                    self.changes.append(frame.event)
        except grpc.RpcError as err:
            if cast(grpc.Call, err).code() != grpc.StatusCode.CANCELLED:
                self.feed_error.append(err)

    @property
    def md(self) -> Metadata:
        return md(self.tenant)

    def get(self, run_id: str) -> pb.Execution:
        execution = self.stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=self.md, timeout=10
        ).execution
        self.observe(run_id, execution.status)
        return execution

    def observe(self, run_id: str, status: int) -> None:
        run = self.known[run_id]
        if run.terminal:
            assert status == run.terminal, "a terminal run changed status"
            return
        if run.paused:
            assert status in (pb.EXECUTION_STATUS_PAUSED, pb.EXECUTION_STATUS_FAILED), (
                f"a paused run became {STATUS_NAMES.get(status, status)} on its own"
            )
        if status in TERMINAL:
            run.terminal = status
            run.paused = False

    @rule(target=runs, kind=st.sampled_from(sorted(KINDS)), dry_run=st.integers(0, 9))
    def execute(self, kind: str, dry_run: int) -> str:
        request = pb.ExecuteRequest(executable_plan=KINDS[kind].plan(), dry_run=dry_run == 0)
        response = self.stub.Execute(request, metadata=self.md, timeout=10)
        assert response.success and response.execution.steps
        self.known[response.run_id] = Run(kind)
        self.observe(response.run_id, response.status)
        if request.dry_run:
            assert response.status == pb.EXECUTION_STATUS_COMPLETED
        return response.run_id

    def call(
        self, action: str, run_id: str, reason: str
    ) -> pb.PauseResponse | pb.ResumeResponse | pb.CancelResponse:
        if action == "pause":
            return self.stub.Pause(
                pb.PauseRequest(run_id=run_id, reason=reason), metadata=self.md, timeout=10
            )
        if action == "resume":
            return self.stub.Resume(
                pb.ResumeRequest(run_id=run_id, reason=reason), metadata=self.md, timeout=10
            )
        return self.stub.Cancel(
            pb.CancelRequest(run_id=run_id, reason=reason), metadata=self.md, timeout=10
        )

    def control(self, action: str, run_id: str, reason: str) -> None:
        """Pause, Resume or Cancel: success exactly when the run's state allows it, else
        FAILED_PRECONDITION with the action's reason and the status that forbade it."""
        run = self.known[run_id]
        try:
            response = self.call(action, run_id, reason)
        except grpc.RpcError as err:
            details = domain_failure(err, grpc.StatusCode.FAILED_PRECONDITION)
            assert details.reason == f"{action.upper()}_FAILED", details
            current = details.metadata.get("current_status", "")
            assert current in REFUSED_IN[action], (action, current)
            if run.terminal:
                assert current == STATUS_NAMES[run.terminal]
            if run.paused:
                assert current in ("PAUSED", "FAILED"), current
            if current in ("COMPLETED", "FAILED", "CANCELLED"):
                self.observe(run_id, pb.ExecutionStatus.Value(f"EXECUTION_STATUS_{current}"))
            return
        assert response.success and response.run_id == run_id
        assert response.status == AFTER[action], (action, response.status)
        assert not run.terminal, f"{action} succeeded on a terminal run"
        if action == "resume":
            assert run.paused, "resumed a run nobody paused"
        elif action == "pause":
            assert not run.paused, "paused a paused run"
        run.paused = action == "pause"
        if action == "cancel":
            run.terminal = pb.EXECUTION_STATUS_CANCELLED
            execution = self.get(run_id)
            assert not [s.step_id for s in execution.steps if s.status in OPEN_STEPS]
            assert not execution.pending_clarifications

    @rule(run_id=runs, reason=ODD_TEXT)
    def pause(self, run_id: str, reason: str) -> None:
        self.control("pause", run_id, reason)

    @rule(run_id=runs, reason=ODD_TEXT)
    def resume(self, run_id: str, reason: str) -> None:
        self.control("resume", run_id, reason)

    @rule(run_id=runs, reason=ODD_TEXT)
    def cancel(self, run_id: str, reason: str) -> None:
        self.control("cancel", run_id, reason)

    @rule(
        run_id=runs,
        how=st.sampled_from(["right", "right", "wrong", "missing", "unknown", "again"]),
        by=SHORT_TEXT.filter(lambda text: "\x00" not in text),
        choice=st.sampled_from(["red", "green"]),
        verdict=st.booleans(),
    )
    def respond(self, run_id: str, how: str, by: str, choice: str, verdict: bool) -> None:
        """Right answers complete the question; wrong or missing ones are INVALID_ARGUMENT;
        unknown ids NOT_FOUND; answering twice FAILED_PRECONDITION."""
        run = self.known[run_id]
        pending = list(self.get(run_id).pending_clarifications)
        request = pb.RespondToClarificationRequest(run_id=run_id, responded_by=by)
        target: pb.Clarification | None = None
        if how == "again" and run.answered:
            request.clarification_id = sorted(run.answered)[0]
        elif how in ("unknown", "again") or not pending:
            request.clarification_id = str(uuid.uuid4())
        else:
            target = pending[0]
            request.clarification_id = target.clarification_id
            verification = target.category == pb.CLARIFICATION_CATEGORY_USER_VERIFICATION
            multiple = target.category == pb.CLARIFICATION_CATEGORY_MULTIPLE_CHOICE
            if how == "right" and verification:
                request.response.bool_value = verdict
            elif how == "right":
                request.response.string_value = choice if multiple else by
            elif how == "wrong" and verification:
                request.response.string_value = "yes"
            elif how == "wrong" and multiple:
                request.response.string_value = "blue"
            elif how == "wrong":
                request.response.null_value = struct_pb2.NULL_VALUE
        try:
            response = self.stub.RespondToClarification(request, metadata=self.md, timeout=10)
        except grpc.RpcError as err:
            details = domain_failure(err)
            if target is not None:
                assert how != "right", f"a right answer was refused: {details}"
                assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
                assert details.reason == "VALIDATION_FAILED", details
            elif request.clarification_id in run.answered:
                assert details.code == grpc.StatusCode.FAILED_PRECONDITION, details
                assert details.reason == "CLARIFICATION_NOT_PENDING", details
            else:
                assert details.code == grpc.StatusCode.NOT_FOUND, details
                assert details.reason == "CLARIFICATION_NOT_FOUND", details
            return
        assert target is not None and how == "right", f"{how} answer taken"
        run.answered.add(request.clarification_id)
        execution = response.execution
        assert execution.run_id == run_id
        still = {c.clarification_id for c in execution.pending_clarifications}
        assert request.clarification_id not in still
        self.observe(run_id, execution.status)

    @rule(run_id=runs)
    def get_execution(self, run_id: str) -> None:
        execution = self.get(run_id)
        assert {s.step_id for s in execution.steps} == KINDS[self.known[run_id].kind].step_ids

    @rule(run_id=runs, after=st.sampled_from(["zero", "one", "last", "middle"]))
    def watch(self, run_id: str, after: str) -> None:
        last = self.get(run_id).last_sequence
        position = {"zero": 0, "one": 1, "last": last, "middle": last // 2}[after]
        events, ended = read_events(self.stub, self.tenant, run_id, position)
        if position == 0:
            assert events[0].type == pb.EVENT_TYPE_SNAPSHOT and events[0].sequence >= last
            position = events[0].sequence
            events = events[1:]
        sequences = [e.sequence for e in events]
        assert sequences == list(range(position + 1, position + 1 + len(events))), sequences
        if ended and events:
            self.observe(run_id, events[-1].execution.status)
            assert events[-1].execution.status in TERMINAL

    @rule()
    def list_executions(self) -> None:
        listed = list_runs(self.stub, self.tenant)
        assert sorted(e.run_id for e in listed) == sorted(self.known), "runs missing or extra"
        for execution in listed:
            assert execution.last_sequence >= 1 and execution.steps
            self.observe(execution.run_id, execution.status)

    @rule(seconds=st.sampled_from([0.01, 0.05, 0.2]))
    def let_time_pass(self, seconds: float) -> None:
        time.sleep(seconds)

    @invariant()
    def healthy(self) -> None:
        assert_healthy(self.channel)

    def teardown(self) -> None:
        """Cancel what is still open, then hold every run to the full invariants, and the
        tenant's feed to them too: each run's status changes, from its creation at sequence 1
        to its terminal status, in order, as in the run's own log."""
        try:
            finals: dict[str, tuple[int, int]] = {}
            for run_id, run in self.known.items():
                if not run.terminal:
                    self.control("cancel", run_id, "teardown")
                execution = check_run(self.stub, self.tenant, run_id, KINDS[run.kind].step_ids)
                assert execution.status == run.terminal
                finals[run_id] = (execution.last_sequence, execution.status)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self.feed_error:
                ends = {
                    e.run_id: e.sequence for e in self.changes if e.execution.status in TERMINAL
                }
                if all(ends.get(run_id) == last for run_id, (last, _) in finals.items()):
                    break
                time.sleep(0.01)
        finally:
            self.feed.cancel()
            self.reader.join(10)
        assert not self.feed_error, self.feed_error
        seen: dict[str, list[pb.ExecutionEvent]] = {}
        for change in self.changes:
            assert change.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED, change
            seen.setdefault(change.run_id, []).append(change)
        assert set(seen) == set(finals), "the feed missed runs, or showed others"
        for run_id, events in seen.items():
            sequences = [event.sequence for event in events]
            assert sequences[0] == 1 and sequences == sorted(set(sequences)), sequences
            assert events[0].execution.status in (
                pb.EXECUTION_STATUS_PENDING,
                pb.EXECUTION_STATUS_COMPLETED,  # a dry run is born complete
            )
            last, status = finals[run_id]
            assert (sequences[-1], events[-1].execution.status) == (last, status)


def test_random_control_calls_over_many_runs(hostile_channel: grpc.Channel) -> None:
    class OnThisServer(ControlCalls):
        def __init__(self) -> None:
            super().__init__(hostile_channel)

    run_state_machine_as_test(
        OnThisServer,
        settings=settings(
            max_examples=100,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- what fuzzing found: regression tests ----------------------------------------------------


def raw_code(channel: grpc.Channel, method: str, payload: bytes, tenant: str) -> grpc.StatusCode:
    """The status the server gives `payload` (bytes in, bytes out: what the server sends is
    told apart from what the Python client could parse)."""
    try:
        if method in STREAMING:
            stream = raw_stream(channel, method)(payload, metadata=md(tenant), timeout=30)
            next(stream, None)
            stream.cancel()
        else:
            raw_unary(channel, method)(payload, metadata=md(tenant), timeout=30)
    except grpc.RpcError as err:
        return cast(grpc.Call, err).code()
    return grpc.StatusCode.OK


def test_deep_structs_are_invalid_argument_not_unknown(hostile_channel: grpc.Channel) -> None:
    """Found: Structs nested past protobuf's decode limit (100 message levels, so step
    parameters deeper than 31) answered UNKNOWN with the DecodeError text."""
    stub = stub_of(hostile_channel)
    for depth in (33, 200):
        request = pb.ExecuteRequest(executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}))
        request.executable_plan.flows[0].steps[0].parameters.update({"x": nested(depth, 1)})
        with pytest.raises(grpc.RpcError) as refused:
            stub.Execute(request, metadata=md(new_tenant()), timeout=10)
        details = domain_failure(refused.value, grpc.StatusCode.INVALID_ARGUMENT)
        assert details.reason == "VALIDATION_FAILED", (depth, details)


def test_undecodable_requests_are_invalid_argument(hostile_channel: grpc.Channel) -> None:
    """Found: bytes that do not parse answered UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>: ..." (grpc.aio's answer when a request
    deserializer raises), unseen by the interceptors, the access log and the metrics."""
    codes = {
        method: raw_code(hostile_channel, method, b"\xff\xff\xff", new_tenant())
        for method in sorted(REQUEST_TYPES)
    }
    assert set(codes.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, codes


def deep_output_request(objects: int, lists: int) -> bytes:
    """One core.echo step whose parameters are `objects` levels of objects around a template
    that builds `lists` levels of lists: within the submit limits, yet its output nests as
    deep as protobuf allows, or deeper."""
    request = pb.ExecuteRequest(
        executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}), async_execution=False
    )
    template = "{{ " + "[" * lists + "1" + "]" * lists + " }}"
    request.executable_plan.flows[0].steps[0].parameters.update(nested(objects, template))
    return request.SerializeToString()


@pytest.mark.parametrize(("objects", "lists"), [(22, 16), (16, 22), (20, 30)])
def test_template_built_deep_outputs(
    hostile_channel: grpc.Channel, objects: int, lists: int
) -> None:
    """Found: an output nesting 98 protobuf levels (3 per object, 2 per list) made
    Execute(async_execution=false) and, for good, the tenant's ListExecutions answer INTERNAL
    (the Execution could not be copied into a response); deeper ones crashed the step in the
    engine ("internal error (DecodeError)", INTERNAL_ERROR)."""
    tenant = new_tenant()
    answer = raw_unary(hostile_channel, "Execute")(
        deep_output_request(objects, lists), metadata=md(tenant), timeout=30
    )
    execution = pb.ExecuteResponse.FromString(answer).execution
    assert execution.status in TERMINAL
    assert execution.error_reason != "INTERNAL_ERROR", execution.error_message
    assert execution.steps[0].error_reason != "INTERNAL_ERROR", execution.steps[0].error
    assert raw_code(hostile_channel, "ListExecutions", b"", tenant) == grpc.StatusCode.OK
    check_run(stub_of(hostile_channel), tenant, execution.run_id, {"a"})


def test_non_finite_and_deep_answers_are_invalid_argument(
    hostile_channel: grpc.Channel, waiting_run: WaitingRun
) -> None:
    """Found: a NaN or infinite answer (top level or nested) answered INTERNAL."""
    nested_nan = struct_pb2.Value()
    nested_nan.struct_value.update({"x": math.nan})
    deep = struct_pb2.Value()
    deep.struct_value.update({"x": nested(31, 1)})
    codes = []
    for answer in (struct_pb2.Value(number_value=math.inf), nested_nan, deep):
        request = pb.RespondToClarificationRequest(
            run_id=waiting_run.run_id,
            clarification_id=waiting_run.clarification_id,
            response=answer,
        )
        payload = request.SerializeToString()
        codes.append(
            raw_code(hostile_channel, "RespondToClarification", payload, waiting_run.tenant)
        )
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * 3, codes


def string_bomb(literal: int, terms: int) -> str:
    """A CEL condition of about 1,000 characters whose evaluation builds a string of
    literal * terms**3 characters from three nested comprehensions over one-item lists."""

    def cat(name: str) -> str:
        return " + ".join([name] * terms)

    return (
        f"['{'x' * literal}'].map(a, [{cat('a')}].map(b, [{cat('b')}]"
        f".map(c, size({cat('c')}))))[0][0][0] > 0"
    )


def healthy_throughout(channel: grpc.Channel, work: Callable[[], object]) -> float:
    """The slowest health check answered while `work` runs in another thread."""
    done = threading.Event()
    slowest = 0.0

    def run() -> None:
        try:
            work()
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    health = health_pb2_grpc.HealthStub(channel)
    while not done.is_set():
        started = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    worker.join()
    return slowest


def test_cel_string_growth_in_comprehensions_is_bounded(hostile_channel: grpc.Channel) -> None:
    """Found: the cost limit counted list items only, so strings growing by `+` in nested
    comprehensions (literal * terms**3: ~10 GB from a 4 KB condition) were built on the
    event loop and stalled the server."""
    stub = stub_of(hostile_channel)
    request = pb.ExecuteRequest(
        executable_plan=plan_of(
            # 12 terms: the runtime refuses longer `+` chains at submit (32 levels of nesting).
            {"stepId": "a", "tool": "core.echo", "conditions": [string_bomb(3000, 12)]}
        ),
        async_execution=False,
    )
    outcome: list[pb.ExecuteResponse] = []
    slowest = healthy_throughout(
        hostile_channel,
        lambda: outcome.append(stub.Execute(request, metadata=md(new_tenant()), timeout=60)),
    )
    assert outcome[0].execution.steps[0].status == pb.STEP_STATUS_FAILED
    assert slowest < 1.0, f"health took {slowest:.1f}s while the condition ran"


def test_cel_concatenation_is_bounded(hostile_channel: grpc.Channel) -> None:
    """Found: outside comprehensions concatenation was not bounded at all: 100 terms over a
    1 MB parameter built 100 MB (copying ~5 GB) on the event loop, stalling the server."""
    stub = stub_of(hostile_channel)

    def request(terms: int) -> pb.ExecuteRequest:
        condition = "size(" + " + ".join(["params.x"] * terms) + ") > 0"
        return pb.ExecuteRequest(
            executable_plan=plan_of(
                {"stepId": "a", "tool": "core.echo", "conditions": [condition]}
            ),
            parameters=struct_of({"x": "y" * 1_000_000}),
            async_execution=False,
        )

    # 100 terms no longer parse (the runtime nests at most 32 levels): refused at submit.
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(request(100), metadata=md(new_tenant()), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    outcome: list[pb.ExecuteResponse] = []
    slowest = healthy_throughout(
        hostile_channel,
        lambda: outcome.append(stub.Execute(request(25), metadata=md(new_tenant()), timeout=120)),
    )
    step = outcome[0].execution.steps[0]
    assert step.status == pb.STEP_STATUS_FAILED and "too costly" in step.error, step
    assert slowest < 1.0, f"health took {slowest:.1f}s while the condition ran"


def test_echoed_input_fits_in_the_trailers(hostile_channel: grpc.Channel) -> None:
    """Found: errors quoted user input whole (a parameter key in a violation's field path, a
    run id in the message and ErrorInfo); past gRPC's metadata limit (16 KiB, or at random
    past the 8 KiB soft one) the client got RESOURCE_EXHAUSTED 'received metadata size
    exceeds hard limit' instead of the error."""
    stub = stub_of(hostile_channel)
    request = pb.ExecuteRequest(executable_plan=plan_of({"stepId": "a", "tool": "core.echo"}))
    request.executable_plan.flows[0].steps[0].parameters.update({"k" * 20_000: "{{"})
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(request, metadata=md(new_tenant()), timeout=10)
    details = details_of(cast(grpc.aio.AioRpcError, refused.value))
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.reason == "VALIDATION_FAILED"
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetExecution(
            pb.GetExecutionRequest(run_id="r" * 20_000), metadata=md(new_tenant()), timeout=10
        )
    details = details_of(cast(grpc.aio.AioRpcError, missing.value))
    assert details.code == grpc.StatusCode.NOT_FOUND, details


def test_invalid_filter_timestamps_are_invalid_argument(hostile_channel: grpc.Channel) -> None:
    """Found: a filter timestamp that is not a valid Timestamp made ListExecutions and
    WatchExecutions answer INTERNAL (ToNanoseconds raised ValueError)."""
    codes = set()
    for seconds, nanos in [(1, -1), (0, 10**9), (253402300800, 0), (-62135596801, 0)]:
        flt = pb.ExecutionFilter()
        flt.created_after.seconds, flt.created_after.nanos = seconds, nanos
        codes.add(
            raw_code(
                hostile_channel,
                "ListExecutions",
                pb.ListExecutionsRequest(filter=flt).SerializeToString(),
                new_tenant(),
            )
        )
        codes.add(
            raw_code(
                hostile_channel,
                "WatchExecutions",
                pb.WatchExecutionsRequest(filter=flt).SerializeToString(),
                new_tenant(),
            )
        )
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT}, codes


WRONG_TYPED = {
    "clarify-options-number": ("core.clarify", {"options": -1}),
    "clarify-options-bool": ("core.clarify", {"options": True}),
    "http-headers-list": ("http.request", {"url": "http://127.0.0.1:1/", "headers": [1, 2]}),
    "http-headers-string": ("http.request", {"url": "http://127.0.0.1:1/", "headers": "abc"}),
    "http-timeout-string": ("http.request", {"url": "http://127.0.0.1:1/", "timeout_seconds": "x"}),
    "http-timeout-list": ("http.request", {"url": "http://127.0.0.1:1/", "timeout_seconds": [1]}),
    "http-url-unclosed-bracket": ("http.request", {"url": "http://[::1"}),
    "http-url-bidi-host": ("http.request", {"url": "http://\u202e/"}),
    "http-url-nul-host": ("http.request", {"url": "http://\x00/"}),
    "http-url-long-label": ("http.request", {"url": "http://" + "a" * 300 + "/"}),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPED))
def test_wrong_typed_tool_parameters_fail_the_step_precisely(
    hostile_channel: grpc.Channel, case: str
) -> None:
    """Found: tools trusted their parameter types (core.clarify iterated a numeric `options`,
    http.request called dict() on `headers` and float() on `timeout_seconds`, httpx raised on
    malformed hosts): the step failed as 'internal error (TypeError); see the server log'."""
    tool, parameters = WRONG_TYPED[case]
    plan = plan_of({"stepId": "a", "tool": tool, "parameters": parameters})
    plan.security_context.allowed_tools.append(tool)
    plan.security_context.required_capabilities.append("network.http")
    request = pb.ExecuteRequest(executable_plan=plan, async_execution=False)
    request.timeout.FromMilliseconds(500)
    tenant = new_tenant()
    response = stub_of(hostile_channel).Execute(request, metadata=md(tenant), timeout=30)
    step = response.execution.steps[0]
    assert step.status == pb.STEP_STATUS_FAILED, step
    assert step.error_reason != "INTERNAL_ERROR", step.error


def run_with_rollback(
    channel: grpc.Channel, rollback: dict[str, JSON]
) -> tuple[pb.StepExecution, list[pb.ExecutionEvent]]:
    """A flow whose one step fails, so that its rollback step `rb` runs: the rollback step
    once it has finished or waits on a person (the run then cancelled), and the run's events."""
    plan = plan_of({"stepId": "a", "tool": "core.fail"}, rollback, rollbackSteps=["rb"])
    tenant = new_tenant()
    stub = stub_of(channel)
    run_id = stub.Execute(pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant)).run_id
    for _ in range(300):
        current = stub.GetExecution(
            pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
        ).execution
        status = current.status
        if status in TERMINAL or current.pending_clarifications:
            break
        time.sleep(0.01)
    if status not in TERMINAL:
        stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(tenant))
    execution = check_run(stub, tenant, run_id, {"a", "rb"})
    events, _ = read_events(stub, tenant, run_id, after=1)
    return next(step for step in execution.steps if step.step_id == "rb"), events


def asked(events: list[pb.ExecutionEvent], step_id: str) -> bool:
    return any(
        e.type == pb.EVENT_TYPE_CLARIFICATION_REQUESTED and e.step_id == step_id for e in events
    )


def test_rollback_steps_ask_for_approval(hostile_channel: grpc.Channel) -> None:
    """Found: a rollback step with requires_approval ran without asking anyone (rollback
    steps skipped the approval): an approval bypass."""
    step, events = run_with_rollback(
        hostile_channel, {"stepId": "rb", "tool": "core.echo", "requiresApproval": True}
    )
    assert step.status != pb.STEP_STATUS_COMPLETED, "ran without the approval it requires"
    assert asked(events, "rb")


def test_rollback_steps_honour_conditions(hostile_channel: grpc.Channel) -> None:
    """Found: a rollback step's conditions were never evaluated."""
    step, _ = run_with_rollback(
        hostile_channel, {"stepId": "rb", "tool": "core.echo", "conditions": ["false"]}
    )
    assert step.status == pb.STEP_STATUS_SKIPPED, step
    assert step.error_reason == "CONDITION_FALSE", step


def test_rollback_clarify_asks_a_person(hostile_channel: grpc.Channel) -> None:
    """Found: a core.clarify rollback step was called as a plain tool and failed with
    'core.clarify is handled by the engine' (TOOL_ERROR)."""
    step, events = run_with_rollback(
        hostile_channel, {"stepId": "rb", "tool": "core.clarify", "parameters": {}}
    )
    assert step.error_reason != "TOOL_ERROR", step.error
    assert asked(events, "rb")


def test_multibyte_input_fits_in_the_trailers(hostile_channel: grpc.Channel) -> None:
    """Found: errors clipped quoted input by characters, not bytes: a run id of 2,000 emoji
    (percent-encoded in grpc-message, 12 characters each) or 60 step ids of 300 emoji still
    passed gRPC's 16 KiB metadata limit, and the client got RESOURCE_EXHAUSTED."""
    stub = stub_of(hostile_channel)
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetExecution(
            pb.GetExecutionRequest(run_id="\U0001f600" * 2000),
            metadata=md(new_tenant()),
            timeout=10,
        )
    assert cast(grpc.Call, missing.value).code() == grpc.StatusCode.NOT_FOUND
    steps = [{"stepId": "\U0001f600" * 300 + str(i), "tool": "core.echo"} for i in range(60)]
    with pytest.raises(grpc.RpcError) as refused:
        stub.Execute(
            pb.ExecuteRequest(executable_plan=plan_of(*steps)),
            metadata=md(new_tenant()),
            timeout=10,
        )
    assert cast(grpc.Call, refused.value).code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "rollback",
    [
        {"stepId": "rb", "tool": "core.echo", "requiresApproval": True},
        {"stepId": "rb", "tool": "core.clarify"},
        {"stepId": "rb", "tool": "core.wait", "parameters": {"seconds": 30}},
    ],
    ids=["approval", "clarify", "wait"],
)
def test_run_timeout_holds_during_rollback(
    hostile_channel: grpc.Channel, rollback: dict[str, JSON]
) -> None:
    """Found: the run timeout did not hold while rollback steps ran: a rollback step waiting
    for approval, a person or a long core.wait kept a run with a 0.5 s timeout RUNNING."""
    stub = stub_of(hostile_channel)
    tenant = new_tenant()
    plan = plan_of({"stepId": "a", "tool": "core.fail"}, rollback, rollbackSteps=["rb"])
    request = pb.ExecuteRequest(executable_plan=plan)
    request.timeout.FromMilliseconds(500)
    run_id = stub.Execute(request, metadata=md(tenant), timeout=10).run_id
    time.sleep(1.5)
    execution = stub.GetExecution(
        pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant), timeout=10
    ).execution
    if execution.status not in TERMINAL:
        stub.Cancel(pb.CancelRequest(run_id=run_id), metadata=md(tenant), timeout=10)
    assert execution.status == pb.EXECUTION_STATUS_FAILED, execution
    assert execution.error_reason == "DEADLINE_EXCEEDED", execution.error_reason


@pytest.mark.postgres
async def test_nul_in_strings_on_postgres(tmp_path: Path) -> None:
    """Found: on PostgreSQL a U+0000 in a string reaching a text column (a run id, triggered_by,
    correlation_id, idempotency_key, flow_id, responded_by, a tool's error message) answered
    INTERNAL: 'invalid byte sequence for encoding UTF8: 0x00'."""
    url = postgres_database()
    server = await build_server(make_settings(tmp_path, url, execute=True))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = pb_grpc.OrchestratorServiceStub(ch)
            tenant = md(new_tenant())
            plan = plan_of({"stepId": "a", "tool": "core.fail", "parameters": {"message": "\x00"}})
            codes: dict[str, grpc.StatusCode] = {}
            calls: dict[str, Awaitable[object]] = {
                "GetExecution.run_id": stub.GetExecution(
                    pb.GetExecutionRequest(run_id="a\x00b"), metadata=tenant
                ),
                "Cancel.run_id": stub.Cancel(pb.CancelRequest(run_id="\x00"), metadata=tenant),
                "Execute.triggered_by": stub.Execute(
                    pb.ExecuteRequest(executable_plan=plan, triggered_by="a\x00b"),
                    metadata=tenant,
                ),
            }
            for name, call in calls.items():
                try:
                    await call
                    codes[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as err:
                    codes[name] = err.code()
            assert not {name for name, code in codes.items() if code in NEVER}, codes
            run = await stub.Execute(
                pb.ExecuteRequest(executable_plan=plan, async_execution=False), metadata=tenant
            )
            assert run.execution.steps[0].error_reason != "INTERNAL_ERROR", run.execution
    finally:
        await server.stop(grace=0.2)
        drop_postgres_database(url)
