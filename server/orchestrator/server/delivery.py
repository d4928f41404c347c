"""Webhook delivery: sends what the store's outbox holds, signed per Standard Webhooks.

At least once: a delivery is settled in the store only after its attempt, so a crash sends
it again (the receiver deduplicates by `webhook-id`). Each subscription is sent to by its own
task, in order, so one receiver that is down or slow delays only itself. A failed attempt is
tried again with exponential back-off (capped) until the retry window has passed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import httpx
import structlog
from standardwebhooks import Webhook

from orchestrator.server.errors import STORE_OUTAGES
from orchestrator.server.store.webhooks import Due, WebhookStore
from orchestrator.server.tools import ToolError
from orchestrator.server.tools.network import Network, resolve_allowed

log = structlog.get_logger("orchestrator.webhooks")

# Deliveries taken per look, and sent to one subscription per look; a receiver's answer is
# read up to this much (and ignored).
BATCH = 200
PER_WEBHOOK = 20
MAX_ANSWER_BYTES = 4096
FIRST_BACKOFF = 1.0


async def check_destination(url: str, allow: Sequence[Network]) -> str:
    """'' when webhooks may POST to `url`, else why not (the http.request guard)."""
    try:
        target = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        return f"not a URL: {exc}"
    if target.scheme not in ("http", "https") or not target.host:
        return "must be an http or https URL with a host"
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        await resolve_allowed(target.host, port, allow)
    except ToolError as exc:
        return str(exc).replace("http.request", "a webhook")
    return ""


class Deliverer:
    """The delivery loop of one process."""

    def __init__(
        self,
        store: WebhookStore,
        *,
        allow: Sequence[Network] = (),
        timeout: float = 10.0,
        retry_seconds: float = 25 * 3600.0,
        max_backoff: float = 3600.0,
        poll: float = 1.0,
    ) -> None:
        self.store = store
        self.allow = tuple(allow)
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.max_backoff = max_backoff
        self.poll = poll
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="webhook-deliveries")

    def wake(self) -> None:
        """Look for due deliveries now (a change that may have queued some committed)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop sending; attempts cut off are sent again after their lease."""
        tasks = [t for t in (self._loop, *self._sending.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        while True:
            try:
                await self._take()
            except asyncio.CancelledError:
                raise
            except STORE_OUTAGES:
                pass  # logged once by the store's health; the next look tries again
            except Exception:
                log.exception("webhooks.loop_failed")
            try:
                async with asyncio.timeout(self.poll):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _take(self) -> None:
        # The lease outlasts the attempts of one subscription's share, so no delivery is sent
        # twice at once; after a crash, what was leased waits at most that long.
        now = time.time()
        due = await self.store.take_due(
            now, limit=BATCH, lease=self.timeout * PER_WEBHOOK + 30, busy=list(self._sending)
        )
        by_webhook: dict[str, list[Due]] = {}
        extra: list[int] = []
        for item in due:
            share = by_webhook.setdefault(item.delivery.webhook_id, [])
            if len(share) < PER_WEBHOOK:
                share.append(item)
            else:
                extra.append(item.delivery.pk)
        if extra:
            await self.store.release(extra, now)
        for webhook_id, items in by_webhook.items():
            task = asyncio.create_task(self._send_all(items), name=f"webhook-{webhook_id}")
            self._sending[webhook_id] = task
            task.add_done_callback(self._sent(webhook_id))

    def _sent(self, webhook_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_task: asyncio.Task[None]) -> None:
            self._sending.pop(webhook_id, None)

        return done

    async def _send_all(self, items: list[Due]) -> None:
        """One subscription's due deliveries, in order; after a failure the rest wait with it."""
        for index, item in enumerate(items):
            try:
                ok = await self._attempt(item, [i.delivery.pk for i in items[index + 1 :]])
            except asyncio.CancelledError:
                raise
            except STORE_OUTAGES:
                return  # the lease runs out and the attempt is made again
            except Exception:
                log.exception("webhooks.send_failed", delivery_id=item.delivery.delivery_id)
                return
            if not ok:
                return
        self.wake()  # more may have come for this subscription while it was busy

    async def _attempt(self, item: Due, rest: list[int]) -> bool:
        delivery = item.delivery
        status_code, error = await self._post(item)
        now = time.time()
        if 200 <= status_code < 300:
            await self.store.settle(
                delivery.pk,
                delivered=True,
                status_code=status_code,
                error="",
                next_attempt_at=None,
                at=now,
            )
            return True
        attempts = delivery.attempts + 1
        backoff = min(self.max_backoff, FIRST_BACKOFF * 2 ** (attempts - 1))
        next_at: float | None = now + random.uniform(backoff / 2, backoff)
        if next_at is not None and next_at - delivery.created_at > self.retry_seconds:
            next_at = None
        log.info(
            "webhooks.attempt_failed",
            delivery_id=delivery.delivery_id,
            webhook_id=delivery.webhook_id,
            attempts=attempts,
            status_code=status_code,
            error=error,
            gave_up=next_at is None,
        )
        await self.store.settle(
            delivery.pk,
            delivered=False,
            status_code=status_code,
            error=error or f"answered {status_code}",
            next_attempt_at=next_at,
            at=now,
            deferred=rest,
        )
        return False

    async def _post(self, item: Due) -> tuple[int, str]:
        """(HTTP status, error): 0 and why when there was no answer."""
        target = httpx.URL(item.url)
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            # Checked again at every attempt, and the checked address is the one used: a DNS
            # answer that changed since the subscription cannot point it inside.
            address = await resolve_allowed(target.host, port, self.allow)
        except ToolError as exc:
            return 0, str(exc).replace("http.request", "a webhook")
        delivery = item.delivery
        stamp = datetime.now(UTC)
        signature = Webhook(item.secret).sign(delivery.delivery_id, stamp, delivery.body)
        headers = {
            "content-type": "application/json",
            "host": target.netloc.decode(),
            "webhook-id": delivery.delivery_id,
            "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": signature,
            "user-agent": "orchestrator-webhooks",
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        try:
            request = self._client.build_request(
                "POST",
                target.copy_with(host=address),
                headers=headers,
                content=delivery.body.encode(),
                timeout=self.timeout,
                extensions=extensions,
            )
            async with asyncio.timeout(self.timeout):
                response = await self._client.send(request, stream=True)
                try:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_ANSWER_BYTES:
                            break
                finally:
                    await response.aclose()
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return 0, f"{type(exc).__name__}: {exc}"[:500]
        return response.status_code, ""
