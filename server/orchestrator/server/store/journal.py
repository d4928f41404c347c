"""The engine's durable record: every step transition is one unit of work that checks the run,
updates the run (compare-and-set) and the step and appends the event, in one transaction.

A unit that finds the run no longer accepts the change (cancelled, paused before a start)
writes nothing and says so; the engine then follows the store, never the other way round.

Instant steps made one after another by a run's task are one unit (`chain`): their starts
and outcomes and, when they end the run, its end.

The hot units (a step's start, its outcome, the run's end) do not read the run's row: the
journal keeps the row as this process last committed it, for each run it executes, and the
unit's compare-and-set on (version, owner) is what checks it is still the store's. When it is
not (another writer, a replica, a retried commit), the unit reads the row and runs again.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import sqlalchemy as sa

from orchestrator.server.errors import (
    STORE_OUTAGES,
    Conflict,
    FailedPrecondition,
    InvalidTransition,
)
from orchestrator.server.lifecycle import TERMINAL, Action, RunStatus, StepStatus, next_status
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.records import (
    Answer,
    EventSpec,
    Inserted,
    Transitioned,
    clean_text,
)
from orchestrator.server.store.runs import (
    RunStore,
    not_found,
    started,
    write_step,
    write_steps,
)
from orchestrator.server.store.schema import clarifications, replicas, runs, signals
from orchestrator.server.store.statements import (
    INSERT_CLARIFICATION,
    OPEN_STEPS,
    RESOLVE_CLARIFICATION,
    SELECT_APPROVALS,
    SELECT_CLARIFICATION,
    SELECT_OPEN_STEPS,
    SELECT_RUN_INPUTS,
    SELECT_STEP,
    SELECT_STEP_CLARIFICATION,
    SELECT_STEPS,
    UNFINISHED,
    WITHDRAW_CLARIFICATIONS,
    bind,
    one_of,
)
from orchestrator.server.store.writer import T, Tx, Unit
from orchestrator.v1 import orchestrator_pb2 as pb

JSON = Any

STEP_EVENT = {
    StepStatus.COMPLETED: pb.EVENT_TYPE_STEP_COMPLETED,
    StepStatus.FAILED: pb.EVENT_TYPE_STEP_FAILED,
    StepStatus.SKIPPED: pb.EVENT_TYPE_STEP_SKIPPED,
    StepStatus.CANCELLED: pb.EVENT_TYPE_STEP_FAILED,
}
# Replica rows older than this (and 10 heartbeat timeouts) are forgotten at the next start.
STALE_REPLICA_SECONDS = 3600.0
# Execution.waiting_reason of a PENDING run whose concurrency key's runs are all taken.
WAITING_FOR_KEY = "CONCURRENCY_KEY"


@dataclass(frozen=True)
class Started:
    """A step attempt was recorded as started."""

    attempt: int
    first_started_at: float
    # Attempts made before the run's last retry; `attempt - attempts_before` is the attempt
    # within the current retry policy's budget.
    attempts_before: int = 0
    # The outcome handed to the StepStart was committed with it.
    finished: bool = False

    @property
    def budget_attempt(self) -> int:
        return self.attempt - self.attempts_before


@dataclass(frozen=True)
class Outcome:
    """How a step finished: COMPLETED with an output, or FAILED/SKIPPED/CANCELLED with why."""

    step_id: str
    status: StepStatus
    output: JSON = None
    error: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Taken:
    """A signal a step took: its payload is the step's output (already committed)."""

    payload: JSON


Riding = tuple[Outcome, Mapping[str, JSON] | None]


@dataclass(frozen=True)
class Link:
    """An instant step's attempt, made and finished before anything of it was written: one
    link of a chain (`Journal.chain`)."""

    step_id: str
    known: Mapping[str, Any]  # the step's row as the store has it (read, not written since)
    attempt: int
    at: float  # the attempt's start (its started_at)
    outcome: Outcome | None  # None: the attempt failed and another follows (only started)
    finished_at: float  # when the tool returned (its completed_at; the next link starts after)
    variables: Mapping[str, JSON] | None = None


@dataclass(frozen=True)
class Ending:
    """How a run ends: COMPLETE or FAIL, with its message."""

    action: Action
    error_message: str = ""
    error_reason: str = ""


@dataclass(frozen=True)
class Chained:
    """A chain committed: each link's first start (by step id), and whether the run ended."""

    first_started_at: dict[str, float]
    ended: bool


class StepStart:
    """A step's start on its way to the writer (`Journal.start_step`). An outcome handed over
    with `finish` before the writer takes the start is committed in the same unit, after it:
    both events, in order, one write. Once the writer has taken the start (it commits alone:
    the step shows RUNNING while it runs), `finish` refuses and the outcome is written on its
    own. The writer takes it in its own thread on SQLite, hence the lock."""

    def __init__(self, journal: Journal, run_id: str, attempt: int, at: float) -> None:
        self.journal = journal
        self.run_id = run_id
        self.attempt = attempt  # the attempt the engine expects this to be
        self.at = at  # the attempt's start (its started_at)
        self.unit: Unit[Started | None] | None = None
        self.future: asyncio.Future[Started | None] | None = None
        self.riding: Riding | None = None
        self._taken = False
        self._lock = threading.Lock()

    def finish(self, outcome: Outcome, variables: Mapping[str, JSON] | None = None) -> bool:
        """Have `outcome` committed with the start; False when the writer took it already."""
        with self._lock:
            if self._taken:
                return False
            self.riding = (outcome, variables)
            return True

    def take(self) -> Riding | None:
        """The writer takes the start: from now on it carries this outcome or none (the same
        on every try of the unit)."""
        with self._lock:
            self._taken = True
            return self.riding

    def submit(self) -> None:
        """Queue the start for the next group commit (a deferred one: see `start_step`)."""
        assert self.unit is not None and self.future is None
        self.future = self.journal.writer.submit(self.unit, self.run_id)

    async def committed(self) -> Started | None:
        """The start once committed (an outage is waited out, as for every engine unit)."""
        assert self.future is not None and self.unit is not None
        try:
            return await self.future
        except STORE_OUTAGES:
            return await self.journal._durably(self.unit, self.run_id)


@dataclass(frozen=True)
class Parking:
    """What a run with nothing in flight waits for. It parks (holds no owner) only if all of
    it still holds under the run's lock when the park commits."""

    wake_at: float  # due at the latest then: its next timer, else its deadline
    paused: bool = False  # waits for Resume (else the run is RUNNING)
    clarifications: tuple[str, ...] = ()  # each still PENDING
    signal_names: tuple[str, ...] = ()  # none of them kept unconsumed


