"""Runs in the store: creation, snapshots, listing, transitions and the event log.

Reads use the reader engine; every write is a unit of work run by the group-commit writer, and
every change of a run appends its event(s) in the same transaction (DESIGN §5).
"""

from __future__ import annotations

import secrets
import statistics
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from orchestrator.server.errors import (
    AlreadyExists,
    Conflict,
    InvalidTransition,
    NotFound,
    ResourceExhausted,
)
from orchestrator.server.lifecycle import (
    REFUSAL_REASONS,
    TERMINAL,
    Action,
    RunStatus,
    StepStatus,
    next_status,
)
from orchestrator.server.store.database import Database
from orchestrator.server.store.direct import SyncConnection
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.outage import StoreHealth
from orchestrator.server.store.records import (
    ClarificationRecord,
    Created,
    EventSpec,
    Inserted,
    ListPage,
    NewRun,
    RetryRun,
    Row,
    RunFilter,
    Transitioned,
    clean_text,
)
from orchestrator.server.store.schema import (
    clarifications,
    events,
    idempotency_keys,
    plans,
    run_labels,
    runs,
    server_settings,
    steps,
    webhook_deliveries,
)
from orchestrator.server.store.snapshots import (
    EventWriter,
    build_execution,
    partial_execution,
)
from orchestrator.server.store.statements import (
    COUNT_UNFINISHED,
    INSERT_EVENTS,
    INSERT_RUN,
    INSERT_STEPS,
    RUN_COLUMNS,
    RUN_INPUTS,
    SELECT_EVENTS,
    SELECT_PENDING_CLARIFICATIONS,
    SELECT_RUN_STATUS,
    SELECT_STEPS,
    SELECT_TENANT_RUN,
    UNFINISHED,
    bind,
    checked,
    update_run_and_step_statement,
    update_run_statement,
    update_step_statement,
)
from orchestrator.server.store.webhooks import Subscriptions, stage_deliveries
from orchestrator.server.store.writer import (
    Change,
    EventRecord,
    T,
    Tx,
    Unit,
    Writer,
)
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = Any
# A plan's last_run_at is moved at most this often per process (seconds), and this many
# plans are remembered as stored before the memory starts over.
PLAN_RUN_PRECISION = 10.0
PLANS_REMEMBERED = 10_000


