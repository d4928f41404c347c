"""What the plan-store and schedule RPCs do, in domain terms, and the clock that fires due
schedules on every replica (the store decides which replica fires each fire time)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from orchestrator.server.control import ControlPlane
from orchestrator.server.errors import (
    STORE_OUTAGES,
    FieldViolation,
    InvalidArgument,
    OrchestratorError,
    ValidationFailed,
)
from orchestrator.server.lifecycle import TERMINAL, RunStatus
from orchestrator.server.schedules import (
    SCHEDULE_LABEL,
    SHOWN_FIRES,
    check_schedule,
    check_schedule_id,
    timing_from_spec,
)
from orchestrator.server.store.records import Fired, NewRun, ScheduleRecord
from orchestrator.server.store.schedules import ScheduleStore
from orchestrator.server.store.snapshots import timestamp
from orchestrator.server.store.writer import Change
from orchestrator.v1 import orchestrator_pb2 as pb

log = structlog.get_logger("orchestrator.schedules")


@dataclass
class ScheduleControl:
    """GetPlan, ListPlans and the schedule RPCs; builds the runs a schedule starts."""

    control: ControlPlane
    store: ScheduleStore
    clock: ScheduleClock | None = field(default=None, init=False)

    # ---------------------------------------------------------------- plans

    async def get_plan(self, tenant_id: str, plan_hash: str) -> pb.StoredPlan:
        """One stored plan, with its body."""
        if not plan_hash:
            raise ValidationFailed(
                "plan_hash is required", violations=[FieldViolation("plan_hash", "required")]
            )
        return await self.control.plans.get(tenant_id, plan_hash)

    async def list_plans(
        self, tenant_id: str, request: pb.ListPlansRequest
    ) -> pb.ListPlansResponse:
        """A page of the tenant's stored plans, most recently stored first."""
        size = self._page_size(request.page_size)
        before: int | None = None
        if request.page_token:
            token = self._token("plans", tenant_id, request.page_token)
            if not isinstance(token, int):
                raise _foreign_token()
            before = token
        found, last = await self.control.plans.page(tenant_id, limit=size, before_pk=before)
        response = pb.ListPlansResponse(plans=found)
        if last is not None:
            response.next_page_token = self.control.tokens.encode(
                "page", {"k": "plans", "t": tenant_id, "after": last}
            )
        return response

    # ---------------------------------------------------------------- schedules

    async def create(self, tenant_id: str, schedule: pb.Schedule) -> pb.Schedule:
        """Check and store a new schedule; it fires from the next fire time after now."""
        spec, plan = await self._checked(tenant_id, schedule, creating=True)
        record = await self.store.create(
            tenant_id, spec, plan, timing_from_spec(spec).next_after(time.time())
        )
        self._wake()
        return self.message(record)

    async def update(self, tenant_id: str, schedule: pb.Schedule) -> pb.Schedule:
        """Replace a schedule's definition; it fires from the next fire time after now."""
        spec, plan = await self._checked(tenant_id, schedule, creating=False)
        record = await self.store.update(
            tenant_id, spec, plan, timing_from_spec(spec).next_after(time.time())
        )
        self._wake()
        return self.message(record)

    async def get(self, tenant_id: str, schedule_id: str) -> pb.Schedule:
        """One schedule with its recent actions and next fire times."""
        _require_id(schedule_id)
        return self.message(await self.store.get(tenant_id, schedule_id))

    async def list_schedules(
        self, tenant_id: str, request: pb.ListSchedulesRequest
    ) -> pb.ListSchedulesResponse:
        """A page of the tenant's schedules, by id."""
        size = self._page_size(request.page_size)
        after: str | None = None
        if request.page_token:
            token = self._token("schedules", tenant_id, request.page_token)
            if not isinstance(token, str):
                raise _foreign_token()
            after = token
        records, last = await self.store.page(tenant_id, limit=size, after_id=after)
        response = pb.ListSchedulesResponse(schedules=[self.message(r) for r in records])
        if last is not None:
            response.next_page_token = self.control.tokens.encode(
                "page", {"k": "schedules", "t": tenant_id, "after": last}
            )
        return response

    async def delete(self, tenant_id: str, schedule_id: str) -> None:
        """Remove a schedule; its runs stay."""
        _require_id(schedule_id)
        await self.store.delete(tenant_id, schedule_id)

    async def pause(self, tenant_id: str, schedule_id: str, paused: bool) -> pb.Schedule:
        """Pause, or unpause from the next fire time after now."""
        _require_id(schedule_id)
        next_fire_at = None
        if not paused:
            current = await self.store.get(tenant_id, schedule_id)
            next_fire_at = timing_from_spec(current.spec).next_after(time.time())
        record = await self.store.set_paused(tenant_id, schedule_id, paused, next_fire_at)
        self._wake()
        return self.message(record)

    async def trigger(self, tenant_id: str, schedule_id: str) -> pb.Execution:
        """Start one run of the schedule now."""
        _require_id(schedule_id)
        fired = await self.store.trigger(tenant_id, schedule_id, self.build_run)
        self.after_commit([fired])
        assert fired.execution is not None
        return fired.execution

    # ---------------------------------------------------------------- runs

    def build_run(
        self,
        tenant_id: str,
        spec: pb.Schedule,
        plan: pb.ExecutablePlan,
        fire_at: float,
        triggered: bool,
    ) -> NewRun:
        """The run a fire time (or a trigger) of the schedule creates, checked as Execute
        checks a request. Runs inside the store's unit of work: no awaiting, no side effect."""
        request = run_request(spec, plan)
        checked = self.control.check_request(tenant_id, request)
        validated = checked.validated
        estimate = self.control.cached_estimate(
            tenant_id, validated.plan_hash, len(validated.steps)
        )
        when = datetime.fromtimestamp(fire_at, UTC).isoformat(timespec="milliseconds")
        how = "triggered" if triggered else "fired"
        correlation = f"schedule/{spec.schedule_id}/{how}/{when}"
        new = self.control.new_run(tenant_id, correlation, request, checked, estimate)
        new.trace_parent = ""
        return new

    def after_commit(self, fired: list[Fired]) -> None:
        """Tell the engine of the runs a commit started and cancelled."""
        engine = self.control.engine
        for one in fired:
            if one.cancelled_run_id:
                engine.control(one.cancelled_run_id, RunStatus.CANCELLED)
            if one.run_id:
                if one.owned:
                    engine.submit(one.run_id)
                else:
                    engine.wake_claimer()

    def message(self, record: ScheduleRecord) -> pb.Schedule:
        """A stored schedule as the API shows it."""
        schedule = pb.Schedule()
        schedule.CopyFrom(record.spec)
        schedule.paused = record.paused
        schedule.recent_actions.extend(record.actions)
        schedule.created_at.CopyFrom(timestamp(record.created_at))
        schedule.updated_at.CopyFrom(timestamp(record.updated_at))
        schedule.started_count = record.started_count
        schedule.skipped_count = record.skipped_count
        schedule.missed_count = record.missed_count
        if not record.paused and record.next_fire_at is not None:
            timing = timing_from_spec(record.spec)
            upcoming = [record.next_fire_at, *timing.upcoming(record.next_fire_at, SHOWN_FIRES - 1)]
            schedule.next_fire_times.extend(timestamp(t) for t in upcoming)
        return schedule

    # ---------------------------------------------------------------- checks

    async def _checked(
        self, tenant_id: str, schedule: pb.Schedule, *, creating: bool
    ) -> tuple[pb.Schedule, pb.ExecutablePlan | None]:
        """The definition to store (its plan by hash) and the plan when given in full."""
        spec, _timing = check_schedule(schedule, creating=creating)
        given = spec.HasField("executable_plan")
        if given:
            plan = pb.ExecutablePlan()
            plan.CopyFrom(spec.executable_plan)
        else:
            plan = await self.control.plans.plan(tenant_id, spec.plan_hash)
        request = run_request(spec, plan)
        request.plan_hash = spec.plan_hash
        try:
            checked = self.control.check_request(tenant_id, request)
        except OrchestratorError as exc:
            exc.violations = [
                FieldViolation(f"schedule.{v.field}", v.description) for v in exc.violations
            ]
            raise
        spec.plan_hash = checked.validated.plan_hash
        spec.ClearField("executable_plan")
        return spec, plan if given else None

    def _page_size(self, page_size: int) -> int:
        settings = self.control.settings
        if page_size < 0:
            raise ValidationFailed(
                "page_size must not be negative",
                violations=[FieldViolation("page_size", "must be 0 (default 50) to 500")],
            )
        return min(page_size or settings.default_page_size, settings.max_page_size)

    def _token(self, kind: str, tenant_id: str, token: str) -> object:
        """Where a page token of this kind and tenant continues after."""
        payload = self.control.tokens.decode("page", token, field="page_token")
        if payload.get("k") != kind or payload.get("t") != tenant_id:
            raise _foreign_token()
        return payload.get("after")

    def _wake(self) -> None:
        if self.clock is not None:
            self.clock.wake()


