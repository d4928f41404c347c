"""Reads with many runs stored: GetExecution p50/p99 and ListExecutions page latency
(page_size 50: the first page, and a deep page reached through page tokens).

The store is filled fast and faithfully: a real server executes one run, then its rows (run,
steps, events) are cloned N times straight into the SQLite file through the server's own
`Database` and schema tables, and a fresh server is started on that file."""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from bench.common import (
    Figure,
    Load,
    channels,
    closed_loop,
    echo_plan,
    md,
    record,
    serve,
)
from orchestrator.server.store.database import Database
from orchestrator.server.store.schema import events, runs, steps
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc


@dataclass
class Scale:
    runs: int = 100_000
    serial_calls: int = 1000
    concurrent_seconds: float = 5.0
    deep_pages: int = 1000  # the deep page is this many pages (x 50 runs) in

    @classmethod
    def quick(cls) -> Scale:
        return cls(runs=20_000, serial_calls=300, concurrent_seconds=2.0, deep_pages=200)


async def template_run(address: str, tenant: str) -> str:
    chan = channels(address, 1)[0]
    stub = pb_grpc.OrchestratorServiceStub(chan)
    reply = await stub.Execute(pb.ExecuteRequest(executable_plan=echo_plan()), metadata=md(tenant))
    for _ in range(600):
        got = await stub.GetExecution(
            pb.GetExecutionRequest(run_id=reply.run_id), metadata=md(tenant)
        )
        if got.execution.status == pb.EXECUTION_STATUS_COMPLETED:
            break
        await asyncio.sleep(0.05)
    await chan.close()
    return reply.run_id


async def clone(url: str, template: str, count: int, chunk: int = 5000) -> list[str]:
    """`count` copies of the template run (with its steps and events), newest last."""
    db = Database(url)
    try:
        async with db.reader.connect() as conn:
            run_row = dict(
                (await conn.execute(sa.select(runs).where(runs.c.run_id == template)))
                .mappings()
                .one()
            )
            step_rows = [
                dict(r)
                for r in (
                    await conn.execute(sa.select(steps).where(steps.c.run_id == template))
                ).mappings()
            ]
            event_rows = [
                dict(r)
                for r in (
                    await conn.execute(sa.select(events).where(events.c.run_id == template))
                ).mappings()
            ]
        del run_row["pk"]
        for e in event_rows:
            del e["id"]
        old = template.encode()
        ids: list[str] = []
        base = time.time() - count * 0.01
        for first in range(0, count, chunk):
            run_batch: list[dict[str, Any]] = []
            step_batch: list[dict[str, Any]] = []
            event_batch: list[dict[str, Any]] = []
            for i in range(first, min(first + chunk, count)):
                run_id = str(uuid.uuid4())
                ids.append(run_id)
                shift = base + i * 0.01 - run_row["created_at"]
                r = dict(run_row, run_id=run_id)
                for name in ("created_at", "started_at", "completed_at", "updated_at"):
                    if r[name] is not None:
                        r[name] += shift
                run_batch.append(r)
                step_batch.extend(dict(s, run_id=run_id) for s in step_rows)
                # Same length ids: swapping the bytes keeps the protobuf framing valid.
                event_batch.extend(
                    dict(e, run_id=run_id, payload=e["payload"].replace(old, run_id.encode()))
                    for e in event_rows
                )
            async with db.writer.begin() as conn:
                await conn.execute(sa.insert(runs), run_batch)
                await conn.execute(sa.insert(steps), step_batch)
                await conn.execute(sa.insert(events), event_batch)
        return ids
    finally:
        await db.close()


