"""Rows to messages: a run's snapshot (`Execution`) and an event's delta, from store rows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from orchestrator.server.lifecycle import RunStatus, StepStatus
from orchestrator.server.store.records import Row
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = Any

RUN_STATUS_PB = {s: pb.ExecutionStatus.Value(f"EXECUTION_STATUS_{s.value}") for s in RunStatus}
STEP_STATUS_PB = {s: pb.StepStatus.Value(f"STEP_STATUS_{s.value}") for s in StepStatus}
CLARIFICATION_STATUS_PB = {
    name: pb.ClarificationStatus.Value(f"CLARIFICATION_STATUS_{name}")
    for name in ("PENDING", "RESOLVED", "WITHDRAWN")
}


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """Epoch seconds as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    set_time(ts, seconds)
    return ts


def set_time(field: timestamp_pb2.Timestamp, seconds: float) -> None:
    """Set a Timestamp field to epoch seconds in place: what FromNanoseconds(int(seconds *
    1e9)) sets, without its checks and a copy (several per event, on the hot path)."""
    field.seconds, field.nanos = divmod(int(seconds * 1e9), 1_000_000_000)


def to_value(obj: JSON) -> struct_pb2.Value:
    """Plain JSON as a protobuf Value: what json_format.ParseDict makes, byte for byte, in a
    third of its time (Struct.update and ListValue.extend convert nested values natively;
    every step output goes through here once per event)."""
    value = struct_pb2.Value()
    if isinstance(obj, dict):
        value.struct_value.SetInParent()  # {} is an empty struct, not an unset Value
        value.struct_value.update(obj)
    elif isinstance(obj, list | tuple):
        value.list_value.SetInParent()
        value.list_value.extend(obj)
    elif obj is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(obj, bool):
        value.bool_value = obj
    elif isinstance(obj, int | float):
        value.number_value = obj
    elif isinstance(obj, str):
        value.string_value = obj
    else:
        return json_format.ParseDict(obj, struct_pb2.Value())  # raises its ParseError
    return value


# Runs whose fixed part an EventWriter keeps at most (then it starts again).
FIXED_PARTS_KEPT = 4096


def _fixed(row: Row) -> pb.Execution:
    """The run-level fields a run keeps while its retry count holds."""
    execution = pb.Execution(
        run_id=row["run_id"],
        tenant_id=row["tenant_id"],
        plan_hash=row["plan_hash"],
        triggered_by=row["triggered_by"],
        correlation_id=row["correlation_id"],
        dry_run=bool(row["dry_run"]),
        retry_count=row.get("retry_count") or 0,
        labels=row.get("labels") or {},
        plan_id=row.get("plan_id") or "",
        plan_name=row.get("plan_name") or "",
        plan_version=row.get("plan_version") or "",
        concurrency_key=row.get("concurrency_key") or "",
        max_concurrent=row.get("max_concurrent") or 0,
        priority=row.get("priority") or 3,
    )
    set_time(execution.created_at, row["created_at"])
    return execution


def _moving(row: Row, execution: pb.Execution) -> pb.Execution:
    """Set the run-level fields that change as the run goes on."""
    execution.status = RUN_STATUS_PB[RunStatus(row["status"])]
    execution.progress = row["steps_finished"] / row["steps_total"] if row["steps_total"] else 1.0
    execution.current_step = row["current_step"]
    execution.error_message = row["error_message"]
    execution.error_reason = row["error_reason"]
    execution.last_sequence = row["last_sequence"]
    execution.waiting_reason = row.get("waiting_reason") or ""
    for name in ("started_at", "completed_at"):
        if row[name] is not None:
            set_time(getattr(execution, name), row[name])
    set_time(execution.last_updated, row["updated_at"])
    if row["completed_at"] is None and row["started_at"] is not None:
        set_time(execution.estimated_completion, row["started_at"] + row["estimated_seconds"])
    elif row["completed_at"] is None:
        set_time(execution.estimated_completion, row["created_at"] + row["estimated_seconds"])
    return execution


def partial_execution(row: Row, changed_steps: Iterable[Row] = ()) -> pb.Execution:
    """The run-level fields of a run row, plus only the steps given (an event's delta)."""
    execution = _moving(row, _fixed(row))
    for step in changed_steps:
        execution.steps.append(step_message(step))
    return execution


