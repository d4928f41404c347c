"""Webhook subscriptions and their outbox: deliveries are queued in the transaction of the
change they announce (`stage_deliveries`, called where events are written), so no change is
announced that did not commit and none that committed goes unannounced; the deliverer
(`orchestrator.server.webhooks`) sends them and settles each attempt here.

A tenant's subscriptions are looked up by every run status change (three a run, nearly always
to find none), so each process keeps them as last read (`Subscriptions`). A change made here
is seen by the next status change after it commits, exactly; one made by another replica,
once its notice arrives (PostgreSQL NOTIFY: milliseconds), or after SUBSCRIPTIONS_TTL at the
latest. A delivery is queued only while its subscription exists, so a deleted one kept
somewhere a moment longer costs nothing."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from orchestrator.server.errors import NotFound
from orchestrator.server.store.database import Database
from orchestrator.server.store.direct import direct
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.records import EventSpec, Row
from orchestrator.server.store.schema import webhook_deliveries, webhooks
from orchestrator.server.store.writer import T, Tx, Writer
from orchestrator.v1 import orchestrator_pb2 as pb

# What a subscription may ask for, by the run event that makes it.
EVENT_TYPES = {
    pb.EVENT_TYPE_RUN_STATUS_CHANGED: "run.status_changed",
    pb.EVENT_TYPE_STEP_FAILED: "step.failed",
    pb.EVENT_TYPE_STEP_RETRYING: "step.retrying",
    pb.EVENT_TYPE_CLARIFICATION_REQUESTED: "clarification.requested",
    pb.EVENT_TYPE_CLARIFICATION_RESOLVED: "clarification.resolved",
    pb.EVENT_TYPE_SIGNAL_RECEIVED: "signal.received",
}
# An event's message is cut to this in a body (bodies stay small and bounded).
MAX_MESSAGE = 1000
PENDING, DELIVERED, FAILED = "PENDING", "DELIVERED", "FAILED"
# A tenant's subscriptions as read are kept this long at most (the bound on a missed notice),
# for this many tenants at most (then all are read again).
SUBSCRIPTIONS_TTL = 30.0
TENANTS_KEPT = 10_000
SELECT_SUBSCRIPTIONS = direct(
    sa.select(webhooks.c.webhook_id, webhooks.c.event_types, webhooks.c.labels).where(
        webhooks.c.tenant_id == sa.bindparam("w_tenant_id")
    )
)
_DELIVERY_COLUMNS = (
    "delivery_id",
    "webhook_id",
    "run_id",
    "event_type",
    "body",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "created_at",
    "next_attempt_at",
)
# A delivery row goes in only while its subscription is there (INSERT ... SELECT FROM webhooks).
INSERT_DELIVERIES = direct(
    sa.insert(webhook_deliveries).from_select(
        _DELIVERY_COLUMNS,
        sa.select(
            *(sa.bindparam(c, type_=webhook_deliveries.c[c].type) for c in _DELIVERY_COLUMNS)
        ).where(webhooks.c.webhook_id == sa.bindparam("webhook_id")),
    )
)


class Subscriptions:
    """Each tenant's subscriptions as last read, for the status changes that look them up.
    A tenant's entry is dropped when this process starts changing its subscriptions and again
    when the change has committed (`changing`: lookups in between read the store and keep
    nothing), and when another replica says it changed them (`dropped`). A lookup that
    overlapped a drop keeps nothing either. Lookups run in the writer's thread on SQLite."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[float, tuple[Mapping[str, Any], ...]]] = {}
        self._changing: Counter[str] = Counter()
        self._drops = 0
        self._lock = threading.Lock()

    async def of(self, tx: Tx, tenant_id: str) -> tuple[Mapping[str, Any], ...]:
        kept = self._kept.get(tenant_id)
        if kept is not None and tx.now - kept[0] < SUBSCRIPTIONS_TTL:
            return kept[1]
        drops = self._drops
        rows = await tx.conn.execute(SELECT_SUBSCRIPTIONS, {"w_tenant_id": tenant_id})
        found = tuple(rows.mappings().all())
        with self._lock:
            if drops == self._drops and not self._changing[tenant_id]:
                if len(self._kept) >= TENANTS_KEPT:
                    self._kept.clear()
                self._kept[tenant_id] = (tx.now, found)
        return found

    def dropped(self, tenant_id: str | None = None) -> None:
        """The tenant's subscriptions (None: anyone's) may have changed."""
        with self._lock:
            self._drops += 1
            if tenant_id is None:
                self._kept.clear()
            else:
                self._kept.pop(tenant_id, None)

    @contextmanager
    def changing(self, tenant_id: str) -> Iterator[None]:
        """Around a unit that changes the tenant's subscriptions, until it has committed."""
        with self._lock:
            self._changing[tenant_id] += 1
        self.dropped(tenant_id)
        try:
            yield
        finally:
            with self._lock:
                self._changing[tenant_id] -= 1
                if not self._changing[tenant_id]:
                    del self._changing[tenant_id]
            self.dropped(tenant_id)