async def measure(address: str, pid: int, tenant: str, ids: list[str], scale: Scale) -> None:
    chans = channels(address, 4)
    stubs = [pb_grpc.OrchestratorServiceStub(c) for c in chans]
    meta = md(tenant)
    rng = random.Random(8)

    async def get(i: int) -> object:
        return await stubs[i % 4].GetExecution(
            pb.GetExecutionRequest(run_id=rng.choice(ids)), metadata=meta
        )

    async def serial(call: Any, n: int) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await call()
            out.append(time.perf_counter() - t0)
        return out

    for _ in range(50):
        await get(0)  # warm up connections and caches
    lat = await serial(lambda: get(0), scale.serial_calls)
    load = Load(len(lat), sum(lat), lat)
    print(f"  GetExecution, 1 caller: {load.describe()}")
    record(Figure("GetExecution p50 (1 caller)", load.p50, "ms", ceiling="echo_serial_p50"))
    record(
        Figure(
            "GetExecution p99 (1 caller)",
            load.p99,
            "ms",
            ceiling="echo_serial_p99",
            target="≤ 10 ms",
            met=load.p99 <= 0.010,
        )
    )
    load = await closed_loop(get, 16, scale.concurrent_seconds, pid=pid)
    print(f"  GetExecution, 16 callers / 4 channels: {load.describe()}")
    record(Figure("GetExecution calls/s (16 callers)", load.rate, "calls/s", ceiling="echo_unary"))
    record(Figure("GetExecution p99 (16 callers)", load.p99, "ms"))

    def page(token: str = "", flt: pb.ExecutionFilter | None = None) -> Any:
        return stubs[0].ListExecutions(
            pb.ListExecutionsRequest(page_size=50, page_token=token, filter=flt), metadata=meta
        )

    lat = await serial(lambda: page(), max(scale.serial_calls // 5, 50))
    first = Load(len(lat), sum(lat), lat)
    print(f"  ListExecutions first page (50): {first.describe('pages')}")
    token = ""
    walk: list[float] = []
    for _ in range(scale.deep_pages):
        t0 = time.perf_counter()
        reply = await page(token)
        walk.append(time.perf_counter() - t0)
        token = reply.next_page_token
        if not token:
            break
    depth = len(walk) * 50
    print(
        f"  walked {len(walk)} pages by token ({depth:,} runs deep): "
        f"{Load(len(walk), sum(walk), walk).describe('pages')}"
    )
    deep_lat = await serial(lambda: page(token), max(scale.serial_calls // 5, 50))
    deep = Load(len(deep_lat), sum(deep_lat), deep_lat)
    print(f"  ListExecutions page {depth:,} runs deep: {deep.describe('pages')}")
    done = pb.ExecutionFilter(statuses=[pb.EXECUTION_STATUS_COMPLETED])
    lat = await serial(lambda: page("", done), max(scale.serial_calls // 5, 50))
    filtered = Load(len(lat), sum(lat), lat)
    print(f"  ListExecutions first page, status filter: {filtered.describe('pages')}")
    for c in chans:
        await c.close()
    record(Figure("List first page p50", first.p50, "ms", ceiling="echo_serial_p50"))
    record(Figure("List first page p99", first.p99, "ms", ceiling="echo_serial_p99"))
    record(
        Figure(f"List page @{depth // 1000}k deep p99", deep.p99, "ms", ceiling="echo_serial_p99")
    )
    record(Figure("List filtered page p99", filtered.p99, "ms", ceiling="echo_serial_p99"))


def run(scale: Scale) -> None:
    print(f"== reads with {scale.runs:,} runs stored")
    tenant = str(uuid.uuid4())
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/reads.db"
        with serve(url) as (address, _pid):
            template = asyncio.run(template_run(address, tenant))
        t0 = time.monotonic()
        ids = asyncio.run(clone(url, template, scale.runs))
        print(
            f"  stored {len(ids):,} completed runs (with steps and events) "
            f"in {time.monotonic() - t0:.1f} s"
        )
        with serve(url) as (address, pid):
            asyncio.run(measure(address, pid, tenant, ids, scale))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale()
    if args.runs:
        scale.runs = args.runs
    run(scale)


if __name__ == "__main__":
    main()
