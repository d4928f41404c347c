"""Survive kill -9 (DESIGN §7): the real `orchestrator serve`, SIGKILLed and restarted on the
same store, SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from orchestrator.client import TERMINAL
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, md, plan_of, running
from tests.process import ServeProcess, free_port
from tests.stores import drop_postgres_database, fetch, postgres_database

pytestmark = pytest.mark.subprocess


class Cluster:
    """Replicas of `orchestrator serve` on one store, each under a fixed replica id."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.tmp_path = tmp_path
        self.procs: dict[str, ServeProcess] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, lease: float = 10.0, **env: str) -> ServeProcess:
        """Replica `name`; `env` adds ORCHESTRATOR_* variables."""
        port = self.ports.setdefault(name, free_port())
        proc = ServeProcess(
            self.url,
            self.tmp_path / f"{name}.log",
            port=port,
            env={
                "ORCHESTRATOR_REPLICA_ID": name,
                "ORCHESTRATOR_LEASE_SECONDS": str(lease),
                **{f"ORCHESTRATOR_{k.upper()}": v for k, v in env.items()},
            },
        )
        self.procs[name] = proc
        proc.wait_serving()
        return proc

    def stub(self, name: str) -> tuple[grpc.Channel, pb_grpc.OrchestratorServiceStub]:
        channel = grpc.insecure_channel(self.procs[name].address)
        return channel, pb_grpc.OrchestratorServiceStub(channel)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.kill()


