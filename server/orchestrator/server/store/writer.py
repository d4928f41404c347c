"""The group-commit writer (DESIGN §7): one task per process owns every write (on
PostgreSQL, one task per lane).

Callers hand it units of work; it runs whatever units are queued together in one transaction,
commits once, then wakes each caller and announces what changed. On SQLite this removes both
"database is locked" and the per-commit thread-hop cost; on PostgreSQL it batches round trips.

On PostgreSQL a batch spends most of its time waiting for round trips, and the process is idle
meanwhile. Lanes fill that wait: each lane is a writer loop with its own connection, and a
unit goes to the lane of its key (a run id, or a tenant id for a new run), so one run's units
still commit in the order they were queued. Lanes commit concurrently, as replicas do, and
cannot deadlock: a run's rows are locked only by its lane; a concurrency key's lock is taken
only by an admission in a transaction of its own (`Journal.open`); the event order lock is
taken last, just before the commit, and still makes event ids grow in commit order across
lanes as across replicas.

On SQLite the whole batch runs in one hop to the writer's own thread, on the stdlib driver:
each statement through aiosqlite would be a hop of its own (about 0.36 ms of waiting), which
capped the writer at a few hundred units a second. Units are still written as coroutines;
there they are driven to completion without an event loop, so a unit may await the store and
nothing else (it fails loudly if it awaits anything that suspends).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import random
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from orchestrator.server.errors import Unavailable
from orchestrator.server.store.direct import Direct, Missed, SyncConnection, drive
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.outage import StoreHealth, Weather, classify, outage_of

T = TypeVar("T")
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EventRecord:
    """One event as committed: its sequence, whether it ends the run, its serialized bytes."""

    sequence: int
    terminal: bool
    payload: bytes


@dataclass(frozen=True)
class Change:
    """A run changed in a commit: its tenant, its newest event sequence, whether its status
    changed, and the events written (what watchers and the scheduler need to hear)."""

    tenant_id: str
    run_id: str
    last_sequence: int
    status_changed: bool
    events: tuple[EventRecord, ...] = ()
    status: str = ""  # the run's status after the change


@dataclass
class Tx:
    """What a unit of work gets: the open connection, the commit's clock and a change log."""

    conn: SyncConnection
    now: float
    changes: list[Change] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    # Statements run once, just before the commit, with the rows every unit staged for them.
    staged: dict[Any, list[dict[str, Any]]] = field(default_factory=dict)
    # The run rows this transaction wrote (RunStore.update_run), as written, by run id.
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Tenants' unfinished runs as this transaction leaves them, once a unit counted them (a
    # new run's quota check counts once a tenant and transaction), and what the writes the
    # connection still keeps (SyncConnection.write) change in them.
    unfinished: dict[str, int] = field(default_factory=dict)
    unflushed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conn.on_flush = self.unflushed.clear

    def moved(self, tenant_id: str, delta: int) -> None:
        """A write of this transaction changed the tenant's unfinished runs by `delta`."""
        if tenant_id in self.unfinished:
            self.unfinished[tenant_id] += delta
        if self.conn.defers:
            self.unflushed[tenant_id] = self.unflushed.get(tenant_id, 0) + delta

    def changed(self, change: Change) -> None:
        self.changes.append(change)

    def stage(self, statement: Any, rows: list[dict[str, Any]] | None = None) -> None:
        """Run `statement` at the end of this transaction, once, with all the rows staged for
        it (one executemany for the whole group commit); without rows, just once. Statements
        run in the order first staged."""
        self.staged.setdefault(statement, []).extend(rows or ())

    def notify(self, notice: Notice) -> None:
        """Tell the other replicas, when (and only if) this transaction commits."""
        self.notices.append(notice)


Unit = Callable[[Tx], Coroutine[Any, Any, T]]
CommitListener = Callable[[list[Change]], None]
RowListener = Callable[[dict[str, dict[str, Any]]], None]
# (units, seconds, ok): a batch committed, or failed to reach the database (metrics).
BatchObserver = Callable[[int, float, bool], None]


@dataclass
class _Job(Generic[T]):
    unit: Unit[T]
    future: asyncio.Future[T]


