"""End to end: N runs of a 3-step core.echo plan submitted concurrently; the time until every
one is COMPLETED, seen through WatchExecutions (a status-filtered stream per tenant, so
completion is pushed, not polled). On SQLite and on PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc

from bench.common import (
    Figure,
    Window,
    channels,
    echo_plan,
    md,
    percentile,
    pg_available,
    pg_database,
    record,
    serve,
    summary,
    tenants,
)
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

STEPS = 3
TERMINAL = (
    pb.EXECUTION_STATUS_COMPLETED,
    pb.EXECUTION_STATUS_FAILED,
    pb.EXECUTION_STATUS_CANCELLED,
)


@dataclass
class Scale:
    runs: int = 2000
    tenants: int = 8  # Execute is rate-limited per tenant (200/s, burst 400): stay in the burst
    in_flight: int = 256  # Execute calls outstanding at once
    timeout: float = 240.0

    @classmethod
    def quick(cls) -> Scale:
        return cls(runs=500)


# This run's runs/s by database label, for the benches that compare with it (bench/versus_dbos.py).
RATES: dict[str, float] = {}


@dataclass
class Batch:
    """What happened to a batch of runs."""

    runs: int
    submitted_in: float  # first Execute sent -> last Execute answered
    seconds: float  # first Execute sent -> last terminal status received
    completed: int
    other: int  # FAILED or CANCELLED
    latencies: list[float] = field(default_factory=list)  # Execute sent -> terminal received
    retries: int = 0  # Execute refused with RESOURCE_EXHAUSTED and retried
    threads: str = ""  # the server's CPU by thread while the batch ran

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        return (
            f"{self.completed}/{self.runs} completed ({self.other} failed/cancelled) in "
            f"{self.seconds:.1f} s = {self.rate:,.0f} runs/s, "
            f"{self.rate * STEPS * 2:,.0f} step transitions/s; all accepted after "
            f"{self.submitted_in:.1f} s; submit-to-done {summary(self.latencies)}"
            + (f"; {self.retries} rate-limited retries" if self.retries else "")
            + (f"\n    {self.threads}" if self.threads else "")
        )


async def complete_runs(
    address: str | list[str],
    runs: int,
    n_tenants: int,
    in_flight: int,
    limit: float,
    pid: int = 0,
) -> Batch:
    """`runs` runs submitted (round robin over the addresses' channels), watched to the end."""
    addresses = [address] if isinstance(address, str) else address
    chans = [c for a in addresses for c in channels(a, max(1, 4 // len(addresses)))]
    stubs = [pb_grpc.OrchestratorServiceStub(c) for c in chans]
    request = pb.ExecuteRequest(executable_plan=echo_plan(STEPS))
    names = tenants(n_tenants)
    done: dict[str, tuple[float, int]] = {}  # run_id -> (received at, status)
    sent: dict[str, float] = {}
    warm: dict[str, asyncio.Event] = {t: asyncio.Event() for t in names}
    warm_runs: dict[str, set[str]] = {t: set() for t in names}
    finished = asyncio.Event()
    flt = pb.ExecutionFilter(statuses=TERMINAL)

    async def follow(t: int, tenant: str) -> None:
        stream = stubs[t % len(stubs)].WatchExecutions(
            pb.WatchExecutionsRequest(filter=flt), metadata=md(tenant)
        )
        async for item in stream:
            event = item.event
            if event.type == pb.EVENT_TYPE_HEARTBEAT:
                continue
            if event.run_id in warm_runs[tenant]:
                warm[tenant].set()
                continue
            if event.run_id not in done:
                done[event.run_id] = (time.monotonic(), event.execution.status)
                if len(done) >= runs:
                    finished.set()

    followers = [asyncio.create_task(follow(t, tenant)) for t, tenant in enumerate(names)]
    # A run per tenant first, awaited through the stream, so every stream is live before the
    # measured batch starts. A stream starts from "now" once the server handles it: a warm-up
    # run that finished before that is not seen, so another one goes after it.
    for t, tenant in enumerate(names):
        for _ in range(30):
            reply = await stubs[t % len(stubs)].Execute(request, metadata=md(tenant))
            warm_runs[tenant].add(reply.run_id)
            try:
                await asyncio.wait_for(warm[tenant].wait(), 2)
                break
            except TimeoutError:
                continue

    gate = asyncio.Semaphore(in_flight)
    retries = 0

    async def submit(i: int) -> None:
        nonlocal retries
        tenant = names[i % len(names)]
        async with gate:
            for _ in range(100):
                t0 = time.monotonic()
                try:
                    reply = await stubs[i % len(stubs)].Execute(
                        request, metadata=md(tenant), timeout=60
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    retries += 1
                    await asyncio.sleep(0.1)
                    continue
                sent[reply.run_id] = t0
                return

    start = time.monotonic()
    window = Window(pid)
    await asyncio.gather(*(submit(i) for i in range(runs)))
    submitted = time.monotonic() - start
    try:
        await asyncio.wait_for(finished.wait(), limit)
    except TimeoutError:
        pass
    threads = window.describe()
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for c in chans:
        await c.close()
    ours = {r: v for r, v in done.items() if r in sent}
    last = max((at for at, _ in ours.values()), default=time.monotonic())
    completed = sum(1 for _, s in ours.values() if s == pb.EXECUTION_STATUS_COMPLETED)
    return Batch(
        runs=runs,
        submitted_in=submitted,
        seconds=last - start,
        completed=completed,
        other=len(ours) - completed,
        latencies=[at - sent[r] for r, (at, _) in ours.items()],
        retries=retries,
        threads=threads,
    )


def measure(label: str, database_url: str | None, scale: Scale, target: float) -> None:
    with serve(database_url) as (address, pid):
        batch = asyncio.run(
            complete_runs(address, scale.runs, scale.tenants, scale.in_flight, scale.timeout, pid)
        )
    print(f"  {label}: {batch.describe()}")
    RATES[label] = batch.rate
    rate_ok = batch.rate >= target and batch.completed == batch.runs
    record(
        Figure(
            f"end-to-end runs/s ({label})",
            batch.rate,
            "runs/s",
            ceiling="echo_unary",
            target=f"≥ {target:.0f}",
            met=rate_ok,
        )
    )
    record(
        Figure(
            f"step transitions/s ({label})",
            batch.rate * STEPS * 2,
            "trans/s",
            ceiling="sqlite_commit" if label == "SQLite" else "pg_commit",
        )
    )
    record(Figure(f"submit-to-done p99 ({label})", percentile(batch.latencies, 0.99), "ms"))


def two_replicas(database_url: str, scale: Scale) -> None:
    """The same batch sent to two replicas on this machine, against one: contention must
    not make two slower than one (issue 13)."""
    with contextlib.ExitStack() as stack:
        served = [
            stack.enter_context(serve(database_url, "--replica-id", f"e2e-{i}")) for i in range(2)
        ]
        batch = asyncio.run(
            complete_runs(
                [address for address, _ in served],
                scale.runs,
                scale.tenants,
                scale.in_flight,
                scale.timeout,
            )
        )
    label = "PostgreSQL, 2 replicas"
    print(f"  {label}: {batch.describe()}")
    RATES[label] = batch.rate
    one = RATES.get("PostgreSQL", 0.0)
    ratio = batch.rate / one if one else float("nan")
    print(f"  two replicas / one: {ratio:.2f}x (target ≥ 1)")
    record(
        Figure(
            "end-to-end, 2 PostgreSQL replicas / 1",
            ratio,
            "x",
            target="≥ 1",
            met=ratio >= 1 and batch.completed == batch.runs,
        )
    )


def run(scale: Scale, postgres: bool = True) -> None:
    print(f"== end to end: {scale.runs} runs of a {STEPS}-step core.echo plan")
    measure("SQLite", None, scale, 500)
    if postgres and pg_available():
        with pg_database() as url:
            measure("PostgreSQL", url, scale, 300)
        with pg_database() as url:
            two_replicas(url, scale)
    elif postgres:
        print("  PostgreSQL: not reachable, skipped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale()
    if args.runs:
        scale.runs = args.runs
    run(scale, postgres=not args.no_postgres)


if __name__ == "__main__":
    main()
