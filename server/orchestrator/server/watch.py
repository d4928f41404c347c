"""Watching runs (DESIGN §5): the hub that wakes watchers, and the two event streams.

The store keeps each event as serialized `ExecutionEvent` bytes, so a stream frame is those
bytes behind a field tag: nothing is parsed or serialized again, and one frame object serves
every watcher of the event. A commit wakes watchers and hands the hub its events; a run with
watchers keeps its recent frames in a bounded cache. A watcher sends from that cache when it
covers its position, else from the store, at its own pace: a slow watcher holds nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from orchestrator.server.errors import InvalidArgument, OutOfRange, ResourceExhausted
from orchestrator.server.lifecycle import RunStatus
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.records import RunFilter
from orchestrator.server.store.runs import RunStore
from orchestrator.server.store.snapshots import RUN_STATUS_PB
from orchestrator.server.store.writer import Change, EventRecord
from orchestrator.server.tokens import TokenCodec
from orchestrator.v1 import orchestrator_pb2 as pb

T = TypeVar("T")
TERMINAL_PB = frozenset(
    RUN_STATUS_PB[s] for s in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
)
# What a watched run keeps in memory: at most this many frames and bytes. A watcher further
# behind reads the store.
CACHE_FRAMES = 512
CACHE_BYTES = 512 * 1024
STATUS_PAGE = 500  # WatchExecutions reads the store this many status changes at a time


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def run_frame(payload: bytes) -> bytes:
    """A serialized WatchExecutionResponse{event} around a serialized ExecutionEvent."""
    return _field(1, payload)


def tenant_frame(cursor: str, payload: bytes) -> bytes:
    """A serialized WatchExecutionsResponse{cursor, event}."""
    return _field(1, cursor.encode()) + _field(2, payload)


@dataclass(frozen=True)
class Frame:
    """One event ready for the wire."""

    sequence: int
    terminal: bool
    data: bytes

    @classmethod
    def of(cls, record: EventRecord) -> Frame:
        return cls(record.sequence, record.terminal, run_frame(record.payload))


@dataclass
class _RunChannel:
    watchers: set[asyncio.Event] = field(default_factory=set)
    cache: deque[Frame] = field(default_factory=deque)
    cached_bytes: int = 0

    def add(self, frame: Frame) -> None:
        self.cache.append(frame)
        self.cached_bytes += len(frame.data)
        while self.cache and (len(self.cache) > CACHE_FRAMES or self.cached_bytes > CACHE_BYTES):
            self.cached_bytes -= len(self.cache.popleft().data)

    def clear(self) -> None:
        self.cache.clear()
        self.cached_bytes = 0

    def after(self, position: int) -> list[Frame] | None:
        """The cached frames that follow `position` without a gap, else None. (Commits of
        other replicas never enter the cache, so it can have holes.)"""
        if not self.cache or self.cache[0].sequence > position + 1:
            return None
        frames: list[Frame] = []
        expected = position + 1
        for frame in self.cache:
            if frame.sequence < expected:
                continue
            if frame.sequence != expected:
                break
            frames.append(frame)
            expected += 1
        if not frames and self.cache[-1].sequence > position:
            return None  # a hole right after `position`: read the store
        # Caught up as far as this replica's commits go (another's clear the cache).
        return frames


class Hub:
    """Wakes the watchers of a run, or of a tenant's status changes, after each commit."""

    def __init__(self, max_watchers_per_tenant: int = 1000) -> None:
        self._runs: dict[str, _RunChannel] = {}
        self._tenants: dict[str, set[asyncio.Event]] = {}
        self._per_tenant: dict[str, int] = {}
        self.max_watchers_per_tenant = max_watchers_per_tenant

    def on_commit(self, changes: list[Change]) -> None:
        for change in changes:
            channel = self._runs.get(change.run_id)
            if channel is not None:
                for record in change.events:
                    channel.add(Frame.of(record))
                for wake in channel.watchers:
                    wake.set()
            if change.status_changed:
                for wake in self._tenants.get(change.tenant_id, ()):
                    wake.set()

    def on_remote(self, notices: list[Notice]) -> None:
        """Another replica committed changes: wake whoever watches them (they read the store).
        After a RESYNC (missed messages), wake everyone."""
        for notice in notices:
            if notice.kind is NoticeKind.RESYNC:
                for channel in self._runs.values():
                    channel.clear()
                    for wake in channel.watchers:
                        wake.set()
                for subscribers in self._tenants.values():
                    for wake in subscribers:
                        wake.set()
            elif notice.kind is NoticeKind.CHANGE:
                watched = self._runs.get(notice.run_id)
                if watched is not None:
                    # Another replica's commit is not in the cache: watchers must read the store.
                    watched.clear()
                    for wake in watched.watchers:
                        wake.set()
                if notice.status_changed:
                    for wake in self._tenants.get(notice.tenant_id, ()):
                        wake.set()

    @property
    def watchers(self) -> int:
        """Watch streams open in this process."""
        return sum(self._per_tenant.values())

    @contextmanager
    def _counted(self, tenant_id: str) -> Iterator[None]:
        count = self._per_tenant.get(tenant_id, 0)
        if count >= self.max_watchers_per_tenant:
            raise ResourceExhausted(
                f"the tenant has {count} watch streams open, the most allowed",
                reason="WATCH_LIMIT",
                metadata={"limit": str(self.max_watchers_per_tenant)},
            )
        self._per_tenant[tenant_id] = count + 1
        try:
            yield
        finally:
            left = self._per_tenant[tenant_id] - 1
            if left:
                self._per_tenant[tenant_id] = left
            else:
                del self._per_tenant[tenant_id]

    @contextmanager
    def run(self, run_id: str, tenant_id: str = "") -> Iterator[tuple[asyncio.Event, _RunChannel]]:
        """Subscribe to a run's commits; counted against the tenant when one is given."""
        with self._counted(tenant_id) if tenant_id else _nothing():
            wake = asyncio.Event()
            channel = self._runs.setdefault(run_id, _RunChannel())
            channel.watchers.add(wake)
            try:
                yield wake, channel
            finally:
                channel.watchers.discard(wake)
                if not channel.watchers:
                    del self._runs[run_id]

    @contextmanager
    def tenant(self, tenant_id: str) -> Iterator[asyncio.Event]:
        """Subscribe to a tenant's run status changes."""
        with self._counted(tenant_id):
            wake = asyncio.Event()
            self._tenants.setdefault(tenant_id, set()).add(wake)
            try:
                yield wake
            finally:
                subscribers = self._tenants[tenant_id]
                subscribers.discard(wake)
                if not subscribers:
                    del self._tenants[tenant_id]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass
