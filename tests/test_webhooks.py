"""Webhooks: subscriptions, the outbox written with each change, signed at-least-once
delivery to a real HTTP receiver on loopback (allowed through --http-allow), retries while it
is down, and the outbound address guard."""

from __future__ import annotations

import asyncio
import signal as signals
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from standardwebhooks import Webhook

from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import echo_plan, make_settings, md, running
from tests.errors import details_of
from tests.process import ServeProcess, free_port
from tests.stores import drop_postgres_database, fetch, postgres_database

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    Stub = pb_grpc.OrchestratorServiceAsyncStub

# The run events a subscription can hear, as the body's `type` names them.
HEARD = {
    pb.EVENT_TYPE_RUN_STATUS_CHANGED: "run.status_changed",
    pb.EVENT_TYPE_STEP_FAILED: "step.failed",
    pb.EVENT_TYPE_STEP_RETRYING: "step.retrying",
    pb.EVENT_TYPE_CLARIFICATION_REQUESTED: "clarification.requested",
    pb.EVENT_TYPE_CLARIFICATION_RESOLVED: "clarification.resolved",
    pb.EVENT_TYPE_SIGNAL_RECEIVED: "signal.received",
}


class Receiver:
    """A real HTTP server on loopback that keeps every POST; it can stop and come back on
    the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def snapshot(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.received)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


def verified(received: list[tuple[dict[str, str], bytes]], secret: str) -> list[dict[str, Any]]:
    """Every body, each checked against its Standard Webhooks signature."""
    hook = Webhook(secret)
    out = []
    for headers, body in received:
        lower = {k.lower(): v for k, v in headers.items()}
        assert lower["webhook-id"].startswith("msg_")
        out.append({**hook.verify(body, lower), "_id": lower["webhook-id"]})
    return out


async def heard_events(stub: Stub, tenant: str, run_id: str) -> set[tuple[str, int]]:
    stream = stub.WatchExecution(
        pb.WatchExecutionRequest(run_id=run_id, after_sequence=1), metadata=md(tenant)
    )
    # Replayed from sequence 2; the first event is always the run's creation (PENDING).
    later = {(run_id, r.event.sequence) async for r in stream if r.event.type in HEARD}
    return {(run_id, 1), *later}


async def create(stub: Stub, tenant: str, url: str, **fields: Any) -> pb.Webhook:
    response = await stub.CreateWebhook(
        pb.CreateWebhookRequest(webhook=pb.Webhook(url=url, **fields)), metadata=md(tenant)
    )
    return response.webhook


async def eventually(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_loopback_and_metadata_webhooks_are_refused_unless_allowed(
    tmp_path: Path, database_url: str, stub: Stub, tenant: str
) -> None:
    for url in (
        "http://127.0.0.1:9/x",
        "http://localhost:9/x",
        "http://[::1]:9/x",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/x",
        "ftp://example.com/x",
        "",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create(stub, tenant, url)
        details = details_of(refused.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, url
        assert [v[0] for v in details.violations] == ["webhook.url"], url
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await create(stub, tenant, "http://127.0.0.1:9/x", event_types=["run.exploded"])
    assert {v[0] for v in details_of(bad.value).violations} == {
        "webhook.url",
        "webhook.event_types[0]",
    }
    allowed = make_settings(tmp_path / "allowed", database_url, http_allow="127.0.0.1/32")
    (tmp_path / "allowed").mkdir()
    async with running(allowed) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

        other: Stub = pb_grpc.OrchestratorServiceStub(channel)
        made = await create(other, tenant, "http://127.0.0.1:9/x", labels={"env": "prod"})
        assert made.secret.startswith("whsec_") and made.webhook_id
        for url in ("http://127.0.0.2:9/x", "http://169.254.169.254/latest/meta-data"):
            with pytest.raises(grpc.aio.AioRpcError) as still:
                await create(other, tenant, url)
            assert details_of(still.value).code == grpc.StatusCode.INVALID_ARGUMENT
        listed = (await other.ListWebhooks(pb.ListWebhooksRequest(), metadata=md(tenant))).webhooks
        assert [(w.webhook_id, w.secret, dict(w.labels)) for w in listed] == [
            (made.webhook_id, "", {"env": "prod"})
        ]
        foreign = await other.ListWebhooks(pb.ListWebhooksRequest(), metadata=md(str(uuid.uuid4())))
        assert list(foreign.webhooks) == []
        await other.DeleteWebhook(
            pb.DeleteWebhookRequest(webhook_id=made.webhook_id), metadata=md(tenant)
        )
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await other.DeleteWebhook(
                pb.DeleteWebhookRequest(webhook_id=made.webhook_id), metadata=md(tenant)
            )
        assert details_of(gone.value).reason == "WEBHOOK_NOT_FOUND"


async def test_a_receiver_gets_every_event_signed_and_the_missed_ones_after_an_outage(
    tmp_path: Path, database_url: str, tenant: str, receiver: Receiver
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        http_allow="127.0.0.1/32",
        webhook_max_backoff_seconds=1.0,
        webhook_poll_seconds=0.2,
    )
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        hook = await create(stub, tenant, receiver.url)
        # A second subscription that is down all along must not hold the first one back.
        dead = await create(stub, tenant, f"http://127.0.0.1:{free_port()}/nobody")

        async def run_all(n: int) -> set[tuple[str, int]]:
            ids = [
                (
                    await stub.Execute(
                        pb.ExecuteRequest(executable_plan=echo_plan(2), async_execution=False),
                        metadata=md(tenant),
                    )
                ).run_id
                for _ in range(n)
            ]
            expected: set[tuple[str, int]] = set()
            for run_id in ids:
                expected |= await heard_events(stub, tenant, run_id)
            return expected

        def got() -> set[tuple[str, int]]:
            bodies = verified(receiver.snapshot(), hook.secret)
            return {(b["data"]["run_id"], b["data"]["sequence"]) for b in bodies}

        first = await run_all(50)
        assert len(first) == 150  # created, started, completed
        await eventually(lambda: got() >= first, 30, "the 50 runs' events")
        receiver.stop()
        second = await run_all(10)

        async def waiting() -> list[pb.WebhookDelivery]:
            deliveries = (
                await stub.ListWebhookDeliveries(
                    pb.ListWebhookDeliveriesRequest(webhook_id=hook.webhook_id, page_size=500),
                    metadata=md(tenant),
                )
            ).deliveries
            return [d for d in deliveries if d.status == pb.WEBHOOK_DELIVERY_STATUS_PENDING]

        # Tried again and again (back-off capped at 1 s here); the others wait with it.
        deadline = time.monotonic() + 30
        while max((d.attempts for d in await waiting()), default=0) < 3:
            assert time.monotonic() < deadline, "no delivery was tried three times"
            await asyncio.sleep(0.2)
        held = await waiting()
        assert len(held) == len(second)
        tried = max(held, key=lambda d: d.attempts)
        assert "ConnectError" in tried.last_error and tried.last_status_code == 0
        receiver.start()
        await eventually(lambda: got() >= first | second, 30, "the missed events")
        bodies = verified(receiver.snapshot(), hook.secret)
        ids = [b["_id"] for b in bodies]
        assert len(ids) == len(set(ids)), "a webhook-id came twice"
        assert got() == first | second
        sample = next(b for b in bodies if b["data"]["status"] == "COMPLETED")
        assert sample["type"] == "run.status_changed" and sample["timestamp"].endswith("Z")
        dead_deliveries = (
            await stub.ListWebhookDeliveries(
                pb.ListWebhookDeliveriesRequest(webhook_id=dead.webhook_id, page_size=5),
                metadata=md(tenant),
            )
        ).deliveries
        assert len(dead_deliveries) == 5
        assert all(d.status == pb.WEBHOOK_DELIVERY_STATUS_PENDING for d in dead_deliveries)


async def test_subscriptions_filter_by_event_type_and_labels(
    tmp_path: Path, database_url: str, tenant: str, receiver: Receiver
) -> None:
    settings = make_settings(
        tmp_path, database_url, http_allow="127.0.0.1/32", webhook_poll_seconds=0.2
    )
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        hook = await create(
            stub, tenant, receiver.url, event_types=["step.failed"], labels={"team": "pay"}
        )
        failing = pb.ExecutablePlan()
        failing.CopyFrom(echo_plan(1))
        failing.flows[0].steps[0].tool = "core.fail"
        failing.security_context.allowed_tools[:] = ["core.fail"]
        for labels in ({"team": "pay"}, {"team": "ops"}):
            await stub.Execute(
                pb.ExecuteRequest(executable_plan=failing, labels=labels, async_execution=False),
                metadata=md(tenant),
            )
        await eventually(lambda: len(receiver.snapshot()) >= 1, 15, "the step failure")
        await asyncio.sleep(1.0)
        bodies = verified(receiver.snapshot(), hook.secret)
        assert [(b["type"], b["data"]["labels"]) for b in bodies] == [
            ("step.failed", {"team": "pay"})
        ]


@pytest.mark.subprocess
def test_a_sigkill_while_deliveries_are_due_loses_none(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    tenant = str(uuid.uuid4())
    env = {
        "ORCHESTRATOR_HTTP_ALLOW": "127.0.0.1/32",
        "ORCHESTRATOR_WEBHOOK_MAX_BACKOFF_SECONDS": "1",
        "ORCHESTRATOR_WEBHOOK_POLL_SECONDS": "0.2",
        "ORCHESTRATOR_REPLICA_ID": "r1",
        # An attempt the SIGKILL cut off waits out its lease (timeout x 20 + 30 s) before it
        # is made again, holding its subscription's later deliveries behind it.
        "ORCHESTRATOR_WEBHOOK_TIMEOUT_SECONDS": "0.5",
    }
    port = free_port()
    proc = ServeProcess(database_url, tmp_path / "r1.log", port=port, env=env)
    try:
        proc.wait_serving()
        from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

        with grpc.insecure_channel(proc.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            hook = stub.CreateWebhook(
                pb.CreateWebhookRequest(webhook=pb.Webhook(url=receiver.url)),
                metadata=md(tenant),
            ).webhook
            receiver.stop()
            run_ids = [
                stub.Execute(
                    pb.ExecuteRequest(executable_plan=echo_plan(1), async_execution=False),
                    metadata=md(tenant),
                ).run_id
                for _ in range(10)
            ]
        proc.signal(signals.SIGKILL)
        proc.wait()
        receiver.start()
        proc = ServeProcess(database_url, tmp_path / "r1.log", port=port, env=env)
        proc.wait_serving()
        deadline = time.monotonic() + 0.5 * 20 + 30 + 15  # the lease of a cut-off attempt
        statuses = ("PENDING", "RUNNING", "COMPLETED")
        expected = {(run_id, status) for run_id in run_ids for status in statuses}
        while True:
            bodies = verified(receiver.snapshot(), hook.secret)
            got = {(b["data"]["run_id"], b["data"]["status"]) for b in bodies}
            if got >= expected:
                break
            assert time.monotonic() < deadline, f"missing {sorted(expected - got)[:5]}"
            time.sleep(0.1)
        assert got == expected
        assert all(b["type"] == "run.status_changed" for b in bodies)
    finally:
        proc.kill()


async def deliveries_of(url: str, run_id: str) -> int:
    """The deliveries queued for the run's changes, as the store has them."""
    sql = "SELECT count(*) AS n FROM webhook_deliveries WHERE run_id = $1"
    return int((await asyncio.to_thread(fetch, url, sql, run_id))[0]["n"])


