"""Fair share (issue 21): tenant A keeps every step slot it may busy with slow steps (an
`http.request` to a loopback server that answers after a while) and a backlog behind them;
tenant B runs one-step runs one after another. Figures: B's latency (p50,
p99; the target is p99 under 200 ms, where first come, first served made it 15 s), and A's
throughput with B beside it against A alone (it may drop by at most B's share). On SQLite with
one replica, and on PostgreSQL with two replicas sharing the store."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from bench.common import (
    Figure,
    echo_plan,
    md,
    percentile,
    pg_available,
    pg_database,
    record,
    serve,
    table,
)
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

SLOTS = 64


@dataclass
class Scale:
    a_runs: int = 500  # A's backlog per replica: enough for both phases
    a_step_seconds: float = 5.0  # each of A's steps holds a slot this long
    phase_seconds: float = 10.0  # whole waves of A's steps: a multiple of a_step_seconds

    @classmethod
    def quick(cls) -> Scale:
        return cls(a_runs=300, a_step_seconds=3.0, phase_seconds=6.0)


@contextlib.contextmanager
def _slow_server(seconds: float) -> Iterator[str]:
    """A loopback HTTP server that answers every GET after `seconds`; yields its URL."""

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(seconds)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 1024  # every slot of every replica connects at once
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _slow_plan(url: str) -> pb.ExecutablePlan:
    plan = echo_plan(1)
    step = plan.flows[0].steps[0]
    step.tool = "http.request"
    step.parameters.Clear()
    step.parameters.update({"url": url, "timeout_seconds": 60})
    plan.security_context.allowed_tools[:] = ["http.request"]
    plan.security_context.required_capabilities[:] = ["network.http"]
    return plan


def _completed(stub: pb_grpc.OrchestratorServiceStub, tenant: str) -> int:
    """A's completed runs so far (counted from the store)."""
    total, token = 0, ""
    while True:
        page = stub.ListExecutions(
            pb.ListExecutionsRequest(
                page_size=500,
                page_token=token,
                filter=pb.ExecutionFilter(statuses=[pb.EXECUTION_STATUS_COMPLETED]),
            ),
            metadata=md(tenant),
            timeout=60,
        )
        total += len(page.executions)
        token = page.next_page_token
        if not token:
            return total


def _measure(addresses: list[str], url: str, scale: Scale) -> tuple[list[float], float, float]:
    """(B's latencies, A's runs/s alone, A's runs/s with B beside it)."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    channels = [grpc.insecure_channel(address) for address in addresses]
    stubs = [pb_grpc.OrchestratorServiceStub(channel) for channel in channels]
    try:
        slow = _slow_plan(url)

        def submit(i: int) -> None:
            stubs[i % len(stubs)].Execute(
                pb.ExecuteRequest(executable_plan=slow), metadata=md(a), timeout=60
            )

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(submit, range(scale.a_runs * len(stubs))))
        time.sleep(1.0)  # every slot A may have is busy, a backlog behind
        start = _completed(stubs[0], a)
        time.sleep(scale.phase_seconds)
        alone = (_completed(stubs[0], a) - start) / scale.phase_seconds
        quick = echo_plan(1)
        latencies: list[float] = []
        stop = threading.Event()

        def b_loop(stub: pb_grpc.OrchestratorServiceStub) -> None:
            while not stop.is_set():
                began = time.perf_counter()
                stub.Execute(
                    pb.ExecuteRequest(executable_plan=quick, async_execution=False),
                    metadata=md(b),
                    timeout=60,
                )
                latencies.append(time.perf_counter() - began)

        workers = [threading.Thread(target=b_loop, args=(stub,)) for stub in stubs]
        start = _completed(stubs[0], a)
        for worker in workers:
            worker.start()
        time.sleep(scale.phase_seconds)
        beside = (_completed(stubs[0], a) - start) / scale.phase_seconds
        stop.set()
        for worker in workers:
            worker.join()
        return latencies, alone, beside
    finally:
        for channel in channels:
            channel.close()


@contextlib.contextmanager
def _replicas(database_url: str | None, count: int) -> Iterator[list[str]]:
    env = {
        "ORCHESTRATOR_EXECUTE_RATE": "100000",
        "ORCHESTRATOR_EXECUTE_BURST": "100000",
        "ORCHESTRATOR_HTTP_ALLOW": "127.0.0.1/32",
    }
    with contextlib.ExitStack() as stack:
        addresses = []
        for i in range(count):
            args = ("--max-steps-in-flight", str(SLOTS), "--replica-id", f"bench-{i}")
            address, _ = stack.enter_context(serve(database_url, *args, **env))
            addresses.append(address)
        yield addresses


def run(scale: Scale, *, postgres: bool = True) -> None:
    print(
        f"== fair share: A keeps {SLOTS} slots per replica busy with {scale.a_step_seconds:.0f} s"
        " steps and a backlog; B runs one-step runs back to back"
    )
    rows = [("store", "B p50", "B p99", "A alone", "A beside B", "A's drop")]
    setups: list[tuple[str, str | None, int]] = [("SQLite, 1 replica", None, 1)]
    if postgres and pg_available():
        setups.append(("PostgreSQL, 2 replicas", "pg", 2))
    for name, store, count in setups:
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(pg_database()) if store == "pg" else None
            addresses = stack.enter_context(_replicas(url, count))
            slow = stack.enter_context(_slow_server(scale.a_step_seconds))
            latencies, alone, beside = _measure(addresses, slow, scale)
        p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
        drop = 1 - beside / alone if alone else float("nan")
        rows.append(
            (
                name,
                f"{p50 * 1000:.1f} ms",
                f"{p99 * 1000:.1f} ms",
                f"{alone:.1f} runs/s",
                f"{beside:.1f} runs/s",
                f"{drop:.0%}",
            )
        )
        record(
            Figure(
                f"fair share, {name}: B p99 beside a saturating A",
                p99,
                "ms",
                target="< 200 ms",
                met=p99 < 0.2,
            )
        )
        record(
            Figure(
                f"fair share, {name}: A's throughput drop with B beside it",
                drop * 100,
                "%",
                target="<= B's share (50%)",
                met=drop <= 0.5,
            )
        )
    print(table(rows))
