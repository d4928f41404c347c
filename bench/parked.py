"""Parked runs (issue 13): runs waiting on clarifications on PostgreSQL, two replicas. A run
with nothing in flight that only waits holds no owner, so at rest the database sees only the
replicas' heartbeats, and any replica moves a run on when its answer comes.

Figures: the row writes per second of the whole database at rest, per replica (the sum of
n_tup_ins + n_tup_upd + n_tup_del of pg_stat_user_tables over a window; the bar is 5), and,
after the replica that accepted the runs is SIGKILLed, how long an answer given to the other
takes to move its run (answer sent to the run COMPLETED; the bar is 2 s). Run rows written at rest
are counted exactly, from their row versions (xmin). The acceptance test
(tests/test_replicas.py) runs the same measurement with a few hundred runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from bench.common import (
    ORCHESTRATOR,
    Figure,
    free_port,
    md,
    percentile,
    pg_available,
    pg_database,
    record,
    table,
    wait_serving,
)
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

WRITES_CEILING = 5.0  # row writes per second per replica, at rest
MOVE_CEILING = 2.0  # seconds from an answer to its run moving on, on the surviving replica
SUBMITTERS = 32
STATS_SETTLE = 11.0  # seconds: past PostgreSQL's PGSTAT_IDLE_INTERVAL, 10 s


@dataclass
class Scale:
    runs: int = 20_000
    window: float = 10.0  # seconds the writes at rest are counted over
    answers: int = 20  # runs answered on the survivor, one after another

    @classmethod
    def quick(cls) -> Scale:
        return cls(runs=2_000, window=5.0, answers=10)


@dataclass
class Parked:
    """What one measurement found."""

    runs: int
    replicas: int
    park_seconds: float  # from the first Execute to every run parked
    writes_per_second: float  # the whole database, at rest
    run_writes_per_second: float  # run rows written, at rest (from their row versions)
    unowned: int  # parked runs holding no owner
    moves: list[float] = field(default_factory=list)  # answer to COMPLETED, seconds

    @property
    def writes_per_replica(self) -> float:
        return self.writes_per_second / self.replicas


def ask_plan() -> pb.ExecutablePlan:
    """A person is asked; the run goes on with a step using the answer."""
    return json_format.ParseDict(
        {
            "planId": "parked",
            "name": "parked on a clarification",
            "flows": [
                {
                    "flowId": "main",
                    "steps": [
                        {"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "go?"}},
                        {
                            "stepId": "after",
                            "tool": "core.echo",
                            "parameters": {"answer": "{{ steps.ask.output }}"},
                        },
                    ],
                }
            ],
            "securityContext": {"allowedTools": ["core.clarify", "core.echo"]},
        },
        pb.ExecutablePlan(),
    )


class Replica:
    """`orchestrator serve` under a replica id, logging to a file; killed with SIGKILL."""

    def __init__(self, url: str, name: str, log_dir: Path, lease: float) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        environment = {
            **os.environ,
            "ORCHESTRATOR_LOG_LEVEL": "warning",
            "ORCHESTRATOR_HTTP_PORT": "0",
            "ORCHESTRATOR_REPLICA_ID": name,
            "ORCHESTRATOR_LEASE_SECONDS": str(lease),
            "ORCHESTRATOR_EXECUTE_RATE": "0",
            "ORCHESTRATOR_MAX_RUNS_PER_TENANT": "0",
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [ORCHESTRATOR, "serve", "--port", str(self.port), "--database-url", url],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
            )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@contextmanager
def replicas(url: str, names: list[str], log_dir: Path, lease: float) -> Iterator[list[Replica]]:
    """The replicas, each serving; all killed at the end."""
    started: list[Replica] = []
    try:
        for name in names:
            started.append(Replica(url, name, log_dir, lease))
        for replica in started:
            wait_serving(replica.address)
        yield started
    finally:
        for replica in started:
            replica.kill()


def query(url: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of one query against the PostgreSQL store."""
    import asyncpg  # type: ignore[import-untyped]

    dsn = url.replace("postgresql+asyncpg://", "postgresql://")

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            return [dict(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(go())


def database_writes(url: str) -> int:
    """Rows inserted, updated and deleted so far, in every table."""
    sql = "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) AS n FROM pg_stat_user_tables"
    return int(query(url, sql)[0]["n"])


def run_rows(url: str) -> dict[str, str]:
    """Each run row's version (its xmin, new on every update): what the runs table holds."""
    return {
        r["run_id"]: r["version"]
        for r in query(url, "SELECT run_id, xmin::text AS version FROM runs")
    }


def rows_written(before: dict[str, str], after: dict[str, str]) -> int:
    """Run rows inserted, updated or deleted between two looks: exact, where the statistics'
    counts arrive late."""
    changed = sum(1 for run_id, version in after.items() if before.get(run_id) != version)
    return changed + sum(1 for run_id in before if run_id not in after)


def parked_runs(url: str) -> int:
    """Runs waiting on a clarification that hold no owner."""
    rows = query(
        url,
        "SELECT count(*) AS n FROM runs r WHERE r.owner IS NULL AND r.status = 'RUNNING'"
        " AND EXISTS (SELECT 1 FROM clarifications c"
        " WHERE c.run_id = r.run_id AND c.status = 'PENDING')",
    )
    return int(rows[0]["n"])


async def submit(address: str, tenant: str, count: int) -> list[str]:
    """`count` runs of the asking plan, Execute'd on `address`."""
    plan = ask_plan()
    run_ids: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        todo = iter(range(count))

        async def worker() -> None:
            for _ in todo:
                reply = await stub.Execute(
                    pb.ExecuteRequest(executable_plan=plan), metadata=md(tenant), timeout=60
                )
                run_ids.append(reply.run_id)

        await asyncio.gather(*(worker() for _ in range(SUBMITTERS)))
    return run_ids


def wait_until(check: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def move(address: str, tenant: str, run_id: str, clarification_id: str) -> float:
    """Answer the run's clarification on `address`; seconds until the run is COMPLETED."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.OrchestratorServiceStub(channel)
        sent = time.monotonic()
        stub.RespondToClarification(
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=clarification_id,
                response=struct_pb2.Value(string_value="yes"),
            ),
            metadata=md(tenant),
            timeout=30,
        )
        while True:
            got = stub.GetExecution(
                pb.GetExecutionRequest(run_id=run_id), metadata=md(tenant), timeout=10
            ).execution
            if got.status == pb.EXECUTION_STATUS_COMPLETED:
                return time.monotonic() - sent
            if got.status in (pb.EXECUTION_STATUS_FAILED, pb.EXECUTION_STATUS_CANCELLED):
                raise RuntimeError(f"run {run_id} ended {got.status}: {got.error_message}")
            if time.monotonic() - sent > 30:
                raise TimeoutError(f"run {run_id} did not move within 30 s")
            time.sleep(0.01)


def measure(
    url: str, runs: int, *, window: float, answers: int, log_dir: Path, lease: float = 2.0
) -> Parked:
    """Park `runs` runs (Execute'd on replica A of A and B), count the writes at rest, SIGKILL
    A, then answer `answers` of them on B one after another, timing each move."""
    tenant = str(uuid.uuid4())
    with replicas(url, ["A", "B"], log_dir, lease) as (a, b):
        started = time.monotonic()
        asyncio.run(submit(a.address, tenant, runs))
        wait_until(lambda: parked_runs(url) == runs, 60 + runs / 50, f"{runs} runs to park")
        park_seconds = time.monotonic() - started
        # A backend flushes its counts to pg_stat_user_tables at most once a second; what a
        # connection wrote in its last second before going idle waits for its idle timer, up
        # to PGSTAT_IDLE_INTERVAL (10 s). Counting from sooner counted the parking's last
        # writes as writes at rest (a writer lane that went idle as the runs parked).
        time.sleep(STATS_SETTLE)
        all_before, rows_before = database_writes(url), run_rows(url)
        time.sleep(window)
        all_after, rows_after = database_writes(url), run_rows(url)
        unowned = int(query(url, "SELECT count(*) AS n FROM runs WHERE owner IS NULL")[0]["n"])
        a.kill()
        asked = query(
            url,
            "SELECT run_id, clarification_id FROM clarifications WHERE status = 'PENDING'"
            " ORDER BY random() LIMIT $1",
            answers,
        )
        moves = [move(b.address, tenant, r["run_id"], r["clarification_id"]) for r in asked]
    return Parked(
        runs=runs,
        replicas=2,
        park_seconds=park_seconds,
        writes_per_second=(all_after - all_before) / window,
        run_writes_per_second=rows_written(rows_before, rows_after) / window,
        unowned=unowned,
        moves=moves,
    )


def run(scale: Scale) -> None:
    print(
        f"== parked runs: {scale.runs:,} runs waiting on clarifications, PostgreSQL, 2 replicas;"
        " the accepting replica is then SIGKILLed and the other answers"
    )
    if not pg_available():
        print("   (PostgreSQL is not reachable: skipped)")
        return
    with ExitStack() as stack:
        url = stack.enter_context(pg_database())
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        found = measure(
            url, scale.runs, window=scale.window, answers=scale.answers, log_dir=log_dir
        )
    p50, worst = percentile(found.moves, 0.5), max(found.moves)
    print(
        table(
            [
                (
                    "runs",
                    "parked in",
                    "unowned",
                    "writes/s per replica",
                    "runs rows/s",
                    "move p50",
                    "move max",
                ),
                (
                    f"{found.runs:,}",
                    f"{found.park_seconds:.1f} s",
                    f"{found.unowned:,}",
                    f"{found.writes_per_replica:.2f} (bar {WRITES_CEILING:g})",
                    f"{found.run_writes_per_second:.2f}",
                    f"{p50 * 1000:.0f} ms",
                    f"{worst * 1000:.0f} ms (bar {MOVE_CEILING:g} s)",
                ),
            ]
        )
    )
    record(
        Figure(
            f"parked, {found.runs:,} runs: row writes/s per replica at rest",
            found.writes_per_replica,
            "rows/s",
            target=f"< {WRITES_CEILING:g}",
            met=found.writes_per_replica < WRITES_CEILING,
        )
    )
    record(
        Figure(
            f"parked, {found.runs:,} runs: answer to moved run after SIGKILL (max)",
            worst,
            "ms",
            target=f"< {MOVE_CEILING:g} s",
            met=worst < MOVE_CEILING,
        )
    )
