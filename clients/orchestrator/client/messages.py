"""Requests built from plain Python values, and what the responses mean."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, json_format, struct_pb2

from orchestrator.v1 import orchestrator_pb2 as pb

PlanSource: TypeAlias = "pb.ExecutablePlan | Mapping[str, Any] | str | os.PathLike[str]"
StructLike: TypeAlias = "Mapping[str, Any] | struct_pb2.Struct"
DurationLike: TypeAlias = "float | timedelta | duration_pb2.Duration"
StatusLike: TypeAlias = "pb.ExecutionStatus.ValueType | str"

TERMINAL: frozenset[pb.ExecutionStatus.ValueType] = frozenset(
    (
        pb.EXECUTION_STATUS_COMPLETED,
        pb.EXECUTION_STATUS_FAILED,
        pb.EXECUTION_STATUS_CANCELLED,
    )
)


class PlanError(ValueError):
    """A plan file or dict that is not a valid ExecutablePlan in proto3 JSON."""


def load_plan(plan: PlanSource) -> pb.ExecutablePlan:
    """An ExecutablePlan from a message, a proto3 JSON dict, or the path of a JSON file."""
    if isinstance(plan, pb.ExecutablePlan):
        return plan
    if isinstance(plan, Mapping):
        data: Any = plan
        origin = "plan"
    else:
        path = Path(plan)
        origin = str(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise PlanError(f"{origin}: {err.strerror or err}") from err
        except json.JSONDecodeError as err:
            raise PlanError(f"{origin}: not JSON: {err}") from err
        if not isinstance(data, dict):
            raise PlanError(f"{origin}: a plan is a JSON object")
    try:
        return json_format.ParseDict(dict(data), pb.ExecutablePlan())
    except json_format.ParseError as err:
        raise PlanError(f"{origin}: not an ExecutablePlan: {err}") from err


def to_value(value: Any) -> struct_pb2.Value:
    """Any JSON value (None, bool, number, str, list, dict) as a google.protobuf.Value."""
    if isinstance(value, struct_pb2.Value):
        return value
    return json_format.ParseDict(value, struct_pb2.Value())


def to_struct(values: StructLike | None) -> struct_pb2.Struct | None:
    """A JSON object as a google.protobuf.Struct (None stays None)."""
    if values is None or isinstance(values, struct_pb2.Struct):
        return values
    return json_format.ParseDict(dict(values), struct_pb2.Struct())


def to_duration(value: DurationLike) -> duration_pb2.Duration:
    """Seconds, a timedelta or a Duration as a Duration."""
    if isinstance(value, duration_pb2.Duration):
        return value
    out = duration_pb2.Duration()
    if isinstance(value, timedelta):
        out.FromTimedelta(value)
    else:
        out.FromNanoseconds(round(value * 1e9))
    return out


def to_status(status: StatusLike) -> pb.ExecutionStatus.ValueType:
    """An ExecutionStatus from its number or name: `COMPLETED`, `completed`,
    `EXECUTION_STATUS_COMPLETED`."""
    if isinstance(status, int):
        return pb.ExecutionStatus.ValueType(status)
    name = status.strip().upper()
    if not name.startswith("EXECUTION_STATUS_"):
        name = f"EXECUTION_STATUS_{name}"
    try:
        return pb.ExecutionStatus.Value(name)
    except ValueError:
        raise ValueError(f"unknown status {status!r}; one of {', '.join(status_names())}") from None


def status_names() -> list[str]:
    """The statuses a run can be in, short and lower case (`pending`, `running`, ...)."""
    return [
        n.removeprefix("EXECUTION_STATUS_").lower()
        for n in pb.ExecutionStatus.keys()
        if not n.endswith("UNSPECIFIED")
    ]


def status_name(status: pb.ExecutionStatus.ValueType) -> str:
    """`COMPLETED` for EXECUTION_STATUS_COMPLETED."""
    return pb.ExecutionStatus.Name(status).removeprefix("EXECUTION_STATUS_")


def step_status_name(status: pb.StepStatus.ValueType) -> str:
    """`COMPLETED` for STEP_STATUS_COMPLETED."""
    return pb.StepStatus.Name(status).removeprefix("STEP_STATUS_")


def event_type_name(kind: pb.EventType.ValueType) -> str:
    """`STEP_COMPLETED` for EVENT_TYPE_STEP_COMPLETED."""
    return pb.EventType.Name(kind).removeprefix("EVENT_TYPE_")


def plain(value: struct_pb2.Value | struct_pb2.Struct) -> Any:
    """A Value or Struct as plain Python values; a whole number is an int, as in templates."""
    return _whole(json_format.MessageToDict(value))


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def results(execution: pb.Execution) -> dict[str, Any]:
    """A run's `results` as plain Python values: step id -> output of each completed step
    (a dry run's: the execution order)."""
    out: dict[str, Any] = plain(execution.results)
    return out


def outputs(execution: pb.Execution) -> dict[str, Any]:
    """Each step that has an output, with it as a plain Python value (a FULL view's steps)."""
    return {step.step_id: plain(step.output) for step in execution.steps if step.HasField("output")}


def execute_request(
    plan: PlanSource | None,
    *,
    parameters: StructLike | None = None,
    variables: StructLike | None = None,
    dry_run: bool = False,
    idempotency_key: str = "",
    wait: bool = False,
    timeout: DurationLike | None = None,
    triggered_by: str = "",
    validate_capabilities: bool | None = None,
    plan_hash: str = "",
    labels: Mapping[str, str] | None = None,
    concurrency_key: str = "",
    max_concurrent: int = 0,
    priority: int = 0,
) -> pb.ExecuteRequest:
    """An ExecuteRequest; `wait=True` asks the server to answer once the run is terminal.
    With `concurrency_key`, at most `max_concurrent` (0: 1) of the tenant's runs with the key
    run at once; `priority` 1 (first) to 5 (last), 0 for the default 3. Without a plan, the
    server runs the tenant's stored plan of `plan_hash`."""
    request = pb.ExecuteRequest(
        executable_plan=load_plan(plan) if plan is not None else None,
        dry_run=dry_run,
        idempotency_key=idempotency_key,
        triggered_by=triggered_by,
        plan_hash=plan_hash,
        parameters=to_struct(parameters),
        variables=to_struct(variables),
        labels=dict(labels or {}),
        concurrency_key=concurrency_key,
        max_concurrent=max_concurrent,
        priority=priority,
    )
    if wait:
        request.async_execution = False
    if validate_capabilities is not None:
        request.validate_capabilities = validate_capabilities
    if timeout is not None:
        request.timeout.CopyFrom(to_duration(timeout))
    return request


def execution_filter(
    statuses: Iterable[StatusLike] = (),
    plan_hash: str = "",
    triggered_by: str = "",
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    labels: Mapping[str, str] | None = None,
    plan_id: str = "",
) -> pb.ExecutionFilter:
    """An ExecutionFilter; empty fields match everything (labels: every pair must match)."""
    out = pb.ExecutionFilter(
        statuses=[to_status(s) for s in statuses],
        plan_hash=plan_hash,
        triggered_by=triggered_by,
        labels=dict(labels or {}),
        plan_id=plan_id,
    )
    if created_after is not None:
        out.created_after.FromDatetime(created_after)
    if created_before is not None:
        out.created_before.FromDatetime(created_before)
    return out


def is_terminal_event(event: pb.ExecutionEvent) -> bool:
    """The event after which a run's stream ends: its terminal status change, or a snapshot
    of a run already finished."""
    if event.type in (pb.EVENT_TYPE_RUN_STATUS_CHANGED, pb.EVENT_TYPE_SNAPSHOT):
        return event.execution.status in TERMINAL
    return False


def overlap_policy(name: str) -> pb.OverlapPolicy.ValueType:
    """An OverlapPolicy from its name: `skip`, `BUFFER_ONE`, `OVERLAP_POLICY_ALLOW_ALL`."""
    key = name.strip().upper().replace("-", "_")
    if not key.startswith("OVERLAP_POLICY_"):
        key = f"OVERLAP_POLICY_{key}"
    try:
        return pb.OverlapPolicy.Value(key)
    except ValueError:
        names = ", ".join(overlap_names())
        raise ValueError(f"unknown overlap policy {name!r}; one of {names}") from None


def overlap_names() -> list[str]:
    """The overlap policies, short and lower case (`skip`, `buffer_one`, ...)."""
    return [
        n.removeprefix("OVERLAP_POLICY_").lower()
        for n in pb.OverlapPolicy.keys()
        if not n.endswith("UNSPECIFIED")
    ]


def schedule_message(
    schedule_id: str = "",
    *,
    plan: PlanSource | None = None,
    plan_hash: str = "",
    cron: str = "",
    interval: DurationLike | None = None,
    timezone: str = "",
    overlap: pb.OverlapPolicy.ValueType | str = pb.OVERLAP_POLICY_UNSPECIFIED,
    catchup_window: DurationLike | None = None,
    paused: bool = False,
    parameters: StructLike | None = None,
    variables: StructLike | None = None,
    labels: Mapping[str, str] | None = None,
    timeout: DurationLike | None = None,
) -> pb.Schedule:
    """A Schedule of a plan (a message, a dict, a JSON file) or a stored plan's hash, on a
    five-field `cron` in `timezone` or every `interval`."""
    schedule = pb.Schedule(
        schedule_id=schedule_id,
        plan_hash=plan_hash,
        cron=cron,
        timezone=timezone,
        overlap_policy=overlap_policy(overlap) if isinstance(overlap, str) else overlap,
        paused=paused,
        parameters=to_struct(parameters),
        variables=to_struct(variables),
        labels=dict(labels or {}),
    )
    if plan is not None:
        schedule.executable_plan.CopyFrom(load_plan(plan))
    for name, value in (
        ("interval", interval),
        ("catchup_window", catchup_window),
        ("timeout", timeout),
    ):
        if value is not None:
            getattr(schedule, name).CopyFrom(to_duration(value))
    return schedule
