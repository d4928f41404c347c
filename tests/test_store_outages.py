"""A store outage is weather, not an error of a run (DESIGN §9, issue 12).

The real server (`orchestrator serve` in a subprocess, so its log is its own) runs 20 runs of
`core.wait` steps with a watcher on each while its PostgreSQL goes away for 10 s: cut off by a
TCP proxy the test controls, or stopped and started for real (a cluster of the test's own).
Every run completes, every step once, every watcher sees every event once; callers get
UNAVAILABLE `STORE_UNAVAILABLE` meanwhile, health says NOT_SERVING and comes back within 2 s.
On SQLite a full store (PRAGMA max_page_count) answers RESOURCE_EXHAUSTED `STORE_FULL` and
fails no run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import sqlalchemy as sa
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from orchestrator.client import OrchestratorClient
from orchestrator.server.tools import Tool, ToolContext, default_registry
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running, sqlite_url, until
from tests.outages import PostgresCluster, SmallDisk, TcpProxy
from tests.process import ServeProcess, free_port
from tests.stores import drop_postgres_database, postgres_database

RUNS = 20
CUT_SECONDS = 10.0
# The server's log is counted from the cut to this long after the store is back.
LOG_WINDOW = 1.0
# s1 ends during the cut (its outcome must wait for the store); s2 outlasts a PostgreSQL
# start and the log window after it, so the lines counted are the outage's, not the runs'.
PLAN = plan_of(
    {"stepId": "s1", "tool": "core.wait", "parameters": {"seconds": 2}},
    {"stepId": "s2", "tool": "core.wait", "parameters": {"seconds": 5}},
    {"stepId": "s3", "tool": "core.echo", "parameters": {"done": True}},
)
STEPS = ("s1", "s2", "s3")
HEALTH = health_pb2.HealthCheckResponse


def details(error: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    """The ErrorInfo reason and the RetryInfo delay of a failed call."""
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status details"
    reason, delay = "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, delay


@dataclass
class Watched:
    """What one watcher received: (monotonic time, event), and how its stream ended."""

    events: list[tuple[float, pb.ExecutionEvent]] = field(default_factory=list)
    ended: grpc.StatusCode | None = None


async def watch(
    stub: pb_grpc.OrchestratorServiceAsyncStub, tenant: str, run_id: str, watched: Watched
) -> None:
    """A raw WatchExecution stream (no client-side resume: it must stay attached)."""
    stream = stub.WatchExecution(pb.WatchExecutionRequest(run_id=run_id), metadata=md(tenant))
    try:
        async for response in stream:
            watched.events.append((time.monotonic(), response.event))
        watched.ended = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        watched.ended = error.code()


async def health_watch(address: str, seen: list[tuple[float, int]]) -> None:
    """Every status the overall health reports, with when it arrived."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async for reply in stream:
            seen.append((time.monotonic(), reply.status))


def started(watched: Watched, step_id: str) -> bool:
    """Whether the watcher saw the step start (or, in its snapshot, already under way)."""
    for _, event in watched.events:
        if event.type == pb.EVENT_TYPE_STEP_STARTED and event.step_id == step_id:
            return True
        if event.type == pb.EVENT_TYPE_SNAPSHOT and any(
            s.step_id == step_id and s.status != pb.STEP_STATUS_PENDING
            for s in event.execution.steps
        ):
            return True
    return False


@dataclass
class Figures:
    """What one outage looked like from outside."""

    not_serving_after: float = 0.0  # seconds from the cut to health NOT_SERVING
    serving_after: float = 0.0  # seconds from the store's return to health SERVING
    restoring: float = 0.0  # how long bringing the store back took (a PostgreSQL start)
    moving_after_restore_began: list[float] = field(default_factory=list)
    moving_after: list[float] = field(default_factory=list)  # per run: return to next event
    log_lines: list[str] = field(default_factory=list)  # the server's lines in the window
    unavailable: list[str] = field(default_factory=list)  # what callers got during the cut

    def summary(self) -> str:
        return (
            f"NOT_SERVING {self.not_serving_after:.2f} s after the cut; SERVING "
            f"{self.serving_after:.2f} s after the return; runs moving again within "
            f"{max(self.moving_after):.2f} s (median "
            f"{sorted(self.moving_after)[len(self.moving_after) // 2]:.2f} s; "
            f"{max(self.moving_after_restore_began):.2f} s after the restore began, which "
            f"took {self.restoring:.2f} s); "
            f"{len(self.log_lines)} log lines from the cut to {LOG_WINDOW:g} s after the return; "
            f"callers got {', '.join(self.unavailable)}"
        )


