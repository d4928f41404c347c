"""Replicas on PostgreSQL (issue 13): incarnations fence each other, ownership at rest costs
no row writes, a stopped replica that comes back writes nothing for the runs it lost, and a
taken port fails the start. Real `orchestrator serve` processes on loopback."""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import plan_of
from tests.process import ServeProcess
from tests.stores import drop_postgres_database, fetch, postgres_database
from tests.test_durability import Cluster, call, events, finished, owners, wait_for, waits

pytestmark = pytest.mark.subprocess


def test_a_second_server_on_a_taken_port_fails_at_start(tmp_path: Path) -> None:
    first = ServeProcess(f"sqlite+aiosqlite:///{tmp_path / 'one.db'}", tmp_path / "one.log")
    try:
        first.wait_serving()
        second = ServeProcess(
            f"sqlite+aiosqlite:///{tmp_path / 'two.db'}", tmp_path / "two.log", port=first.port
        )
        code = second.wait(30)
        assert code == 1
        ours = [
            line
            for line in (tmp_path / "two.log").read_text().splitlines()
            if line.startswith("error:")
        ]
        assert ours == [
            f"error: cannot listen on 127.0.0.1:{first.port}: the port is in use by another "
            "process (or the address is not this host's)"
        ]
        # The first one still serves, alone.
        first.wait_serving(5)
        assert first.proc.poll() is None
    finally:
        first.kill()


def table_writes(url: str, table: str) -> int:
    rows = fetch(
        url,
        "SELECT n_tup_ins + n_tup_upd + n_tup_del AS n FROM pg_stat_user_tables WHERE relname = $1",
        table,
    )
    return int(rows[0]["n"])


def database_writes(url: str) -> int:
    rows = fetch(url, "SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) AS n FROM pg_stat_user_tables")
    return int(rows[0]["n"])


@pytest.mark.postgres
def test_parked_runs_cost_no_row_writes_at_rest(tmp_path: Path) -> None:
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    count = 300
    parked = plan_of(
        {"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "go?"}},
    )
    try:
        # A short heartbeat timeout: the old per-run renewal rewrote every owned run every
        # third of it (300 runs, lease 2 s: ~450 row updates a second).
        cluster.start("A", lease=2)
        cluster.start("B", lease=2)
        # Each replica runs what it accepts while it has room: the runs are sent to both.
        for i in range(count):
            call(cluster, "AB"[i % 2], "Execute", pb.ExecuteRequest(executable_plan=parked), tenant)
        wait_for(
            lambda: (
                fetch(url, "SELECT count(*) AS n FROM clarifications WHERE status = 'PENDING'")[0][
                    "n"
                ]
                == count
            ),
            60,
            "every run to wait on its clarification",
        )
        held = Counter(
            owners(url, [r["run_id"] for r in fetch(url, "SELECT run_id FROM runs")]).values()
        )
        assert set(held) == {"A", "B"}, held
        # Statistics reach pg_stat_user_tables within about a second of a commit.
        time.sleep(2)
        runs_before, all_before = table_writes(url, "runs"), database_writes(url)
        window = 4.0
        time.sleep(window)
        runs_rate = (table_writes(url, "runs") - runs_before) / window
        all_rate = (database_writes(url) - all_before) / window
        print(
            f"\nat rest, {count} parked runs on two replicas: runs rows {runs_rate:.1f}/s, "
            f"whole database {all_rate:.1f} rows/s (runs per replica: {dict(held)})"
        )
        assert runs_rate == 0, f"{runs_rate} run rows written per second at rest"
        # What is left is the heartbeats: one row per replica, three times per timeout.
        assert all_rate <= 2 * 2, all_rate

        # The runs are still owned and alive: an answer moves one at once.
        run_id, clarification_id = next(
            (r["run_id"], r["clarification_id"])
            for r in fetch(url, "SELECT run_id, clarification_id FROM clarifications LIMIT 1")
        )
        call(
            cluster,
            "B",
            "RespondToClarification",
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=clarification_id,
                response=struct_pb2.Value(string_value="yes"),
            ),
            tenant,
        )
        assert finished(cluster, "A", run_id, tenant, 10).status == pb.EXECUTION_STATUS_COMPLETED
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


def heartbeat_of(url: str, replica_id: str) -> float:
    rows = fetch(
        url, "SELECT max(heartbeat_at) AS h FROM replicas WHERE replica_id = $1", replica_id
    )
    return float(rows[0]["h"] or 0)


