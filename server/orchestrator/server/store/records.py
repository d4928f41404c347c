"""Values that cross the store's boundary: what a run is made from, what calls return."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import RowMapping

from orchestrator.server.lifecycle import RunStatus, StepStatus
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = Any
# A row as a mapping: SQLAlchemy's RowMapping or a plain dict built for an insert.
Row = Mapping[str, Any] | RowMapping


def clean_text(text: str) -> str:
    """Text for a text column: PostgreSQL's cannot hold NUL, which tools and callers may send."""
    return text.replace("\x00", "\ufffd")


@dataclass(frozen=True)
class NewStep:
    """A step row to create with its run."""

    step_id: str
    flow_id: str
    position: int
    tool: str


@dataclass
class NewRun:
    """Everything a run is created from, already validated."""

    run_id: str
    tenant_id: str
    plan: pb.ExecutablePlan
    plan_hash: str
    parameters: dict[str, JSON]
    variables: dict[str, JSON]
    dry_run: bool
    triggered_by: str
    correlation_id: str
    timeout_seconds: float
    estimated_seconds: float
    steps: list[NewStep]
    idempotency_key: str = ""
    request_digest: str = ""
    dry_run_order: list[str] | None = None
    # Set when the accepting replica runs it itself (single-replica stores).
    owner: str = ""
    lease_expires_at: float | None = None
    # W3C traceparent of the submitting call: the run's step spans join that trace.
    trace_parent: str = ""
    # Unfinished runs the tenant may have (0 = no limit), checked in the creating transaction.
    max_unfinished: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    concurrency_key: str = ""
    max_concurrent: int = 0
    priority: int = 3


@dataclass(frozen=True)
class Created:
    """The outcome of `create_run`: the run and whether this call created it."""

    execution: pb.Execution
    created: bool
    # The new run's rows as its unit wrote them (None when found by its idempotency key).
    inserted: Inserted | None = None


@dataclass(frozen=True)
class Inserted:
    """A new run's rows as its creating unit wrote them: the first task of a run created here
    starts from them (`Journal.open`) instead of reading them back."""

    run: dict[str, Any]  # every column but the inputs (as the journal reads a run)
    inputs: dict[str, Any]  # plan and parameters
    steps: list[dict[str, Any]]


@dataclass(frozen=True)
class Transitioned:
    """The outcome of a control transition."""

    run_id: str
    status: RunStatus
    at: float
    execution: pb.Execution


@dataclass(frozen=True)
class ListPage:
    """One page of runs and the key to continue after."""

    executions: list[pb.Execution]
    last_pk: int | None


@dataclass
class RunFilter:
    """ListExecutions / WatchExecutions filter in store terms."""

    statuses: list[RunStatus] = field(default_factory=list)
    plan_hash: str = ""
    triggered_by: str = ""
    created_after: float | None = None
    created_before: float | None = None
    labels: dict[str, str] = field(default_factory=dict)
    plan_id: str = ""

    @property
    def needs_run(self) -> bool:
        """Whether the filter reads anything of the run beyond an event's own columns."""
        return bool(
            self.statuses
            or self.plan_hash
            or self.triggered_by
            or self.created_after is not None
            or self.created_before is not None
            or self.labels
            or self.plan_id
        )


@dataclass
class EventSpec:
    """An event to append: its type, step, message and the steps its delta carries; `run`,
    the run as the event shows it when that is not the row the unit writes (an earlier
    change of the same unit: `Journal.chain`)."""

    type: pb.EventType.ValueType
    message: str
    step_id: str = ""
    steps: Sequence[Row] = field(default_factory=list)
    run: Row | None = None


@dataclass(frozen=True)
class ClarificationRecord:
    """What answering a clarification needs to know of it first."""

    clarification_id: str
    step_id: str
    status: str  # PENDING, RESOLVED or WITHDRAWN
    category: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """What answering a clarification did to its step (or, for a run approval, to the run)."""

    step_id: str
    step_status: StepStatus | None
    output: JSON = None
    error: str = ""
    run_failed: bool = False

    def to_json(self) -> list[JSON]:
        status = self.step_status.value if self.step_status else None
        return [self.step_id, status, self.output, self.error, self.run_failed]

    @classmethod
    def from_json(cls, data: list[JSON]) -> Answer:
        step_id, status, output, error, run_failed = data
        return cls(step_id, StepStatus(status) if status else None, output, error, run_failed)


@dataclass(frozen=True)
class RetryRun:
    """What RetryExecution asks of the store: which run, the steps named to run again and
    every step that depends on them (`rerun_step_ids`), and who executes it from here."""

    tenant_id: str
    run_id: str
    restart_step_ids: tuple[str, ...]
    rerun_step_ids: frozenset[str]
    reason: str
    owner: str = ""
    lease_expires_at: float | None = None


@dataclass(frozen=True)
class ScheduleRecord:
    """A stored schedule: its definition (with `plan_hash`, without the plan) and its state."""

    spec: pb.Schedule
    paused: bool
    next_fire_at: float | None
    buffered_fire_at: float | None
    started_count: int
    skipped_count: int
    missed_count: int
    created_at: float
    updated_at: float
    actions: tuple[pb.ScheduleAction, ...] = ()


@dataclass(frozen=True)
class Fired:
    """What a schedule's fire (or trigger) did, for the engine to hear after the commit: the
    run it started (owned here or left to claim) and the run it cancelled."""

    run_id: str = ""
    owned: bool = False
    cancelled_run_id: str = ""
    execution: pb.Execution | None = None