async def run_once(stub: Stub, tenant: str) -> str:
    done = await stub.Execute(
        pb.ExecuteRequest(executable_plan=echo_plan(1), async_execution=False),
        metadata=md(tenant),
    )
    assert done.status == pb.EXECUTION_STATUS_COMPLETED
    return done.run_id


async def test_the_status_change_after_a_subscription_changes_sees_it(
    tmp_path: Path, database_url: str, tenant: str, receiver: Receiver
) -> None:
    """Subscriptions are kept between lookups, yet the first run after a subscription is
    created is announced, the first after it is deleted is not, and one deleted behind the
    server's back (no notice) only costs its deliveries, never a run."""
    settings = make_settings(tmp_path, database_url, http_allow="127.0.0.1/32")
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

        stub: Stub = pb_grpc.OrchestratorServiceStub(channel)
        before = await run_once(stub, tenant)  # the tenant's subscriptions (none) are kept
        assert await deliveries_of(database_url, before) == 0
        hook = await create(stub, tenant, receiver.url)
        heard = await run_once(stub, tenant)
        # Created, started, completed: each status change announced.
        assert await deliveries_of(database_url, heard) == 3
        await stub.DeleteWebhook(
            pb.DeleteWebhookRequest(webhook_id=hook.webhook_id), metadata=md(tenant)
        )
        assert await deliveries_of(database_url, await run_once(stub, tenant)) == 0

        await create(stub, tenant, receiver.url)
        assert await deliveries_of(database_url, await run_once(stub, tenant)) == 3
        # Gone from the store with no word to the server: the kept subscription is stale.
        await asyncio.to_thread(fetch, database_url, "DELETE FROM webhook_deliveries")
        await asyncio.to_thread(fetch, database_url, "DELETE FROM webhooks")
        assert await deliveries_of(database_url, await run_once(stub, tenant)) == 0


@pytest.mark.postgres
async def test_a_subscription_made_on_one_replica_is_heard_on_the_other(
    tmp_path: Path, tenant: str, receiver: Receiver
) -> None:
    url = postgres_database()
    try:
        one = make_settings(tmp_path, url, replica_id="one", http_allow="127.0.0.1/32")
        two = make_settings(tmp_path, url, replica_id="two", http_allow="127.0.0.1/32")
        async with (
            running(one) as first,
            running(two) as second,
            grpc.aio.insecure_channel(first.address) as ch1,
            grpc.aio.insecure_channel(second.address) as ch2,
        ):
            from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

            on_one: Stub = pb_grpc.OrchestratorServiceStub(ch1)
            on_two: Stub = pb_grpc.OrchestratorServiceStub(ch2)
            await run_once(on_two, tenant)  # replica two keeps "no subscriptions"
            await create(on_one, tenant, receiver.url)
            # Replica two hears of it by notice, well within SUBSCRIPTIONS_TTL.
            deadline = time.monotonic() + 5
            while not await deliveries_of(url, await run_once(on_two, tenant)):
                assert time.monotonic() < deadline, "replica two never heard of the webhook"
                await asyncio.sleep(0.05)
    finally:
        drop_postgres_database(url)