@pytest.mark.postgres
def test_a_stopped_replica_that_comes_back_writes_nothing_for_runs_it_lost(
    tmp_path: Path,
) -> None:
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    lease = 1.5
    try:
        cluster.start("A", lease=lease)
        cluster.start("B", lease=lease)
        run_ids = [
            call(
                cluster,
                "AB"[i % 2],
                "Execute",
                pb.ExecuteRequest(executable_plan=waits(8, 0.5)),
                tenant,
            ).run_id
            for i in range(8)
        ]
        wait_for(lambda: (o := owners(url, run_ids)) and all(o.values()), 10, "claims")
        time.sleep(0.8)
        on_a = [r for r, o in owners(url, run_ids).items() if o == "A"]
        assert on_a, "A holds some runs"

        stopped = time.monotonic()
        cluster.procs["A"].signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: all(o == "B" for o in owners(url, on_a).values()),
                lease + 5,
                "B to take over the stopped replica's runs",
            )
            takeover = time.monotonic() - stopped
            # A core.wait step A had in flight is past its deadline now: on waking, A's
            # first thought is to record it.
            time.sleep(0.6)
        finally:
            cluster.procs["A"].signal(signal.SIGCONT)
        woke = time.time()
        print(f"\ntakeover of a SIGSTOPped replica ({len(on_a)} runs, {lease} s): {takeover:.2f}s")

        for run_id in run_ids:
            done = finished(cluster, "B", run_id, tenant, 30)
            assert done.status == pb.EXECUTION_STATUS_COMPLETED
            seen = events(cluster, "B", run_id, tenant)
            assert [e.sequence for e in seen] == list(range(2, seen[-1].sequence + 1))
            completed = Counter(e.step_id for e in seen if e.type == pb.EVENT_TYPE_STEP_COMPLETED)
            assert completed == {f"w{i}": 1 for i in range(8)}, (run_id, completed)

        # A came back alive: it beats again, serves, and knows it lost those runs.
        wait_for(lambda: heartbeat_of(url, "A") > woke, 5, "A to beat again")
        log = cluster.procs["A"].log_path.read_text()
        for run_id in on_a:
            assert any(
                f'"run_id": "{run_id}"' in line and '"lost": true' in line
                for line in log.splitlines()
            ), f"A did not stop {run_id} as lost"
        assert '"level": "error"' not in log
        channel = grpc.insecure_channel(cluster.procs["A"].address)
        with channel:
            got = pb_grpc.OrchestratorServiceStub(channel).GetExecution(
                pb.GetExecutionRequest(run_id=on_a[0]),
                metadata=(("x-tenant-id", tenant),),
                timeout=10,
            )
        assert got.execution.status == pb.EXECUTION_STATUS_COMPLETED
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


@pytest.mark.postgres
def test_two_processes_under_one_replica_id_never_both_own_a_run(tmp_path: Path) -> None:
    """The issue's case: two processes given one replica id. The second is a new
    incarnation: it takes the name's runs back, and the first can no longer write to them."""
    url = postgres_database()
    tenant = str(uuid.uuid4())
    env = {"ORCHESTRATOR_REPLICA_ID": "vm:50091", "ORCHESTRATOR_LEASE_SECONDS": "2"}
    first = ServeProcess(url, tmp_path / "first.log", env=env)
    second: ServeProcess | None = None
    try:
        first.wait_serving()
        channel = grpc.insecure_channel(first.address)
        with channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            run_ids = [
                stub.Execute(
                    pb.ExecuteRequest(executable_plan=waits(12, 0.5)),
                    metadata=(("x-tenant-id", tenant),),
                    timeout=30,
                ).run_id
                for _ in range(4)
            ]
        wait_for(lambda: (o := owners(url, run_ids)) and all(o.values()), 10, "claims")
        second = ServeProcess(url, tmp_path / "second.log", env=env)
        second.wait_serving()
        # What was unfinished once the second served, it had taken back at its start.
        taken = [
            r["run_id"]
            for r in fetch(
                url,
                "SELECT run_id FROM runs WHERE run_id = ANY($1::text[]) AND completed_at IS NULL",
                run_ids,
            )
        ]
        assert taken, "the first process finished everything before the second started"
        incarnations = fetch(url, "SELECT incarnation FROM replicas WHERE replica_id = 'vm:50091'")
        assert len(incarnations) == 2, incarnations
        cluster = Cluster(url, tmp_path)
        cluster.procs["second"] = second
        for run_id in run_ids:
            done = finished(cluster, "second", run_id, tenant, 30)
            assert done.status == pb.EXECUTION_STATUS_COMPLETED
            seen = events(cluster, "second", run_id, tenant)
            completed = Counter(e.step_id for e in seen if e.type == pb.EVENT_TYPE_STEP_COMPLETED)
            assert completed == {f"w{i}": 1 for i in range(12)}, (run_id, completed)
        log = first.log_path.read_text().splitlines()
        for run_id in taken:
            assert any(f'"run_id": "{run_id}"' in line and "lease_lost" in line for line in log), (
                f"the first process did not give up {run_id}"
            )
    finally:
        first.kill()
        if second is not None:
            second.kill()
        drop_postgres_database(url)