async def store_up(metrics_url: str) -> str:
    """The orchestrator_store_up gauge, as /metrics shows it."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(metrics_url, timeout=5)).text
    return next(line for line in text.splitlines() if line.startswith("orchestrator_store_up "))


async def ride_out(
    server: ServeProcess,
    metrics_url: str,
    cut: Callable[[], Awaitable[None]],
    restore: Callable[[], Awaitable[None]],
) -> Figures:
    """The scenario: 20 runs with watchers, a 10 s outage, and everything checked after."""
    figures = Figures()
    tenant = str(uuid.uuid4())
    health_seen: list[tuple[float, int]] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        health_task = asyncio.create_task(health_watch(server.address, health_seen))
        run_ids = [
            (
                await stub.Execute(
                    pb.ExecuteRequest(executable_plan=PLAN, idempotency_key=f"outage-{i}"),
                    metadata=md(tenant),
                )
            ).run_id
            for i in range(RUNS)
        ]
        watched = [Watched() for _ in run_ids]
        watchers = [
            asyncio.create_task(watch(stub, tenant, r, w))
            for r, w in zip(run_ids, watched, strict=True)
        ]
        await until(lambda: all(started(w, "s1") for w in watched), 20, "every s1 to start")
        await until(lambda: bool(health_seen) and health_seen[-1][1] == HEALTH.SERVING, 5, "health")

        offset = server.log_path.stat().st_size
        cut_at = time.monotonic()
        await cut()
        figures.not_serving_after = (
            await until(lambda: health_seen[-1][1] == HEALTH.NOT_SERVING, 5, "health NOT_SERVING")
            - cut_at
        )
        # Callers get a status they can act on: UNAVAILABLE STORE_UNAVAILABLE with RetryInfo.
        calls: list[tuple[str, Awaitable[Any]]] = [
            (
                "Execute",
                stub.Execute(pb.ExecuteRequest(executable_plan=PLAN), metadata=md(tenant)),
            ),
            (
                "GetExecution",
                stub.GetExecution(pb.GetExecutionRequest(run_id=run_ids[0]), metadata=md(tenant)),
            ),
        ]
        for name, call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
            reason, delay = details(failed.value)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (name, failed.value)
            assert reason == "STORE_UNAVAILABLE", name
            assert delay is not None and delay > 0, name
            figures.unavailable.append(f"{name}: UNAVAILABLE {reason} (retry in {delay:g} s)")
        assert await store_up(metrics_url) == "orchestrator_store_up 0.0"
        await asyncio.sleep(max(0.0, cut_at + CUT_SECONDS - time.monotonic()))
        restoring_at = time.monotonic()
        await restore()  # a restarted PostgreSQL accepts connections before this returns
        back_at = time.monotonic()
        figures.restoring = back_at - restoring_at
        figures.serving_after = (
            await until(lambda: health_seen[-1][1] == HEALTH.SERVING, 10, "health SERVING")
            - back_at
        )
        assert await store_up(metrics_url) == "orchestrator_store_up 1.0"
        await asyncio.sleep(max(0.0, back_at + LOG_WINDOW - time.monotonic()))
        with server.log_path.open("rb") as log:
            log.seek(offset)
            figures.log_lines = log.read().decode().splitlines()

        _, pending = await asyncio.wait(watchers, timeout=60)
        assert not pending, "watchers still open 60 s after the store came back"
        health_task.cancel()
        await asyncio.gather(health_task, return_exceptions=True)

        for run_id, w in zip(run_ids, watched, strict=True):
            assert w.ended == grpc.StatusCode.OK, (run_id, w.ended)
            events = [e for _, e in w.events if e.type != pb.EVENT_TYPE_HEARTBEAT]
            assert events[0].type == pb.EVENT_TYPE_SNAPSHOT
            sequences = [e.sequence for e in events[1:]]
            # Every event once, in order, with no gap.
            assert sequences == list(range(events[0].sequence + 1, sequences[-1] + 1)), run_id
            assert events[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED, run_id
            completed = [e.step_id for e in events if e.type == pb.EVENT_TYPE_STEP_COMPLETED]
            assert sorted(completed) == sorted(STEPS), (run_id, completed)
            after = [
                t for t, e in w.events if t > restoring_at and e.type != pb.EVENT_TYPE_HEARTBEAT
            ]
            figures.moving_after.append(max(0.0, after[0] - back_at))
            figures.moving_after_restore_began.append(after[0] - restoring_at)
            final = (
                await stub.GetExecution(pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant))
            ).execution
            assert final.status == pb.EXECUTION_STATUS_COMPLETED
            # No step ran twice: the write that waited kept the outcome already computed.
            assert [(s.step_id, s.status, s.attempts) for s in final.steps] == [
                (s, pb.STEP_STATUS_COMPLETED, 1) for s in STEPS
            ]
    return figures


async def serving(server: ServeProcess, within: float = 60.0) -> None:
    """Wait (without blocking the loop the proxy runs on) until the server says SERVING."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(server.log_path.read_text()[-3000:])
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == HEALTH.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(server.log_path.read_text()[-3000:])


