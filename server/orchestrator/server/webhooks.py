"""What the webhook RPCs do: subscriptions checked and stored, deliveries listed."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.server.delivery import check_destination
from orchestrator.server.errors import FieldViolation, ResourceExhausted, ValidationFailed
from orchestrator.server.labels import label_violations
from orchestrator.server.store.snapshots import timestamp
from orchestrator.server.store.webhooks import (
    EVENT_TYPES,
    DeliveryRecord,
    WebhookRecord,
    WebhookStore,
    webhook_not_found,
)
from orchestrator.server.tools.network import Network
from orchestrator.v1 import orchestrator_pb2 as pb

MAX_URL = 2048
MAX_WEBHOOKS_PER_TENANT = 20
DEFAULT_DELIVERIES = 50
MAX_DELIVERIES = 500
DELIVERY_STATUS_PB = {
    "PENDING": pb.WEBHOOK_DELIVERY_STATUS_PENDING,
    "DELIVERED": pb.WEBHOOK_DELIVERY_STATUS_DELIVERED,
    "FAILED": pb.WEBHOOK_DELIVERY_STATUS_FAILED,
}


@dataclass
class WebhookControl:
    """CreateWebhook, ListWebhooks, DeleteWebhook, ListWebhookDeliveries."""

    store: WebhookStore
    allow: Sequence[Network] = ()

    async def create(self, tenant_id: str, request: pb.CreateWebhookRequest) -> pb.Webhook:
        """Check and store a subscription; the answer carries its secret, once."""
        hook = request.webhook
        violations: list[FieldViolation] = []
        if not hook.url or len(hook.url) > MAX_URL or "\x00" in hook.url:
            violations.append(
                FieldViolation("webhook.url", f"required, an http(s) URL of at most {MAX_URL}")
            )
        else:
            problem = await check_destination(hook.url, self.allow)
            if problem:
                violations.append(FieldViolation("webhook.url", problem))
        known = set(EVENT_TYPES.values())
        for i, name in enumerate(hook.event_types):
            if name not in known:
                violations.append(
                    FieldViolation(
                        f"webhook.event_types[{i}]", "one of: " + ", ".join(sorted(known))
                    )
                )
        violations += label_violations(hook.labels, "webhook.labels")
        if violations:
            raise ValidationFailed("invalid webhook", violations=violations)
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        record = WebhookRecord(
            webhook_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            url=hook.url,
            event_types=tuple(dict.fromkeys(hook.event_types)),
            labels=dict(hook.labels),
            secret=secret,
            created_at=0.0,
        )
        stored = await self.store.create(record, MAX_WEBHOOKS_PER_TENANT)
        if stored is None:
            raise ResourceExhausted(
                f"a tenant has at most {MAX_WEBHOOKS_PER_TENANT} webhooks",
                reason="WEBHOOK_LIMIT",
            )
        return webhook_message(stored, with_secret=True)

    async def list_webhooks(self, tenant_id: str) -> list[pb.Webhook]:
        return [webhook_message(r) for r in await self.store.list_webhooks(tenant_id)]

    async def delete(self, tenant_id: str, webhook_id: str) -> None:
        _require_webhook_id(webhook_id)
        await self.store.delete(tenant_id, webhook_id)

    async def deliveries(
        self, tenant_id: str, request: pb.ListWebhookDeliveriesRequest
    ) -> list[pb.WebhookDelivery]:
        _require_webhook_id(request.webhook_id)
        if request.page_size < 0:
            raise ValidationFailed(
                "page_size must not be negative",
                violations=[FieldViolation("page_size", f"0 (default 50) to {MAX_DELIVERIES}")],
            )
        limit = min(request.page_size or DEFAULT_DELIVERIES, MAX_DELIVERIES)
        rows = await self.store.deliveries(tenant_id, request.webhook_id, limit)
        return [delivery_message(r) for r in rows]


def webhook_message(record: WebhookRecord, *, with_secret: bool = False) -> pb.Webhook:
    return pb.Webhook(
        webhook_id=record.webhook_id,
        url=record.url,
        event_types=list(record.event_types),
        labels=record.labels,
        secret=record.secret if with_secret else "",
        created_at=timestamp(record.created_at),
    )


def delivery_message(record: DeliveryRecord) -> pb.WebhookDelivery:
    message = pb.WebhookDelivery(
        delivery_id=record.delivery_id,
        event_type=record.event_type,
        run_id=record.run_id,
        status=DELIVERY_STATUS_PB[record.status],
        attempts=record.attempts,
        last_status_code=record.last_status_code,
        last_error=record.last_error,
        created_at=timestamp(record.created_at),
    )
    if record.status == "PENDING":
        message.next_attempt_at.CopyFrom(timestamp(record.next_attempt_at))
    if record.delivered_at is not None:
        message.delivered_at.CopyFrom(timestamp(record.delivered_at))
    return message


def _require_webhook_id(webhook_id: str) -> None:
    if not webhook_id:
        raise ValidationFailed(
            "webhook_id is required", violations=[FieldViolation("webhook_id", "required")]
        )
    try:
        uuid.UUID(webhook_id)
    except ValueError:
        raise webhook_not_found(webhook_id) from None