@pytest.fixture
def cluster(database_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(database_url, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


def call(cluster: Cluster, name: str, method: str, request: Any, tenant: str) -> Any:
    channel, stub = cluster.stub(name)
    with channel:
        return getattr(stub, method)(request, metadata=(("x-tenant-id", tenant),), timeout=30)


def wait_for(check: Callable[[], Any], limit: float, what: str) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            value = check()
        except grpc.RpcError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def finished(
    cluster: Cluster, name: str, run_id: str, tenant: str, limit: float = 30
) -> pb.Execution:
    """The run once it is terminal (asked of replica `name`)."""

    def terminal() -> pb.Execution | None:
        got = execution(cluster, name, run_id, tenant)
        return got if got.status in TERMINAL else None

    result: pb.Execution = wait_for(terminal, limit, f"run {run_id} to finish")
    return result


def execution(cluster: Cluster, name: str, run_id: str, tenant: str) -> pb.Execution:
    got: pb.Execution = call(
        cluster, name, "GetExecution", pb.GetExecutionRequest(run_id=run_id), tenant
    ).execution
    return got


def events(cluster: Cluster, name: str, run_id: str, tenant: str) -> list[pb.ExecutionEvent]:
    channel, stub = cluster.stub(name)
    with channel:
        return [
            r.event
            for r in stub.WatchExecution(
                pb.WatchExecutionRequest(run_id=run_id, after_sequence=1),
                metadata=(("x-tenant-id", tenant),),
                timeout=60,
            )
            if r.event.type != pb.EVENT_TYPE_HEARTBEAT
        ]


def waits(n: int, seconds: float) -> pb.ExecutablePlan:
    return plan_of(
        *(
            {"stepId": f"w{i}", "tool": "core.wait", "parameters": {"seconds": seconds}}
            for i in range(n)
        )
    )


def test_kill_9_at_random_moments_loses_nothing(cluster: Cluster) -> None:
    tenant = str(uuid.uuid4())
    rng = random.Random(7)
    cluster.start("r1")
    run_id = call(
        cluster, "r1", "Execute", pb.ExecuteRequest(executable_plan=waits(10, 0.4)), tenant
    ).run_id
    recoveries: list[float] = []
    for _ in range(5):
        time.sleep(rng.uniform(0.2, 0.7))
        cluster.procs["r1"].kill()
        before = execution_from_store(cluster.url, run_id)
        restarted = time.monotonic()
        cluster.start("r1")

        # Recovery: from the restart to the run moving again (a new event in the store).
        def moved(before: int = before) -> bool:
            return (
                last_sequence(cluster.url, run_id) > before
                or execution(cluster, "r1", run_id, tenant).status in TERMINAL
            )

        wait_for(
            moved,
            30,
            "the run to move after a restart",
        )
        recoveries.append(time.monotonic() - restarted)
    done = finished(cluster, "r1", run_id, tenant, 60)
    assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    log = events(cluster, "r1", run_id, tenant)
    assert [e.sequence for e in log] == list(range(2, done.last_sequence + 1)), "no gap"
    completed = Counter(e.step_id for e in log if e.type == pb.EVENT_TYPE_STEP_COMPLETED)
    assert completed == {f"w{i}": 1 for i in range(10)}, "each step COMPLETED once"
    attempts = {s.step_id: s.attempts for s in done.steps}
    assert all(a in (1, 2) for a in attempts.values()), attempts
    assert sum(a - 1 for a in attempts.values()) <= 5, "only a step in flight at a kill reruns"
    print(
        f"\nrecovery after restart (process start to the run moving): "
        f"{', '.join(f'{r:.2f}s' for r in recoveries)}; reruns: "
        f"{ {k: v for k, v in attempts.items() if v > 1} }"
    )


def execution_from_store(url: str, run_id: str) -> int:
    return last_sequence(url, run_id)


def last_sequence(url: str, run_id: str) -> int:
    rows = fetch(url, "SELECT last_sequence FROM runs WHERE run_id = $1", run_id)
    return int(rows[0]["last_sequence"])


def test_a_paused_run_and_a_pending_clarification_survive_restarts(cluster: Cluster) -> None:
    tenant = str(uuid.uuid4())
    cluster.start("r1")
    paused = call(
        cluster, "r1", "Execute", pb.ExecuteRequest(executable_plan=waits(3, 0.3)), tenant
    ).run_id
    asking = call(
        cluster,
        "r1",
        "Execute",
        pb.ExecuteRequest(
            executable_plan=plan_of(
                {
                    "stepId": "ask",
                    "tool": "core.clarify",
                    "parameters": {
                        "category": "multiple_choice",
                        "prompt": "which?",
                        "options": ["a", "b"],
                    },
                },
                {
                    "stepId": "use",
                    "tool": "core.echo",
                    "parameters": {"got": "{{ steps.ask.output }}"},
                },
            )
        ),
        tenant,
    ).run_id
    wait_for(
        lambda: execution(cluster, "r1", paused, tenant).steps[0].status == pb.STEP_STATUS_RUNNING,
        10,
        "the first step to start",
    )
    call(cluster, "r1", "Pause", pb.PauseRequest(run_id=paused), tenant)
    question = wait_for(
        lambda: execution(cluster, "r1", asking, tenant).pending_clarifications,
        10,
        "the clarification",
    )[0]
    for _ in range(2):
        cluster.procs["r1"].kill()
        cluster.start("r1")
    time.sleep(1.0)
    held = execution(cluster, "r1", paused, tenant)
    assert held.status == pb.EXECUTION_STATUS_PAUSED
    assert [s.status for s in held.steps][1:] == [pb.STEP_STATUS_PENDING] * 2
    still = execution(cluster, "r1", asking, tenant)
    assert [c.clarification_id for c in still.pending_clarifications] == [question.clarification_id]
    call(cluster, "r1", "Resume", pb.ResumeRequest(run_id=paused), tenant)
    call(
        cluster,
        "r1",
        "RespondToClarification",
        pb.RespondToClarificationRequest(
            run_id=asking,
            clarification_id=question.clarification_id,
            response=struct_pb2.Value(string_value="b"),
        ),
        tenant,
    )
    for run_id in (paused, asking):
        done = finished(cluster, "r1", run_id, tenant, 30)
        assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
    final = execution(cluster, "r1", asking, tenant)
    assert final.steps[1].output.struct_value["got"] == "b"


def owners(url: str, run_ids: list[str]) -> dict[str, str]:
    """Each run's owner, by replica id (runs point at an incarnation of it)."""
    rows = fetch(
        url,
        "SELECT r.run_id, p.replica_id FROM runs r LEFT JOIN replicas p ON p.incarnation = r.owner"
        " WHERE r.run_id = ANY($1::text[])",
        run_ids,
    )
    return {r["run_id"]: r["replica_id"] for r in rows}


@pytest.mark.postgres
def test_two_replicas_share_take_over_and_hand_over(tmp_path: Path) -> None:
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("A", lease=2)
        cluster.start("B", lease=2)
        # Each replica runs what it accepts while it has step slots free (no claim round
        # trip), so the runs are sent to both.
        runs = [
            call(
                cluster,
                "AB"[i % 2],
                "Execute",
                pb.ExecuteRequest(executable_plan=waits(4, 0.5)),
                tenant,
            ).run_id
            for i in range(12)
        ]
        owned = wait_for(
            lambda: (o := owners(url, runs)) and all(o.values()) and o,
            10,
            "every run to be claimed",
        )
        assert set(owned.values()) == {"A", "B"}, (
            f"runs spread over both: {Counter(owned.values())}"
        )

        # A watch on B of a run owned by A sees every event, in order.
        watched = next(r for r, o in owned.items() if o == "A")
        seen = events(cluster, "B", watched, tenant)
        assert [e.sequence for e in seen] == list(range(2, seen[-1].sequence + 1))
        assert seen[-1].execution.status == pb.EXECUTION_STATUS_COMPLETED

        # Cancel sent to B of a run owned by A stops it at once.
        long_run = call(
            cluster, "A", "Execute", pb.ExecuteRequest(executable_plan=waits(1, 30)), tenant
        ).run_id
        wait_for(
            lambda: (
                execution(cluster, "A", long_run, tenant).steps[0].status == pb.STEP_STATUS_RUNNING
            ),
            10,
            "the long step to start",
        )
        holder = owners(url, [long_run])[long_run]
        other = "B" if holder == "A" else "A"
        started = time.monotonic()
        call(cluster, other, "Cancel", pb.CancelRequest(run_id=long_run), tenant)
        log = cluster.procs[holder].log_path
        wait_for(
            lambda: any(
                f'"run_id": "{long_run}"' in line and "engine.run_task_ended" in line
                for line in log.read_text().splitlines()
            ),
            1.0,
            "the owner to stop the run",
        )
        print(
            f"\ncancel via the other replica stopped the run in {time.monotonic() - started:.3f}s"
        )

        # SIGKILL A: its unfinished runs finish on B within the lease + 5 s.
        more = [
            call(
                cluster,
                "AB"[i % 2],
                "Execute",
                pb.ExecuteRequest(executable_plan=waits(6, 0.5)),
                tenant,
            ).run_id
            for i in range(6)
        ]
        wait_for(lambda: (o := owners(url, more)) and all(o.values()), 10, "claims")
        time.sleep(0.7)
        on_a = [r for r, o in owners(url, more).items() if o == "A"]
        assert on_a, "A holds some runs"
        killed = time.monotonic()
        cluster.procs["A"].kill()
        wait_for(
            lambda: all(o == "B" for o in owners(url, on_a).values()),
            2 + 5,
            "B to take over A's runs",
        )
        takeover = time.monotonic() - killed
        for run_id in more:
            done = finished(cluster, "B", run_id, tenant, 30)
            assert done.status == pb.EXECUTION_STATUS_COMPLETED
        print(f"takeover after SIGKILL ({len(on_a)} runs, lease 2 s): {takeover:.2f}s")

        # SIGTERM on a replica mid-run hands its runs over with no step run twice.
        cluster.start("A", lease=2)
        handed = [
            call(
                cluster,
                "AB"[i % 2],
                "Execute",
                pb.ExecuteRequest(executable_plan=waits(6, 0.4)),
                tenant,
            ).run_id
            for i in range(6)
        ]
        wait_for(lambda: (o := owners(url, handed)) and all(o.values()), 10, "claims")
        time.sleep(0.6)
        leaving = cluster.procs["B"]
        leaving.signal(signal.SIGTERM)
        assert leaving.wait(30) == 0
        for run_id in handed:
            done = finished(cluster, "A", run_id, tenant, 30)
            assert done.status == pb.EXECUTION_STATUS_COMPLETED
            assert all(s.attempts == 1 for s in done.steps), [s.attempts for s in done.steps]
            started_events = Counter(
                e.step_id
                for e in events(cluster, "A", run_id, tenant)
                if e.type == pb.EVENT_TYPE_STEP_STARTED
            )
            assert set(started_events.values()) == {1}
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


async def test_retention_deletes_finished_runs_with_their_events(
    tmp_path: Path, database_url: str
) -> None:
    """Off by default; when set, finished runs older than the period go, unfinished stay."""
    tenant = str(uuid.uuid4())
    settings = make_settings(tmp_path, database_url, retention_seconds=0.5)
    async with running(settings) as srv, grpc.aio.insecure_channel(srv.address) as ch:
        stub = pb_grpc.OrchestratorServiceStub(ch)
        done = await stub.Execute(
            pb.ExecuteRequest(executable_plan=waits(1, 0.01), dry_run=True, idempotency_key="k"),
            metadata=md(tenant),
        )
        waiting = await stub.Execute(
            pb.ExecuteRequest(
                executable_plan=plan_of(
                    {"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "?"}}
                )
            ),
            metadata=md(tenant),
        )
        for _ in range(100):
            rows = fetch(
                database_url, "SELECT count(*) AS n FROM events WHERE run_id = $1", done.run_id
            )
            if rows[0]["n"] == 0:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetExecution(pb.GetExecutionRequest(run_id=done.run_id), metadata=md(tenant))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert (
            fetch(database_url, "SELECT count(*) AS n FROM events WHERE run_id = $1", done.run_id)[
                0
            ]["n"]
            == 0
        )
        assert fetch(database_url, "SELECT count(*) AS n FROM idempotency_keys")[0]["n"] == 0
        kept = await stub.GetExecution(
            pb.GetExecutionRequest(run_id=waiting.run_id), metadata=md(tenant)
        )
        assert kept.execution.status == pb.EXECUTION_STATUS_RUNNING