@asynccontextmanager
async def served(database_url: str, log: Path) -> AsyncIterator[tuple[ServeProcess, str]]:
    """`orchestrator serve` on the store, and the address of its /metrics."""
    metrics_port = free_port()
    server = ServeProcess(
        database_url, log, "--shutdown-grace", "1", "--metrics-port", str(metrics_port)
    )

    try:
        await serving(server)
        yield server, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        if server.proc.poll() is None:
            server.signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 30)
        if code != 0:
            tail = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"the server exited {code}: {tail[-3000:]}")


def report(name: str, figures: Figures) -> None:
    """The figures on stderr (pytest -s shows them), and every line the server logged."""
    print(f"\n[{name}] {figures.summary()}", file=sys.stderr)
    for line in figures.log_lines:
        print(f"  {line[:300]}", file=sys.stderr)


def check(figures: Figures) -> None:
    assert figures.serving_after < 2.0, figures.summary()
    assert max(figures.moving_after) < 2.0, figures.summary()
    assert len(figures.log_lines) < 50, figures.summary()
    # Quiet, but not silent: the outage and the return are each told once.
    events = [json.loads(line).get("event") for line in figures.log_lines]
    assert events.count("store.unavailable") == 1, events
    assert events.count("store.available") == 1, events


@pytest.mark.postgres
@pytest.mark.subprocess
async def test_postgres_cut_off_by_a_proxy_for_10s(tmp_path: Path) -> None:
    url = postgres_database()
    target = sa.make_url(url)
    proxy = TcpProxy(target.port or 5432, target.host or "127.0.0.1")
    await proxy.start()
    try:
        via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
        async with served(via_proxy, tmp_path / "server.log") as (server, metrics):
            figures = await ride_out(server, metrics, proxy.cut, proxy.restore)
        report("proxy cut", figures)
        check(figures)
    finally:
        await proxy.close()
        drop_postgres_database(url)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the test's own (root creates it; CI runs as root)."""
    version = PostgresCluster.installed_version()
    if version is None or shutil.which("pg_createcluster") is None or os.geteuid() != 0:
        pytest.fail("the restart test needs pg_createcluster and root (as in CI)")
    cluster = PostgresCluster(version)
    cluster.create()
    try:
        yield cluster
    finally:
        cluster.drop()