class Watcher:
    """The event streams of one process."""

    store: RunStore
    hub: Hub
    tokens: TokenCodec
    heartbeat_seconds: float = 15.0

    async def run_events(
        self, tenant_id: str, run_id: str, after_sequence: int, *, from_start: bool = False
    ) -> AsyncIterator[bytes]:
        """WatchExecution frames: snapshot or replay (`from_start`: from the first event),
        then live events until the terminal one."""
        if after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", reason="INVALID_SEQUENCE")
        # The limit first: a stream refused costs no store read, so thousands refused at
        # once are answered WATCH_LIMIT promptly.
        with self.hub.run(run_id, tenant_id) as (wake, channel):
            status, last = await self.store.run_status(tenant_id, run_id)
            if after_sequence > last:
                raise OutOfRange(
                    f"after_sequence {after_sequence} is beyond the run's last event {last}",
                    metadata={"run_id": run_id, "last_sequence": str(last)},
                )
            if status.terminal and after_sequence == last:
                return
            position = after_sequence
            if after_sequence == 0 and not from_start:
                snapshot = await self._snapshot(tenant_id, run_id, resync=False)
                yield run_frame(snapshot.SerializeToString())
                if snapshot.execution.status in TERMINAL_PB:
                    return
                position = snapshot.sequence
            # From here on the stream is attached: a store outage delays it, never ends it.
            while True:
                wake.clear()
                frames = channel.after(position)
                if frames is None:
                    frames = await self._patiently(partial(self._read, run_id, position))
                    if not frames or frames[0].sequence != position + 1:
                        # Events are committed with last_sequence: once `last` is read, a
                        # fresh read holds every event up to it, unless they were pruned.
                        _, last = await self._patiently(
                            lambda: self.store.run_status(tenant_id, run_id)
                        )
                        if last > position:
                            frames = await self._patiently(partial(self._read, run_id, position))
                        if last > position and (not frames or frames[0].sequence != position + 1):
                            # What the caller asked for was pruned: start again from now.
                            snapshot = await self._patiently(
                                lambda: self._snapshot(tenant_id, run_id, resync=True)
                            )
                            yield run_frame(snapshot.SerializeToString())
                            if snapshot.execution.status in TERMINAL_PB:
                                return
                            position = snapshot.sequence
                            continue
                for frame in frames:
                    yield frame.data
                    position = frame.sequence
                    if frame.terminal:
                        return
                if frames:
                    continue
                try:
                    # asyncio.timeout, not wait_for: no task per wait (a wake-up is one per
                    # watcher and event, a thousand at a time in a fan-out).
                    async with asyncio.timeout(self.heartbeat_seconds):
                        await wake.wait()
                except TimeoutError:
                    heartbeat = pb.ExecutionEvent(
                        type=pb.EVENT_TYPE_HEARTBEAT, sequence=position, run_id=run_id
                    )
                    heartbeat.timestamp.GetCurrentTime()
                    yield run_frame(heartbeat.SerializeToString())

    async def _patiently(self, read: Callable[[], Awaitable[T]]) -> T:
        """A read of an attached stream: waits a store outage out (the stream stays open and
        goes on where it was once the store is back)."""
        return await self.store.health.wait_out(read)

    async def _read(self, run_id: str, position: int) -> list[Frame]:
        return [Frame.of(r) for r in await self.store.read_events(run_id, position)]

    async def _snapshot(self, tenant_id: str, run_id: str, *, resync: bool) -> pb.ExecutionEvent:
        execution = await self.store.get_execution(tenant_id, run_id)
        event = pb.ExecutionEvent(
            type=pb.EVENT_TYPE_SNAPSHOT,
            sequence=execution.last_sequence,
            execution=execution,
            run_id=run_id,
            resync=resync,
            message="snapshot (resync: events were pruned)" if resync else "snapshot",
        )
        event.timestamp.CopyFrom(execution.last_updated)
        return event

    async def tenant_changes(
        self, tenant_id: str, flt: RunFilter, after_cursor: str
    ) -> AsyncIterator[bytes]:
        """WatchExecutions frames: every status change of the tenant's runs, in commit order."""
        if after_cursor:
            payload = self.tokens.decode("cursor", after_cursor, field="after_cursor")
            position = payload.get("id")
            if not isinstance(position, int) or payload.get("t") != tenant_id:
                raise InvalidArgument(
                    "after_cursor is not a cursor of this tenant", reason="INVALID_CURSOR"
                )
        else:
            position = 0
        read_after = self.store.status_events(tenant_id, flt, STATUS_PAGE)
        with self.hub.tenant(tenant_id) as wake:
            if not after_cursor:
                position = await self.store.last_event_id(tenant_id)
            while True:
                wake.clear()
                rows = await self._patiently(partial(read_after, position))
                for event_id, data in rows:
                    position = event_id
                    yield tenant_frame(self._cursor(tenant_id, event_id), data)
                if len(rows) == STATUS_PAGE:
                    continue
                # Caught up as of the read: a commit after it has set `wake` (cleared before
                # the read), so no second read is needed to be sure.
                try:
                    async with asyncio.timeout(self.heartbeat_seconds):
                        await wake.wait()
                except TimeoutError:
                    heartbeat = pb.ExecutionEvent(type=pb.EVENT_TYPE_HEARTBEAT)
                    heartbeat.timestamp.GetCurrentTime()
                    yield tenant_frame(
                        self._cursor(tenant_id, position), heartbeat.SerializeToString()
                    )

    async def start_cursor(self, tenant_id: str) -> str:
        """A cursor at the tenant's newest status change: a WatchExecutions started after it
        sees every change committed since this call (ListExecutions' `watch_cursor`)."""
        return self._cursor(tenant_id, await self.store.last_event_id(tenant_id))

    def _cursor(self, tenant_id: str, event_id: int) -> str:
        return self.tokens.encode("cursor", {"id": event_id, "t": tenant_id})
