"""Store outages (DESIGN §9): the one place that tells weather from bugs, and the store's health.

A database that is restarting, cut off, contended or full is weather: nothing was written,
and the same write will land later. `classify` is the only code that looks at driver
exception types; the store raises `StoreUnavailable` or `StoreFull` in their place, and
`StoreHealth` keeps what the rest of the server needs to know: whether the store can be
reached now (health, the `orchestrator_store_up` gauge), and when it comes back (writes that
wait it out resume at once). It logs one line when the store goes and one when it returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
import structlog

from orchestrator.server.errors import (
    STORE_OUTAGES,
    OrchestratorError,
    StoreFull,
    StoreOutage,
    StoreUnavailable,
)

T = TypeVar("T")
log = structlog.get_logger("orchestrator.store")


class Weather(enum.Enum):
    """What kind of transient trouble an exception is."""

    UNREACHABLE = "unreachable"  # connection refused/reset/closed, server shutting down
    CONTENTION = "contention"  # serialization failure, deadlock, "database is locked"
    FULL = "full"  # disk or database full


# PostgreSQL SQLSTATEs that are weather (class 08 is every connection exception).
_SQLSTATES = {
    "57P01": Weather.UNREACHABLE,  # admin_shutdown
    "57P02": Weather.UNREACHABLE,  # crash_shutdown
    "57P03": Weather.UNREACHABLE,  # cannot_connect_now (starting up, shutting down)
    "53300": Weather.UNREACHABLE,  # too_many_connections
    "40001": Weather.CONTENTION,  # serialization_failure
    "40P01": Weather.CONTENTION,  # deadlock_detected
    "55P03": Weather.CONTENTION,  # lock_not_available
    "53100": Weather.FULL,  # disk_full
}
# SQLite primary result codes.
_SQLITE_CODES = {
    5: Weather.CONTENTION,  # SQLITE_BUSY ("database is locked")
    6: Weather.CONTENTION,  # SQLITE_LOCKED
    10: Weather.UNREACHABLE,  # SQLITE_IOERR ("disk I/O error")
    13: Weather.FULL,  # SQLITE_FULL ("database or disk is full")
    14: Weather.UNREACHABLE,  # SQLITE_CANTOPEN
}
_SQLITE_TEXTS = {
    "database is locked": Weather.CONTENTION,
    "disk i/o error": Weather.UNREACHABLE,
    "database or disk is full": Weather.FULL,
    "unable to open database file": Weather.UNREACHABLE,
}
ENOSPC = 28


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, what SQLAlchemy wrapped, and their causes."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < 12:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        todo.extend((getattr(current, "orig", None), current.__cause__, current.__context__))
    return seen


def _one(exc: BaseException) -> Weather | None:
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return Weather.UNREACHABLE
    if isinstance(exc, sa.exc.TimeoutError):  # the pool had no connection to give
        return Weather.UNREACHABLE
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if isinstance(code, int) and (code & 0xFF) in _SQLITE_CODES:
            return _SQLITE_CODES[code & 0xFF]
        text = str(exc).lower()
        return next((w for t, w in _SQLITE_TEXTS.items() if t in text), None)
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state.startswith("08"):
            return Weather.UNREACHABLE
        return _SQLSTATES.get(state)
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "connection was closed in the middle of operation"
        return Weather.UNREACHABLE if "closed" in str(exc).lower() else None
    if isinstance(exc, OSError):  # refused, reset, unreachable, timed out (TimeoutError)
        return Weather.FULL if exc.errno == ENOSPC else Weather.UNREACHABLE
    return None


def cause(exc: BaseException) -> str:
    """The name of what the weather is, deepest first found (`ConnectionRefusedError`, not
    SQLAlchemy's wrapper around it)."""
    for link in _chain(exc):
        if _one(link) is not None and not isinstance(link, sa.exc.DBAPIError):
            return type(link).__name__
    return type(exc).__name__


def classify(exc: BaseException) -> Weather | None:
    """The weather `exc` is, or None: a bug (a constraint, a syntax error...) stays a bug."""
    if isinstance(exc, STORE_OUTAGES):
        return Weather.FULL if isinstance(exc, StoreFull) else Weather.UNREACHABLE
    if isinstance(exc, OrchestratorError):
        return None  # a unit's own answer (NotFound, AlreadyExists...), whatever it followed
    for link in _chain(exc):
        found = _one(link)
        if found is not None:
            return found
    return None


def outage_of(exc: BaseException) -> StoreOutage | None:
    """The domain error a caller sees in place of `exc`, when `exc` is weather."""
    if isinstance(exc, STORE_OUTAGES):
        return exc
    weather = classify(exc)
    if weather is None:
        return None
    if weather is Weather.FULL:
        return StoreFull()
    return StoreUnavailable()


def _log(level: str, event: str, **fields: object) -> None:
    """A line about the store, not about whichever call happened to notice: none of the
    call's bound context (tenant, correlation id, run) goes with it."""
    contextvars.Context().run(getattr(log, level), event, **fields)


class StoreHealth:
    """Whether the store can be reached, learnt from every store call and from a probe on a
    timer; what waits for it to come back."""

    # The probe runs this often while the store is up, and this often while it is down (so
    # that health says SERVING, and waiting writes resume, well within 2 s of its return).
    UP_INTERVAL = 1.0
    DOWN_INTERVAL = 0.2
    PROBE_TIMEOUT = 2.0
    # Writes that wait out an outage retry after 50 ms, doubling to at most 1 s, with jitter;
    # the store's return wakes them at once.
    RETRY_INITIAL = 0.05
    RETRY_MAX = 1.0

    def __init__(self, probe: Callable[[], Awaitable[None]] | None = None) -> None:
        self._probe = probe
        self.reachable = True
        self.full = False
        self._since = 0.0
        self.waiting = 0  # writes waiting for the store now
        self._waited = 0  # writes that waited during the current outage
        self._back = asyncio.Event()
        self._kick = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(reachable)` whenever reachability changes."""
        self._listeners.append(listener)

    def start(self) -> None:
        if self._probe is not None and self._task is None:
            self._task = asyncio.create_task(self._probe_loop(), name="store-probe")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # ------------------------------------------------------------ what store calls report

    def failed(self, weather: Weather, exc: BaseException) -> None:
        """A store call met weather."""
        if weather is Weather.CONTENTION:
            return  # the store answers; it only asked us to try again
        if weather is Weather.FULL:
            if not self.full and self.reachable:
                self.full = True
                self._since = time.monotonic()
                _log("warning", "store.full", error=cause(exc))
            return
        if self.reachable:
            self.reachable = False
            if not self.full:
                self._since = time.monotonic()
            _log("warning", "store.unavailable", error=cause(exc))
            self._changed()
        self._kick.set()

    def succeeded(self, *, wrote: bool = False, began: float | None = None) -> None:
        """A store call went through (`wrote`: a commit, which proves there is room again).
        `began` (time.monotonic()): a call that began before the outage was noticed proves
        nothing of now: its answer was on its way when the connection went."""
        if not self.reachable and (began is None or began >= self._since):
            self.reachable = True
            self._returned("store.available")
            self._changed()
        if wrote and self.full:
            self.full = False
            self._returned("store.space_available")

    def _returned(self, event: str) -> None:
        _log(
            "info",
            event,
            down_seconds=round(time.monotonic() - self._since, 3),
            writes_waited=self._waited,
            writes_waiting=self.waiting,
        )
        if self.reachable and not self.full:
            self._waited = 0
        self._back.set()
        self._back = asyncio.Event()

    def _changed(self) -> None:
        for listener in self._listeners:
            try:
                listener(self.reachable)
            except Exception:
                log.exception("store.listener_failed")

    # ------------------------------------------------------------ waiting it out

    async def wait_out(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt()` until it gets through the weather: capped exponential back-off with
        jitter, cut short when the store comes back. Bugs and cancellation pass through."""
        delay = self.RETRY_INITIAL
        counted = False
        try:
            while True:
                try:
                    return await attempt()
                except STORE_OUTAGES:
                    pass
                if not counted:
                    counted = True
                    self.waiting += 1
                    self._waited += 1
                back = self._back
                try:
                    async with asyncio.timeout(random.uniform(delay / 2, delay)):
                        await back.wait()
                except TimeoutError:
                    pass
                delay = min(self.RETRY_MAX, delay * 2)
        finally:
            if counted:
                self.waiting -= 1

    # ------------------------------------------------------------ the probe

    async def _probe_loop(self) -> None:
        assert self._probe is not None
        while True:
            interval = self.UP_INTERVAL if self.reachable else self.DOWN_INTERVAL
            try:
                async with asyncio.timeout(interval):
                    await self._kick.wait()
            except TimeoutError:
                pass
            self._kick.clear()
            began = time.monotonic()
            try:
                async with asyncio.timeout(self.PROBE_TIMEOUT):
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                weather = classify(exc) or Weather.UNREACHABLE
                if weather is Weather.UNREACHABLE:
                    self.failed(weather, exc)
                    self._kick.clear()  # the failure above need not probe again at once
                continue
            self.succeeded(began=began)