@pytest.mark.postgres
@pytest.mark.subprocess
async def test_postgres_restarted_for_real(tmp_path: Path, own_cluster: PostgresCluster) -> None:
    await own_cluster.create_database("orchestrator")

    async def stop() -> None:
        await asyncio.to_thread(own_cluster.stop)

    async def start() -> None:
        await asyncio.to_thread(own_cluster.start)

    log = tmp_path / "server.log"
    async with served(own_cluster.url("orchestrator"), log) as (server, metrics):
        figures = await ride_out(server, metrics, stop, start)
    report("restart", figures)
    check(figures)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 4 MiB tmpfs for the store (root mounts it; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.fail("the store-full test mounts a tmpfs: it needs root (as in CI)")
    disk = SmallDisk(tmp_path / "disk")
    disk.mount()
    try:
        yield disk
    finally:
        disk.unmount()


async def test_sqlite_store_full(tmp_path: Path, small_disk: SmallDisk) -> None:
    settings = make_settings(tmp_path, sqlite_url(small_disk.path / "orchestrator.db"))
    tenant = str(uuid.uuid4())
    # Each run stores its plan: a long description makes a few runs fill what is left.
    plan = plan_of(
        {"stepId": "s1", "tool": "core.wait", "parameters": {"seconds": 3}},
        {"stepId": "s2", "tool": "core.echo", "parameters": {"done": True}},
    )
    plan.description = "x" * 20_000
    unfinished = (pb.EXECUTION_STATUS_PENDING, pb.EXECUTION_STATUS_RUNNING)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def execute() -> str:
            request = pb.ExecuteRequest(executable_plan=plan)
            return (await stub.Execute(request, metadata=md(tenant))).run_id

        async def get(run_id: str) -> pb.Execution:
            request = pb.GetExecutionRequest(run_id=run_id)
            return (await stub.GetExecution(request, metadata=md(tenant))).execution

        run_ids = [await execute() for _ in range(3)]
        for run_id in run_ids:
            for _ in range(400):
                if (await get(run_id)).steps[0].status == pb.STEP_STATUS_RUNNING:
                    break
                await asyncio.sleep(0.05)
        filled_at = time.monotonic()
        await asyncio.to_thread(small_disk.fill)
        # Writes that fit in what SQLite holds already may still land; then the disk is full.
        full: grpc.aio.AioRpcError | None = None
        for _ in range(200):
            try:
                run_ids.append(await execute())
            except grpc.aio.AioRpcError as error:
                full = error
                break
        assert full is not None, "the store never filled up"
        assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full
        assert details(full)[0] == "STORE_FULL"
        # Full is not down: reads are served, and health says so.
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == HEALTH.SERVING
        # The first runs' s1 ends while the store is full: its outcome waits, nothing fails.
        await asyncio.sleep(max(0.0, filled_at + 4 - time.monotonic()))
        assert srv.db.health.full and srv.db.health.waiting >= 3
        for run_id in run_ids:
            assert (await get(run_id)).status in unfinished
        small_disk.free()
        deadline = time.monotonic() + 30
        for run_id in run_ids:
            while (execution := await get(run_id)).status in unfinished:
                assert time.monotonic() < deadline, "runs did not finish once space returned"
                await asyncio.sleep(0.1)
            assert execution.status == pb.EXECUTION_STATUS_COMPLETED, execution
            assert [(s.status, s.attempts) for s in execution.steps] == [
                (pb.STEP_STATUS_COMPLETED, 1)
            ] * 2
        assert not srv.db.health.full
        run_ids.append(await execute())  # and Execute works again


@pytest.mark.postgres
async def test_the_client_library_carries_a_caller_through_a_blip(tmp_path: Path) -> None:
    """Get and List (the channel's retry policy, paced by the server's pushback), Execute
    with an idempotency key and watch (the client's own retries) each outlast a 1.5 s cut."""
    url = postgres_database()
    target = sa.make_url(url)
    proxy = TcpProxy(target.port or 5432, target.host or "127.0.0.1")
    await proxy.start()
    via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
    plan = plan_of({"stepId": "s1", "tool": "core.wait", "parameters": {"seconds": 0.5}})
    try:
        async with (
            running(make_settings(tmp_path, via_proxy)) as srv,
            OrchestratorClient(srv.address, str(uuid.uuid4())) as client,
        ):
            first = await client.execute(plan, idempotency_key="blip")

            async def blip() -> None:
                await proxy.cut()
                await asyncio.sleep(1.5)
                await proxy.restore()

            async def events() -> list[pb.ExecutionEvent]:
                return [e async for e in client.watch(first.run_id)]

            cutting = asyncio.create_task(blip())
            await asyncio.sleep(0.1)
            began = time.monotonic()
            got = await client.get(first.run_id)
            assert time.monotonic() - began > 1.0, "the call did not meet the cut"
            assert got.run_id == first.run_id
            await cutting

            cutting = asyncio.create_task(blip())
            await asyncio.sleep(0.1)
            watching = asyncio.create_task(events())
            listed = [e.run_id async for e in client.list()]
            again = await client.execute(plan, idempotency_key="blip")
            await cutting
            assert listed == [first.run_id] and again.run_id == first.run_id
            seen = await asyncio.wait_for(watching, 30)
            assert seen[0].type == pb.EVENT_TYPE_SNAPSHOT
            sequences = [e.sequence for e in seen[1:]]
            assert sequences == list(
                range(seen[0].sequence + 1, seen[0].sequence + 1 + len(sequences))
            )
            assert seen[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED
    finally:
        await proxy.close()
        drop_postgres_database(url)


@pytest.mark.postgres
async def test_an_outcome_computed_during_an_outage_is_kept_not_computed_again(
    tmp_path: Path,
) -> None:
    """A tool that returns while the store is cut off is called once: its outcome waits in the
    engine and is written when the store is back."""
    calls: list[str] = []
    gate = asyncio.Event()

    async def gated(ctx: ToolContext, params: dict[str, Any]) -> Any:
        calls.append(ctx.idempotency_key)
        await gate.wait()
        return {"calls": len(calls)}

    registry = default_registry(load_entry_points=False)
    registry.register(Tool("test.gated", gated))
    url = postgres_database()
    target = sa.make_url(url)
    proxy = TcpProxy(target.port or 5432, target.host or "127.0.0.1")
    await proxy.start()
    via_proxy = target.set(port=proxy.port).render_as_string(hide_password=False)
    plan = plan_of(
        {"stepId": "s1", "tool": "test.gated"},
        {"stepId": "s2", "tool": "core.echo", "parameters": {"after": True}},
    )
    del plan.security_context.allowed_tools[:]
    tenant = str(uuid.uuid4())
    try:
        async with (
            running(make_settings(tmp_path, via_proxy), registry=registry) as srv,
            grpc.aio.insecure_channel(srv.address) as channel,
        ):
            stub = pb_grpc.OrchestratorServiceStub(channel)
            request = pb.ExecuteRequest(executable_plan=plan, validate_capabilities=False)
            run_id = (await stub.Execute(request, metadata=md(tenant))).run_id
            await until(lambda: bool(calls), 10, "the tool to be called")
            await proxy.cut()
            gate.set()  # the tool returns now, with the store away
            await until(lambda: srv.db.health.waiting >= 1, 10, "the outcome to wait")
            await asyncio.sleep(2)
            await proxy.restore()
            get = pb.GetExecutionRequest(run_id=run_id)

            async def status() -> int:
                return (await stub.GetExecution(get, metadata=md(tenant))).execution.status

            for _ in range(200):
                if await status() != pb.EXECUTION_STATUS_RUNNING:
                    break
                await asyncio.sleep(0.05)
            execution = (await stub.GetExecution(get, metadata=md(tenant))).execution
            assert execution.status == pb.EXECUTION_STATUS_COMPLETED, execution
            assert calls == [f"{run_id}/s1"]
            assert [(s.step_id, s.attempts) for s in execution.steps] == [("s1", 1), ("s2", 1)]
            assert json_format.MessageToDict(execution.steps[0].output) == {"calls": 1}
    finally:
        await proxy.close()
        drop_postgres_database(url)