class Taker(Protocol):
    """The engine, as the journal sees it: whether it takes runs now, and taking one."""

    @property
    def accepting(self) -> bool: ...

    def take(self, run_id: str) -> None: ...


class LeaseLost(Exception):
    """This incarnation no longer owns the run: another one executes it now."""


class _Stale(Exception):
    """The run row a unit took from the journal's cache is not the store's (its compare-and-set
    missed), or the unit would decide on it without writing: the unit reads the row and runs
    again. Raised before the unit has written anything."""


# A unit's body on the run's row: (tx, row or None when the run is gone, whether it is the
# cached row) -> result.
OnRow = Callable[[Tx, dict[str, Any] | None, bool], Awaitable[T]]


class Journal:
    """Units of work for the engine's progress, fenced by the run's owner incarnation: a
    process that lost a run (or shares a replica id with another) cannot write to it."""

    def __init__(self, store: RunStore, owner: str = "", replica_id: str = "") -> None:
        self.store = store
        self.writer = store.writer
        # The incarnation (replica id + boot nonce) this process writes runs as.
        self.owner = owner
        self.replica_id = replica_id or owner
        # Runs that only wait are parked, so any replica can go on with them (DESIGN §9,
        # issue 10). One replica on its own store keeps them: nobody else could.
        self.parks = not store.db.dialect.single_replica
        # The engine of this process, when it executes runs: an event for a parked run
        # (an answer, a signal, Resume) is taken here in the transaction that records it.
        self.taker: Taker | None = None
        # The runs executed here (from `open` to `forget`): each one's row as last committed,
        # or None when unknown (the next unit reads it).
        self._rows: dict[str, dict[str, Any] | None] = {}
        # Runs executed here that opened from the rows they were created with and have asked
        # no one anything since: none has a clarification to withdraw when it ends.
        self._unasked: set[str] = set()
        self.writer.add_row_listener(self._committed)

    async def _durably(self, unit: Unit[T], run_id: str) -> T:
        """Run the engine's unit for `run_id` until it commits: a store outage delays the
        engine's progress, never fails it (the outcome is kept here and written once the
        store is back). LeaseLost and bugs pass through."""
        return await self.store.health.wait_out(lambda: self.writer.run(unit, run_id))

    def _committed(self, rows: dict[str, dict[str, Any]]) -> None:
        """A commit wrote these run rows: keep those of runs executed here that this
        incarnation still owns and that go on."""
        for run_id, row in rows.items():
            if run_id in self._rows:
                live = row["owner"] == self.owner and not RunStatus(row["status"]).terminal
                self._rows[run_id] = row if live else None

    def forget(self, run_id: str) -> None:
        """The run's task here ended: its row is no longer kept."""
        self._unasked.discard(run_id)
        self._rows.pop(run_id, None)

    async def _on_run(self, tx: Tx, run_id: str, body: OnRow[T]) -> T:
        """Run `body` on the run's row: the one this process last committed, when it has it
        (not read: the body's `_write_run` compares it with the store's), else the row read,
        locked and fenced. A body on the cached row that raises _Stale runs again on the
        row read."""
        cached = tx.rows.get(run_id) or self._rows.get(run_id)
        if cached is not None and cached["owner"] == self.owner:
            try:
                return await body(tx, cached, True)
            except _Stale:
                pass
        return await body(tx, await self._run_row(tx, run_id), False)

    async def _write_run(
        self,
        tx: Tx,
        row: dict[str, Any],
        cached: bool,
        changes: Mapping[str, Any],
        specs: Sequence[EventSpec],
        step: tuple[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A body's first write (`_on_run`): the run's compare-and-set, on version and owner
        when the row came from the cache (with one step's changes, where the store writes
        both in one statement). Locking the run's row first keeps the order of the control
        paths (run, then its steps), so no two transactions wait on each other."""
        try:
            return await self.store.update_run(
                tx, row, changes, specs, owner=self.owner if cached else None, step=step
            )
        except Conflict:
            if cached:
                raise _Stale from None
            raise

    @staticmethod
    def _unsure(cached: bool) -> None:
        """A body about to decide on its row without writing: not on the cached row."""
        if cached:
            raise _Stale

    async def _run_row(self, tx: Tx, run_id: str, *, fenced: bool = True) -> dict[str, Any] | None:
        query = self.store.db.dialect.select_run_for_write
        row = (await tx.conn.execute(query, {"w_run_id": run_id})).mappings().first()
        if row is None:
            return None
        if fenced and row["owner"] != self.owner and not RunStatus(row["status"]).terminal:
            raise LeaseLost(run_id)
        return dict(row)

    # ------------------------------------------------------------------ ownership

    def _dead(self, now: float, lapse: float) -> sa.Select[Any]:
        """The other incarnations whose heartbeat lapsed."""
        lapsed = replicas.c.heartbeat_at < now - lapse
        return sa.select(replicas.c.incarnation).where(lapsed, replicas.c.incarnation != self.owner)

    async def register(self, lapse: float) -> None:
        """Enter this incarnation in the replicas table, and forget incarnations long dead,
        handing their runs back first (claims look runs up by a dead owner's row), as well
        as runs whose owner has no row at all."""

        async def unit(tx: Tx) -> None:
            forgotten = replicas.c.heartbeat_at < tx.now - max(10 * lapse, STALE_REPLICA_SECONDS)
            unfinished = one_of(runs.c.status, UNFINISHED)
            await tx.conn.execute(
                sa.update(runs)
                .where(runs.c.owner.in_(sa.select(replicas.c.incarnation).where(forgotten)))
                .where(unfinished)
                .values(owner=None, wake_at=None)
            )
            await tx.conn.execute(sa.delete(replicas).where(forgotten))
            await tx.conn.execute(
                sa.update(runs)
                .where(
                    runs.c.owner.is_not(None),
                    runs.c.owner.not_in(sa.select(replicas.c.incarnation)),
                    runs.c.owner != self.owner,
                    unfinished,
                )
                .values(owner=None, wake_at=None)
            )
            await self._beat(tx)

        await self.store.health.wait_out(lambda: self.writer.run_beside(unit))

    async def _beat(self, tx: Tx) -> None:
        beat = await tx.conn.execute(
            sa.update(replicas)
            .where(replicas.c.incarnation == self.owner)
            .values(heartbeat_at=tx.now)
        )
        if not beat.rowcount:
            # First beat, or the row was forgotten while this process stood still (SIGSTOP):
            # fencing is per run, so coming back costs only the runs others took meanwhile.
            await tx.conn.execute(
                sa.insert(replicas).values(
                    incarnation=self.owner,
                    replica_id=self.replica_id,
                    started_at=tx.now,
                    heartbeat_at=tx.now,
                )
            )

    async def heartbeat(self) -> set[str]:
        """This incarnation is alive: one row written, however many runs it owns. Returns the
        unfinished runs it still owns (any other it was executing was taken over)."""

        async def unit(tx: Tx) -> set[str]:
            await self._beat(tx)
            rows = await tx.conn.execute(
                sa.select(runs.c.run_id).where(
                    runs.c.owner == self.owner, one_of(runs.c.status, UNFINISHED)
                )
            )
            return {r.run_id for r in rows.all()}

        return await self.writer.run_beside(unit)

    async def claim(
        self, *, lapse: float, limit: int, own: bool = False, everything: bool = False
    ) -> list[str]:
        """Take up to `limit` unfinished runs nobody owns or whose owner's heartbeat is older
        than `lapse` seconds, fairly by tenant (each tenant's first, by priority then age,
        before anyone's second: one tenant's backlog never stands in front of another's run);
        `own` also takes back every run of this replica id's earlier incarnations, whatever
        `limit` (a restart: the port is exclusive, so they are dead); `everything` takes
        every unfinished run (a single-replica store after a restart)."""

        async def unit(tx: Tx) -> list[str]:
            unfinished = one_of(runs.c.status, UNFINISHED)
            taken: list[str] = []
            if own and not everything:
                # An earlier incarnation of this replica id is dead, or a process started
                # under the same id by mistake: all of its runs come here, those it is writing
                # right now too (an UPDATE waits for their row locks where SKIP LOCKED would
                # pass them by and leave them to it for good, its heartbeat being fresh).
                earlier = sa.select(replicas.c.incarnation).where(
                    replicas.c.replica_id == self.replica_id, replicas.c.incarnation != self.owner
                )
                result = await tx.conn.execute(
                    sa.update(runs)
                    .where(runs.c.owner.in_(earlier), unfinished)
                    .values(owner=self.owner, lease_expires_at=None, wake_at=None)
                    .returning(runs.c.run_id)
                )
                taken = [r.run_id for r in result.all()]
            room = limit - len(taken)
            if room <= 0:
                return taken
            if everything:
                query = sa.select(runs.c.run_id).where(unfinished).order_by(runs.c.pk).limit(room)
            else:
                # Unowned and due (a parked run's wake-up time passed, or it has none), or
                # owned by an incarnation whose heartbeat lapsed: lookups in the index
                # on (owner, status, wake_at), never a scan of every unfinished run (runs
                # parked for days are many, and every replica asks at least every second).
                unowned = runs.c.owner.is_(None)
                due = sa.and_(unowned, sa.or_(runs.c.wake_at.is_(None), runs.c.wake_at <= tx.now))
                orphaned = runs.c.owner.in_(self._dead(tx.now, lapse))
                columns = (runs.c.run_id, runs.c.tenant_id, runs.c.priority, runs.c.pk)
                # One arm per index range ("wake_at IS NULL OR ..." would be a filter over
                # every parked run).
                found = sa.union_all(
                    sa.select(*columns).where(unowned, unfinished, runs.c.wake_at.is_(None)),
                    sa.select(*columns).where(unowned, unfinished, runs.c.wake_at <= tx.now),
                    sa.select(*columns).where(orphaned, unfinished),
                ).subquery()
                turn = sa.func.row_number().over(
                    partition_by=found.c.tenant_id, order_by=(found.c.priority, found.c.pk)
                )
                ranked = sa.select(found.c.run_id, found.c.pk, turn.label("turn")).subquery()
                fair = sa.select(ranked.c.run_id).order_by(ranked.c.turn, ranked.c.pk).limit(room)
                # The rows are locked (SKIP LOCKED) outside the window: a replica claiming at
                # the same time skips them, and the free check is made again on each row.
                query = sa.select(runs.c.run_id).where(
                    runs.c.run_id.in_(fair), sa.or_(due, orphaned), unfinished
                )
            query = self.store.db.dialect.claimable(query)
            run_ids = [r.run_id for r in (await tx.conn.execute(query)).all()]
            if run_ids:
                await tx.conn.execute(
                    sa.update(runs)
                    .where(runs.c.run_id.in_(run_ids))
                    .values(owner=self.owner, lease_expires_at=None, wake_at=None)
                )
            return taken + run_ids

        return await self.store.health.wait_out(lambda: self.writer.run_beside(unit))

    async def release(self) -> int:
        """Hand every unfinished run back (graceful shutdown), for another replica to take,
        and leave the replicas table."""

        async def unit(tx: Tx) -> int:
            result = await tx.conn.execute(
                sa.update(runs)
                .where(runs.c.owner == self.owner, one_of(runs.c.status, UNFINISHED))
                .values(owner=None, lease_expires_at=None, wake_at=None)
            )
            await tx.conn.execute(sa.delete(replicas).where(replicas.c.incarnation == self.owner))
            tx.notify(Notice(NoticeKind.CLAIM))
            return int(result.rowcount or 0)

        return await self.writer.run(unit)

    async def park(self, run_id: str, parking: Parking) -> bool:
        """Let go of a run that only waits: no owner, due at `parking.wake_at` or when the
        event it waits for comes. False (nothing written) when the wait no longer holds: an
        answer, a signal or a control call got there first."""

        async def unit(tx: Tx) -> bool:
            row = await self._run_row(tx, run_id)
            expected = RunStatus.PAUSED if parking.paused else RunStatus.RUNNING
            if row is None or row["status"] != expected.value:
                return False
            if parking.clarifications:
                pending = await tx.conn.execute(
                    sa.select(sa.func.count()).where(
                        clarifications.c.clarification_id.in_(parking.clarifications),
                        clarifications.c.status == "PENDING",
                    )
                )
                if pending.scalar_one() != len(parking.clarifications):
                    return False
            if parking.signal_names:
                kept = await tx.conn.execute(
                    sa.select(signals.c.pk)
                    .where(
                        signals.c.run_id == run_id,
                        signals.c.signal_name.in_(parking.signal_names),
                        signals.c.consumed_by == "",
                    )
                    .limit(1)
                )
                if kept.first() is not None:
                    return False
            await tx.conn.execute(
                sa.update(runs)
                .where(runs.c.run_id == run_id)
                .values(owner=None, wake_at=parking.wake_at)
            )
            return True

        parked = await self._durably(unit, run_id)
        if parked:
            self.forget(run_id)  # no longer this incarnation's
        return parked

    async def _wake_parked(self, tx: Tx, run_id: str, taken: list[str]) -> None:
        """An event for the run came: if it is parked, it is due now, and taken by this
        incarnation in the same transaction when the engine here takes runs (else any
        replica claims it, told so by a notice). `taken` says which it was, once committed."""
        if not self.parks:
            return
        take = self.taker is not None and self.taker.accepting
        values: dict[str, Any] = {"wake_at": None}
        if take:
            values["owner"] = self.owner
        woken = await tx.conn.execute(
            sa.update(runs)
            .where(
                runs.c.run_id == run_id, runs.c.owner.is_(None), one_of(runs.c.status, UNFINISHED)
            )
            .values(**values)
        )
        if not woken.rowcount:
            return
        if take:
            taken.append(run_id)
        else:
            tx.notify(Notice(NoticeKind.CLAIM))

    def _taken(self, taken: list[str]) -> None:
        if taken and self.taker is not None:
            self.taker.take(taken[-1])

    async def control(
        self, tenant_id: str, run_id: str, action: Action, reason: str
    ) -> Transitioned:
        """Pause, Resume or Cancel (RunStore.transition); a parked run that goes on is woken."""
        taken: list[str] = []

        async def unit(tx: Tx) -> Transitioned:
            taken.clear()
            result = await self.store.transition(tx, tenant_id, run_id, action, reason)
            if not result.status.terminal:
                await self._wake_parked(tx, run_id, taken)
            return result

        result = await self.store.with_retry(unit, run_id)
        self._taken(taken)
        return result

    async def _step_row(self, tx: Tx, run_id: str, step_id: str) -> dict[str, Any]:
        where = {"w_run_id": run_id, "w_step_id": step_id}
        return dict((await tx.conn.execute(SELECT_STEP, where)).mappings().one())

    async def _step_known(
        self, tx: Tx, run_id: str, step_id: str, known: Mapping[str, Any] | None, first: bool
    ) -> dict[str, Any]:
        """The step's row: `known` (as the run's task last saw it) on a unit's first try, else
        read. Tried again, the unit may have committed already: only the store can say (and
        a run row that was stale may have had its steps changed with it)."""
        if known is not None and first:
            return dict(known)
        return await self._step_row(tx, run_id, step_id)

    def _takes_steps(self, row: dict[str, Any] | None, cached: bool) -> TypeGuard[dict[str, Any]]:
        """Whether the run takes new steps now: it is there and RUNNING (a body on the
        cached row about to say no reads the store first: `_unsure`)."""
        if row is None or row["status"] != RunStatus.RUNNING.value:
            self._unsure(cached)
            return False
        return True

    async def _set_step(
        self, tx: Tx, run_id: str, step: dict[str, Any], changes: Mapping[str, Any]
    ) -> dict[str, Any]:
        await write_step(tx, run_id, step["step_id"], changes)
        step.update(changes)
        return step

    def start_step(
        self,
        run_id: str,
        step_id: str,
        attempt: int,
        known: Mapping[str, Any] | None = None,
        *,
        deferred: bool = False,
    ) -> StepStart:
        """Queue a new attempt of a step, the step's `attempt`-th, for the next group commit;
        an outcome handed to the StepStart before the writer takes it is committed with it.
        `known`: the step's row as the store has it (the run's task read it and nothing has
        written it since), so it need not be read again. The start resolves to None when the
        run does not take new steps now. `deferred`: queued only by `StepStart.submit` (an
        instant tool's start goes with its outcome, whatever the writer is doing)."""
        start = StepStart(self, run_id, attempt, time.time())
        calls = 0

        async def body(tx: Tx, row: dict[str, Any] | None, cached: bool) -> Started | None:
            nonlocal calls
            calls += 1
            if not self._takes_steps(row, cached):
                return None
            step = await self._step_known(tx, run_id, step_id, known, calls == 1)
            before = int(step["attempts_before"] or 0)
            if (step["attempts"], step["started_at"]) == (start.attempt, start.at):
                # Ours, committed once already: the store cut off between committing and
                # saying so, and the write is being tried again.
                return Started(
                    start.attempt, step["first_started_at"], before, start.riding is not None
                )
            if step["status"] not in (StepStatus.PENDING.value, StepStatus.RUNNING.value):
                return None
            attempt = step["attempts"] + 1
            # An outcome computed for another attempt than the store's is not this one's.
            riding = start.take() if attempt == start.attempt else None
            outcome, variables = riding if riding is not None else (None, None)
            changes, run_changes, specs = self._attempt_writes(
                tx, row, step, attempt, start.at, outcome, variables
            )
            await self._write_run(tx, row, cached, run_changes, specs, (step_id, changes))
            return Started(attempt, changes["first_started_at"], before, riding is not None)

        async def unit(tx: Tx) -> Started | None:
            return await self._on_run(tx, run_id, body)

        start.unit = unit
        if not deferred:
            start.submit()
        return start

    def _attempt_writes(
        self,
        tx: Tx,
        run: Mapping[str, Any],
        step: dict[str, Any],
        attempt: int,
        at: float,
        outcome: Outcome | None,
        variables: Mapping[str, JSON] | None,
        finished_at: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any], list[EventSpec]]:
        """What a step's `attempt` started at `at` writes, and with `outcome` its end (at
        `finished_at`, else the commit's time): the step's changes, the run's (from `run`,
        the run as the attempt found it) and the events. `step` is updated as they show it."""
        changes: dict[str, Any] = {
            "status": StepStatus.RUNNING.value,
            "attempts": attempt,
            "started_at": at,
            "first_started_at": step["first_started_at"] or at,
            "wake_at": None,
        }
        step_id = step["step_id"]
        specs = [
            EventSpec(
                pb.EVENT_TYPE_STEP_STARTED,
                f"step {step_id} attempt {attempt} started",
                step_id,
                [{**step, **changes}],
            )
        ]
        run_changes: dict[str, Any] = {
            "current_step": step_id,
            "started_at": run["started_at"] or tx.now,
        }
        if outcome is not None:
            changes.update(self._finish_changes(tx, outcome))
            if finished_at is not None:
                changes["completed_at"] = finished_at
            specs.append(self._finish_spec(outcome, step))
            run_changes["steps_finished"] = run["steps_finished"] + 1
            if variables:
                run_changes["variables"] = {**(run["variables"] or {}), **variables}
        step.update(changes)  # as its events show it
        return changes, run_changes, specs

    @staticmethod
    def _finish_changes(tx: Tx, outcome: Outcome) -> dict[str, Any]:
        """A finishing step's columns."""
        return {
            "status": outcome.status.value,
            "completed_at": tx.now,
            "output": outcome.output,
            "error": clean_text(outcome.error),
            "error_reason": outcome.reason,
            "wake_at": None,
        }

    @staticmethod
    def _finish_spec(outcome: Outcome, step: dict[str, Any]) -> EventSpec:
        """A finishing step's event, with the step as it is written."""
        message = f"step {outcome.step_id} {outcome.status.value.lower()}" + (
            f": {outcome.error}" if outcome.error else ""
        )
        return EventSpec(STEP_EVENT[outcome.status], message, outcome.step_id, [step])

    async def step_retrying(self, run_id: str, step_id: str, error: str, wake_at: float) -> bool:
        """An attempt failed and another follows at `wake_at` (kept across restarts)."""

        async def unit(tx: Tx) -> bool:
            row = await self._run_row(tx, run_id)
            if row is None or RunStatus(row["status"]) in TERMINAL:
                return False
            step = await self._step_row(tx, run_id, step_id)
            await self._set_step(
                tx,
                run_id,
                step,
                {
                    "status": StepStatus.PENDING.value,
                    "error": clean_text(error),
                    "error_reason": "RETRYING",
                    "wake_at": wake_at,
                },
            )
            await self.store.update_run(
                tx,
                row,
                {},
                [
                    EventSpec(
                        pb.EVENT_TYPE_STEP_RETRYING,
                        f"step {step_id} attempt {step['attempts']} failed, retrying: {error}",
                        step_id,
                        [step],
                    )
                ],
            )
            return True

        return await self._durably(unit, run_id)

    async def steps_finished(
        self,
        run_id: str,
        outcomes: Sequence[Outcome],
        *,
        variables: Mapping[str, JSON] | None = None,
    ) -> bool:
        """Finish steps. With `variables`, they are merged into the run's variables in the
        same transaction."""

        async def body(tx: Tx, row: dict[str, Any] | None, cached: bool) -> bool:
            if row is None or RunStatus(row["status"]) in TERMINAL:
                self._unsure(cached)
                return False
            specs: list[EventSpec] = []
            finishing: list[tuple[dict[str, Any], dict[str, Any]]] = []
            for outcome in outcomes:
                step = await self._step_row(tx, run_id, outcome.step_id)
                if step["status"] not in OPEN_STEPS:
                    continue
                changes = self._finish_changes(tx, outcome)
                step.update(changes)  # as its event shows it
                finishing.append((step, changes))
                specs.append(self._finish_spec(outcome, step))
            if not specs:
                self._unsure(cached)
                return True
            run_changes: dict[str, Any] = {"steps_finished": row["steps_finished"] + len(specs)}
            if variables:
                run_changes["variables"] = {**(row["variables"] or {}), **variables}
            first_step, *more = finishing
            await self._write_run(
                tx, row, cached, run_changes, specs, (first_step[0]["step_id"], first_step[1])
            )
            await write_steps(tx, run_id, [(step["step_id"], changes) for step, changes in more])
            return True

        return await self._durably(lambda tx: self._on_run(tx, run_id, body), run_id)

    async def finish_run(
        self, run_id: str, action: Action, *, error_message: str = "", error_reason: str = ""
    ) -> bool:
        """COMPLETE or FAIL the run; steps never reached are SKIPPED (or CANCELLED when the run
        failed while they ran). False when the run was already finished (e.g. cancelled)."""
        ending = Ending(action, error_message, error_reason)

        async def body(tx: Tx, row: dict[str, Any] | None, cached: bool) -> bool:
            target = None if row is None else next_status(RunStatus(row["status"]), action)
            if row is None or target is None:
                self._unsure(cached)
                return False
            changes, specs, closing = await self._ending(tx, row, cached, ending)
            await self._write_run(tx, row, cached, changes, specs)
            await self._ended(tx, run_id, closing)
            return True

        return await self._durably(lambda tx: self._on_run(tx, run_id, body), run_id)

    async def _ending(
        self,
        tx: Tx,
        row: Mapping[str, Any],
        cached: bool,
        ending: Ending,
        ending_now: Sequence[str] = (),
    ) -> tuple[dict[str, Any], list[EventSpec], list[tuple[dict[str, Any], dict[str, Any]]]]:
        """The run's end from `row` (its status allows it): the run's changes, the events
        (the open steps' first, then the run's) and the open steps' changes. `ending_now`:
        steps this unit finishes (still open in the store until it writes them)."""
        target = next_status(RunStatus(row["status"]), ending.action)
        assert target is not None
        if cached and row["steps_finished"] == row["steps_total"]:
            # Every step's end was committed here, on this row (the compare-and-set that
            # writes the end checks it is still the store's): none is open.
            open_steps: list[dict[str, Any]] = []
        else:
            query = await tx.conn.execute(SELECT_OPEN_STEPS, {"w_run_id": row["run_id"]})
            open_steps = [dict(r) for r in query.mappings() if r["step_id"] not in ending_now]
        step_specs: list[EventSpec] = []
        closing: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for step in open_steps:
            running = step["status"] != StepStatus.PENDING.value
            changes: dict[str, Any] = {
                "status": (StepStatus.CANCELLED if running else StepStatus.SKIPPED).value,
                "completed_at": tx.now,
                "error": step["error"]
                or ("cancelled: the run failed" if running else "not reached"),
                "error_reason": "CANCELLED" if running else "NOT_REACHED",
                "wake_at": None,
            }
            step.update(changes)  # as its event shows it
            closing.append((step, changes))
            # Every step change has its event (DESIGN §5), before the run's own.
            status = StepStatus(step["status"])
            step_specs.append(
                EventSpec(
                    STEP_EVENT[status],
                    f"step {step['step_id']} {status.value.lower()}: {step['error']}",
                    step["step_id"],
                    [step],
                )
            )
        message = f"run {target.value.lower()}" + (
            f": {ending.error_message}" if ending.error_message else ""
        )
        changes = {
            "status": target.value,
            "completed_at": tx.now,
            "steps_finished": row["steps_total"],
            "error_message": clean_text(ending.error_message),
            "error_reason": ending.error_reason,
            "started_at": row["started_at"] or tx.now,
        }
        specs = [
            *step_specs,
            EventSpec(pb.EVENT_TYPE_RUN_STATUS_CHANGED, message, steps=open_steps),
        ]
        return changes, specs, closing

    async def _ended(
        self, tx: Tx, run_id: str, closing: list[tuple[dict[str, Any], dict[str, Any]]]
    ) -> None:
        """After the run's end is written: its open steps', and its open questions withdrawn."""
        await write_steps(tx, run_id, [(step["step_id"], changes) for step, changes in closing])
        if run_id not in self._unasked:
            await tx.conn.execute(
                WITHDRAW_CLARIFICATIONS, {"w_run_id": run_id, "v_resolved_at": tx.now}
            )

    async def chain(
        self, run_id: str, links: Sequence[Link], ending: Ending | None = None
    ) -> Chained | None:
        """Instant steps made one after another in memory, each on the outputs of those
        before it, written in one unit: each link's start and outcome (its two events, in
        order, each showing the run as that link left it), then, with `ending`, the run's
        end. All or nothing: None, having written nothing, when the run no longer takes
        them (paused, cancelled) or a step is not as its link expects; the engine then makes
        them again from the store's state. Nothing outside the process saw a link before
        this commits, and an instant tool has no effect outside it, so a crash before the
        commit loses nothing a caller could tell (Temporal's local activities, recorded
        with the workflow task that ran them, make the same trade)."""
        calls = 0

        async def body(tx: Tx, row: dict[str, Any] | None, cached: bool) -> Chained | None:
            nonlocal calls
            calls += 1
            if not self._takes_steps(row, cached):
                return None
            steps: list[dict[str, Any]] = []
            for link in links:
                step = await self._step_known(tx, run_id, link.step_id, link.known, calls == 1)
                if (step["attempts"], step["started_at"]) == (link.attempt, link.at):
                    # Ours, committed once already (the store cut off between committing and
                    # saying so): the whole chain is, and the run's end with it, if it had one.
                    return Chained(
                        {k.step_id: k.known["first_started_at"] or k.at for k in links},
                        ending is not None,
                    )
                open_step = step["status"] in (StepStatus.PENDING.value, StepStatus.RUNNING.value)
                if not open_step or step["attempts"] + 1 != link.attempt:
                    self._unsure(cached)
                    return None
                steps.append(step)
            shown = dict(row)
            shown["updated_at"] = tx.now
            run_changes: dict[str, Any] = {}
            specs: list[EventSpec] = []
            writes: list[tuple[str, dict[str, Any]]] = []
            firsts: dict[str, float] = {}
            for link, step in zip(links, steps, strict=True):
                changes, link_changes, link_specs = self._attempt_writes(
                    tx,
                    shown,
                    step,
                    link.attempt,
                    link.at,
                    link.outcome,
                    link.variables,
                    link.finished_at,
                )
                firsts[link.step_id] = changes["first_started_at"]
                shown = {**shown, **link_changes}
                run_changes.update(link_changes)
                for spec in link_specs:
                    spec.run = shown  # its events show the run as this link left it
                specs.extend(link_specs)
                writes.append((link.step_id, changes))
            closing: list[tuple[dict[str, Any], dict[str, Any]]] = []
            if ending is not None:
                end_changes, end_specs, closing = await self._ending(
                    tx, shown, cached, ending, [link.step_id for link in links]
                )
                run_changes.update(end_changes)
                specs.extend(end_specs)  # these show the row as written
            await self._write_run(tx, row, cached, run_changes, specs, writes[0])
            await write_steps(tx, run_id, writes[1:])
            if ending is not None:
                await self._ended(tx, run_id, closing)
            return Chained(firsts, ending is not None)

        async def unit(tx: Tx) -> Chained | None:  # named: `bench.profile` counts units by it
            return await self._on_run(tx, run_id, body)

        return await self._durably(unit, run_id)

    async def request_clarification(
        self,
        run_id: str,
        step_id: str,
        *,
        category: str,
        prompt: str,
        options: list[str],
        argument_name: str,
    ) -> str | None:
        """Ask a person on behalf of a step ("" for the run's own approval); the step WAITs.
        Reuses a clarification still pending for that step (after a restart)."""
        self._unasked.discard(run_id)  # from now on its end withdraws what may be pending

        async def unit(tx: Tx) -> str | None:
            row = await self._run_row(tx, run_id)
            if row is None or RunStatus(row["status"]) in TERMINAL:
                return None
            where = {"w_run_id": run_id, "w_step_id": step_id}
            existing = (await tx.conn.execute(SELECT_STEP_CLARIFICATION, where)).mappings().first()
            if existing is not None:
                return str(existing["clarification_id"])
            clarification_id = str(uuid.uuid4())
            await tx.conn.execute(
                INSERT_CLARIFICATION,
                {
                    "clarification_id": clarification_id,
                    "run_id": run_id,
                    "step_id": step_id,
                    "category": category,
                    "prompt": clean_text(prompt),
                    "options": options,
                    "argument_name": clean_text(argument_name),
                    "status": "PENDING",
                    "created_at": tx.now,
                },
            )
            changed: list[dict[str, Any]] = []
            if step_id:
                step = await self._step_row(tx, run_id, step_id)
                changed = [
                    await self._set_step(
                        tx,
                        run_id,
                        step,
                        {
                            "status": StepStatus.WAITING.value,
                            "started_at": step["started_at"] or tx.now,
                            "first_started_at": step["first_started_at"] or tx.now,
                            # Asking is core.clarify's one attempt (an approval's attempts are
                            # its tool calls, counted when they start).
                            "attempts": max(step["attempts"], 1)
                            if step["tool"] == "core.clarify"
                            else step["attempts"],
                        },
                    )
                ]
            await self.store.update_run(
                tx,
                row,
                {"current_step": step_id or row["current_step"]},
                [
                    EventSpec(
                        pb.EVENT_TYPE_CLARIFICATION_REQUESTED,
                        f"clarification {clarification_id} requested: {prompt}",
                        step_id,
                        changed,
                    )
                ],
            )
            return clarification_id

        return await self._durably(unit, run_id)

    async def answer(
        self,
        tenant_id: str,
        run_id: str,
        clarification_id: str,
        response: JSON,
        responded_by: str,
    ) -> Answer:
        """Resolve a pending clarification and apply it in the same transaction: a core.clarify
        step completes with the answer; an approval answered false fails its step (or the run)
        with APPROVAL_REJECTED; one answered true lets the step call its tool. A parked run
        is woken (and taken here: see `_wake_parked`)."""
        taken: list[str] = []

        async def unit(tx: Tx) -> Answer:
            taken.clear()
            row = await self._run_row(tx, run_id, fenced=False)
            if row is None or row["tenant_id"] != tenant_id:
                raise not_found(run_id)
            where = {"w_clarification_id": clarification_id, "w_run_id": run_id}
            clar = (await tx.conn.execute(SELECT_CLARIFICATION, where)).mappings().first()
            if clar is None or clar["status"] != "PENDING":
                raise FailedPrecondition(
                    f"clarification {clarification_id!r} is not pending",
                    reason="CLARIFICATION_NOT_PENDING",
                    metadata={"run_id": run_id, "clarification_id": clarification_id},
                )
            if RunStatus(row["status"]) in TERMINAL:
                raise InvalidTransition(
                    f"run {run_id!r} is {row['status'].lower()}",
                    reason="CLARIFICATION_NOT_PENDING",
                    metadata={"run_id": run_id, "current_status": row["status"]},
                )
            await tx.conn.execute(
                RESOLVE_CLARIFICATION,
                bind(
                    {
                        "status": "RESOLVED",
                        "response": response,
                        "responded_by": responded_by,
                        "resolved_at": tx.now,
                    },
                    clarification_id=clarification_id,
                ),
            )
            step_id = clar["step_id"]
            rejected = clar["category"] == "USER_VERIFICATION" and response is not True
            specs = [
                EventSpec(
                    pb.EVENT_TYPE_CLARIFICATION_RESOLVED,
                    f"clarification {clarification_id} answered"
                    + (f" by {responded_by}" if responded_by else ""),
                    step_id,
                )
            ]
            changes: dict[str, Any] = {}
            answer = Answer(step_id, None)
            if not step_id:
                # A rejected run approval: the engine fails the run (it owns what runs).
                if rejected:
                    answer = Answer("", None, error="run approval rejected", run_failed=True)
                await self.store.update_run(tx, row, changes, specs)
                await self._wake_parked(tx, run_id, taken)
                tx.notify(Notice.answered(run_id, clarification_id, answer))
                return answer
            step = await self._step_row(tx, run_id, step_id)
            if rejected:
                error = "approval rejected" + (f" by {responded_by}" if responded_by else "")
                await self._set_step(
                    tx,
                    run_id,
                    step,
                    {
                        "status": StepStatus.FAILED.value,
                        "completed_at": tx.now,
                        "error": error,
                        "error_reason": "APPROVAL_REJECTED",
                    },
                )
                specs.append(
                    EventSpec(
                        pb.EVENT_TYPE_STEP_FAILED,
                        f"step {step_id} failed: {error}",
                        step_id,
                        [step],
                    )
                )
                changes["steps_finished"] = row["steps_finished"] + 1
                answer = Answer(step_id, StepStatus.FAILED, error=error)
            elif step["tool"] == "core.clarify":
                await self._set_step(
                    tx,
                    run_id,
                    step,
                    {
                        "status": StepStatus.COMPLETED.value,
                        "completed_at": tx.now,
                        "output": response,
                        "error": "",
                    },
                )
                specs.append(
                    EventSpec(
                        pb.EVENT_TYPE_STEP_COMPLETED, f"step {step_id} completed", step_id, [step]
                    )
                )
                changes["steps_finished"] = row["steps_finished"] + 1
                answer = Answer(step_id, StepStatus.COMPLETED, output=response)
            else:
                # Approved: the step goes back to PENDING and the engine calls its tool.
                await self._set_step(tx, run_id, step, {"status": StepStatus.PENDING.value})
                specs[0].steps = [step]
                answer = Answer(step_id, StepStatus.PENDING)
            await self.store.update_run(tx, row, changes, specs)
            await self._wake_parked(tx, run_id, taken)
            tx.notify(Notice.answered(run_id, clarification_id, answer))
            return answer

        answer = await self.writer.run(unit, run_id)
        self._taken(taken)
        return answer

    async def _admitted(self, tx: Tx, row: dict[str, Any]) -> bool:
        """Whether a PENDING run with a concurrency key may start now: fewer than its
        `max_concurrent` runs of the tenant with the key are started (RUNNING or PAUSED),
        counting those that wait ahead of it (by priority, then submit order)."""
        key = row["concurrency_key"]
        await self.store.db.dialect.lock_key(tx.conn, f"{row['tenant_id']}/{key}")
        same = sa.and_(runs.c.tenant_id == row["tenant_id"], runs.c.concurrency_key == key)
        started = sa.select(sa.func.count()).where(
            same, one_of(runs.c.status, (RunStatus.RUNNING.value, RunStatus.PAUSED.value))
        )
        ahead = sa.select(sa.func.count()).where(
            same,
            runs.c.status == RunStatus.PENDING.value,
            sa.or_(
                runs.c.priority < row["priority"],
                sa.and_(runs.c.priority == row["priority"], runs.c.pk < row["pk"]),
            ),
        )
        taken = (await tx.conn.execute(started)).scalar_one()
        taken += (await tx.conn.execute(ahead)).scalar_one()
        if int(taken) >= max(1, int(row["max_concurrent"])):
            return False
        # Admitted because a run of the key ended: in a transaction that may have begun
        # after this one, so with a later clock. The run starts no earlier than that end.
        tx.now = max(tx.now, time.time())
        return True

    async def signal(
        self, tenant_id: str, run_id: str, signal_name: str, payload: JSON, request_id: str
    ) -> bool:
        """Keep a signal for the run, with its SIGNAL_RECEIVED event, in one transaction.
        True when the run already has a signal with this request id (nothing is written).
        A parked run is woken (and taken here: see `_wake_parked`)."""
        taken: list[str] = []

        async def unit(tx: Tx) -> bool:
            taken.clear()
            row = await self._run_row(tx, run_id, fenced=False)
            if row is None or row["tenant_id"] != tenant_id:
                raise not_found(run_id)
            # The run row is locked: a second delivery of the key waits here, then sees ours.
            seen = await tx.conn.execute(
                sa.select(signals.c.pk).where(
                    signals.c.run_id == run_id, signals.c.request_id == request_id
                )
            )
            if seen.first() is not None:
                return True
            if RunStatus(row["status"]) in TERMINAL:
                raise FailedPrecondition(
                    f"run {run_id!r} is {row['status'].lower()}: it takes no signals",
                    reason="SIGNAL_FAILED",
                    metadata={"run_id": run_id, "current_status": row["status"]},
                )
            await tx.conn.execute(
                sa.insert(signals).values(
                    run_id=run_id,
                    signal_name=signal_name,
                    request_id=request_id,
                    payload=payload,
                    created_at=tx.now,
                )
            )
            await self.store.update_run(
                tx,
                row,
                {},
                [EventSpec(pb.EVENT_TYPE_SIGNAL_RECEIVED, f"signal {signal_name} received")],
            )
            await self._wake_parked(tx, run_id, taken)
            tx.notify(Notice.signalled(run_id, signal_name))
            return False

        duplicate = await self.writer.run(unit, run_id)
        self._taken(taken)
        return duplicate

    async def take_signal(
        self, run_id: str, step_id: str, signal_name: str, deadline: float | None
    ) -> Taken | None:
        """A core.wait_for_signal step takes the oldest signal of its name still kept, and
        completes with its payload, in one transaction (a crash cannot lose it between the
        two). None when there is none yet: the step's deadline is kept in `wake_at`, so a
        restart waits no longer than the first attempt would have."""

        async def unit(tx: Tx) -> Taken | None:
            row = await self._run_row(tx, run_id)
            if row is None or RunStatus(row["status"]) in TERMINAL:
                return None
            step = await self._step_row(tx, run_id, step_id)
            if step["status"] != StepStatus.RUNNING.value:
                return None
            found = (
                await tx.conn.execute(
                    sa.select(signals.c.pk, signals.c.payload)
                    .where(
                        signals.c.run_id == run_id,
                        signals.c.signal_name == signal_name,
                        signals.c.consumed_by == "",
                    )
                    .order_by(signals.c.pk)
                    .limit(1)
                )
            ).first()
            if found is None:
                if step["wake_at"] != deadline:
                    await self._set_step(tx, run_id, step, {"wake_at": deadline})
                return None
            await tx.conn.execute(
                sa.update(signals)
                .where(signals.c.pk == found.pk)
                .values(consumed_by=step_id, consumed_at=tx.now)
            )
            await self._set_step(
                tx,
                run_id,
                step,
                {
                    "status": StepStatus.COMPLETED.value,
                    "completed_at": tx.now,
                    "output": found.payload,
                    "error": "",
                    "error_reason": "",
                    "wake_at": None,
                },
            )
            await self.store.update_run(
                tx,
                row,
                {"steps_finished": row["steps_finished"] + 1},
                [
                    EventSpec(
                        pb.EVENT_TYPE_STEP_COMPLETED,
                        f"step {step_id} completed: took signal {signal_name}",
                        step_id,
                        [step],
                    )
                ],
            )
            return Taken(found.payload)

        return await self._durably(unit, run_id)

    async def open(
        self, run_id: str, inserted: Inserted | None = None
    ) -> tuple[dict[str, Any], list[dict[str, Any]], set[str], bool]:
        """What (re)starting the run's task needs, in one unit: the run row (a PENDING run is
        started: RUNNING, unless its concurrency key says wait: then it stays PENDING with
        its `waiting_reason`), its step rows, the steps (and "" for the run) whose approval
        was answered yes, and whether the run's own approval was refused since it (re)started
        (answered while nobody held the run: the task that opens it fails it).

        On PostgreSQL a PENDING run with a concurrency key is admitted in a transaction of its
        own (`Writer.run_beside`): the key's lock is then the only lock its transaction waits
        for after the run's row, so no two transactions (lanes or replicas) can each hold one
        key and wait for another's. In a group commit, units for runs of different keys in
        opposite orders could.

        A run created here to run here opens from the rows its creating unit wrote
        (`inserted`), nothing read and no unit of its own: that unit started it. A run
        changed since (cancelled, claimed) misses its first compare-and-set, is read then,
        and followed. (A keyed run is created PENDING: its admission reads the key's runs.)"""
        if inserted is not None and inserted.run["status"] == RunStatus.RUNNING.value:
            self._rows[run_id] = inserted.run
            self._unasked.add(run_id)
            return (
                {**inserted.run, **inserted.inputs},
                [dict(s) for s in inserted.steps],
                set(),
                False,
            )
        # SQLite's one writer never overlaps itself: there the group commit admits too.
        admit_in_batch = self.store.db.dialect.single_replica

        async def unit(
            tx: Tx, admit: bool
        ) -> tuple[dict[str, Any], list[dict[str, Any]], set[str], bool] | None:
            self._unasked.discard(run_id)
            row = await self._run_row(tx, run_id)
            if row is None:
                raise not_found(run_id)
            keyed = row["status"] == RunStatus.PENDING.value and bool(row["concurrency_key"])
            if keyed and not admit:
                return None
            step_rows = [
                dict(s)
                for s in (await tx.conn.execute(SELECT_STEPS, {"w_run_id": run_id})).mappings()
            ]
            inputs = (await tx.conn.execute(SELECT_RUN_INPUTS, {"w_run_id": run_id})).mappings()
            run_inputs = dict(inputs.one())
            answers = list(
                (await tx.conn.execute(SELECT_APPROVALS, {"w_run_id": run_id})).mappings()
            )
            approved = {r["step_id"] for r in answers if r["response"] is True}
            since = row["started_at"] or 0.0
            refused = any(
                r["step_id"] == ""
                and r["response"] is not True
                and (r["resolved_at"] or 0) >= since
                for r in answers
            )
            if keyed and not await self._admitted(tx, row):
                if row["waiting_reason"] != WAITING_FOR_KEY:
                    row = await self.store.update_run(
                        tx, row, {"waiting_reason": WAITING_FOR_KEY}, []
                    )
            elif row["status"] == RunStatus.PENDING.value:
                row = await self.store.update_run(tx, row, *started(row, tx.now))
            tx.rows[run_id] = row  # as committed: kept for the run's next units
            return {**row, **run_inputs}, step_rows, approved, refused

        self._rows.setdefault(run_id, None)
        opened = await self._durably(lambda tx: unit(tx, admit_in_batch), run_id)
        if opened is None:  # to be admitted, in a transaction of its own
            opened = await self.store.health.wait_out(
                lambda: self.writer.run_beside(lambda tx: unit(tx, True))
            )
        assert opened is not None
        return opened
