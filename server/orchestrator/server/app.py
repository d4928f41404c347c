"""`build_server(settings)`: the one factory used by `orchestrator serve`, the tests and benches."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from orchestrator.server.api.connect import connect_application
from orchestrator.server.api.http import HttpApp, HttpListener
from orchestrator.server.api.interceptors import (
    CallInterceptor,
)
from orchestrator.server.api.servicer import OrchestratorServicer, register
from orchestrator.server.control import ControlPlane
from orchestrator.server.delivery import Deliverer
from orchestrator.server.engine import Engine
from orchestrator.server.errors import STORE_OUTAGES, PortUnavailable
from orchestrator.server.lifecycle import RunStatus
from orchestrator.server.metrics import Metrics
from orchestrator.server.sandbox import Sandbox
from orchestrator.server.schedule_control import ScheduleClock, ScheduleControl
from orchestrator.server.security import KeyRing, TenantPolicy
from orchestrator.server.settings import Settings
from orchestrator.server.store.cluster import ClusterBus, Handler
from orchestrator.server.store.database import Database
from orchestrator.server.store.journal import Journal
from orchestrator.server.store.notices import Notice, NoticeKind
from orchestrator.server.store.runs import RunStore
from orchestrator.server.store.schedules import ScheduleStore
from orchestrator.server.store.webhooks import Subscriptions, WebhookStore
from orchestrator.server.store.writer import Writer
from orchestrator.server.tokens import TokenCodec
from orchestrator.server.tools import ToolRegistry, default_registry
from orchestrator.server.tools.network import parse_networks
from orchestrator.server.tracing import tracing_on
from orchestrator.server.watch import Hub
from orchestrator.server.webhooks import WebhookControl
from orchestrator.v1 import orchestrator_pb2

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
log = structlog.get_logger("orchestrator.server")

# Long-lived watch streams behind proxies: ping idle connections so NATs and load balancers
# keep them, and accept clients that ping as often as every 10 s.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Calls the server has not picked up yet wait rather than being CANCELLED: gRPC's own
    # defaults (1,000, hard 3,000) cancelled most of 10,000 watch streams opened at once
    # instead of letting them reach the handler and its WATCH_LIMIT.
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 50_000),
    # gRPC's default SO_REUSEPORT let a second server bind a port already served, silently:
    # two processes answered as one replica. A taken port must fail the start instead.
    ("grpc.so_reuseport", 0),
]


def _connection_options(settings: Settings) -> list[tuple[str, int]]:
    """A connection older than the max age is sent GOAWAY, so long-lived clients open a new
    one and rebalance behind L4 balancers. Calls in flight keep the old one (no grace limit):
    a watch stream is not cut; new calls go to the new connection."""
    age_ms = int(settings.max_connection_age_seconds * 1000)
    return [("grpc.max_connection_age_ms", age_ms)] if age_ms > 0 else []


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS when a certificate is given; mutual TLS when a client CA is given too."""
    if not settings.tls_cert:
        return None
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class Server:
    """A running orchestrator: the grpc.aio server and what stands behind it."""

    settings: Settings
    grpc_server: grpc.aio.Server
    db: Database
    writer: Writer
    store: RunStore
    hub: Hub
    control: ControlPlane
    engine: Engine
    health: health.aio.HealthServicer
    port: int = 0
    bus: ClusterBus | None = None
    metrics: Metrics | None = None
    keys: KeyRing | None = None
    policy: TenantPolicy | None = None
    clock: ScheduleClock | None = None
    deliverer: Deliverer | None = None
    http: HttpListener | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _background: list[asyncio.Task[None]] = field(default_factory=list)
    _health_updates: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def http_address(self) -> str:
        """host:port of the HTTP listener ('' with --no-http)."""
        return f"{self.settings.host}:{self.http.port}" if self.http is not None else ""

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.http is not None:
            await self.http.start()
        if self.bus is not None:
            await self.bus.start()
        recovered = await self.engine.start()
        if self.clock is not None:
            self.clock.start()
        if self.deliverer is not None:
            self.deliverer.start()
        if self.metrics is not None and self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port, self.settings.host)
        if self.settings.retention_seconds > 0:
            self._background.append(asyncio.create_task(self._retention(), name="retention"))
        await self._serving(self.db.health.reachable)
        self.db.health.add_listener(self._store_reachable)
        self.db.health.start()
        log.info(
            "server.started",
            address=self.address,
            dashboard=f"http://{self.http_address}/" if self.http is not None else None,
            replica=self.engine.owner,
            database=self.db.url.render_as_string(),
            recovered_runs=recovered,
        )

    async def _serving(self, reachable: bool) -> None:
        """Health follows the store: NOT_SERVING while it cannot be reached (and for good
        once draining)."""
        if self._stopped.is_set():
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if reachable
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _store_reachable(self, reachable: bool) -> None:
        update = asyncio.get_running_loop().create_task(self._serving(reachable))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let calls and tool calls in flight finish
        within `grace`, hand the leases back."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.db.health.stop()
        for task in self._background:
            task.cancel()
        if self.clock is not None:
            await self.clock.stop()
        await asyncio.gather(
            self.grpc_server.stop(grace),
            self.engine.stop(grace),
            *([self.http.stop(grace)] if self.http is not None else []),
        )
        if self.deliverer is not None:
            await self.deliverer.stop()
        if self.bus is not None:
            await self.bus.stop()
        await self.writer.stop()
        await self.db.close()
        if self.metrics is not None:
            self.metrics.close()
        log.info("server.stopped")

    def reload(self) -> None:
        """Re-read the API keys and the tenant policy (SIGHUP). A broken file keeps the old."""
        for source in (self.keys, self.policy):
            if source is None:
                continue
            try:
                source.reload()
            except (OSError, ValueError, KeyError, TypeError):
                log.exception("server.reload_failed", path=str(source.path))

    async def wait(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _retention(self) -> None:
        """Delete finished runs older than the retention period, a batch at a time."""
        keep = self.settings.retention_seconds
        while True:
            try:
                pruned = await self.store.prune(time.time() - keep)
                if pruned:
                    log.info("retention.pruned", runs=pruned)
                    continue  # more may be due: go on at once
            except asyncio.CancelledError:
                raise
            except STORE_OUTAGES:
                pass  # logged once by the store's health; the next turn tries again
            except Exception:
                log.exception("retention.failed")
            await asyncio.sleep(min(max(keep / 10, 1.0), 60.0))


def on_cluster_message(hub: Hub, engine: Engine, subscriptions: Subscriptions) -> Handler:
    """What another replica's commit means here."""

    def handle(notices: list[Notice]) -> None:
        hub.on_remote(notices)
        for notice in notices:
            if notice.kind is NoticeKind.CONTROL:
                engine.control(notice.run_id, RunStatus(notice.status))
            elif notice.kind is NoticeKind.ANSWER and notice.answer is not None:
                engine.answered(notice.run_id, notice.clarification_id, notice.answer)
            elif notice.kind is NoticeKind.SIGNAL:
                engine.signalled(notice.run_id, notice.signal_name)
            elif notice.kind is NoticeKind.WEBHOOKS:
                subscriptions.dropped(notice.tenant_id)
            elif notice.kind in (NoticeKind.CLAIM, NoticeKind.RESYNC):
                engine.wake_claimer()
                if notice.kind is NoticeKind.RESYNC:
                    engine.signalled("", None)
                    subscriptions.dropped()
            if notice.kind is NoticeKind.CHANGE and notice.status_changed:
                engine.tenant_changed(notice.tenant_id)
            elif notice.kind is NoticeKind.RESYNC:
                engine.tenant_changed(None)

    return handle


def _enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Reflection v1alpha and v1. grpcio-reflection ships only v1alpha; v1 is the same protocol
    under a new package name (same messages, same field numbers), so one servicer serves both
    and grpcurl / buf curl, which ask for v1 first, need no fallback."""
    # v1 is served but not listed: its descriptors are not in the pool, and a listed service
    # that cannot be described breaks `buf curl --list-methods`.
    names = (*services, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection.enable_server_reflection(names, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )


async def build_server(
    settings: Settings,
    registry: ToolRegistry | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> Server:
    """Open the store (migrating it), wire the service and bind the port (0 = any free one).
    Tracing uses `tracer_provider`, else the global one (see tracing.configure_tracing)."""
    metrics = Metrics()
    keys = KeyRing(Path(settings.auth_keys)) if settings.auth_keys else None
    policy = TenantPolicy(Path(settings.tenant_policy)) if settings.tenant_policy else None
    # The same interceptor serves the gRPC port and the HTTP port (api/connect.py).
    rpc_interceptors: list[CallInterceptor] = [CallInterceptor(metrics, keys)]
    interceptors: list[grpc.aio.ServerInterceptor] = list(rpc_interceptors)
    if tracing_on(tracer_provider):
        # Off, the interceptor would still make a (no-op) span per call: 5-10% of Execute.
        interceptors.insert(0, aio_server_interceptor(tracer_provider=tracer_provider))  # type: ignore[no-untyped-call]
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            *SERVER_OPTIONS,
            *_connection_options(settings),
            ("grpc.max_receive_message_length", settings.max_request_bytes),
        ],
    )
    address = f"{settings.host}:{settings.port}"
    credentials = _credentials(settings)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as err:
        # grpc says only "Failed to bind"; with SO_REUSEPORT off that is a taken port or an
        # address this host does not have.
        raise PortUnavailable(address) from err
    replica = settings.replica_id or f"{socket.gethostname()}:{port}"
    # This process's incarnation: fencing compares it, so a restart under the same replica id
    # (or a second process given the same one) can never pass for the owner it replaces.
    incarnation = f"{replica}#{secrets.token_hex(6)}"
    db = Database(
        settings.database_url, stall_seconds=settings.lease_seconds, client_name=incarnation
    )
    await db.migrate()
    writer = Writer(
        db.writer,
        notify_channel=db.dialect.notify_channel,
        origin=incarnation,
        sync_engine=db.sync_writer,
        direct=db.direct,
        health=db.health,
        lanes=settings.writer_lanes,
        defer_writes=db.dialect.defers_writes,
    )
    writer.start()
    hub = Hub(settings.max_watchers_per_tenant)
    writer.add_listener(hub.on_commit)
    writer.add_listener(metrics.on_commit)
    store = RunStore(db, writer)
    tokens = TokenCodec(await store.signing_key())
    http_allow = parse_networks(settings.http_allow)
    registry = registry or default_registry(http_allow=http_allow)
    journal = Journal(store, owner=incarnation, replica_id=replica)
    engine = Engine(
        journal,
        registry,
        max_steps_in_flight=settings.max_steps_in_flight,
        step_slot_reserve=settings.step_slot_reserve,
        enabled=settings.execute,
        lease_seconds=settings.lease_seconds,
        park_after=settings.park_after_seconds,
        single_replica=db.dialect.single_replica,
        tracer=trace.get_tracer("orchestrator.engine", tracer_provider=tracer_provider),
        metrics=metrics,
        policy=policy,
        max_template_output_bytes=settings.max_template_output_bytes,
        max_value_depth=settings.max_struct_depth,
        expression_budget=settings.expression_budget_ms / 1000,
        sandbox=Sandbox(),
    )
    writer.on_batch = metrics.on_batch
    metrics.watch_gauges(
        runs=lambda: len(engine.runs),
        steps=lambda: engine.slots.held,
        steps_waiting=engine.slots.waiting,
        runs_waiting=engine.runs_waiting,
        watchers=lambda: hub.watchers,
        writer_queue=lambda: writer.queue_depth,
        store_up=lambda: float(db.health.reachable),
    )
    control = ControlPlane(settings, store, hub, tokens, registry, engine, journal, policy)
    bus = db.dialect.cluster_bus(
        db.url, incarnation, on_cluster_message(hub, engine, store.subscriptions)
    )
    schedules = ScheduleControl(control, ScheduleStore(store))
    clock = ScheduleClock(schedules, settings.schedule_poll_seconds)
    writer.add_listener(clock.on_commit)
    webhook_store = WebhookStore(db, writer, store.subscriptions)
    deliverer = Deliverer(
        webhook_store,
        allow=http_allow,
        timeout=settings.webhook_timeout_seconds,
        retry_seconds=settings.webhook_retry_seconds,
        max_backoff=settings.webhook_max_backoff_seconds,
        poll=settings.webhook_poll_seconds,
    )
    servicer = OrchestratorServicer(control, schedules, WebhookControl(webhook_store, http_allow))
    register(servicer, grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    _enable_reflection(grpc_server, (SERVICE_NAME, health.SERVICE_NAME))
    http = None
    if settings.http:
        connect = connect_application(servicer, rpc_interceptors, settings.max_request_bytes)
        origins = frozenset(o.strip() for o in settings.cors_origin.split(",") if o.strip())
        http = HttpListener(
            HttpApp(connect, connect.path, origins), settings.host, settings.http_port
        )
    return Server(
        settings=settings,
        grpc_server=grpc_server,
        db=db,
        writer=writer,
        store=store,
        hub=hub,
        control=control,
        engine=engine,
        health=health_servicer,
        port=port,
        bus=bus,
        deliverer=deliverer,
        metrics=metrics,
        keys=keys,
        policy=policy,
        clock=clock,
        http=http,
    )
