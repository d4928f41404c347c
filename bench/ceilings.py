"""Ceilings measured in the same run on the same machine: what a trivial grpc.aio echo server
does with the same options and the same client harness, and what the SQL driver commits."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import struct
import tempfile
import time
from dataclasses import dataclass

import sqlalchemy as sa

from bench.accept import accept_load
from bench.common import (
    CEILINGS,
    Figure,
    Load,
    Window,
    channels,
    closed_loop,
    echo_plan,
    percentile,
    pg_available,
    pg_database,
    record,
    serve_echo,
    summary,
)
from bench.echo_server import HEADER, SERVICE
from orchestrator.server.store.database import Database
from orchestrator.v1 import orchestrator_pb2 as pb


@dataclass
class Scale:
    """How long and how big: the full run and `--quick`."""

    seconds: float = 5.0
    fanout_subscribers: int = 1000
    burst_steps: int = 30  # events come in pairs every 50 ms, as in watch_fanout's run
    paced_steps: int = 10  # pairs every 300 ms: each event fans out alone
    db_seconds: float = 3.0

    @classmethod
    def quick(cls) -> Scale:
        return cls(seconds=2.0, burst_steps=15, paced_steps=5, db_seconds=1.5)


def ceiling(key: str, name: str, value: float, unit: str) -> None:
    CEILINGS[key] = record(Figure(name, value, unit))


# ---------------------------------------------------------------- gRPC echo


async def echo_unary(address: str, pid: int, callers: int, seconds: float) -> Load:
    chans = channels(address, 4)
    calls = [c.unary_unary(f"/{SERVICE}/Unary") for c in chans]
    # About the size of an Execute request of the bench plan.
    body = pb.ExecuteRequest(executable_plan=echo_plan()).SerializeToString()
    try:
        return await closed_loop(lambda i: calls[i % len(calls)](body), callers, seconds, pid=pid)
    finally:
        for c in chans:
            await c.close()


async def echo_stream(address: str, pid: int, seconds: float) -> Load:
    """4 concurrent streams of 500 messages of 400 bytes each, back to back; a "call" is one
    message."""
    chans = channels(address, 4)
    calls = [c.unary_stream(f"/{SERVICE}/Stream") for c in chans]
    request = struct.pack("<II", 500, 400)
    received = 0

    async def one(i: int) -> None:
        nonlocal received
        async for _ in calls[i % len(calls)](request):
            received += 1

    loop = asyncio.get_running_loop()
    await asyncio.gather(*(one(i) for i in range(4)))  # warm up
    received = 0
    start = loop.time()
    stop = start + seconds
    from bench.common import cpu_seconds

    cpu0 = cpu_seconds(pid)

    async def caller(i: int) -> None:
        while loop.time() < stop:
            await one(i)

    await asyncio.gather(*(caller(i) for i in range(4)))
    elapsed = loop.time() - start
    cpu = cpu_seconds(pid) - cpu0
    for c in chans:
        await c.close()
    return Load(received, elapsed, [], server_cpu=cpu)


@dataclass
class Fanout:
    """Delivery latencies (publish to receipt) of a broadcast to many subscribers."""

    latencies: list[float]
    deliveries: int
    seconds: float

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        return (
            f"{self.deliveries} deliveries, publish-to-delivery {summary(self.latencies)}, "
            f"{self.rate:,.0f} messages/s delivered over {self.seconds:.2f} s"
        )


async def echo_fanout(address: str, subscribers: int, pairs: int, interval: float) -> Fanout:
    """`subscribers` streams over 4 channels; then `pairs` pairs of publications every
    `interval` seconds (the cadence of a run's step events), then a last one that ends them."""
    chans = channels(address, 4)
    subscribe = [c.unary_stream(f"/{SERVICE}/Subscribe") for c in chans]
    publish = chans[0].unary_unary(f"/{SERVICE}/Publish")
    payload = b"\x00" + b"e" * 400  # about an ExecutionEvent with a one-step delta
    latencies: list[float] = []
    connected = 0
    ready = asyncio.Event()
    first = last = 0.0

    async def subscriber(i: int) -> None:
        nonlocal connected, first, last
        async for message in subscribe[i % len(subscribe)](b""):
            now = time.time()
            (stamp,) = HEADER.unpack_from(message)
            if stamp == 0.0:
                connected += 1
                if connected == subscribers:
                    ready.set()
                continue
            first = first or now
            last = now
            latencies.append(now - stamp)

    tasks = [asyncio.create_task(subscriber(i)) for i in range(subscribers)]
    await asyncio.wait_for(ready.wait(), 120)
    for _ in range(pairs):
        await publish(payload)
        await publish(payload)
        await asyncio.sleep(interval)
    await publish(b"\x01" + payload[1:])
    await asyncio.wait_for(asyncio.gather(*tasks), 300)
    for c in chans:
        await c.close()
    return Fanout(latencies, len(latencies), max(last - first, 1e-9))


# ---------------------------------------------------------------- SQL commits


bench_rows = sa.Table(
    "bench_rows",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


async def commits(url: str, rows_per_commit: int, seconds: float) -> tuple[float, float]:
    """(commits/s, rows/s) through the server's own engine setup (Database.writer: the same
    driver, pragmas and BEGIN), Core inserts, one transaction after another."""
    db = Database(url)
    try:
        async with db.writer.begin() as conn:
            await conn.run_sync(bench_rows.metadata.create_all)
        row = {"run_id": "0" * 36, "payload": b"p" * 300, "created_at": 0.0}
        batch = [row] * rows_per_commit
        n = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < seconds:
            async with db.writer.begin() as conn:
                if rows_per_commit == 1:
                    await conn.execute(sa.insert(bench_rows).values(row))
                else:
                    await conn.execute(sa.insert(bench_rows), batch)
            n += 1
        elapsed = loop.time() - start
        return n / elapsed, n * rows_per_commit / elapsed
    finally:
        await db.close()


def raw_sqlite_commits(path: str, seconds: float) -> float:
    """Plain sqlite3 on the event loop's thread, same pragmas: what the disk allows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE IF NOT EXISTS raw (id INTEGER PRIMARY KEY, p BLOB, t REAL)")
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO raw (p, t) VALUES (?, ?)", (b"p" * 300, 0.0))
        conn.execute("COMMIT")
        n += 1
    elapsed = time.monotonic() - start
    conn.close()
    return n / elapsed


# ---------------------------------------------------------------- run


def run(scale: Scale, postgres: bool = True) -> None:
    print("== ceilings: trivial grpc.aio echo server (same options, same harness)")
    with serve_echo() as (address, pid):
        load = asyncio.run(echo_unary(address, pid, 64, scale.seconds))
        print(f"  unary, 64 callers / 4 channels: {load.describe()}")
        ceiling("echo_unary", "echo unary calls/s", load.rate, "calls/s")
        ceiling("echo_unary_p50", "echo unary p50 @64", load.p50, "ms")
        ceiling("echo_unary_p99", "echo unary p99 @64", load.p99, "ms")
        load = asyncio.run(accept_load(address, pid, 64, scale.seconds))
        print(
            f"  Execute that does nothing (the contract's headers), 64 callers: {load.describe()}"
        )
        ceiling("execute_floor", "Execute floor calls/s", load.rate, "calls/s")
        ceiling("execute_floor_p99", "Execute floor p99 @64", load.p99, "ms")
        load = asyncio.run(echo_unary(address, pid, 1, scale.seconds / 2))
        print(f"  unary, 1 caller: {load.describe()}")
        ceiling("echo_serial_p50", "echo unary p50 @1", load.p50, "ms")
        ceiling("echo_serial_p99", "echo unary p99 @1", load.p99, "ms")
        load = asyncio.run(echo_stream(address, pid, scale.seconds))
        print(f"  server streaming, 4 streams: {load.describe('messages')}")
        ceiling("echo_stream", "echo streamed msgs/s", load.rate, "msgs/s")
    for mode, pairs, interval in (
        ("paced", scale.paced_steps + 1, 0.3),
        ("burst", scale.burst_steps + 1, 0.05),
    ):
        # A fresh server each time, as watch_fanout gets a fresh orchestrator.
        with serve_echo() as (address, pid):
            window = Window(pid)
            fan = asyncio.run(echo_fanout(address, scale.fanout_subscribers, pairs, interval))
            used = window.describe()
        print(
            f"  fan-out to {scale.fanout_subscribers} ({mode}, pairs every {interval} s): "
            f"{fan.describe()}\n    {used}"
        )
        ceiling(f"echo_fanout_{mode}_p50", f"echo fan-out {mode} p50", fan.p50, "ms")
        ceiling(f"echo_fanout_{mode}_p99", f"echo fan-out {mode} p99", fan.p99, "ms")
        ceiling(f"echo_fanout_{mode}_rate", f"echo fan-out {mode} msgs/s", fan.rate, "msgs/s")

    print("== ceilings: SQL commits through SQLAlchemy Core (the server's engine setup)")
    window = Window(None)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/ceiling.db"
        one, _ = asyncio.run(commits(url, 1, scale.db_seconds))
        many, rows = asyncio.run(commits(url, 100, scale.db_seconds))
        raw = raw_sqlite_commits(f"{tmp}/raw.db", scale.db_seconds / 2)
    print(
        f"  SQLite + aiosqlite: {one:,.0f} commits/s (1 row each); "
        f"{many:,.0f} commits/s of 100 rows = {rows:,.0f} rows/s; raw sqlite3 {raw:,.0f}/s"
    )
    print(f"    {window.describe()}")
    ceiling("sqlite_commit", "SQLite commits/s (1 row)", one, "commits/s")
    ceiling("sqlite_rows", "SQLite rows/s (100/commit)", rows, "rows/s")
    if postgres and pg_available():
        window = Window(None)
        with pg_database() as url:
            one, _ = asyncio.run(commits(url, 1, scale.db_seconds))
            many, rows = asyncio.run(commits(url, 100, scale.db_seconds))
        print(
            f"  PostgreSQL + asyncpg: {one:,.0f} commits/s (1 row each); "
            f"{many:,.0f} commits/s of 100 rows = {rows:,.0f} rows/s"
        )
        print(f"    {window.describe()} (PostgreSQL's own processes count as other)")
        ceiling("pg_commit", "PG commits/s (1 row)", one, "commits/s")
        ceiling("pg_rows", "PG rows/s (100/commit)", rows, "rows/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    run(Scale.quick() if args.quick else Scale(), postgres=not args.no_postgres)


if __name__ == "__main__":
    main()