class Writer:
    """Runs units of work in group commits. A unit must be a function of the database state
    (it may run again, alone, when another unit of its batch fails) and must keep its side
    effects for after the commit."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 512,
        notify_channel: str = "",
        origin: str = "",
        sync_engine: sa.Engine | None = None,
        direct: Direct | None = None,
        health: StoreHealth | None = None,
        lanes: int = 1,
        defer_writes: bool = False,
    ) -> None:
        self._engine = engine
        self.health = health or StoreHealth()
        # SQLite: batches run on this engine, in this one thread (see the module's doc).
        self._sync_engine = sync_engine
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="store-writer") if sync_engine else None
        )
        self._direct = direct  # the store's driver path (SQLite), shared with its readers
        # PostgreSQL: changes and notices go out with NOTIFY inside the commit, so other
        # replicas hear of exactly what was committed.
        self.notify_channel = notify_channel
        self.origin = origin
        self._max_batch = max_batch
        # PostgreSQL: units' writes are kept and run together (SyncConnection.write).
        self.defer_writes = defer_writes and sync_engine is None
        self.missed = 0  # transactions run again because a deferred compare-and-set missed
        # SQLite has one writing connection (and one thread): one lane.
        count = 1 if sync_engine is not None else max(1, lanes)
        self._queues: list[asyncio.Queue[_Job[Any] | None]] = [
            asyncio.Queue() for _ in range(count)
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._listeners: list[CommitListener] = []
        self._row_listeners: list[RowListener] = []
        self._closed = False
        self.commits = 0
        self.units = 0
        self.on_batch: BatchObserver | None = None

    def add_listener(self, listener: CommitListener) -> None:
        """Call `listener` with the changes of every commit, right after it."""
        self._listeners.append(listener)

    def add_row_listener(self, listener: RowListener) -> None:
        """Call `listener` with the run rows every commit wrote (`Tx.rows`), right after it."""
        self._row_listeners.append(listener)

    def _tell_listeners(self, tx: Tx) -> None:
        """What a commit changed, to every listener (one failing does not stop the others)."""
        if tx.rows:
            for row_listener in self._row_listeners:
                _tell(row_listener, tx.rows)
        if tx.changes:
            for listener in self._listeners:
                _tell(listener, tx.changes)

    @property
    def queue_depth(self) -> int:
        """Units of work waiting for the next group commit."""
        return sum(q.qsize() for q in self._queues)

    @property
    def lanes(self) -> int:
        """How many group commits may be in flight at once."""
        return len(self._queues)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(queue), name=f"store-writer-{i}")
            for i, queue in enumerate(self._queues)
        ]

    async def stop(self) -> None:
        """Finish every queued unit, then stop."""
        if not self._tasks:
            return
        self._closed = True
        for queue in self._queues:
            await queue.put(None)
        await asyncio.gather(*self._tasks)
        self._tasks = []
        if self._thread is not None and self._sync_engine is not None:
            await asyncio.get_running_loop().run_in_executor(
                self._thread, self._sync_engine.dispose
            )
            self._thread.shutdown()

    async def run(self, unit: Unit[T], key: str = "") -> T:
        """Run `unit` in the next group commit and return its result once committed."""
        return await self.submit(unit, key)

    def submit(self, unit: Unit[T], key: str = "") -> asyncio.Future[T]:
        """Queue `unit` for the next group commit now; the future resolves once it committed.
        Units of one `key` (a run id) commit in the order queued; units without a key, in
        the order queued among themselves. A caller that goes away cancels only the future:
        the unit stays queued and commits with its batch, and the writer skips setting a
        result nobody waits for."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queues[self.lane_of(key)].put_nowait(_Job(unit, future))
        return future

    def lane_of(self, key: str) -> int:
        """The lane a unit of `key` goes to (lane 0 without a key)."""
        return hash(key) % len(self._queues) if key else 0

    async def run_beside(self, unit: Unit[T]) -> T:
        """Run a small unit that must never wait behind group commits (heartbeats, claims).
        On PostgreSQL it is its own transaction on its own connection, at once; on SQLite,
        where one connection writes, it joins the next group commit (one replica, no rival
        to lose runs to)."""
        if self._thread is not None:
            return await self.run(unit)
        if self._closed:
            raise Unavailable("the server is shutting down")
        began = time.monotonic()
        try:
            tx, results = await self._transact([unit])
        except Exception as exc:
            weather = classify(exc)
            if weather is None:
                raise
            self.health.failed(weather, exc)
            raise _outage(exc) from exc
        self.health.succeeded(wrote=True, began=began)
        self._tell_listeners(tx)
        result: T = results[0]
        return result

    async def _loop(self, queue: asyncio.Queue[_Job[Any] | None]) -> None:
        while True:
            job = await queue.get()
            if job is None:
                return
            batch: list[_Job[Any]] = [job]
            stop = False
            while len(batch) < self._max_batch and not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                await self._commit(batch)
            except asyncio.CancelledError:
                self._settle(batch, Unavailable("the writer stopped"))
                raise
            except BaseException as exc:
                # The loop must outlive any failure, or every later write would wait forever.
                self._settle(batch, exc if isinstance(exc, Exception) else Unavailable(str(exc)))
                _quietly(log.exception, "writer.batch_failed")
            if stop:
                return

    @staticmethod
    def _settle(batch: list[_Job[Any]], exc: Exception) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(exc)

    async def _transact(self, units: list[Unit[Any]]) -> tuple[Tx, list[Any]]:
        """Run `units` in one transaction and commit it."""
        if self._thread is not None:
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, context.run, self._transact_in_thread, units
            )
        # PostgreSQL: the whole batch in one greenlet (run_sync), not one per statement.
        try:
            async with self._engine.begin() as conn:
                return await conn.run_sync(self._run_units, units, self.defer_writes)
        except Missed:
            # A unit's compare-and-set on a row it had not read (its run as last written
            # here) missed: someone else wrote the run. Run them again, each write at once,
            # so that unit sees its miss where it writes and decides on the store's row.
            self.missed += 1
            async with self._engine.begin() as conn:
                return await conn.run_sync(self._run_units, units, False)

    def _transact_in_thread(self, units: list[Unit[Any]]) -> tuple[Tx, list[Any]]:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as conn:
            return self._run_units(conn, units)

    def _run_units(
        self, conn: sa.Connection, units: list[Unit[Any]], defer: bool = False
    ) -> tuple[Tx, list[Any]]:
        """The batch on an open transaction: its units, the writes they kept (`defer`), the
        statements they staged, and the NOTIFYs that announce it (PostgreSQL)."""
        tx = Tx(conn=SyncConnection(conn, self._direct, defers=defer), now=time.time())
        results = [drive(unit(tx)) for unit in units]
        drive(tx.conn.flush())
        for statement, rows in tx.staged.items():
            drive(tx.conn.execute(statement, rows or None))
        if self.notify_channel and (tx.changes or tx.notices):
            for payload in encode_notices(self.origin, tx.changes, tx.notices):
                conn.execute(
                    sa.text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": self.notify_channel, "payload": payload},
                )
        return tx, results

    # A batch that lost to another transaction (serialization failure, deadlock) runs again
    # at once, this many times in all, before its callers hear of it.
    CONTENTION_ATTEMPTS = 3

    async def _commit(self, batch: list[_Job[Any]]) -> None:
        started = time.perf_counter()
        attempt = 1
        while True:
            began = time.monotonic()
            try:
                tx, results = await self._transact([job.unit for job in batch])
                break
            except BaseException as exc:
                weather = classify(exc) if isinstance(exc, Exception) else None
                if weather is Weather.CONTENTION and attempt < self.CONTENTION_ATTEMPTS:
                    attempt += 1
                    await asyncio.sleep(random.uniform(0.005, 0.02 * attempt))
                    continue
                if weather is not None:
                    # Weather, not a unit's fault: nothing committed, and running the units
                    # one by one would only meet it again. Each caller decides (the engine
                    # waits it out; an RPC answers UNAVAILABLE or RESOURCE_EXHAUSTED).
                    self.health.failed(weather, exc)
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(_outage(exc))
                    return
                if len(batch) > 1 and isinstance(exc, Exception):
                    # One unit failed and the whole transaction rolled back: run each alone
                    # so the others still commit and only the failing caller sees its error.
                    for job in batch:
                        await self._commit([job])
                    return
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                return
        self.health.succeeded(wrote=True, began=began)
        self.commits += 1
        self.units += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - started, True)
        self._tell_listeners(tx)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)