@dataclass(frozen=True)
class WebhookRecord:
    """A subscription."""

    webhook_id: str
    tenant_id: str
    url: str
    event_types: tuple[str, ...]
    labels: dict[str, str]
    secret: str
    created_at: float


@dataclass(frozen=True)
class DeliveryRecord:
    """One queued or sent delivery."""

    pk: int
    delivery_id: str
    webhook_id: str
    run_id: str
    event_type: str
    body: str
    status: str
    attempts: int
    last_status_code: int
    last_error: str
    created_at: float
    next_attempt_at: float
    delivered_at: float | None


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now, with where it goes and how it is signed."""

    delivery: DeliveryRecord
    url: str
    secret: str


def _webhook(row: Any) -> WebhookRecord:
    return WebhookRecord(
        webhook_id=row.webhook_id,
        tenant_id=row.tenant_id,
        url=row.url,
        event_types=tuple(row.event_types or ()),
        labels=dict(row.labels or {}),
        secret=row.secret,
        created_at=row.created_at,
    )


def _delivery(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        pk=row.pk,
        delivery_id=row.delivery_id,
        webhook_id=row.webhook_id,
        run_id=row.run_id,
        event_type=row.event_type,
        body=row.body,
        status=row.status,
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        next_attempt_at=row.next_attempt_at,
        delivered_at=row.delivered_at,
    )


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


async def stage_deliveries(
    tx: Tx,
    subscriptions: Subscriptions,
    run: Row,
    specs: Sequence[EventSpec],
    first_sequence: int,
) -> None:
    """Queue a delivery for every subscription of the run's tenant that wants one of these
    events, in `tx` (the transaction writing them). Events no one can subscribe to (a step
    started or completed: the hot path) cost nothing here."""
    wanted = [(i, spec) for i, spec in enumerate(specs) if spec.type in EVENT_TYPES]
    if not wanted:
        return
    wanting = await subscriptions.of(tx, run["tenant_id"])
    if not wanting:
        return
    labels = run.get("labels") or {}
    values = []
    for offset, spec in wanted:
        event_type = EVENT_TYPES[spec.type]
        body = json.dumps(
            {
                "type": event_type,
                "timestamp": _rfc3339(tx.now),
                "data": {
                    "run_id": run["run_id"],
                    "status": run["status"],
                    "sequence": first_sequence + offset,
                    "step_id": spec.step_id,
                    "message": spec.message[:MAX_MESSAGE],
                    "labels": labels,
                    "plan_id": run.get("plan_id", ""),
                },
            },
            separators=(",", ":"),
        )
        for sub in wanting:
            if sub["event_types"] and event_type not in sub["event_types"]:
                continue
            if any(labels.get(k) != v for k, v in (sub["labels"] or {}).items()):
                continue
            values.append(
                {
                    "delivery_id": f"msg_{uuid.uuid4().hex}",
                    "webhook_id": sub["webhook_id"],
                    "run_id": run["run_id"],
                    "event_type": event_type,
                    "body": body,
                    "status": PENDING,
                    "attempts": 0,
                    "last_status_code": 0,
                    "last_error": "",
                    "created_at": tx.now,
                    "next_attempt_at": tx.now,
                }
            )
    if values:
        await tx.conn.execute(INSERT_DELIVERIES, values)


class WebhookStore:
    """Every query and unit of work on webhook subscriptions and deliveries."""

    def __init__(self, db: Database, writer: Writer, subscriptions: Subscriptions) -> None:
        self.db = db
        self.writer = writer
        self.subscriptions = subscriptions

    async def _change(self, tenant_id: str, unit: Callable[[Tx], Awaitable[T]]) -> T:
        """A unit changing the tenant's subscriptions, announced to the other replicas."""

        async def announced(tx: Tx) -> T:
            result = await unit(tx)
            tx.notify(Notice(NoticeKind.WEBHOOKS, tenant_id=tenant_id))
            return result

        with self.subscriptions.changing(tenant_id):
            return await self.writer.run(announced)

    async def create(self, record: WebhookRecord, limit: int) -> WebhookRecord | None:
        """Store a subscription; None when the tenant already has `limit` of them."""

        async def unit(tx: Tx) -> WebhookRecord | None:
            count = await tx.conn.execute(
                sa.select(sa.func.count())
                .select_from(webhooks)
                .where(webhooks.c.tenant_id == record.tenant_id)
            )
            if int(count.scalar_one()) >= limit:
                return None
            await tx.conn.execute(
                sa.insert(webhooks).values(
                    webhook_id=record.webhook_id,
                    tenant_id=record.tenant_id,
                    url=record.url,
                    event_types=list(record.event_types),
                    labels=record.labels,
                    secret=record.secret,
                    created_at=tx.now,
                )
            )
            return WebhookRecord(**{**record.__dict__, "created_at": tx.now})

        return await self._change(record.tenant_id, unit)

    async def list_webhooks(self, tenant_id: str) -> list[WebhookRecord]:
        async def read(conn: Any) -> list[WebhookRecord]:
            rows = await conn.execute(
                sa.select(webhooks)
                .where(webhooks.c.tenant_id == tenant_id)
                .order_by(webhooks.c.created_at, webhooks.c.webhook_id)
            )
            return [_webhook(r) for r in rows.all()]

        return await self.db.read(read)

    async def delete(self, tenant_id: str, webhook_id: str) -> None:
        """Drop the subscription with its deliveries; NotFound when the tenant has none such."""

        async def unit(tx: Tx) -> None:
            where = sa.and_(webhooks.c.webhook_id == webhook_id, webhooks.c.tenant_id == tenant_id)
            found = await tx.conn.execute(sa.select(webhooks.c.webhook_id).where(where))
            if found.first() is None:
                raise webhook_not_found(webhook_id)
            await tx.conn.execute(
                sa.delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
            )
            await tx.conn.execute(sa.delete(webhooks).where(where))

        await self._change(tenant_id, unit)

    async def deliveries(self, tenant_id: str, webhook_id: str, limit: int) -> list[DeliveryRecord]:
        """The subscription's newest deliveries; NotFound for another tenant's or none."""

        async def read(conn: Any) -> list[DeliveryRecord]:
            found = await conn.execute(
                sa.select(webhooks.c.webhook_id).where(
                    webhooks.c.webhook_id == webhook_id, webhooks.c.tenant_id == tenant_id
                )
            )
            if found.first() is None:
                raise webhook_not_found(webhook_id)
            rows = await conn.execute(
                sa.select(webhook_deliveries)
                .where(webhook_deliveries.c.webhook_id == webhook_id)
                .order_by(webhook_deliveries.c.pk.desc())
                .limit(limit)
            )
            return [_delivery(r) for r in rows.all()]

        return await self.db.read(read)

    async def take_due(
        self, now: float, *, limit: int, lease: float, busy: Iterable[str] = ()
    ) -> list[Due]:
        """Up to `limit` deliveries due now, oldest first, leaving out the subscriptions in
        `busy` (being sent to already); each is leased (its next attempt moved `lease`
        seconds on) so that another replica, or a crash, only delays it."""
        busy = list(busy)
        query = sa.select(webhook_deliveries.c.pk).where(
            webhook_deliveries.c.status == PENDING,
            webhook_deliveries.c.next_attempt_at <= now,
        )
        if busy:
            query = query.where(webhook_deliveries.c.webhook_id.not_in(busy))
        query = query.order_by(webhook_deliveries.c.pk).limit(limit)

        async def look(conn: Any) -> list[int]:
            return [r.pk for r in (await conn.execute(query)).all()]

        # A read first: with nothing due (the usual case) no transaction is written at all, so
        # polling neither loads the writer nor passes for a write that succeeded (store full).
        if not await self.db.read(look):
            return []

        async def unit(tx: Tx) -> list[Due]:
            pks = [r.pk for r in (await tx.conn.execute(self.db.dialect.claimable(query))).all()]
            if not pks:
                return []
            await tx.conn.execute(
                sa.update(webhook_deliveries)
                .where(webhook_deliveries.c.pk.in_(pks))
                .values(next_attempt_at=now + lease)
            )
            rows = await tx.conn.execute(
                sa.select(webhook_deliveries, webhooks.c.url, webhooks.c.secret)
                .join(webhooks, webhooks.c.webhook_id == webhook_deliveries.c.webhook_id)
                .where(webhook_deliveries.c.pk.in_(pks))
                .order_by(webhook_deliveries.c.pk)
            )
            return [Due(_delivery(r), r.url, r.secret) for r in rows.all()]

        return await self.writer.run_beside(unit)

    async def release(self, pks: Sequence[int], at: float) -> None:
        """Give leased deliveries back, due at `at` (taken but not sent this time)."""

        async def unit(tx: Tx) -> None:
            await tx.conn.execute(
                sa.update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.pk.in_(list(pks)),
                    webhook_deliveries.c.status == PENDING,
                )
                .values(next_attempt_at=at)
            )

        await self.writer.run_beside(unit)

    async def settle(
        self,
        pk: int,
        *,
        delivered: bool,
        status_code: int,
        error: str,
        next_attempt_at: float | None,
        at: float,
        deferred: Sequence[int] = (),
    ) -> None:
        """Record an attempt: DELIVERED, PENDING again at `next_attempt_at`, or FAILED for
        good (None). `deferred` deliveries of the same subscription wait with it."""

        async def unit(tx: Tx) -> None:
            changes: dict[str, Any] = {
                "attempts": webhook_deliveries.c.attempts + 1,
                "last_status_code": status_code,
                "last_error": error[:500],
            }
            if delivered:
                changes.update(status=DELIVERED, delivered_at=at)
            elif next_attempt_at is None:
                changes.update(status=FAILED)
            else:
                changes.update(next_attempt_at=next_attempt_at)
            await tx.conn.execute(
                sa.update(webhook_deliveries)
                .where(webhook_deliveries.c.pk == pk, webhook_deliveries.c.status == PENDING)
                .values(**changes)
            )
            if deferred and next_attempt_at is not None:
                await tx.conn.execute(
                    sa.update(webhook_deliveries)
                    .where(
                        webhook_deliveries.c.pk.in_(list(deferred)),
                        webhook_deliveries.c.status == PENDING,
                    )
                    .values(next_attempt_at=next_attempt_at)
                )

        await self.writer.run_beside(unit)


def webhook_not_found(webhook_id: str) -> NotFound:
    return NotFound(
        f"webhook {webhook_id!r} not found",
        reason="WEBHOOK_NOT_FOUND",
        metadata={"webhook_id": webhook_id},
    )
