"""Prometheus metrics (DESIGN §8), one registry per server so tests can run several."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from orchestrator.server.store.writer import Change

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """What the server counts. Exposed on --metrics-port when it is set."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter("orchestrator_rpcs", "RPCs handled", ["method", "code"], registry=r)
        self.rpc_latency = Histogram(
            "orchestrator_rpc_duration_seconds",
            "RPC latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
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
        self.watchers = Gauge("orchestrator_watchers", "Open watch streams", registry=r)
        self.store_up = Gauge(
            "orchestrator_store_up", "1 while the store can be reached, else 0", registry=r
        )

    def watch_gauges(
        self,
        runs: Callable[[], float],
        watchers: Callable[[], float],
        store_up: Callable[[], float],
    ) -> None:
        """Gauges read at scrape time."""
        self.runs_in_flight.set_function(runs)
        self.watchers.set_function(watchers)
        self.store_up.set_function(store_up)

    def on_commit(self, changes: list[Change]) -> None:
        """Count runs by the status each commit moved them to."""
        for change in changes:
            if change.status_changed and change.status:
                self.run_transitions.labels(change.status).inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics on `port` (a thread of prometheus_client's)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
