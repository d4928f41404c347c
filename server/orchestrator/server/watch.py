"""Watching runs: the in-process hub that wakes watchers, and the event streams (DESIGN §5).

Watchers never hold events in memory: a commit only wakes them, and each reads what it has
not seen from the store, so a slow watcher costs nothing while it is slow.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

from orchestrator.server.errors import InvalidArgument, OutOfRange
from orchestrator.server.lifecycle import RunStatus
from orchestrator.server.store.runs import RUN_STATUS_PB, RunFilter, RunStore, timestamp
from orchestrator.server.store.writer import Change
from orchestrator.server.tokens import TokenCodec
from orchestrator.v1 import orchestrator_pb2 as pb

TERMINAL_PB = frozenset(
    RUN_STATUS_PB[s] for s in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED)
)


class Hub:
    """Wakes the watchers of a run, or of a tenant's status changes, after each commit."""

    def __init__(self) -> None:
        self._runs: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._tenants: dict[str, set[asyncio.Event]] = defaultdict(set)

    def on_commit(self, changes: list[Change]) -> None:
        for change in changes:
            for wake in self._runs.get(change.run_id, ()):
                wake.set()
            if change.status_changed:
                for wake in self._tenants.get(change.tenant_id, ()):
                    wake.set()

    @property
    def watchers(self) -> int:
        return sum(len(s) for s in self._runs.values()) + sum(
            len(s) for s in self._tenants.values()
        )

    @contextmanager
    def _subscribe(self, table: dict[str, set[asyncio.Event]], key: str) -> Iterator[asyncio.Event]:
        wake = asyncio.Event()
        table[key].add(wake)
        try:
            yield wake
        finally:
            subscribers = table.get(key)
            if subscribers is not None:
                subscribers.discard(wake)
                if not subscribers:
                    del table[key]

    def run(self, run_id: str) -> AbstractContextManager[asyncio.Event]:
        """Subscribe to a run's commits (a context manager)."""
        return self._subscribe(self._runs, run_id)

    def tenant(self, tenant_id: str) -> AbstractContextManager[asyncio.Event]:
        """Subscribe to a tenant's run status changes (a context manager)."""
        return self._subscribe(self._tenants, tenant_id)


@dataclass
class Watcher:
    """Streams of events for one caller."""

    store: RunStore
    hub: Hub
    tokens: TokenCodec
    heartbeat_seconds: float = 15.0

    async def run_events(
        self, tenant_id: str, run_id: str, after_sequence: int
    ) -> AsyncIterator[pb.ExecutionEvent]:
        """WatchExecution: snapshot or replay, then live events until the terminal one."""
        if after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", reason="INVALID_SEQUENCE")
        with self.hub.run(run_id) as wake:
            status, last = await self.store.run_status(tenant_id, run_id)
            if after_sequence > last:
                raise OutOfRange(
                    f"after_sequence {after_sequence} is beyond the run's last event {last}",
                    metadata={"run_id": run_id, "last_sequence": str(last)},
                )
            position = after_sequence
            if after_sequence == 0:
                snapshot = await self._snapshot(tenant_id, run_id, resync=False)
                yield snapshot
                position = snapshot.sequence
                if snapshot.execution.status in TERMINAL_PB:
                    return
            elif status.terminal and after_sequence == last:
                return
            while True:
                wake.clear()
                payloads = await self.store.read_events(run_id, position)
                for payload in payloads:
                    event = pb.ExecutionEvent.FromString(payload)
                    if event.sequence != position + 1:
                        # What the caller asked for was pruned: start again from the present.
                        snapshot = await self._snapshot(tenant_id, run_id, resync=True)
                        yield snapshot
                        position = snapshot.sequence
                        if snapshot.execution.status in TERMINAL_PB:
                            return
                        break
                    yield event
                    position = event.sequence
                    if (
                        event.type == pb.EVENT_TYPE_RUN_STATUS_CHANGED
                        and event.execution.status in TERMINAL_PB
                    ):
                        return
                if payloads:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), self.heartbeat_seconds)
                except TimeoutError:
                    yield pb.ExecutionEvent(
                        type=pb.EVENT_TYPE_HEARTBEAT, sequence=position, run_id=run_id
                    )

    async def _snapshot(self, tenant_id: str, run_id: str, *, resync: bool) -> pb.ExecutionEvent:
        execution = await self.store.get_execution(tenant_id, run_id)
        event = pb.ExecutionEvent(
            type=pb.EVENT_TYPE_SNAPSHOT,
            sequence=execution.last_sequence,
            execution=execution,
            run_id=run_id,
            resync=resync,
            message="snapshot",
        )
        event.timestamp.CopyFrom(execution.last_updated)
        return event

    async def tenant_changes(
        self, tenant_id: str, flt: RunFilter, after_cursor: str
    ) -> AsyncIterator[tuple[str, pb.ExecutionEvent]]:
        """WatchExecutions: every status change of the tenant's runs, in commit order."""
        with self.hub.tenant(tenant_id) as wake:
            if after_cursor:
                payload = self.tokens.decode("cursor", after_cursor, field="after_cursor")
                position = payload.get("id")
                if not isinstance(position, int) or payload.get("t") != tenant_id:
                    raise InvalidArgument(
                        "after_cursor is not a cursor of this tenant", reason="INVALID_CURSOR"
                    )
            else:
                position = await self.store.last_event_id(tenant_id)
            while True:
                wake.clear()
                rows = await self.store.read_status_events(tenant_id, position, flt)
                for event_id, data in rows:
                    position = event_id
                    yield self._cursor(tenant_id, event_id), pb.ExecutionEvent.FromString(data)
                if rows:
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), self.heartbeat_seconds)
                except TimeoutError:
                    heartbeat = pb.ExecutionEvent(type=pb.EVENT_TYPE_HEARTBEAT)
                    heartbeat.timestamp.GetCurrentTime()
                    yield self._cursor(tenant_id, position), heartbeat

    def _cursor(self, tenant_id: str, event_id: int) -> str:
        return self.tokens.encode("cursor", {"id": event_id, "t": tenant_id})


__all__ = ["Hub", "Watcher", "timestamp"]
