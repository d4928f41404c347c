"""What the CLI prints: proto3 JSON, rich tables, and the live view of a run."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console, Group, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.client.messages import (
    TERMINAL,
    event_type_name,
    status_name,
    step_status_name,
)
from orchestrator.v1 import orchestrator_pb2 as pb

# A wide console off a terminal, so that piped tables are not wrapped in the middle of ids.
PIPE_WIDTH = 200
_STEP_DONE = frozenset(
    (
        pb.STEP_STATUS_COMPLETED,
        pb.STEP_STATUS_FAILED,
        pb.STEP_STATUS_SKIPPED,
        pb.STEP_STATUS_CANCELLED,
    )
)
_STATUS_STYLE = {
    "COMPLETED": "green",
    "FAILED": "red",
    "CANCELLED": "yellow",
    "PAUSED": "yellow",
    "RUNNING": "cyan",
    "WAITING": "magenta",
    "SKIPPED": "dim",
}


def console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that does not wrap when piped."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out = Console(stderr=stderr, highlight=False, width=PIPE_WIDTH, soft_wrap=True)
    return out


def to_dict(message: Message) -> dict[str, Any]:
    """proto3 JSON of a message (camelCase names, enums by name)."""
    return json_format.MessageToDict(message)


def json_text(value: Message | Iterable[Message], *, compact: bool = False) -> str:
    """One JSON document: an object for a message, an array for several."""
    data: Any = to_dict(value) if isinstance(value, Message) else [to_dict(item) for item in value]
    return json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2)


def styled(name: str) -> str:
    style = _STATUS_STYLE.get(name)
    return f"[{style}]{name}[/]" if style else name


def _when(message: Message, name: str) -> str:
    if not message.HasField(name):
        return ""
    stamp = getattr(message, name)
    return str(stamp.ToDatetime().isoformat(timespec="milliseconds")) + "Z"


def _plain(value: Any) -> Any:
    """JSON numbers arrive as doubles: show 9 rather than 9.0."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _output(value: Any) -> str:
    text = json.dumps(_plain(json_format.MessageToDict(value)), separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def steps_table(steps: Iterable[pb.StepExecution]) -> Table:
    """One row per step: id, tool, status, attempts, output or error."""
    table = Table(title="steps", title_justify="left")
    for column in ("step", "tool", "status", "attempts", "output / error"):
        table.add_column(column, no_wrap=column in ("step", "status"))
    for step in steps:
        detail = (
            step.error if step.error else (_output(step.output) if step.HasField("output") else "")
        )
        table.add_row(
            step.step_id,
            step.tool,
            styled(step_status_name(step.status)),
            str(step.attempts),
            detail,
        )
    return table


def execution_view(execution: pb.Execution) -> RenderableType:
    """A run in full: its fields, pending clarifications and steps."""
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold", no_wrap=True)
    fields.add_column(no_wrap=True)
    rows = [
        ("run", execution.run_id),
        ("status", styled(status_name(execution.status))),
        ("progress", progress_text(execution)),
        ("plan", execution.plan_hash),
        ("plan name", plan_text(execution) if execution.plan_name or execution.plan_id else ""),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(execution.labels.items()))),
        ("retries", str(execution.retry_count) if execution.retry_count else ""),
        ("waiting", _waiting(execution)),
        ("triggered by", execution.triggered_by),
        ("correlation id", execution.correlation_id),
        ("dry run", "yes" if execution.dry_run else ""),
        ("created", _when(execution, "created_at")),
        ("started", _when(execution, "started_at")),
        ("completed", _when(execution, "completed_at")),
        ("current step", execution.current_step),
        ("error", f"{execution.error_reason} {execution.error_message}".strip()),
        ("last sequence", str(execution.last_sequence)),
    ]
    for name, value in rows:
        if value:
            fields.add_row(name, value)
    parts: list[RenderableType] = [fields]
    if execution.pending_clarifications:
        asks = Table(title="pending clarifications", title_justify="left")
        for column in ("clarification", "step", "category", "prompt", "options"):
            asks.add_column(column, no_wrap=column == "clarification")
        for c in execution.pending_clarifications:
            asks.add_row(
                c.clarification_id,
                c.step_id,
                pb.ClarificationCategory.Name(c.category).removeprefix("CLARIFICATION_CATEGORY_"),
                c.prompt,
                ", ".join(c.options),
            )
        parts.append(asks)
    if execution.steps:
        parts.append(steps_table(execution.steps))
    return Group(*parts)


