"""Schedules in the store: their definitions, and the fires that start their runs.

A fire is claimed by inserting (tenant, schedule, fire time) into `schedule_fires` in the
very transaction that creates its run and moves the schedule's next fire time: whichever
replica or restart gets there, the fire and its run commit together or not at all, and the
key forbids a second one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from orchestrator.server.errors import AlreadyExists, NotFound, OrchestratorError
from orchestrator.server.lifecycle import TERMINAL, Action, RunStatus
from orchestrator.server.schedules import (
    PB_OVERLAP,
    SHOWN_ACTIONS,
    Decision,
    catchup_of,
    decide,
    timing_from_spec,
)
from orchestrator.server.store.plans import plan_not_found
from orchestrator.server.store.records import Fired, NewRun, Row, ScheduleRecord
from orchestrator.server.store.runs import RunStore
from orchestrator.server.store.schema import plans, runs, schedule_fires, schedules
from orchestrator.server.store.snapshots import timestamp
from orchestrator.server.store.writer import Tx
from orchestrator.v1 import orchestrator_pb2 as pb

# (definition, plan, fire time, triggered) -> the run to create; raises OrchestratorError
# when the plan no longer passes validation (the fire is then REJECTED).
RunBuilder = Callable[[str, pb.Schedule, pb.ExecutablePlan, float, bool], NewRun]

# At most this many fire times of one schedule per transaction (a long catch-up goes on in
# the next one), and this many schedules per transaction.
FIRES_PER_UNIT = 100
SCHEDULES_PER_UNIT = 20
# Fire rows older than this are deleted as the schedule fires (they are only history: the
# schedule's next fire time is already past them).
FIRE_HISTORY_SECONDS = 86_400.0


def schedule_not_found(schedule_id: str) -> NotFound:
    """The one NotFound for schedules, identical for unknown ids and other tenants'."""
    return NotFound(
        f"schedule {schedule_id[:100]!r} not found",
        reason="SCHEDULE_NOT_FOUND",
        metadata={"schedule_id": schedule_id[:100]},
    )


