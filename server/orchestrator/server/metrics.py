"""Prometheus metrics (DESIGN §8), one registry per server so tests can run several.

The gRPC series use the names and labels of go-grpc-prometheus (and py-grpc-prometheus), so
stock gRPC dashboards and alerts read them as they are; the registry also carries the default
process, platform and GC collectors. `dashboards/orchestrator.json` is a Grafana dashboard
for all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.server.store.writer import Change

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Streams last minutes to hours: their own buckets, so they do not swamp the unary ones.
STREAM_BUCKETS = (0.1, 1, 10, 60, 300, 900, 1800, 3600, 7200, 14400)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
UNIT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class Metrics:
    """What the server counts. Exposed on --metrics-port when it is set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The default collectors live in the global registry; each exposes the process once.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)

        # gRPC server, by go-grpc-prometheus's names.
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", RPC_LABELS, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of success or failure.",
            (*RPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of unary RPCs handled by the server.",
            RPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stream_handling = Histogram(
            "grpc_server_stream_handling_seconds",
            "Duration of streaming RPCs handled by the server.",
            RPC_LABELS,
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "RPC messages received on the server.",
            RPC_LABELS,
            registry=r,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent", "gRPC messages sent by the server.", RPC_LABELS, registry=r
        )

        # The store's writer.
        self.commit_seconds = Histogram(
            "orchestrator_store_commit_seconds",
            "Time to run and commit one group commit",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.commit_units = Histogram(
            "orchestrator_store_commit_units",
            "Units of work per group commit",
            buckets=UNIT_BUCKETS,
            registry=r,
        )
        self.writer_queue = Gauge(
            "orchestrator_store_writer_queue_depth",
            "Units of work waiting for the writer",
            registry=r,
        )

        # The engine.
        self.run_transitions = Counter(
            "orchestrator_run_transitions", "Runs entering each status", ["status"], registry=r
        )
        self.step_duration = Histogram(
            "orchestrator_step_duration_seconds",
            "Step attempt duration by tool",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.takeovers = Counter(
            "orchestrator_lease_takeovers",
            "Runs claimed from a lapsed or released lease",
            registry=r,
        )
        self.runs_in_flight = Gauge(
            "orchestrator_runs_in_flight", "Runs this replica is executing", registry=r
        )
        self.steps_in_flight = Gauge(
            "orchestrator_steps_in_flight", "Tool calls under way on this replica", registry=r
        )
        self.watchers = Gauge("orchestrator_watchers", "Open watch streams", registry=r)
        self.store_up = Gauge(
            "orchestrator_store_up", "1 while the store can be reached, else 0", registry=r
        )

    def watch_gauges(
        self,
        *,
        runs: Callable[[], float],
        steps: Callable[[], float],
        watchers: Callable[[], float],
        writer_queue: Callable[[], float],
        store_up: Callable[[], float],
        steps_waiting: Callable[[], Mapping[str, int]] | None = None,
        runs_waiting: Callable[[], Mapping[tuple[str, str], int]] | None = None,
    ) -> None:
        """Gauges read at scrape time."""
        if steps_waiting is not None:
            self.registry.register(_TenantQueue(steps_waiting))
        if runs_waiting is not None:
            self.registry.register(_KeyQueue(runs_waiting))
        self.runs_in_flight.set_function(runs)
        self.steps_in_flight.set_function(steps)
        self.watchers.set_function(watchers)
        self.writer_queue.set_function(writer_queue)
        self.store_up.set_function(store_up)

    def on_commit(self, changes: list[Change]) -> None:
        """Count runs by the status each commit moved them to."""
        for change in changes:
            if change.status_changed and change.status:
                self.run_transitions.labels(change.status).inc()

    def on_batch(self, units: int, seconds: float, ok: bool) -> None:
        """A group commit ended: committed (`ok`), or failed to reach the database."""
        if ok:
            self.commit_seconds.observe(seconds)
            self.commit_units.observe(units)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on `port` (a thread of prometheus_client's)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()


class _TenantQueue(Collector):
    """`orchestrator_steps_waiting{tenant_id}`: steps waiting for a slot, per tenant, read at
    scrape time (only tenants with waiters: no series lingers for a tenant gone idle)."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_steps_waiting",
            "Steps waiting for a step slot on this replica, by tenant",
            labels=["tenant_id"],
        )
        for tenant, count in self._read().items():
            family.add_metric([tenant], count)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("orchestrator_steps_waiting", "", labels=["tenant_id"])


class _KeyQueue(Collector):
    """`orchestrator_runs_waiting{tenant_id, concurrency_key}`: runs this replica holds that
    wait PENDING on their concurrency key, read at scrape time."""

    def __init__(self, read: Callable[[], Mapping[tuple[str, str], int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "orchestrator_runs_waiting",
            "Runs waiting on their concurrency key on this replica, by tenant and key",
            labels=["tenant_id", "concurrency_key"],
        )
        for (tenant, key), count in self._read().items():
            family.add_metric([tenant, key], count)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "orchestrator_runs_waiting", "", labels=["tenant_id", "concurrency_key"]
        )