def _outage(exc: BaseException) -> Exception:
    """A fresh domain error for one caller (each future raises its own), caused by `exc`."""
    outage = outage_of(exc)
    assert outage is not None
    fresh = type(outage)()
    fresh.__cause__ = exc
    return fresh


def _tell(listener: Callable[[Any], None], what: Any) -> None:
    """One listener of a commit; its failure is logged, never the writer's."""
    try:
        listener(what)
    except Exception:
        _quietly(log.exception, "writer.listener_failed")


def _quietly(report: Callable[..., Any], event: str) -> None:
    """Log, but never let a broken log sink take the writer down with it."""
    try:
        report(event)
    except Exception:
        pass


# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
NOTIFY_LIMIT = 7000


def encode_notices(origin: str, changes: list[Change], notices: list[Notice]) -> list[str]:
    """The NOTIFY payloads for one commit: JSON `{"o": origin, "m": [notice, ...]}`, split to
    fit PostgreSQL's payload limit; each change of the commit is a CHANGE notice."""
    messages = [
        Notice(
            NoticeKind.CHANGE, c.run_id, tenant_id=c.tenant_id, status_changed=c.status_changed
        ).to_json()
        for c in changes
    ]
    messages.extend(n.to_json() for n in notices)
    payloads: list[str] = []
    chunk: list[str] = []
    size = 0
    for message in messages:
        text = json.dumps(message, separators=(",", ":"))
        if chunk and size + len(text) > NOTIFY_LIMIT:
            payloads.append(_payload(origin, chunk))
            chunk, size = [], 0
        chunk.append(text)
        size += len(text) + 1
    if chunk:
        payloads.append(_payload(origin, chunk))
    return payloads


def _payload(origin: str, messages: list[str]) -> str:
    return '{"o":' + json.dumps(origin) + ',"m":[' + ",".join(messages) + "]}"