def executions_table(executions: Iterable[pb.Execution]) -> Table:
    """One row per run, newest first."""
    table = Table()
    for column in ("run", "status", "progress", "created", "triggered by", "plan", "labels"):
        table.add_column(column, no_wrap=True)
    for e in executions:
        status = styled(status_name(e.status))
        if e.waiting_reason == "CONCURRENCY_KEY":
            status += f" (key {e.concurrency_key})"
        table.add_row(
            e.run_id,
            status,
            progress_text(e),
            _when(e, "created_at"),
            e.triggered_by,
            plan_text(e),
            ",".join(f"{k}={v}" for k, v in sorted(e.labels.items())),
        )
    return table


def webhooks_table(webhooks: Iterable[pb.Webhook]) -> Table:
    """One row per subscription."""
    table = Table()
    for column in ("webhook", "url", "events", "labels", "created"):
        table.add_column(column, no_wrap=True)
    for w in webhooks:
        table.add_row(
            w.webhook_id,
            w.url,
            ",".join(w.event_types) or "all",
            ",".join(f"{k}={v}" for k, v in sorted(w.labels.items())),
            _when(w, "created_at"),
        )
    return table


def deliveries_table(deliveries: Iterable[pb.WebhookDelivery]) -> Table:
    """One row per delivery, newest first."""
    table = Table()
    for column in ("delivery", "event", "run", "status", "attempts", "last answer"):
        table.add_column(column, no_wrap=True)
    for d in deliveries:
        status = pb.WebhookDeliveryStatus.Name(d.status).removeprefix("WEBHOOK_DELIVERY_STATUS_")
        answer = d.last_error or (str(d.last_status_code) if d.last_status_code else "")
        table.add_row(d.delivery_id, d.event_type, d.run_id, status, str(d.attempts), answer)
    return table


def plan_text(execution: pb.Execution) -> str:
    """The plan as people name it: `name version` (or its id), else the start of its hash."""
    name = execution.plan_name or execution.plan_id
    if name:
        return f"{name} {execution.plan_version}".strip()
    return execution.plan_hash[:19]


def progress_text(execution: pb.Execution) -> str:
    """Progress; for a run that did not complete, the share of its steps that did (skipped
    and cancelled steps count as finished, not as done)."""
    if execution.status in (pb.EXECUTION_STATUS_FAILED, pb.EXECUTION_STATUS_CANCELLED):
        if execution.steps:
            done = sum(1 for s in execution.steps if s.status == pb.STEP_STATUS_COMPLETED)
            return (
                f"{done / len(execution.steps):.0%} ({done}/{len(execution.steps)} steps completed)"
            )
        return "-"
    return f"{execution.progress:.0%}"


def status_line(execution: pb.Execution) -> str:
    """`run <id> COMPLETED`, with the error of a failed run."""
    line = f"run {execution.run_id} {styled(status_name(execution.status))}"
    if execution.status != pb.EXECUTION_STATUS_COMPLETED and execution.error_message:
        line += f": {execution.error_message}"
    return line


def event_line(event: pb.ExecutionEvent) -> str:
    """One line per event, for logs and pipes."""
    parts = [f"{event.sequence:>5}", f"{event_type_name(event.type):<24}"]
    if event.type in (pb.EVENT_TYPE_SNAPSHOT, pb.EVENT_TYPE_RUN_STATUS_CHANGED):
        parts.append(status_name(event.execution.status))
    if event.step_id:
        parts.append(event.step_id)
    if event.message:
        parts.append(event.message)
    return "  ".join(parts).rstrip()


