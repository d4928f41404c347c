"""Rows to messages: the fast JSON -> Value conversion is json_format.ParseDict's, byte for
byte, on any JSON a step can put out; an event written in pieces is the event the messages
build."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.server.lifecycle import RunStatus, StepStatus
from orchestrator.server.store.snapshots import (
    EventWriter,
    partial_execution,
    timestamp,
    to_value,
)
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def parse_dict(obj: Any) -> bytes:
    return json_format.ParseDict(obj, struct_pb2.Value()).SerializeToString(deterministic=True)


@given(JSON)
def test_to_value_is_parse_dict(obj: Any) -> None:
    assert to_value(obj).SerializeToString(deterministic=True) == parse_dict(obj)


@pytest.mark.parametrize("obj", [{}, [], {"a": {}, "b": []}, None, 0, -0.0, False, ""])
def test_empty_and_zero_values_are_set(obj: Any) -> None:
    value = to_value(obj)
    assert value.WhichOneof("kind") is not None
    assert value.SerializeToString(deterministic=True) == parse_dict(obj)


def test_what_is_not_json_is_refused_as_before() -> None:
    with pytest.raises(json_format.ParseError):
        to_value(object())


TIMES = st.floats(0, 4e9, allow_nan=False)
TEXT = st.text(max_size=12)
RUN_ROWS = st.fixed_dictionaries(
    {
        "run_id": st.uuids().map(str),
        "tenant_id": st.uuids().map(str),
        "status": st.sampled_from([s.value for s in RunStatus]),
        "steps_finished": st.integers(0, 5),
        "steps_total": st.integers(0, 5),
        "current_step": TEXT,
        "error_message": TEXT,
        "error_reason": TEXT,
        "plan_hash": TEXT,
        "triggered_by": TEXT,
        "correlation_id": TEXT,
        "dry_run": st.booleans(),
        "last_sequence": st.integers(0, 10**6),
        "retry_count": st.integers(0, 3),
        "labels": st.dictionaries(TEXT, TEXT, max_size=3),
        "plan_id": TEXT,
        "plan_name": TEXT,
        "plan_version": TEXT,
        "waiting_reason": TEXT,
        "concurrency_key": TEXT,
        "max_concurrent": st.integers(0, 9),
        "priority": st.integers(1, 5),
        "started_at": st.none() | TIMES,
        "completed_at": st.none() | TIMES,
        "created_at": TIMES,
        "updated_at": TIMES,
        "estimated_seconds": st.floats(0, 1e5),
    }
)
STEP_ROWS = st.fixed_dictionaries(
    {
        "step_id": TEXT,
        "flow_id": TEXT,
        "status": st.sampled_from([s.value for s in StepStatus]),
        "attempts": st.integers(0, 9),
        "error": TEXT,
        "tool": TEXT,
        "error_reason": TEXT,
        "started_at": st.none() | TIMES,
        "completed_at": st.none() | TIMES,
        "output": JSON,
    }
)


@given(RUN_ROWS, RUN_ROWS, st.lists(STEP_ROWS, max_size=3), st.integers(1, 10**9), TIMES)
def test_an_events_bytes_are_the_event_the_messages_build(
    row: dict[str, Any], other: dict[str, Any], steps: list[Any], sequence: int, at: float
) -> None:
    """EventWriter writes an event in pieces, a run's fixed fields once: parsed, it is the
    event partial_execution and ExecutionEvent build, for the same run in another state too."""
    writer = EventWriter()
    later = {**other, **{k: row[k] for k in ("run_id", "retry_count")}}
    for shown in (row, later):  # the second one's fixed part is the kept one
        shown = {**row, **{k: v for k, v in shown.items() if k not in FIXED_BY_TEST}}
        data = writer.event(
            writer.run_part(shown),
            steps,
            sequence=sequence,
            type=pb.EVENT_TYPE_STEP_COMPLETED,
            step_id="s",
            message="step s completed",
            run_id=shown["run_id"],
            at=at,
        )
        execution = partial_execution(shown, steps)
        execution.last_sequence = sequence
        expected = pb.ExecutionEvent(
            sequence=sequence,
            type=pb.EVENT_TYPE_STEP_COMPLETED,
            step_id="s",
            message="step s completed",
            execution=execution,
            run_id=shown["run_id"],
        )
        expected.timestamp.CopyFrom(timestamp(at))
        assert pb.ExecutionEvent.FromString(data) == expected


# The fields a run keeps while its retry count holds (the writer's fixed part).
FIXED_BY_TEST = frozenset(
    (
        "tenant_id",
        "plan_hash",
        "triggered_by",
        "correlation_id",
        "dry_run",
        "labels",
        "plan_id",
        "plan_name",
        "plan_version",
        "concurrency_key",
        "max_concurrent",
        "priority",
        "created_at",
    )
)