class RunStore:
    """Every query and unit of work on runs."""

    def __init__(self, db: Database, writer: Writer) -> None:
        self.db = db
        self.writer = writer
        upsert = db.dialect.insert(plans)
        # The plan store keeps each plan once; a run of it only moves its last_run_at.
        self._store_plan = upsert.on_conflict_do_update(
            index_elements=[plans.c.tenant_id, plans.c.plan_hash],
            set_={"last_run_at": upsert.excluded.last_run_at},
        )
        self._plan_ran = (
            sa.update(plans)
            .where(
                plans.c.tenant_id == sa.bindparam("w_tenant_id"),
                plans.c.plan_hash == sa.bindparam("w_plan_hash"),
            )
            .values(last_run_at=sa.bindparam("last_run_at"))
        )
        # (tenant, plan hash) -> when this process last committed its plans row. A plan run
        # again soon after writes nothing there: every replica's group commits would
        # otherwise queue on the row lock of a plan they all run.
        self._plans_written: dict[tuple[str, str], float] = {}
        # Each tenant's webhook subscriptions, looked up by every status change.
        self.subscriptions = Subscriptions()
        # Events' bytes, each run's fixed fields serialized once (its writes are the writer's).
        self.events = EventWriter()

    @property
    def health(self) -> StoreHealth:
        """Whether the store can be reached; what waits an outage out."""
        return self.db.health

    # ---------------------------------------------------------------- reads

    async def get_execution(self, tenant_id: str, run_id: str) -> pb.Execution:
        """The run's snapshot; NotFound for unknown runs and other tenants' runs alike."""
        return await self.db.read(lambda conn: self._load_execution(conn, tenant_id, run_id))

    async def _load_execution(
        self, conn: SyncConnection, tenant_id: str, run_id: str
    ) -> pb.Execution:
        where = {"w_run_id": run_id}
        row = (
            (await conn.execute(SELECT_TENANT_RUN, {**where, "w_tenant_id": tenant_id}))
            .mappings()
            .first()
        )
        if row is None:
            raise not_found(run_id)
        step_rows = (await conn.execute(SELECT_STEPS, where)).mappings().all()
        pending = (await conn.execute(SELECT_PENDING_CLARIFICATIONS, where)).mappings().all()
        return build_execution(row, step_rows, pending)

    async def list_executions(
        self,
        tenant_id: str,
        flt: RunFilter,
        *,
        limit: int,
        before_pk: int | None,
        full: bool = True,
    ) -> ListPage:
        """Up to `limit` runs, newest first, strictly older than `before_pk` when given.
        Without `full` (the BASIC view), no step outputs and no results are read or sent."""
        columns = RUN_COLUMNS if full else tuple(c for c in RUN_COLUMNS if c.name != "results")
        step_columns = steps.c if full else [c for c in steps.c if c.name != "output"]
        query = sa.select(*columns).where(runs.c.tenant_id == tenant_id)
        query = _apply_filter(query, flt, tenant_id=tenant_id)
        if before_pk is not None:
            query = query.where(runs.c.pk < before_pk)
        query = query.order_by(runs.c.pk.desc()).limit(limit + 1)

        async def read(conn: Any) -> ListPage:
            rows = (await conn.execute(query)).mappings().all()
            more = len(rows) > limit
            rows = rows[:limit]
            if not rows:
                return ListPage([], None)
            ids = [r["run_id"] for r in rows]
            by_run: dict[str, list[Row]] = {i: [] for i in ids}
            for srow in (
                await conn.execute(
                    sa.select(*step_columns)
                    .where(steps.c.run_id.in_(ids))
                    .order_by(steps.c.position)
                )
            ).mappings():
                by_run[srow["run_id"]].append(srow if full else {**srow, "output": None})
            clar_by_run: dict[str, list[Row]] = {i: [] for i in ids}
            for crow in (
                await conn.execute(
                    sa.select(clarifications)
                    .where(
                        clarifications.c.run_id.in_(ids),
                        clarifications.c.status == "PENDING",
                    )
                    .order_by(clarifications.c.created_at)
                )
            ).mappings():
                clar_by_run[crow["run_id"]].append(crow)
            executions = [
                build_execution(
                    r if full else {**r, "results": None},
                    by_run[r["run_id"]],
                    clar_by_run[r["run_id"]],
                    results=full,
                )
                for r in rows
            ]
            return ListPage(executions, rows[-1]["pk"] if more else None)

        return await self.db.read(read)

    async def estimate_seconds(self, tenant_id: str, plan_hash: str) -> float | None:
        """Median wall time of the tenant's last completed runs of this plan, if any."""
        query = (
            sa.select(runs.c.started_at, runs.c.completed_at)
            .where(
                runs.c.tenant_id == tenant_id,
                runs.c.plan_hash == plan_hash,
                runs.c.status == RunStatus.COMPLETED.value,
                runs.c.dry_run == sa.false(),
                runs.c.started_at.is_not(None),
            )
            .order_by(runs.c.pk.desc())
            .limit(20)
        )

        async def read(conn: Any) -> list[float]:
            return [r.completed_at - r.started_at for r in (await conn.execute(query)).all()]

        durations = await self.db.read(read)
        return statistics.median(durations) if durations else None

    async def read_events(self, run_id: str, after: int, limit: int = 500) -> list[EventRecord]:
        """Events of a run with sequence > `after`, in order."""
        where = {"w_run_id": run_id, "w_after": after, "w_limit": limit}

        async def read(conn: Any) -> list[EventRecord]:
            return [
                EventRecord(
                    int(r["sequence"]),
                    bool(r["status_changed"]) and RunStatus(r["status"]) in TERMINAL,
                    r["payload"],
                )
                for r in (await conn.execute(SELECT_EVENTS, where)).mappings()
            ]

        return await self.db.read(read)

    def status_events(
        self, tenant_id: str, flt: RunFilter, limit: int = 500
    ) -> Callable[[int], Awaitable[list[tuple[int, bytes]]]]:
        """A reader of the tenant's run status changes after a global event id, in commit
        order: its statement built once, for the many reads of one WatchExecutions stream
        (built for each read, it cost about as much as the rest of the read)."""
        query = sa.select(events.c.id, events.c.payload).where(
            events.c.tenant_id == tenant_id,
            events.c.status_changed == sa.true(),
            events.c.id > sa.bindparam("w_after_id"),
        )
        # The statuses are the event's own (the status each change led to): only the rest
        # of a filter reads the run.
        if replace(flt, statuses=[]).needs_run:
            query = query.join(runs, runs.c.run_id == events.c.run_id)
        query = _apply_filter(query, flt, tenant_id=tenant_id, status_from_event=True)
        query = query.order_by(events.c.id).limit(limit)

        async def read_after(after_id: int) -> list[tuple[int, bytes]]:
            async def read(conn: Any) -> list[tuple[int, bytes]]:
                rows = await conn.execute(query, {"w_after_id": after_id})
                return [(r.id, r.payload) for r in rows.all()]

            return await self.db.read(read)

        return read_after

    async def last_event_id(self, tenant_id: str) -> int:
        """The id of the tenant's newest status event (a WatchExecutions start point; the
        watch reads status events only, and ix_events_tenant_status answers this at once)."""
        query = sa.select(sa.func.max(events.c.id)).where(
            events.c.tenant_id == tenant_id, events.c.status_changed == sa.true()
        )

        async def read(conn: Any) -> Any:
            return (await conn.execute(query)).scalar()

        return int(await self.db.read(read) or 0)

    async def run_status(self, tenant_id: str, run_id: str) -> tuple[RunStatus, int]:
        """The run's status and last sequence; NotFound as for snapshots."""
        where = {"w_run_id": run_id, "w_tenant_id": tenant_id}

        async def read(conn: Any) -> Any:
            return (await conn.execute(SELECT_RUN_STATUS, where)).mappings().first()

        row = await self.db.read(read)
        if row is None:
            raise not_found(run_id)
        return RunStatus(row["status"]), int(row["last_sequence"])

    # ---------------------------------------------------------------- writes

    async def create_run(self, new: NewRun) -> Created:
        """Store a new run (or return the one its idempotency key already names)."""

        async def unit(tx: Tx) -> Created:
            if new.idempotency_key:
                existing = (
                    await tx.conn.execute(
                        sa.select(
                            idempotency_keys.c.request_digest, idempotency_keys.c.run_id
                        ).where(
                            idempotency_keys.c.tenant_id == new.tenant_id,
                            idempotency_keys.c.key == new.idempotency_key,
                        )
                    )
                ).first()
                if existing is not None:
                    if existing.request_digest != new.request_digest:
                        raise AlreadyExists(
                            "idempotency key already used for a different request",
                            metadata={
                                "run_id": existing.run_id,
                                "idempotency_key": new.idempotency_key,
                            },
                        )
                    execution = await self._load_execution(tx.conn, new.tenant_id, existing.run_id)
                    return Created(execution, created=False)
            return await self._insert(tx, new)

        # Keyed by tenant: one tenant's new runs take turns (its quota, its idempotency keys).
        created = await self.writer.run(unit, new.tenant_id)
        if created.created:
            self._plan_written(new, created.execution.created_at.ToNanoseconds() / 1e9)
        return created

    async def insert_run(self, tx: Tx, new: NewRun) -> pb.Execution:
        """Store a new run in the caller's unit of work, within the tenant's run quota."""
        return (await self._insert(tx, new)).execution

    async def _insert(self, tx: Tx, new: NewRun) -> Created:
        if new.max_unfinished:
            unfinished = tx.unfinished.get(new.tenant_id)
            if unfinished is None:
                # Counted once a transaction, without running the writes it keeps first:
                # what they change is in `unflushed`; later writes keep it up to date.
                counted = await tx.conn.execute(
                    COUNT_UNFINISHED, {"w_tenant_id": new.tenant_id}, flush=False
                )
                unfinished = counted.scalar_one() + tx.unflushed.get(new.tenant_id, 0)
                tx.unfinished[new.tenant_id] = unfinished
            if unfinished >= new.max_unfinished:
                raise ResourceExhausted(
                    f"the tenant has {unfinished} unfinished runs, the most allowed",
                    reason="TENANT_QUOTA_EXCEEDED",
                    metadata={"limit": str(new.max_unfinished)},
                )
        if not new.owner:
            # An unowned run: whichever replica is free takes it.
            tx.notify(Notice(NoticeKind.CLAIM))
        return await self._insert_run(tx, new)

    async def _insert_run(self, tx: Tx, new: NewRun) -> Created:
        now = tx.now
        row: dict[str, Any] = {
            "run_id": new.run_id,
            "tenant_id": new.tenant_id,
            "status": RunStatus.PENDING.value,
            "version": 1,
            "plan_hash": new.plan_hash,
            "plan": new.plan.SerializeToString(deterministic=True),
            "parameters": new.parameters,
            "variables": new.variables,
            "dry_run": new.dry_run,
            "triggered_by": new.triggered_by,
            "correlation_id": new.correlation_id,
            "timeout_seconds": new.timeout_seconds,
            "estimated_seconds": new.estimated_seconds,
            "created_at": now,
            "started_at": None,
            "completed_at": None,
            "updated_at": now,
            "current_step": "",
            "error_message": "",
            "error_reason": "",
            "steps_total": len(new.steps),
            "steps_finished": 0,
            "last_sequence": 0,
            "results": None,
            "owner": new.owner or None,
            "trace_parent": new.trace_parent,
            "lease_expires_at": new.lease_expires_at,
            "retry_count": 0,
            "labels": dict(new.labels) or None,
            "plan_id": new.plan.plan_id,
            "plan_name": new.plan.name,
            "plan_version": new.plan.version,
            "concurrency_key": new.concurrency_key,
            "max_concurrent": new.max_concurrent,
            "priority": new.priority,
            "waiting_reason": "",
            "wake_at": None,
        }
        step_rows: list[dict[str, Any]] = [
            {
                "run_id": new.run_id,
                "step_id": s.step_id,
                "flow_id": s.flow_id,
                "position": s.position,
                "tool": s.tool,
                "status": StepStatus.PENDING.value,
                "attempts": 0,
                "attempts_before": 0,
                "first_started_at": None,
                "started_at": None,
                "completed_at": None,
                "output": None,
                "error": "",
                "error_reason": "",
                "wake_at": None,
            }
            for s in new.steps
        ]
        specs = [EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, "run created", steps=step_rows)]
        if new.dry_run:
            # A dry run is validated and ordered, never executed: it is stored finished.
            row.update(
                status=RunStatus.COMPLETED.value,
                completed_at=now,
                steps_finished=len(new.steps),
                results={"execution_order": list(new.dry_run_order or [])},
            )
            for s in step_rows:
                s.update(
                    status=StepStatus.SKIPPED.value,
                    error="dry run: not executed",
                    error_reason="DRY_RUN",
                )
            specs = [
                EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, "dry run completed", steps=step_rows)
            ]
        row["last_sequence"] = len(specs)
        created = row
        if new.owner and not new.dry_run and not new.concurrency_key:
            # Run here at once: it starts in the unit creating it (its next event), and its
            # task has nothing to write before its first step (a unit fewer a run: on
            # PostgreSQL +3 to +11% end to end, on SQLite +2 to +8%, measured).
            changes, started_specs = started(created, now)
            row = {**created, **changes, "last_sequence": len(specs) + len(started_specs)}
        if tx.conn.defers:
            # Kept: its key is the database's to give when it runs, and only listings read
            # that (from the store), so the row as created has none.
            await tx.conn.write(INSERT_RUN, row, [("runs", new.run_id)])
        else:
            result = await tx.conn.execute(INSERT_RUN, row)
            row["pk"] = result.inserted_primary_key[0] if result.inserted_primary_key else None
            created["pk"] = row["pk"]
        if step_rows:
            await tx.conn.write(
                INSERT_STEPS, step_rows, (("steps", new.run_id, s.step_id) for s in new.steps)
            )
        tx.moved(new.tenant_id, _unfinished(row["status"]))
        if new.labels:
            await tx.conn.execute(
                sa.insert(run_labels),
                [
                    {"run_id": new.run_id, "tenant_id": new.tenant_id, "key": k, "value": v}
                    for k, v in new.labels.items()
                ],
            )
        await self._keep_plan(tx, new, row["plan"])
        if new.idempotency_key:
            await tx.conn.execute(
                sa.insert(idempotency_keys).values(
                    tenant_id=new.tenant_id,
                    key=new.idempotency_key,
                    request_digest=new.request_digest,
                    run_id=new.run_id,
                    created_at=now,
                )
            )
        await self._insert_events(tx, created, specs, first_sequence=1, status_changed=True)
        if row is not created:
            await self._insert_events(
                tx, row, started_specs, first_sequence=len(specs) + 1, status_changed=True
            )
        # The run as created (its first event), as Execute has always answered.
        execution = build_execution(created, step_rows, [])
        inserted = Inserted(
            run={k: v for k, v in row.items() if k not in RUN_INPUTS},
            inputs={k: row[k] for k in RUN_INPUTS},
            steps=step_rows,
        )
        return Created(execution, created=True, inserted=inserted)

    async def _keep_plan(self, tx: Tx, new: NewRun, blob: bytes) -> None:
        """Store the run's plan in the plan store, or move its last_run_at (at most every
        PLAN_RUN_PRECISION seconds per process)."""
        written = self._plans_written.get((new.tenant_id, new.plan_hash))
        if written is None:
            await tx.conn.execute(
                self._store_plan,
                {
                    "tenant_id": new.tenant_id,
                    "plan_hash": new.plan_hash,
                    "plan": blob,
                    "plan_id": new.plan.plan_id,
                    "plan_name": new.plan.name,
                    "plan_version": new.plan.version,
                    "created_at": tx.now,
                    "last_run_at": tx.now,
                },
            )
        elif tx.now - written >= PLAN_RUN_PRECISION:
            await tx.conn.execute(
                self._plan_ran,
                {
                    "w_tenant_id": new.tenant_id,
                    "w_plan_hash": new.plan_hash,
                    "last_run_at": tx.now,
                },
            )

    def _plan_written(self, new: NewRun, at: float) -> None:
        """After the commit: the plans row of `new` is there, as of `at`."""
        key = (new.tenant_id, new.plan_hash)
        last = self._plans_written.get(key)
        if last is None or at - last >= PLAN_RUN_PRECISION:
            if len(self._plans_written) >= PLANS_REMEMBERED:
                self._plans_written.clear()
            self._plans_written[key] = at

    async def _insert_events(
        self,
        tx: Tx,
        row: Row,
        specs: Sequence[EventSpec],
        *,
        first_sequence: int,
        status_changed: bool,
    ) -> None:
        values = []
        # The run-level part is the same in every event of the unit that shows the same run:
        # built once for each.
        run_parts: dict[int, bytes] = {}
        for offset, spec in enumerate(specs):
            sequence = first_sequence + offset
            shown = row if spec.run is None else spec.run
            run_part = run_parts.get(id(shown))
            if run_part is None:
                run_part = run_parts[id(shown)] = self.events.run_part(shown)
            payload = self.events.event(
                run_part,
                spec.steps,
                sequence=sequence,
                type=spec.type,
                step_id=spec.step_id,
                message=spec.message,
                run_id=row["run_id"],
                at=tx.now,
            )
            values.append(
                {
                    "run_id": row["run_id"],
                    "tenant_id": row["tenant_id"],
                    "sequence": sequence,
                    "type": pb.EventType.Name(spec.type),
                    "status_changed": status_changed
                    and spec.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED,
                    "status": shown["status"],
                    "created_at": tx.now,
                    "payload": payload,
                }
            )
        self.db.dialect.order_events(tx.stage)
        # Every event of the group commit goes in at its end, in one statement.
        tx.stage(INSERT_EVENTS, values)
        await stage_deliveries(tx, self.subscriptions, row, specs, first_sequence)
        terminal = RunStatus(row["status"]) in TERMINAL
        if terminal:
            self.events.forget(row["run_id"], row.get("retry_count") or 0)
        tx.changed(
            Change(
                tenant_id=row["tenant_id"],
                run_id=row["run_id"],
                last_sequence=first_sequence + len(specs) - 1,
                status_changed=status_changed,
                status=row["status"],
                events=tuple(
                    EventRecord(
                        v["sequence"],
                        terminal and v["status_changed"],
                        v["payload"],
                    )
                    for v in values
                ),
            )
        )

    async def _locked_row(self, tx: Tx, tenant_id: str, run_id: str) -> dict[str, Any]:
        query = self.db.dialect.select_tenant_run_for_write
        where = {"w_run_id": run_id, "w_tenant_id": tenant_id}
        row = (await tx.conn.execute(query, where)).mappings().first()
        if row is None:
            raise not_found(run_id)
        return dict(row)

    async def update_run(
        self,
        tx: Tx,
        row: dict[str, Any],
        changes: Row,
        specs: Sequence[EventSpec],
        *,
        owner: str | None = None,
        step: tuple[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Compare-and-set `changes` onto the run at the version `row` was read at (and, with
        `owner`, only while that incarnation owns it), and append `specs` as its next events;
        with `step` (its id and changes), write that step's changes too, after the run's.
        Raises Conflict, having written nothing, when another writer got there first."""
        status_changed = "status" in changes and changes["status"] != row["status"]
        new = dict(row)
        new.update(changes)
        new["version"] = row["version"] + 1
        new["updated_at"] = tx.now
        new["last_sequence"] = row["last_sequence"] + len(specs)
        keys = (*changes.keys(), "version", "updated_at", "last_sequence")
        params = bind({k: new[k] for k in keys}, run_id=row["run_id"], version=row["version"])
        if owner is not None:
            params["w_owner"] = owner
        run_id = row["run_id"]
        statement = update_run_statement(keys, owner is not None)
        written: tuple[tuple[str, ...], ...] = (("runs", run_id),)
        if step is not None and self.db.dialect.updates_run_with_step:
            step_id, step_changes = step
            params.update({f"s_{k}": v for k, v in step_changes.items()}, w_step_id=step_id)
            statement = update_run_and_step_statement(keys, owner is not None, tuple(step_changes))
            written += (("steps", run_id, step_id),)
            step = None  # written with the run
        if tx.conn.defers:
            await tx.conn.write(checked(statement), params, written)
        elif (await tx.conn.execute(statement, params)).rowcount != 1:
            raise Conflict(run_id)
        if step is not None:
            await write_step(tx, run_id, *step)
        if status_changed:
            tx.moved(row["tenant_id"], _unfinished(new["status"]) - _unfinished(row["status"]))
        tx.rows[run_id] = new
        if specs:
            await self._insert_events(
                tx,
                new,
                specs,
                first_sequence=row["last_sequence"] + 1,
                status_changed=status_changed,
            )
        return new

    async def control(
        self, tenant_id: str, run_id: str, action: Action, reason: str
    ) -> Transitioned:
        """Pause, Resume or Cancel: one compare-and-set from the transition table."""

        async def unit(tx: Tx) -> Transitioned:
            return await self.transition(tx, tenant_id, run_id, action, reason)

        return await self.with_retry(unit, run_id)

    async def transition(
        self, tx: Tx, tenant_id: str, run_id: str, action: Action, reason: str
    ) -> Transitioned:
        """`control`'s transition inside a unit of work of the caller's (a schedule's
        CANCEL_OTHER cancels the last run in the transaction that starts the next)."""
        row = await self._locked_row(tx, tenant_id, run_id)
        current = RunStatus(row["status"])
        target = next_status(current, action)
        if target is None:
            raise InvalidTransition(
                f"cannot {action.value} run {run_id!r}: it is {current.value.lower()}",
                reason=REFUSAL_REASONS.get(action, "INVALID_TRANSITION"),
                metadata={"run_id": run_id, "current_status": current.value},
            )
        changes: dict[str, Any] = {"status": target.value}
        changed_steps: list[dict[str, Any]] = []
        clar_specs: list[EventSpec] = []
        if target in TERMINAL:
            changes["completed_at"] = tx.now
        if target is RunStatus.CANCELLED:
            changed_steps, clar_specs = await self._cancel_open_work(tx, run_id, reason)
            changes["steps_finished"] = row["steps_total"]
            changes["error_message"] = clean_text(f"cancelled: {reason}" if reason else "cancelled")
            changes["error_reason"] = "CANCELLED"
        message = f"{action.value}: {reason}" if reason else f"run {target.value.lower()}"
        specs = [
            *clar_specs,
            EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, message, steps=changed_steps),
        ]
        new = await self.update_run(tx, row, changes, specs)
        tx.notify(Notice(NoticeKind.CONTROL, run_id, status=target.value))
        return Transitioned(run_id, target, tx.now, partial_execution(new, changed_steps))

    async def run_plan(self, tenant_id: str, run_id: str) -> pb.ExecutablePlan:
        """The plan a run executes; NotFound as for snapshots."""
        query = sa.select(runs.c.plan).where(runs.c.run_id == run_id, runs.c.tenant_id == tenant_id)

        async def read(conn: Any) -> bytes | None:
            blob: bytes | None = (await conn.execute(query)).scalar()
            return blob

        blob = await self.db.read(read)
        if blob is None:
            raise not_found(run_id)
        return pb.ExecutablePlan.FromString(blob)

    async def retry(self, retry: RetryRun) -> pb.Execution:
        """RetryExecution: one compare-and-set of a finished run back to RUNNING, with the
        steps that run again reset to PENDING (each with its event) in the same transaction."""

        async def unit(tx: Tx) -> pb.Execution:
            row = await self._locked_row(tx, retry.tenant_id, retry.run_id)
            current = RunStatus(row["status"])
            target = next_status(current, Action.RETRY)
            refusal = ""
            if target is None:
                refusal = f"it is {current.value.lower()}"
            elif row["dry_run"]:
                refusal = "a dry run executes nothing"
            elif current is RunStatus.COMPLETED and not retry.restart_step_ids:
                refusal = "it completed: name the steps to run again (restart_step_ids)"
            if target is None or refusal:
                raise InvalidTransition(
                    f"cannot retry run {retry.run_id!r}: {refusal}",
                    reason=REFUSAL_REASONS[Action.RETRY],
                    metadata={"run_id": retry.run_id, "current_status": current.value},
                )
            step_rows = [
                dict(r)
                for r in (
                    await tx.conn.execute(SELECT_STEPS, {"w_run_id": retry.run_id})
                ).mappings()
            ]
            again = [
                s
                for s in step_rows
                if s["step_id"] in retry.rerun_step_ids
                or s["status"]
                in (StepStatus.FAILED.value, StepStatus.SKIPPED.value, StepStatus.CANCELLED.value)
            ]
            reset: dict[str, Any] = {
                "status": StepStatus.PENDING.value,
                "started_at": None,
                "first_started_at": None,
                "completed_at": None,
                "output": None,
                "error": "",
                "error_reason": "",
                "wake_at": None,
            }
            if again:
                await tx.conn.execute(
                    sa.update(steps)
                    .where(
                        steps.c.run_id == retry.run_id,
                        steps.c.step_id.in_([s["step_id"] for s in again]),
                    )
                    # A step run again gets its retry policy's attempts afresh.
                    .values(**reset, attempts_before=steps.c.attempts)
                )
            for s in again:
                s.update(reset, attempts_before=s["attempts"])
            finished = sum(1 for s in step_rows if StepStatus(s["status"]).finished)
            changes: dict[str, Any] = {
                "status": RunStatus.RUNNING.value,
                # A fresh deadline: the run's timeout counts from the retry.
                "started_at": tx.now,
                "completed_at": None,
                "current_step": "",
                "error_message": "",
                "error_reason": "",
                "steps_finished": finished,
                "retry_count": row["retry_count"] + 1,
                "owner": retry.owner or None,
                "lease_expires_at": retry.lease_expires_at,
                # A run cancelled while parked kept its wake-up time: retried, it is due now.
                "wake_at": None,
            }
            message = f"{Action.RETRY.value}: {retry.reason}" if retry.reason else "run retried"
            specs = [
                EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, message),
                *(
                    EventSpec(
                        pb.EVENT_TYPE_STEP_RETRYING,
                        f"step {s['step_id']} runs again: the run was retried",
                        s["step_id"],
                        [s],
                    )
                    for s in again
                ),
            ]
            new = await self.update_run(tx, row, changes, specs)
            if not retry.owner:
                tx.notify(Notice(NoticeKind.CLAIM))
            return build_execution(new, step_rows, [])

        return await self.with_retry(unit, retry.run_id)

    async def _cancel_open_work(
        self, tx: Tx, run_id: str, reason: str
    ) -> tuple[list[dict[str, Any]], list[EventSpec]]:
        """Mark unfinished steps CANCELLED and withdraw pending clarifications."""
        open_steps = [
            dict(r)
            for r in (
                await tx.conn.execute(
                    sa.select(steps)
                    .where(
                        steps.c.run_id == run_id,
                        steps.c.status.in_(
                            [
                                StepStatus.PENDING.value,
                                StepStatus.RUNNING.value,
                                StepStatus.WAITING.value,
                            ]
                        ),
                    )
                    .order_by(steps.c.position)
                )
            ).mappings()
        ]
        if open_steps:
            await tx.conn.execute(
                sa.update(steps)
                .where(
                    steps.c.run_id == run_id,
                    steps.c.step_id.in_([s["step_id"] for s in open_steps]),
                )
                .values(
                    status=StepStatus.CANCELLED.value,
                    completed_at=tx.now,
                    error="cancelled with its run",
                    error_reason="CANCELLED",
                    wake_at=None,
                )
            )
            for s in open_steps:
                s.update(
                    status=StepStatus.CANCELLED.value,
                    completed_at=tx.now,
                    error="cancelled with its run",
                    error_reason="CANCELLED",
                    wake_at=None,
                )
        pending = (
            await tx.conn.execute(
                sa.select(clarifications.c.clarification_id, clarifications.c.step_id).where(
                    clarifications.c.run_id == run_id, clarifications.c.status == "PENDING"
                )
            )
        ).all()
        specs: list[EventSpec] = []
        if pending:
            await tx.conn.execute(
                sa.update(clarifications)
                .where(clarifications.c.run_id == run_id, clarifications.c.status == "PENDING")
                .values(status="WITHDRAWN", resolved_at=tx.now)
            )
            specs = [
                EventSpec(
                    pb.EVENT_TYPE_CLARIFICATION_RESOLVED,
                    f"clarification {c.clarification_id} withdrawn: run cancelled",
                    step_id=c.step_id,
                )
                for c in pending
            ]
        # Every step change has its event (DESIGN §5); a cancelled step is a STEP_FAILED
        # whose status says CANCELLED.
        specs += [
            EventSpec(
                pb.EVENT_TYPE_STEP_FAILED,
                f"step {s['step_id']} cancelled with its run",
                s["step_id"],
                [s],
            )
            for s in open_steps
        ]
        return open_steps, specs

    async def prune(self, older_than: float, limit: int = 500) -> int:
        """Delete finished runs completed before `older_than`, with their steps, events,
        clarifications, signals and idempotency keys (foreign keys cascade) and their settled
        webhook deliveries. Returns how many."""

        async def unit(tx: Tx) -> int:
            run_ids = [
                r.run_id
                for r in (
                    await tx.conn.execute(
                        sa.select(runs.c.run_id)
                        .where(
                            runs.c.status.in_([s.value for s in TERMINAL]),
                            runs.c.completed_at < older_than,
                        )
                        .limit(limit)
                    )
                ).all()
            ]
            if run_ids:
                await tx.conn.execute(sa.delete(runs).where(runs.c.run_id.in_(run_ids)))
                # Their webhook deliveries once settled (one still being retried stays).
                await tx.conn.execute(
                    sa.delete(webhook_deliveries).where(
                        webhook_deliveries.c.run_id.in_(run_ids),
                        webhook_deliveries.c.status != "PENDING",
                    )
                )
            return len(run_ids)

        return await self.writer.run(unit)

    async def clarification(
        self, tenant_id: str, run_id: str, clarification_id: str
    ) -> ClarificationRecord:
        """A clarification of the tenant's run; NotFound for the run or the clarification."""
        query = (
            sa.select(clarifications)
            .join(runs, runs.c.run_id == clarifications.c.run_id)
            .where(
                runs.c.run_id == run_id,
                runs.c.tenant_id == tenant_id,
                clarifications.c.clarification_id == clarification_id,
            )
        )

        async def read(conn: Any) -> ClarificationRecord | None:
            row = (await conn.execute(query)).mappings().first()
            if row is None:
                return None
            return ClarificationRecord(
                clarification_id=row["clarification_id"],
                step_id=row["step_id"],
                status=row["status"],
                category=row["category"],
                options=tuple(str(o) for o in row["options"] or ()),
            )

        found = await self.db.read(read)
        if found is None:
            await self.run_status(tenant_id, run_id)  # NotFound for the run first
            raise NotFound(
                f"clarification {clarification_id!r} not found in run {run_id!r}",
                reason="CLARIFICATION_NOT_FOUND",
                metadata={"run_id": run_id, "clarification_id": clarification_id},
            )
        return found

    async def signing_key(self) -> bytes:
        """The page-token key, made once and kept in the store so every replica and restart
        accepts the tokens of the others."""

        async def unit(tx: Tx) -> str:
            row = (
                await tx.conn.execute(
                    sa.select(server_settings.c.value).where(server_settings.c.name == "token_key")
                )
            ).first()
            if row is not None:
                return str(row.value)
            value = secrets.token_hex(32)
            await tx.conn.execute(sa.insert(server_settings).values(name="token_key", value=value))
            return value

        return bytes.fromhex(await self.writer.run(unit))

    async def with_retry(self, unit: Unit[T], run_id: str) -> T:
        # A Conflict means another replica changed the run between our read and our write:
        # read again and decide again (the decision may now be a refusal).
        for _ in range(5):
            try:
                return await self.writer.run(unit, run_id)
            except Conflict:
                continue
        return await self.writer.run(unit, run_id)


def _unfinished(status: str) -> int:
    """1 for a status the tenant's quota counts, else 0."""
    return 1 if status in UNFINISHED else 0


async def write_step(tx: Tx, run_id: str, step_id: str, changes: Mapping[str, Any]) -> None:
    """A step's `changes` written (its dict, already updated, showed them in the events)."""
    await tx.conn.write(
        update_step_statement(tuple(changes)),
        bind(changes, run_id=run_id, step_id=step_id),
        [("steps", run_id, step_id)],
    )


async def write_steps(tx: Tx, run_id: str, writes: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Steps' changes written, one statement (an executemany) for the steps that change the
    same columns: a round trip for all of them on PostgreSQL."""
    by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for step_id, changes in writes:
        rows = by_keys.setdefault(tuple(changes), [])
        rows.append(bind(changes, run_id=run_id, step_id=step_id))
    for keys, rows in by_keys.items():
        await tx.conn.write(
            update_step_statement(keys),
            rows if len(rows) > 1 else rows[0],
            (("steps", run_id, r["w_step_id"]) for r in rows),  # read only when kept
        )


def started(row: Row, now: float) -> tuple[dict[str, Any], list[EventSpec]]:
    """A PENDING run's start: its changes and its event."""
    target = next_status(RunStatus.PENDING, Action.START)
    assert target is not None
    changes = {"status": target.value, "started_at": row["started_at"] or now, "waiting_reason": ""}
    return changes, [EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, "run started")]


def not_found(run_id: str) -> NotFound:
    """The one NotFound for runs, identical for unknown runs and other tenants' runs."""
    return NotFound(f"execution {run_id!r} not found", metadata={"run_id": run_id})


def _apply_filter(
    query: Any, flt: RunFilter, *, tenant_id: str, status_from_event: bool = False
) -> Any:
    if flt.statuses:
        # WatchExecutions filters on the status each change led to, not on today's status.
        column = events.c.status if status_from_event else runs.c.status
        query = query.where(column.in_([s.value for s in flt.statuses]))
    if flt.plan_hash:
        query = query.where(runs.c.plan_hash == flt.plan_hash)
    if flt.triggered_by:
        query = query.where(runs.c.triggered_by == flt.triggered_by)
    if flt.created_after is not None:
        query = query.where(runs.c.created_at >= flt.created_after)
    if flt.created_before is not None:
        query = query.where(runs.c.created_at < flt.created_before)
    if flt.plan_id:
        query = query.where(runs.c.plan_id == flt.plan_id)
    for key, value in sorted(flt.labels.items()):
        # One indexed lookup per pair; every pair must match. Portable SQL (SQLite, Postgres).
        query = query.where(
            runs.c.run_id.in_(
                sa.select(run_labels.c.run_id).where(
                    run_labels.c.tenant_id == tenant_id,
                    run_labels.c.key == key,
                    run_labels.c.value == value,
                )
            )
        )
    return query