def run_request(spec: pb.Schedule, plan: pb.ExecutablePlan) -> pb.ExecuteRequest:
    """The Execute request each run of the schedule amounts to."""
    request = pb.ExecuteRequest(
        executable_plan=plan,
        parameters=spec.parameters,
        variables=spec.variables,
        triggered_by=f"schedule/{spec.schedule_id}",
        labels={**spec.labels, SCHEDULE_LABEL: spec.schedule_id},
    )
    if spec.HasField("timeout"):
        request.timeout.CopyFrom(spec.timeout)
    return request


def _foreign_token() -> InvalidArgument:
    return InvalidArgument("page_token belongs to a different query", reason="INVALID_PAGE_TOKEN")


def _require_id(schedule_id: str) -> None:
    violations: list[FieldViolation] = []
    check_schedule_id(schedule_id, violations, "schedule_id")
    if violations:
        raise ValidationFailed("invalid schedule_id", violations=violations)


TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)
# After a look that fired nothing although a schedule was due (another replica holds it, or
# the clock ran a hair early), wait this long before the next.
RECHECK_SECONDS = 0.05


class ScheduleClock:
    """Fires due schedules: sleeps until the earliest next fire time (at most
    `poll_seconds`), then lets the store fire what is due. Every replica runs one; the
    store's row locks and fire keys make each fire time start one run in all."""

    def __init__(self, schedules: ScheduleControl, poll_seconds: float) -> None:
        self.schedules = schedules
        self.poll = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Whether a schedule had a buffered fire waiting at the last look.
        self._buffered = False
        schedules.clock = self

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="schedule-clock")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def wake(self) -> None:
        """Look again now (a schedule changed here)."""
        self._wake.set()

    def on_commit(self, changes: list[Change]) -> None:
        """A run that ends may release a buffered fire (looked for only while one waits)."""
        if self._buffered and any(c.status_changed and c.status in TERMINAL_NAMES for c in changes):
            self._wake.set()

    async def _loop(self) -> None:
        store = self.schedules.store
        buffered_seen = False
        while True:
            wait = self.poll
            try:
                due, buffered = await store.earliest_due()
                self._buffered = buffered
                now = time.time()
                if (due is not None and due <= now) or (buffered and not buffered_seen):
                    fired = await store.fire_due(self.schedules.build_run)
                    self.schedules.after_commit(fired)
                    buffered_seen = buffered
                    wait = 0.0 if fired else RECHECK_SECONDS
                elif due is not None:
                    wait = min(self.poll, due - now)
            except asyncio.CancelledError:
                raise
            except STORE_OUTAGES:
                pass  # logged once by the store's health; the next look tries again
            except Exception:
                log.exception("schedules.fire_failed")
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                self._wake.clear()
                buffered_seen = False