class ScheduleStore:
    """Every query and unit of work on schedules."""

    def __init__(self, runs: RunStore) -> None:
        self.runs = runs
        self.db = runs.db
        self.writer = runs.writer
        self._store_plan = (
            self.db.dialect.insert(plans)
            .on_conflict_do_nothing(index_elements=[plans.c.tenant_id, plans.c.plan_hash])
            .values(
                tenant_id=sa.bindparam("tenant_id"),
                plan_hash=sa.bindparam("plan_hash"),
                plan=sa.bindparam("plan"),
                plan_id=sa.bindparam("plan_id"),
                plan_name=sa.bindparam("plan_name"),
                plan_version=sa.bindparam("plan_version"),
                created_at=sa.bindparam("created_at"),
            )
        )
        self._claim = self.db.dialect.insert(schedule_fires).on_conflict_do_nothing(
            index_elements=[
                schedule_fires.c.tenant_id,
                schedule_fires.c.schedule_id,
                schedule_fires.c.fire_at,
            ]
        )

    # ---------------------------------------------------------------- definitions

    async def create(
        self,
        tenant_id: str,
        spec: pb.Schedule,
        plan: pb.ExecutablePlan | None,
        next_fire_at: float | None,
    ) -> ScheduleRecord:
        """Store a new schedule (and its plan, when given in full)."""

        async def unit(tx: Tx) -> ScheduleRecord:
            await self._keep_plan(tx, tenant_id, spec.plan_hash, plan)
            inserted = await tx.conn.execute(
                self.db.dialect.insert(schedules)
                .on_conflict_do_nothing(
                    index_elements=[schedules.c.tenant_id, schedules.c.schedule_id]
                )
                .values(
                    tenant_id=tenant_id,
                    schedule_id=spec.schedule_id,
                    created_at=tx.now,
                    **_definition(spec, next_fire_at, tx.now),
                )
            )
            if inserted.rowcount != 1:
                raise AlreadyExists(
                    f"schedule {spec.schedule_id!r} already exists",
                    reason="SCHEDULE_ALREADY_EXISTS",
                    metadata={"schedule_id": spec.schedule_id},
                )
            return await self._load(tx.conn, tenant_id, spec.schedule_id)

        return await self.writer.run(unit)

    async def update(
        self,
        tenant_id: str,
        spec: pb.Schedule,
        plan: pb.ExecutablePlan | None,
        next_fire_at: float | None,
    ) -> ScheduleRecord:
        """Replace a schedule's definition; its counters and history stay."""

        async def unit(tx: Tx) -> ScheduleRecord:
            await self._locked(tx, tenant_id, spec.schedule_id)
            await self._keep_plan(tx, tenant_id, spec.plan_hash, plan)
            await tx.conn.execute(
                sa.update(schedules)
                .where(
                    schedules.c.tenant_id == tenant_id,
                    schedules.c.schedule_id == spec.schedule_id,
                )
                .values(buffered_fire_at=None, **_definition(spec, next_fire_at, tx.now))
            )
            return await self._load(tx.conn, tenant_id, spec.schedule_id)

        return await self.writer.run(unit)

    async def set_paused(
        self, tenant_id: str, schedule_id: str, paused: bool, next_fire_at: float | None
    ) -> ScheduleRecord:
        """Pause (no next fire time) or unpause (from `next_fire_at`); a no-op if already so."""

        async def unit(tx: Tx) -> ScheduleRecord:
            row = await self._locked(tx, tenant_id, schedule_id)
            if bool(row["paused"]) != paused:
                spec = pb.Schedule.FromString(row["spec"])
                spec.paused = paused
                await tx.conn.execute(
                    sa.update(schedules)
                    .where(
                        schedules.c.tenant_id == tenant_id,
                        schedules.c.schedule_id == schedule_id,
                    )
                    .values(
                        spec=spec.SerializeToString(deterministic=True),
                        paused=paused,
                        next_fire_at=None if paused else next_fire_at,
                        buffered_fire_at=None,
                        updated_at=tx.now,
                    )
                )
            return await self._load(tx.conn, tenant_id, schedule_id)

        return await self.writer.run(unit)

    async def delete(self, tenant_id: str, schedule_id: str) -> None:
        """Remove a schedule and its fire history (its runs stay)."""

        async def unit(tx: Tx) -> None:
            await self._locked(tx, tenant_id, schedule_id)
            for table in (schedule_fires, schedules):
                await tx.conn.execute(
                    sa.delete(table).where(
                        table.c.tenant_id == tenant_id, table.c.schedule_id == schedule_id
                    )
                )

        await self.writer.run(unit)

    async def get(self, tenant_id: str, schedule_id: str) -> ScheduleRecord:
        """One schedule with its recent actions; SCHEDULE_NOT_FOUND for others' too."""
        return await self.db.read(lambda conn: self._load(conn, tenant_id, schedule_id))

    async def page(
        self, tenant_id: str, *, limit: int, after_id: str | None
    ) -> tuple[list[ScheduleRecord], str | None]:
        """Up to `limit` schedules by id, after `after_id`, and the id to continue after."""
        query = sa.select(schedules).where(schedules.c.tenant_id == tenant_id)
        if after_id is not None:
            query = query.where(schedules.c.schedule_id > after_id)
        query = query.order_by(schedules.c.schedule_id).limit(limit + 1)

        async def read(conn: Any) -> list[Row]:
            return list((await conn.execute(query)).mappings().all())

        rows = await self.db.read(read)
        more = len(rows) > limit
        rows = rows[:limit]
        return [record(r) for r in rows], (rows[-1]["schedule_id"] if more and rows else None)

    async def plan(self, tenant_id: str, plan_hash: str) -> pb.ExecutablePlan | None:
        """The tenant's stored plan of this hash, if any."""
        query = sa.select(plans.c.plan).where(
            plans.c.tenant_id == tenant_id, plans.c.plan_hash == plan_hash
        )

        async def read(conn: Any) -> bytes | None:
            blob: bytes | None = (await conn.execute(query)).scalar()
            return blob

        blob = await self.db.read(read)
        return None if blob is None else pb.ExecutablePlan.FromString(blob)

    async def earliest_due(self) -> tuple[float | None, bool]:
        """The earliest next fire time of the unpaused schedules, and whether one has a
        buffered fire waiting for its last run to end."""
        earliest = sa.select(sa.func.min(schedules.c.next_fire_at)).where(
            schedules.c.paused == sa.false()
        )
        buffered = (
            sa.select(schedules.c.schedule_id)
            .where(schedules.c.paused == sa.false(), schedules.c.buffered_fire_at.is_not(None))
            .limit(1)
        )

        async def read(conn: Any) -> tuple[float | None, bool]:
            at = (await conn.execute(earliest)).scalar()
            waiting = (await conn.execute(buffered)).first()
            return (None if at is None else float(at)), waiting is not None

        return await self.db.read(read)

    # ---------------------------------------------------------------- fires

    async def fire_due(self, build: RunBuilder) -> list[Fired]:
        """Fire every due fire time of the due schedules (those no other replica is firing
        now), each with its run, in one transaction."""

        async def unit(tx: Tx) -> list[Fired]:
            query = (
                sa.select(schedules)
                .where(
                    schedules.c.paused == sa.false(),
                    sa.or_(
                        schedules.c.next_fire_at <= tx.now,
                        schedules.c.buffered_fire_at.is_not(None),
                    ),
                )
                .order_by(schedules.c.next_fire_at)
                .limit(SCHEDULES_PER_UNIT)
            )
            rows = (await tx.conn.execute(self.db.dialect.claimable(query))).mappings().all()
            fired: list[Fired] = []
            for row in rows:
                fired += await self._fire(tx, dict(row), build)
            return fired

        return await self.writer.run(unit)

    async def trigger(self, tenant_id: str, schedule_id: str, build: RunBuilder) -> Fired:
        """Start one run of the schedule now, whatever its state and overlap policy."""

        async def unit(tx: Tx) -> Fired:
            row = await self._locked(tx, tenant_id, schedule_id)
            spec = pb.Schedule.FromString(row["spec"])
            plan = await self._plan_in(tx, tenant_id, row["plan_hash"])
            new = build(tenant_id, spec, plan, tx.now, True)
            await tx.conn.execute(
                self._claim,
                _fire_row(tenant_id, schedule_id, tx.now, "TRIGGERED", new.run_id, "", tx.now),
            )
            execution = await self.runs.insert_run(tx, new)
            await self._update(
                tx,
                tenant_id,
                schedule_id,
                last_run_id=new.run_id,
                started_count=row["started_count"] + 1,
            )
            return Fired(run_id=new.run_id, owned=bool(new.owner), execution=execution)

        return await self.writer.run(unit)

    async def _fire(self, tx: Tx, row: dict[str, Any], build: RunBuilder) -> list[Fired]:
        tenant_id, schedule_id = row["tenant_id"], row["schedule_id"]
        spec = pb.Schedule.FromString(row["spec"])
        timing = timing_from_spec(spec)
        policy = PB_OVERLAP.get(spec.overlap_policy, PB_OVERLAP[pb.OVERLAP_POLICY_SKIP])
        plan = await self._plan_in(tx, tenant_id, row["plan_hash"])
        state = dict(
            last_run_id=row["last_run_id"],
            buffered_fire_at=row["buffered_fire_at"],
            next_fire_at=row["next_fire_at"],
            started_count=row["started_count"],
            skipped_count=row["skipped_count"],
            missed_count=row["missed_count"],
        )
        running = await self._running(tx, row["last_run_id"])
        fired: list[Fired] = []

        async def start(fire_at: float, cancel: bool, claim: bool) -> None:
            """Claim `fire_at` (unless already claimed as BUFFERED) and start its run."""
            nonlocal running
            try:
                new = build(tenant_id, spec, plan, fire_at, False)
            except OrchestratorError as exc:
                if claim:
                    await self._record(tx, tenant_id, schedule_id, fire_at, "REJECTED", "", exc)
                else:
                    await self._settle(tx, tenant_id, schedule_id, fire_at, "REJECTED", "", exc)
                return
            if claim:
                claimed = await tx.conn.execute(
                    self._claim,
                    _fire_row(tenant_id, schedule_id, fire_at, "STARTED", new.run_id, "", tx.now),
                )
                if claimed.rowcount != 1:
                    return  # fired already, by another replica or before a restart
            cancelled = ""
            if cancel and state["last_run_id"]:
                cancelled = await self._cancel(tx, tenant_id, state["last_run_id"], schedule_id)
            try:
                await self.runs.insert_run(tx, new)
            except OrchestratorError as exc:  # the tenant's run quota: nothing was written
                await self._settle(tx, tenant_id, schedule_id, fire_at, "SKIPPED", "", exc)
                state["skipped_count"] += 1
                return
            if not claim:
                await self._settle(tx, tenant_id, schedule_id, fire_at, "STARTED", new.run_id)
            state["last_run_id"] = new.run_id
            state["started_count"] += 1
            running = True
            fired.append(
                Fired(run_id=new.run_id, owned=bool(new.owner), cancelled_run_id=cancelled)
            )

        if state["buffered_fire_at"] is not None and not running:
            buffered = state["buffered_fire_at"]
            state["buffered_fire_at"] = None
            await start(buffered, cancel=False, claim=False)
        at = state["next_fire_at"]
        if at is not None and at <= tx.now:
            cutoff = tx.now - catchup_of(spec)
            if at < cutoff:
                kept = timing.next_after(cutoff - 1e-6)
                state["missed_count"] += timing.count_between(at, kept - 1e-6)
                at = kept
            handled = 0
            while at <= tx.now and handled < FIRES_PER_UNIT:
                handled += 1
                decision = decide(policy, running, state["buffered_fire_at"] is not None)
                if decision in (Decision.START, Decision.CANCEL_AND_START):
                    await start(at, cancel=decision is Decision.CANCEL_AND_START, claim=True)
                else:
                    outcome = "BUFFERED" if decision is Decision.BUFFER else "SKIPPED"
                    claimed = await tx.conn.execute(
                        self._claim,
                        _fire_row(
                            tenant_id,
                            schedule_id,
                            at,
                            outcome,
                            None,
                            "the last run is still going",
                            tx.now,
                        ),
                    )
                    if claimed.rowcount == 1:
                        if decision is Decision.BUFFER:
                            state["buffered_fire_at"] = at
                        else:
                            state["skipped_count"] += 1
                at = timing.next_after(at)
            state["next_fire_at"] = at
            await tx.conn.execute(
                sa.delete(schedule_fires).where(
                    schedule_fires.c.tenant_id == tenant_id,
                    schedule_fires.c.schedule_id == schedule_id,
                    schedule_fires.c.fire_at < tx.now - FIRE_HISTORY_SECONDS,
                )
            )
        await self._update(tx, tenant_id, schedule_id, **state)
        return fired

    async def _cancel(self, tx: Tx, tenant_id: str, run_id: str, schedule_id: str) -> str:
        """CANCEL_OTHER: cancel the last run if it is still going; its id, else ""."""
        if not await self._running(tx, run_id):
            return ""
        await self.runs.transition(
            tx, tenant_id, run_id, Action.CANCEL, f"schedule {schedule_id}: a newer run started"
        )
        return run_id

    async def _running(self, tx: Tx, run_id: str | None) -> bool:
        if not run_id:
            return False
        status = (
            await tx.conn.execute(sa.select(runs.c.status).where(runs.c.run_id == run_id))
        ).scalar()
        return status is not None and RunStatus(status) not in TERMINAL

    async def _record(
        self,
        tx: Tx,
        tenant_id: str,
        schedule_id: str,
        fire_at: float,
        outcome: str,
        run_id: str,
        exc: OrchestratorError,
    ) -> None:
        await tx.conn.execute(
            self._claim,
            _fire_row(tenant_id, schedule_id, fire_at, outcome, run_id or None, _why(exc), tx.now),
        )

    async def _settle(
        self,
        tx: Tx,
        tenant_id: str,
        schedule_id: str,
        fire_at: float,
        outcome: str,
        run_id: str,
        exc: OrchestratorError | None = None,
    ) -> None:
        """Change a claimed fire's outcome (a buffered fire started, a start refused)."""
        await tx.conn.execute(
            sa.update(schedule_fires)
            .where(
                schedule_fires.c.tenant_id == tenant_id,
                schedule_fires.c.schedule_id == schedule_id,
                schedule_fires.c.fire_at == fire_at,
            )
            .values(outcome=outcome, run_id=run_id or None, message=_why(exc) if exc else "")
        )

    async def _update(self, tx: Tx, tenant_id: str, schedule_id: str, **values: Any) -> None:
        await tx.conn.execute(
            sa.update(schedules)
            .where(schedules.c.tenant_id == tenant_id, schedules.c.schedule_id == schedule_id)
            .values(**values)
        )

    async def _keep_plan(
        self, tx: Tx, tenant_id: str, plan_hash: str, plan: pb.ExecutablePlan | None
    ) -> None:
        """Store a schedule's plan given in full; a plan named by hash must be stored."""
        if plan is not None:
            await tx.conn.execute(
                self._store_plan,
                {
                    "tenant_id": tenant_id,
                    "plan_hash": plan_hash,
                    "plan": plan.SerializeToString(deterministic=True),
                    "plan_id": plan.plan_id,
                    "plan_name": plan.name,
                    "plan_version": plan.version,
                    "created_at": tx.now,
                },
            )
        else:
            await self._plan_in(tx, tenant_id, plan_hash)

    async def _plan_in(self, tx: Tx, tenant_id: str, plan_hash: str) -> pb.ExecutablePlan:
        blob = (
            await tx.conn.execute(
                sa.select(plans.c.plan).where(
                    plans.c.tenant_id == tenant_id, plans.c.plan_hash == plan_hash
                )
            )
        ).scalar()
        if blob is None:
            raise plan_not_found(plan_hash)
        return pb.ExecutablePlan.FromString(blob)

    async def _locked(self, tx: Tx, tenant_id: str, schedule_id: str) -> Row:
        query = sa.select(schedules).where(
            schedules.c.tenant_id == tenant_id, schedules.c.schedule_id == schedule_id
        )
        if not self.db.dialect.single_replica:
            query = query.with_for_update()
        row: Row | None = (await tx.conn.execute(query)).mappings().first()
        if row is None:
            raise schedule_not_found(schedule_id)
        return row

    async def _load(self, conn: Any, tenant_id: str, schedule_id: str) -> ScheduleRecord:
        row = (
            (
                await conn.execute(
                    sa.select(schedules).where(
                        schedules.c.tenant_id == tenant_id,
                        schedules.c.schedule_id == schedule_id,
                    )
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            raise schedule_not_found(schedule_id)
        fires = (
            await conn.execute(
                sa.select(schedule_fires)
                .where(
                    schedule_fires.c.tenant_id == tenant_id,
                    schedule_fires.c.schedule_id == schedule_id,
                )
                .order_by(schedule_fires.c.fire_at.desc())
                .limit(SHOWN_ACTIONS)
            )
        ).mappings()
        actions = []
        for fire in fires:
            action = pb.ScheduleAction(
                run_id=fire["run_id"] or "", outcome=fire["outcome"], message=fire["message"]
            )
            action.fire_time.CopyFrom(timestamp(fire["fire_at"]))
            actions.append(action)
        return record(row, tuple(actions))


def record(row: Row, actions: tuple[pb.ScheduleAction, ...] = ()) -> ScheduleRecord:
    """A schedules row as a ScheduleRecord."""
    return ScheduleRecord(
        spec=pb.Schedule.FromString(row["spec"]),
        paused=bool(row["paused"]),
        next_fire_at=row["next_fire_at"],
        buffered_fire_at=row["buffered_fire_at"],
        started_count=int(row["started_count"]),
        skipped_count=int(row["skipped_count"]),
        missed_count=int(row["missed_count"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        actions=actions,
    )


def _definition(spec: pb.Schedule, next_fire_at: float | None, now: float) -> dict[str, Any]:
    """The columns a schedule's definition sets (create and update)."""
    return {
        "spec": spec.SerializeToString(deterministic=True),
        "plan_hash": spec.plan_hash,
        "paused": spec.paused,
        "next_fire_at": None if spec.paused else next_fire_at,
        "updated_at": now,
    }


def _fire_row(
    tenant_id: str,
    schedule_id: str,
    fire_at: float,
    outcome: str,
    run_id: str | None,
    message: str,
    now: float,
) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "schedule_id": schedule_id,
        "fire_at": fire_at,
        "outcome": outcome,
        "run_id": run_id,
        "message": message,
        "created_at": now,
    }


def _why(exc: OrchestratorError) -> str:
    details = "; ".join(f"{v.field}: {v.description}" for v in exc.violations)
    return f"{exc.message}: {details}"[:500] if details else exc.message[:500]
