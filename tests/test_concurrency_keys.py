"""Concurrency keys and priority: at most `max_concurrent` of a tenant's runs with a key run
at once; the rest wait PENDING, in priority then submit order, and start as runs end."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from prometheus_client import generate_latest

from orchestrator.client import TERMINAL
from orchestrator.server.app import Server
from orchestrator.v1 import orchestrator_pb2 as pb
from tests.conftest import md
from tests.errors import details_of
from tests.stores import drop_postgres_database, fetch, postgres_database
from tests.test_durability import Cluster, call, finished, wait_for, waits

if TYPE_CHECKING:
    from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

    Stub = pb_grpc.OrchestratorServiceAsyncStub


def one_wait(seconds: float) -> pb.ExecutablePlan:
    return waits(1, seconds)


async def submit(stub: Stub, tenant: str, seconds: float, **fields: object) -> str:
    request = pb.ExecuteRequest(executable_plan=one_wait(seconds), **fields)  # type: ignore[arg-type]
    response: pb.ExecuteResponse = await stub.Execute(request, metadata=md(tenant))
    return response.run_id


async def get(stub: Stub, tenant: str, run_id: str) -> pb.Execution:
    got: pb.GetExecutionResponse = await stub.GetExecution(
        pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant)
    )
    return got.execution


async def all_done(stub: Stub, tenant: str, run_ids: list[str]) -> list[pb.Execution]:
    for _ in range(3000):
        runs = [await get(stub, tenant, r) for r in run_ids]
        if all(r.status in TERMINAL for r in runs):
            return runs
        await asyncio.sleep(0.05)
    raise AssertionError("the runs did not finish")


def overlapping(runs: list[pb.Execution]) -> int:
    """The most runs that were started and not yet finished at one time."""
    edges = []
    for run in runs:
        if run.HasField("started_at"):
            edges.append((run.started_at.ToNanoseconds(), 1))
            edges.append((run.completed_at.ToNanoseconds(), -1))
    most = current = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        current += step
        most = max(most, current)
    return most


async def test_a_mutex_runs_one_at_a_time_in_priority_then_submit_order(
    stub: Stub, tenant: str, server: Server
) -> None:
    first = await submit(stub, tenant, 2.0, concurrency_key="deploy/prod", max_concurrent=1)
    priorities = [3, 5, 1, 3, 2, 1, 4, 3, 2]
    queued = [
        await submit(
            stub, tenant, 0.05, concurrency_key="deploy/prod", max_concurrent=1, priority=p
        )
        for p in priorities
    ]
    # Another key, and no key, are not held up by this one.
    other = await submit(stub, tenant, 0.05, concurrency_key="deploy/staging")
    free = await submit(stub, tenant, 0.05)
    waiting = await get(stub, tenant, queued[0])
    assert waiting.status == pb.EXECUTION_STATUS_PENDING
    assert waiting.waiting_reason == "CONCURRENCY_KEY"
    assert (waiting.concurrency_key, waiting.max_concurrent, waiting.priority) == (
        "deploy/prod",
        1,
        3,
    )
    # The queue, per tenant and key, in Prometheus.
    assert server.metrics is not None
    scraped = ""
    for _ in range(100):
        scraped = generate_latest(server.metrics.registry).decode()
        if f'concurrency_key="deploy/prod",tenant_id="{tenant}"}} 9.0' in scraped:
            break
        await asyncio.sleep(0.05)
    assert f'concurrency_key="deploy/prod",tenant_id="{tenant}"}} 9.0' in scraped
    done = await all_done(stub, tenant, [first, *queued, other, free])
    assert all(r.status == pb.EXECUTION_STATUS_COMPLETED for r in done)
    assert all(r.waiting_reason == "" for r in done)
    keyed = done[: 1 + len(queued)]
    assert overlapping(keyed) == 1
    order = [r.run_id for r in sorted(keyed, key=lambda r: r.started_at.ToNanoseconds())]
    expected = [first] + [
        queued[i] for i in sorted(range(len(queued)), key=lambda i: (priorities[i], i))
    ]
    assert order == expected
    # The other key and the unkeyed run did not wait for the mutex: they started while its
    # first holder still ran.
    assert done[-2].started_at.ToNanoseconds() < done[0].completed_at.ToNanoseconds()
    assert done[-1].started_at.ToNanoseconds() < done[0].completed_at.ToNanoseconds()


async def test_max_concurrent_two_and_a_cancelled_waiter(stub: Stub, tenant: str) -> None:
    runs = [
        await submit(stub, tenant, 0.3, concurrency_key="batch", max_concurrent=2) for _ in range(6)
    ]
    await stub.Cancel(pb.CancelRequest(run_id=runs[3], reason="not needed"), metadata=md(tenant))
    done = await all_done(stub, tenant, runs)
    statuses = [r.status for r in done]
    assert statuses.count(pb.EXECUTION_STATUS_CANCELLED) == 1
    assert statuses.count(pb.EXECUTION_STATUS_COMPLETED) == 5
    assert overlapping(done) == 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_concurrent": 2}, "max_concurrent"),
        ({"concurrency_key": "k", "max_concurrent": -1}, "max_concurrent"),
        ({"priority": 9}, "priority"),
        ({"concurrency_key": "k" * 129}, "concurrency_key"),
    ],
)
async def test_bad_queueing_fields_are_invalid_argument(
    stub: Stub, tenant: str, fields: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await submit(stub, tenant, 0, **fields)
    details = details_of(refused.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in details.violations] == [field]


@pytest.mark.postgres
def test_kill_9_of_the_replica_running_a_keyed_run_neither_doubles_nor_loses(
    tmp_path: Path,
) -> None:
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("r1", lease=2.0)
        cluster.start("r2", lease=2.0)
        run_ids = [
            call(
                cluster,
                ("r1", "r2")[i % 2],
                "Execute",
                pb.ExecuteRequest(executable_plan=waits(3, 0.3), concurrency_key="deploy/prod"),
                tenant,
            ).run_id
            for i in range(6)
        ]

        def running() -> str | None:
            rows = fetch(
                url,
                "SELECT r.run_id, p.replica_id FROM runs r JOIN replicas p ON p.incarnation ="
                " r.owner WHERE r.run_id = ANY($1::text[]) AND r.status = 'RUNNING'",
                run_ids,
            )
            return str(rows[0]["replica_id"]) if len(rows) == 1 else None

        victim = wait_for(running, 30, "a keyed run under way")
        cluster.procs[victim].kill()  # SIGKILL, mid-run
        survivor = "r2" if victim == "r1" else "r1"
        done = [finished(cluster, survivor, run_id, tenant, 90) for run_id in run_ids]
        assert [d.status for d in done] == [pb.EXECUTION_STATUS_COMPLETED] * 6
        assert overlapping(done) == 1
    finally:
        cluster.stop_all()
        drop_postgres_database(url)