class RunView:
    """The state of a run as its events arrive, drawn as a progress bar and a step table."""

    def __init__(self) -> None:
        self.execution = pb.Execution()
        self.steps: dict[str, pb.StepExecution] = {}
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task("PENDING", total=None)

    def apply(self, event: pb.ExecutionEvent) -> None:
        """Fold one event into the view."""
        if event.type == pb.EVENT_TYPE_HEARTBEAT:
            return
        if event.type == pb.EVENT_TYPE_SNAPSHOT:
            self.execution.CopyFrom(event.execution)
            self.steps = {s.step_id: s for s in event.execution.steps}
        else:
            run = event.execution
            self.execution.status = run.status
            self.execution.progress = run.progress
            self.execution.error_message = run.error_message
            self.execution.error_reason = run.error_reason
            if run.run_id:
                self.execution.run_id = run.run_id
            for step in run.steps:
                self.steps[step.step_id] = step
        done = sum(1 for s in self.steps.values() if s.status in _STEP_DONE)
        self._progress.update(
            self._task,
            description=styled(status_name(self.execution.status)),
            completed=done,
            total=len(self.steps) or None,
        )
        if self.execution.status in TERMINAL:
            self._progress.stop_task(self._task)

    def __rich__(self) -> RenderableType:
        return Group(self._progress, steps_table(self.steps.values()))


def _waiting(execution: pb.Execution) -> str:
    """Why a PENDING run waits, for people."""
    if execution.waiting_reason == "CONCURRENCY_KEY":
        limit = execution.max_concurrent
        return f"for concurrency key {execution.concurrency_key!r} ({limit} at once)"
    return execution.waiting_reason


def when_text(schedule: pb.Schedule) -> str:
    """A schedule's timing as people say it: `cron 0 9 * * 1-5 Europe/Paris`, `every 30s`."""
    if schedule.cron:
        return f"cron {schedule.cron} {schedule.timezone or 'UTC'}"
    return f"every {schedule.interval.ToNanoseconds() / 1e9:g}s"


def overlap_text(policy: pb.OverlapPolicy.ValueType) -> str:
    name = pb.OverlapPolicy.Name(policy).removeprefix("OVERLAP_POLICY_")
    return "SKIP" if name == "UNSPECIFIED" else name


def schedules_table(schedules: Iterable[pb.Schedule]) -> Table:
    """One row per schedule, by id."""
    table = Table()
    for column in ("schedule", "when", "overlap", "state", "next fire", "started", "plan"):
        table.add_column(column, no_wrap=True)
    for s in schedules:
        table.add_row(
            s.schedule_id,
            when_text(s),
            overlap_text(s.overlap_policy),
            styled("PAUSED") if s.paused else "active",
            _stamp(s.next_fire_times[0]) if s.next_fire_times else "-",
            str(s.started_count),
            s.plan_hash[:19],
        )
    return table


def schedule_view(schedule: pb.Schedule) -> RenderableType:
    """One schedule: its definition, counters, next fire times and recent actions."""
    head = Table.grid(padding=(0, 2))
    for name, value in (
        ("schedule", schedule.schedule_id),
        ("when", when_text(schedule)),
        ("overlap", overlap_text(schedule.overlap_policy)),
        ("state", "paused" if schedule.paused else "active"),
        ("plan", schedule.plan_hash),
        (
            "runs",
            f"{schedule.started_count} started, {schedule.skipped_count} skipped, "
            f"{schedule.missed_count} missed",
        ),
        ("next", ", ".join(_stamp(t) for t in schedule.next_fire_times) or "-"),
    ):
        head.add_row(name, value)
    actions = Table()
    for column in ("fire time", "outcome", "run", "message"):
        actions.add_column(column, no_wrap=column != "message")
    for a in schedule.recent_actions:
        actions.add_row(_stamp(a.fire_time), a.outcome, a.run_id, a.message)
    return Group(head, actions) if schedule.recent_actions else head


def plans_table(plans: Iterable[pb.StoredPlan]) -> Table:
    """One row per stored plan, most recently stored first."""
    table = Table()
    for column in ("plan hash", "plan id", "name", "version", "stored", "last run"):
        table.add_column(column, no_wrap=True)
    for p in plans:
        table.add_row(
            p.plan_hash,
            p.plan_id,
            p.name,
            p.version,
            _when(p, "created_at"),
            _when(p, "last_run_at"),
        )
    return table


def _stamp(stamp: Any) -> str:
    return str(stamp.ToDatetime().isoformat(timespec="seconds")) + "Z"