class EventWriter:
    """Events as their stored (and streamed) bytes, built in pieces: the wire format lets a
    message be written as several, a later scalar field replacing an earlier one and a
    repeated one extending it. The fields a run keeps (its ids, plan, labels...) are
    serialized once per run (and retry), the ones that move once per state the unit's events
    show, a step once per event; nothing is copied into a message to be serialized again
    (an Execution's copy into each event and its serialization were a third of an event).
    Parsed, the bytes are the message `partial_execution` and `pb.ExecutionEvent` build."""

    def __init__(self) -> None:
        self._fixed: dict[tuple[str, int], bytes] = {}

    def run_part(self, row: Row) -> bytes:
        """An Execution's run-level fields, serialized (what an event of this state carries
        but its steps and sequence)."""
        key = (row["run_id"], row.get("retry_count") or 0)
        fixed = self._fixed.get(key)
        if fixed is None:
            if len(self._fixed) >= FIXED_PARTS_KEPT:
                self._fixed.clear()
            fixed = self._fixed[key] = _fixed(row).SerializeToString()
        return fixed + _moving(row, pb.Execution()).SerializeToString()

    def forget(self, run_id: str, retry_count: int) -> None:
        """The run ended: its fixed part is not needed again (a retry has a key of its own)."""
        self._fixed.pop((run_id, retry_count), None)

    @staticmethod
    def event(
        run_part: bytes,
        steps: Iterable[Row],
        *,
        sequence: int,
        type: pb.EventType.ValueType,
        step_id: str,
        message: str,
        run_id: str,
        at: float,
    ) -> bytes:
        """An ExecutionEvent's bytes, its execution the run part, the steps and `sequence`."""
        pieces = [run_part]
        for step in steps:
            data = step_message(step).SerializeToString()
            pieces += (_STEPS, _varint(len(data)), data)
        pieces += (_LAST_SEQUENCE, _varint(sequence))
        execution = b"".join(pieces)
        head = pb.ExecutionEvent(
            sequence=sequence, type=type, step_id=step_id, message=message, run_id=run_id
        )
        set_time(head.timestamp, at)
        return head.SerializeToString() + _EXECUTION + _varint(len(execution)) + execution


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


_VARINT, _LENGTH_DELIMITED = 0, 2
_STEPS = _key(pb.Execution.STEPS_FIELD_NUMBER, _LENGTH_DELIMITED)
_LAST_SEQUENCE = _key(pb.Execution.LAST_SEQUENCE_FIELD_NUMBER, _VARINT)
_EXECUTION = _key(pb.ExecutionEvent.EXECUTION_FIELD_NUMBER, _LENGTH_DELIMITED)


def step_message(row: Row) -> pb.StepExecution:
    """One step row as its message."""
    step = pb.StepExecution(
        step_id=row["step_id"],
        flow_id=row["flow_id"],
        status=STEP_STATUS_PB[StepStatus(row["status"])],
        attempts=row["attempts"],
        error=row["error"],
        tool=row["tool"],
        error_reason=row["error_reason"],
    )
    for name in ("started_at", "completed_at"):
        if row[name] is not None:
            set_time(getattr(step, name), row[name])
    if row["output"] is not None:
        step.output.CopyFrom(to_value(row["output"]))
    return step


def _clarification_message(row: Row) -> pb.Clarification:
    msg = pb.Clarification(
        clarification_id=row["clarification_id"],
        step_id=row["step_id"],
        category=pb.ClarificationCategory.Value(f"CLARIFICATION_CATEGORY_{row['category']}"),
        prompt=row["prompt"],
        options=[str(o) for o in row["options"]],
        argument_name=row["argument_name"],
        status=CLARIFICATION_STATUS_PB[row["status"]],
        responded_by=row["responded_by"],
    )
    msg.created_at.CopyFrom(timestamp(row["created_at"]))
    if row["resolved_at"] is not None:
        msg.resolved_at.CopyFrom(timestamp(row["resolved_at"]))
    if row["response"] is not None:
        msg.response.CopyFrom(to_value(row["response"]))
    return msg


def build_execution(
    run: Row,
    step_rows: Sequence[Row],
    pending: Sequence[Row],
    *,
    results: bool = True,
) -> pb.Execution:
    """The full snapshot of a run from its rows (without `results`: the BASIC view's)."""
    execution = partial_execution(run, step_rows)
    if not results:
        pass
    elif run["results"] is not None:
        execution.results.update(run["results"])
    else:
        for step in step_rows:
            if step["status"] == StepStatus.COMPLETED and step["output"] is not None:
                execution.results[step["step_id"]] = step["output"]
    for clar in pending:
        execution.pending_clarifications.append(_clarification_message(clar))
    return execution
