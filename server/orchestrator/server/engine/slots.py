"""Step slots shared fairly by tenant.

A replica runs at most `capacity` tool calls at once. One tenant's backlog must never stand
in front of another tenant's work, so the slots are not first come, first served:

- no tenant holds more than `capacity - reserve` slots: the last `reserve` are kept for the
  others, so a tenant that arrives while one tenant fills the replica starts at once, not at
  the next turnover (which, with slow steps, may be minutes away);
- a freed slot goes to the waiting tenant that holds the fewest slots for its weight (a
  deficit round-robin over tenants): tenants with a backlog converge on shares proportional to
  their weights, and a tenant with nothing running is served first;
- within a tenant, waiters go by priority (1 first ... 5 last), then in the order they came.

Everything runs on the event loop: no locks, and a grant is a future resolved in place.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

DEFAULT_PRIORITY = 3


@dataclass
class _Tenant:
    held: int = 0
    # (priority, arrival, future): the tenant's waiters, best first.
    waiting: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)


class FairSlots:
    """`capacity` slots; `async with slots.take(tenant, priority):` holds one."""

    def __init__(
        self,
        capacity: int,
        *,
        reserve: int | None = None,
        weight: Callable[[str], float] | None = None,
    ) -> None:
        self.capacity = max(1, capacity)
        if reserve is None:
            reserve = max(1, self.capacity // 16)
        # A single slot cannot be shared: then there is nothing to reserve.
        self.reserve = min(max(0, reserve), self.capacity - 1)
        self._weight = weight or (lambda _tenant: 1.0)
        self._tenants: dict[str, _Tenant] = {}
        self._held = 0
        self._arrivals = itertools.count()

    @property
    def held(self) -> int:
        """Slots in use."""
        return self._held

    def waiting(self) -> dict[str, int]:
        """Waiters per tenant (tenants with none are left out)."""
        return {t: len(s.waiting) for t, s in self._tenants.items() if s.waiting}

    def free_to(self, tenant: str, spoken_for: int = 0, spoken_for_all: int = 0) -> bool:
        """Whether the tenant would get a slot at once, after `spoken_for` more of its own
        (and `spoken_for_all` more of anyone's) are taken."""
        state = self._tenants.get(tenant)
        held = state.held if state is not None else 0
        if state is not None and state.waiting:
            return False
        return (
            self._held + spoken_for_all < self.capacity
            and held + spoken_for < self.capacity - self.reserve
        )

    def held_by(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.held if state is not None else 0

    @asynccontextmanager
    async def take(self, tenant: str, priority: int = DEFAULT_PRIORITY) -> AsyncIterator[None]:
        """Hold a slot for the block; waits its turn when none is free to this tenant."""
        await self._acquire(tenant, priority)
        try:
            yield
        finally:
            self._release(tenant)

    def _state(self, tenant: str) -> _Tenant:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _Tenant()
        return state

    def _may_take(self, state: _Tenant) -> bool:
        return self._held < self.capacity and state.held < self.capacity - self.reserve

    async def _acquire(self, tenant: str, priority: int) -> None:
        state = self._state(tenant)
        if not state.waiting and self._may_take(state):
            self._grant(state)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(state.waiting, (priority, next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Granted as we were cancelled: hand the slot on.
                self._release(tenant)
            else:
                state.waiting = [w for w in state.waiting if w[2] is not future]
                heapq.heapify(state.waiting)
                self._forget(tenant, state)
            raise

    def _grant(self, state: _Tenant) -> None:
        state.held += 1
        self._held += 1

    def _release(self, tenant: str) -> None:
        state = self._tenants[tenant]
        state.held -= 1
        self._held -= 1
        self._forget(tenant, state)
        self._dispatch()

    def _forget(self, tenant: str, state: _Tenant) -> None:
        if not state.held and not state.waiting:
            del self._tenants[tenant]

    def _dispatch(self) -> None:
        """Give free slots to waiters: each to the tenant with the fewest held per weight."""
        while self._held < self.capacity:
            best: _Tenant | None = None
            best_load = 0.0
            for tenant, state in self._tenants.items():
                if not state.waiting or not self._may_take(state):
                    continue
                load = state.held / max(self._weight(tenant), 1e-9)
                if best is None or load < best_load:
                    best, best_load = state, load
            if best is None:
                return
            _, _, future = heapq.heappop(best.waiting)
            if future.done():
                continue  # cancelled while queued; its waiter cleans up
            self._grant(best)
            future.set_result(None)
