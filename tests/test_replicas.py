"""Replicas on PostgreSQL (issue 13): incarnations fence each other, runs that only wait hold
no owner (no row writes at rest, any replica moves them on), a stopped replica that comes back
writes nothing for the runs it lost, and a taken port fails the start. Real `orchestrator
serve` processes on loopback."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2

from bench import parked
from orchestrator.server.store.cluster import asyncpg_dsn
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import plan_of
from tests.process import ServeProcess
from tests.stores import drop_postgres_database, execute_postgres, fetch, postgres_database
from tests.test_durability import (
    Cluster,
    call,
    events,
    execution,
    finished,
    owners,
    wait_for,
    waits,
)

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


@pytest.mark.postgres
def test_parked_runs_hold_no_owner_cost_nothing_at_rest_and_move_on_the_survivor(
    tmp_path: Path,
) -> None:
    """The issue's acceptance, a few hundred runs (`python -m bench --only parked`: 20,000).
    Runs waiting on a person hold no owner: at rest only the heartbeats write, and once the
    replica that accepted them is SIGKILLed, an answer given to the other moves its run
    within 2 s (no heartbeat lapse to wait for: nobody owns it)."""
    url = postgres_database()
    try:
        found = parked.measure(url, 300, window=4.0, answers=5, log_dir=tmp_path, lease=2.0)
    finally:
        drop_postgres_database(url)
    print(
        f"\n{found.runs} parked runs on two replicas: {found.writes_per_replica:.2f} row writes/s"
        f" per replica at rest (runs rows {found.run_writes_per_second:.2f}/s), parked in"
        f" {found.park_seconds:.1f} s; moves after SIGKILL: "
        + ", ".join(f"{m * 1000:.0f} ms" for m in found.moves)
    )
    assert found.unowned == found.runs
    assert found.run_writes_per_second == 0
    # What is left is the heartbeats: one row per replica, three times per timeout (2 s).
    assert found.writes_per_replica < parked.WRITES_CEILING
    assert len(found.moves) == 5
    assert max(found.moves) < parked.MOVE_CEILING, found.moves


def unowned(url: str, run_ids: list[str]) -> bool:
    rows = fetch(
        url,
        "SELECT count(*) AS n FROM runs WHERE run_id = ANY($1::text[]) AND owner IS NULL"
        " AND wake_at IS NOT NULL",
        run_ids,
    )
    return int(rows[0]["n"]) == len(run_ids)


@pytest.mark.postgres
def test_a_parked_pause_timer_and_signal_go_on_from_any_replica(tmp_path: Path) -> None:
    """A paused run, a run on a core.wait and one waiting for a signal all park; the replica
    that accepted them is SIGKILLed; the other one resumes, signals, and claims the timer
    when it is due, without waiting for the dead one's heartbeat to lapse."""
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    lease = 30.0  # a lapse the test would notice: nothing here may wait for it
    then = {"stepId": "then", "tool": "core.echo", "parameters": {"ok": True}}
    try:
        for name in ("A", "B"):
            cluster.start(name, lease=lease, park_after_seconds="1")
        paused, timer, signalled = (
            call(cluster, "A", "Execute", pb.ExecuteRequest(executable_plan=plan), tenant).run_id
            for plan in (
                plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 60}}, then),
                plan_of({"stepId": "w", "tool": "core.wait", "parameters": {"seconds": 4}}, then),
                plan_of(
                    {
                        "stepId": "w",
                        "tool": "core.wait_for_signal",
                        "parameters": {"signal_name": "go"},
                    },
                    then,
                ),
            )
        )
        accepted = time.monotonic()
        wait_for(
            lambda: (
                execution(cluster, "A", paused, tenant).steps[0].status == pb.STEP_STATUS_RUNNING
            ),
            10,
            "the paused run's wait to start",
        )
        call(cluster, "A", "Pause", pb.PauseRequest(run_id=paused), tenant)
        wait_for(lambda: unowned(url, [paused, timer, signalled]), 10, "the three to park")
        cluster.procs["A"].kill()

        call(cluster, "B", "Resume", pb.ResumeRequest(run_id=paused), tenant)
        call(
            cluster,
            "B",
            "SignalExecution",
            pb.SignalExecutionRequest(run_id=signalled, signal_name="go"),
            tenant,
        )
        for run_id in (signalled, timer):
            done = finished(cluster, "B", run_id, tenant, 10)
            assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
        # The timer went on once due (4 s after it started), by B's claim.
        assert time.monotonic() - accepted < 4 + 5
        # The resumed run is B's now, its 60 s wait going on (held: it is due later than
        # park_after, so it parks again, owned by nobody but due at its timer).
        resumed = execution(cluster, "B", paused, tenant)
        assert resumed.status == pb.EXECUTION_STATUS_RUNNING
        assert resumed.steps[0].status == pb.STEP_STATUS_RUNNING
        wait_for(lambda: unowned(url, [paused]), 10, "the resumed run to park on its timer")
        call(cluster, "B", "Cancel", pb.CancelRequest(run_id=paused), tenant)
        assert execution(cluster, "B", paused, tenant).status == pb.EXECUTION_STATUS_CANCELLED
        # Retried, the run cancelled while parked is due at once (not at its old wake-up time).
        call(cluster, "B", "RetryExecution", pb.RetryExecutionRequest(run_id=paused), tenant)
        wait_for(
            lambda: (
                (got := execution(cluster, "B", paused, tenant)).status
                == pb.EXECUTION_STATUS_RUNNING
                and got.steps[0].status == pb.STEP_STATUS_RUNNING
            ),
            5,
            "the retried run to start its wait again",
        )
        log = cluster.procs["B"].log_path.read_text()
        assert '"level": "error"' not in log
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


@pytest.mark.postgres
def test_an_answer_given_to_an_api_only_replica_wakes_a_parked_run_elsewhere(
    tmp_path: Path,
) -> None:
    """A replica that executes nothing cannot take a parked run: its answer makes the run
    due and a notice tells the others, one of which claims it at once."""
    url = postgres_database()
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    try:
        cluster.start("worker", lease=30)
        cluster.start("api", lease=30, execute="false")
        asking = plan_of(
            {"stepId": "ask", "tool": "core.clarify", "parameters": {"prompt": "go?"}},
            {
                "stepId": "then",
                "tool": "core.echo",
                "parameters": {"got": "{{ steps.ask.output }}"},
            },
        )
        run_id = call(
            cluster, "api", "Execute", pb.ExecuteRequest(executable_plan=asking), tenant
        ).run_id
        wait_for(lambda: unowned(url, [run_id]), 10, "the run to park")
        question = execution(cluster, "api", run_id, tenant).pending_clarifications[0]
        sent = time.monotonic()
        call(
            cluster,
            "api",
            "RespondToClarification",
            pb.RespondToClarificationRequest(
                run_id=run_id,
                clarification_id=question.clarification_id,
                response=struct_pb2.Value(string_value="yes"),
            ),
            tenant,
        )
        done = finished(cluster, "api", run_id, tenant, 10)
        moved = time.monotonic() - sent
        assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
        assert done.steps[1].output.struct_value["got"] == "yes"
        # By the notice, not a lapse (30 s); the worker also looks every second.
        print(f"\nanswered on the API-only replica: moved in {moved * 1000:.0f} ms")
        assert moved < 0.5, moved
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


def gave_up(process: ServeProcess, run_id: str) -> bool:
    """Whether the process logged that it lost the run to another incarnation."""
    lines = process.log_path.read_text().splitlines()
    return any(f'"run_id": "{run_id}"' in line and "lease_lost" in line for line in lines)


class OneReplicaId:
    """Two `orchestrator serve` processes given one replica id, on a fresh PostgreSQL
    database: the first serving, the second started on demand (`start_second`)."""

    def __init__(self, tmp_path: Path, replica_id: str) -> None:
        self.url = postgres_database()
        self.tmp_path = tmp_path
        self.env = {"ORCHESTRATOR_REPLICA_ID": replica_id, "ORCHESTRATOR_LEASE_SECONDS": "2"}
        self.first = ServeProcess(self.url, tmp_path / "first.log", env=self.env)
        self.second: ServeProcess | None = None

    def start_second(self) -> ServeProcess:
        self.second = ServeProcess(self.url, self.tmp_path / "second.log", env=self.env)
        return self.second


@contextmanager
def one_replica_id(tmp_path: Path, replica_id: str) -> Iterator[OneReplicaId]:
    pair = OneReplicaId(tmp_path, replica_id)
    try:
        pair.first.wait_serving()
        yield pair
    finally:
        for process in (pair.first, pair.second):
            if process is not None:
                process.kill()
        drop_postgres_database(pair.url)


@pytest.mark.postgres
def test_two_processes_under_one_replica_id_never_both_own_a_run(tmp_path: Path) -> None:
    """The issue's case: two processes given one replica id. The second is a new
    incarnation: it takes the name's runs back, and the first can no longer write to them."""
    tenant = str(uuid.uuid4())
    with one_replica_id(tmp_path, "vm:50091") as pair:
        url, first = pair.url, pair.first
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
        second = pair.start_second()
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
        for run_id in taken:
            assert gave_up(first, run_id), f"the first process did not give up {run_id}"


@contextmanager
def row_locked(url: str, run_id: str) -> Iterator[threading.Event]:
    """Hold the run's row lock (as a transaction writing it would) until the yielded event is
    set; the lock is held once this is entered."""
    held, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(sa.make_url(url)))
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM runs WHERE run_id = $1 FOR UPDATE", run_id)
                held.set()
                await asyncio.to_thread(release.wait)
        finally:
            await conn.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),))
    thread.start()
    try:
        assert held.wait(10), "the row lock was not taken"
        yield release
    finally:
        release.set()
        thread.join(10)


@pytest.mark.postgres
def test_a_new_incarnation_takes_back_a_run_whose_row_is_locked_at_its_start(
    tmp_path: Path,
) -> None:
    """A run the earlier incarnation is writing at the moment the new one starts (its row
    locked) is taken back too: the start waits for the lock instead of skipping the row, which
    would leave the run to the earlier incarnation for good (its heartbeat is fresh)."""
    tenant = str(uuid.uuid4())
    with one_replica_id(tmp_path, "vm:50092") as pair:
        url, first = pair.url, pair.first
        with grpc.insecure_channel(first.address) as channel:
            run_id = (
                pb_grpc.OrchestratorServiceStub(channel)
                .Execute(
                    pb.ExecuteRequest(executable_plan=waits(1, 30)),
                    metadata=(("x-tenant-id", tenant),),
                    timeout=30,
                )
                .run_id
            )
        before = incarnation_of(url, "vm:50092")
        with row_locked(url, run_id) as release:
            second = pair.start_second()
            # Its start waits for the lock (or, if it passed the row by, it serves).
            wait_for(
                lambda: (
                    fetch(
                        url,
                        "SELECT 1 FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    or "server.started" in second.log_path.read_text()
                ),
                30,
                "the second's start to reach the run",
            )
            release.set()
            second.wait_serving()
        owner = fetch(url, "SELECT owner FROM runs WHERE run_id = $1", run_id)[0]["owner"]
        assert owner not in (None, before), owner
        wait_for(lambda: gave_up(first, run_id), 10, "the first process giving the run up")


@contextmanager
def counting_server(delay: float) -> Iterator[tuple[str, Counter[str]]]:
    """A loopback HTTP server answering every GET after `delay`, counting the calls per
    Idempotency-Key (http.request sends `<run_id>/<step_id>`); yields its URL and the counts."""
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    class Counting(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                calls[self.headers.get("Idempotency-Key", "")] += 1
            time.sleep(delay)
            try:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the caller was killed meanwhile

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", calls
    finally:
        server.shutdown()
        server.server_close()


# Who writes what: every step and event row written, and every change of a run's owner, with
# the writing connection's application_name (each replica names its connections after its
# incarnation) and the time. Row locks order a replica's fenced writes to a run and another's
# claim of it, so "after the takeover" is well defined.
AUDIT = """
CREATE TABLE audit (at double precision, who text, tbl text, run_id text, old_owner text,
                    new_owner text);
CREATE FUNCTION audit_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit VALUES (extract(epoch FROM clock_timestamp()),
    current_setting('application_name'), TG_TABLE_NAME, NEW.run_id, NULL, NULL);
  RETURN NEW;
END $$;
CREATE FUNCTION audit_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit VALUES (extract(epoch FROM clock_timestamp()),
    current_setting('application_name'), 'owner', NEW.run_id, OLD.owner, NEW.owner);
  RETURN NEW;
END $$;
CREATE TRIGGER audit_steps AFTER INSERT OR UPDATE ON steps
  FOR EACH ROW EXECUTE FUNCTION audit_write();
CREATE TRIGGER audit_events AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION audit_write();
CREATE TRIGGER audit_owner AFTER UPDATE OF owner ON runs
  FOR EACH ROW WHEN (OLD.owner IS DISTINCT FROM NEW.owner) EXECUTE FUNCTION audit_owner();
"""


def incarnation_of(url: str, replica_id: str) -> str:
    rows = fetch(url, "SELECT incarnation FROM replicas WHERE replica_id = $1", replica_id)
    assert len(rows) == 1, rows
    return str(rows[0]["incarnation"])


def writes_after_takeover(url: str, incarnation: str) -> list[dict[str, object]]:
    """Step and event rows `incarnation` wrote to a run after another replica took it."""
    return fetch(
        url,
        """
        WITH taken AS (
          SELECT run_id, min(at) AS at FROM audit
          WHERE tbl = 'owner' AND old_owner = $1 AND who <> $1 GROUP BY run_id)
        SELECT a.tbl, a.run_id, a.at - t.at AS late FROM audit a JOIN taken t USING (run_id)
        WHERE a.who = $1 AND a.tbl <> 'owner' AND a.at > t.at
        """,
        incarnation,
    )


@pytest.mark.postgres
def test_three_replicas_one_killed_one_stopped_lose_nothing_and_do_nothing_twice(
    tmp_path: Path,
) -> None:
    """Runs in flight on three replicas; A is SIGKILLed and B SIGSTOPped past the heartbeat
    timeout, then continued. Every run completes, no step completes twice, every call was
    made, and B writes nothing (no step row, no event) to a run after it was taken over."""
    url = postgres_database()
    execute_postgres(url, AUDIT)
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    lease = 2.0
    runs, steps_per_run = 24, 4
    try:
        with counting_server(0.4) as (address, calls):
            plan = plan_of(
                *(
                    {"stepId": f"h{i}", "tool": "http.request", "parameters": {"url": address}}
                    for i in range(steps_per_run)
                )
            )
            plan.security_context.allowed_tools[:] = ["http.request"]
            plan.security_context.required_capabilities[:] = ["network.http"]
            for name in ("A", "B", "C"):
                cluster.start(name, lease=lease, http_allow="127.0.0.1/32")
            incarnations = {name: incarnation_of(url, name) for name in ("A", "B", "C")}
            # Each replica runs what it accepts while it has room: the runs are sent to all.
            run_ids = [
                call(
                    cluster,
                    "ABC"[i % 3],
                    "Execute",
                    pb.ExecuteRequest(executable_plan=plan),
                    tenant,
                ).run_id
                for i in range(runs)
            ]
            held = wait_for(
                lambda: (
                    (o := owners(url, run_ids))
                    and all(o.values())
                    and {"A", "B"} <= set(o.values())
                    and o
                ),
                10,
                "every run claimed, A and B holding some",
            )
            on_b = [r for r, o in held.items() if o == "B"]
            time.sleep(0.3)  # calls in flight everywhere
            cluster.procs["A"].kill()
            cluster.procs["B"].signal(signal.SIGSTOP)
            try:
                wait_for(
                    lambda: not {"A", "B"} & set(owners(url, run_ids).values()),
                    lease + 10,
                    "C to take over A's and B's runs",
                )
                time.sleep(1.0)  # B's calls have been answered meanwhile: it would record them
            finally:
                cluster.procs["B"].signal(signal.SIGCONT)
            woke = time.time()
            for run_id in run_ids:
                done = finished(cluster, "C", run_id, tenant, 30)
                assert done.status == pb.EXECUTION_STATUS_COMPLETED, done.error_message
                seen = events(cluster, "C", run_id, tenant)
                assert [e.sequence for e in seen] == list(range(2, seen[-1].sequence + 1))
                completed = Counter(
                    e.step_id for e in seen if e.type == pb.EVENT_TYPE_STEP_COMPLETED
                )
                assert completed == {f"h{i}": 1 for i in range(steps_per_run)}, (run_id, completed)
            # B is alive again: it beats, and it has had the time to try its stale writes.
            wait_for(lambda: heartbeat_of(url, "B") > woke, 5, "B to beat again")
            time.sleep(1.0)
            # Every call was made; those in flight at the failures were made again (at least
            # once, with the same key), none of the others.
            keys = {f"{r}/h{i}" for r in run_ids for i in range(steps_per_run)}
            assert keys <= set(calls), keys - set(calls)
            again = sum(n - 1 for n in calls.values())
            hit = sum(1 for o in held.values() if o in ("A", "B"))
            assert again <= hit, (again, hit)
        # The audit tells the incarnations apart (B wrote before it was stopped)...
        wrote = fetch(url, "SELECT count(*) AS n FROM audit WHERE who = $1", incarnations["B"])
        assert wrote[0]["n"] > 0
        # ...and B wrote nothing to the runs C took from it.
        stale = writes_after_takeover(url, incarnations["B"])
        assert stale == [], stale
        assert writes_after_takeover(url, incarnations["A"]) == []
        log = cluster.procs["B"].log_path.read_text()
        for run_id in on_b:
            assert any(
                f'"run_id": "{run_id}"' in line and '"lost": true' in line
                for line in log.splitlines()
            ), f"B did not stop {run_id} as lost"
        print(f"\n{runs} runs on three replicas: {again} calls made again (of {hit} in flight)")
    finally:
        cluster.stop_all()
        drop_postgres_database(url)


# A store slow to write events (a busy disk, a loaded server): each group commit takes as long
# as its events, seconds for a large batch, while a heartbeat queued behind it would lapse.
SLOW_EVENTS = """
CREATE FUNCTION slow_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END $$;
CREATE TRIGGER slow_events BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow_event();
"""


@pytest.mark.postgres
def test_a_replica_saturated_with_work_loses_no_run_to_the_other(tmp_path: Path) -> None:
    """Every run is submitted to A, as fast as it takes them, on a store slow to write events,
    with a heartbeat timeout short enough that a heartbeat queued behind A's group commits
    would lapse: heartbeats go on their own connection, so B never takes a run from A (no
    owner change away from a live replica, no lost lease) while both work the backlog off."""
    url = postgres_database()
    execute_postgres(url, AUDIT + SLOW_EVENTS)
    cluster = Cluster(url, tmp_path)
    tenant = str(uuid.uuid4())
    runs = 200
    try:
        # Few step slots: a replica runs what it accepts only while a slot is free to the
        # tenant, so most of A's backlog is left to claims, B's among them.
        for name in ("A", "B"):
            cluster.start(name, lease=1.5, execute_rate="0", max_steps_in_flight="8")
        incarnations = {name: incarnation_of(url, name) for name in ("A", "B")}
        plan = plan_of(
            *({"stepId": f"s{i}", "tool": "core.echo", "parameters": {"i": i}} for i in range(3))
        )

        async def submit() -> list[str]:
            async with grpc.aio.insecure_channel(cluster.procs["A"].address) as channel:
                stub = pb_grpc.OrchestratorServiceStub(channel)
                todo = iter(range(runs))
                run_ids: list[str] = []

                async def worker() -> None:
                    for _ in todo:
                        reply = await stub.Execute(
                            pb.ExecuteRequest(executable_plan=plan),
                            metadata=(("x-tenant-id", tenant),),
                            timeout=60,
                        )
                        run_ids.append(reply.run_id)

                await asyncio.gather(*(worker() for _ in range(32)))
                return run_ids

        started = time.monotonic()
        run_ids = asyncio.run(submit())
        wait_for(
            lambda: (
                fetch(
                    url,
                    "SELECT count(*) AS n FROM runs WHERE run_id = ANY($1::text[])"
                    " AND status = 'COMPLETED'",
                    run_ids,
                )[0]["n"]
                == runs
            ),
            120,
            "every run to complete",
        )
        took = time.monotonic() - started
        # Claims: an owner set on a run nobody held.
        worked = Counter(
            r["who"]
            for r in fetch(url, "SELECT who FROM audit WHERE tbl = 'owner' AND old_owner IS NULL")
        )
        taken = fetch(
            url,
            "SELECT run_id, who, old_owner FROM audit WHERE tbl = 'owner'"
            " AND old_owner IS NOT NULL AND new_owner IS DISTINCT FROM old_owner"
            " AND who <> old_owner",
        )
        print(
            f"\n{runs} runs submitted to A in {took:.1f} s: runs claimed per incarnation "
            f"{dict(worked)}, taken from a live replica: {len(taken)}"
        )
        assert taken == []
        # Both replicas worked (B claimed its share of A's backlog).
        assert {incarnations["A"], incarnations["B"]} <= set(worked)
        for name in ("A", "B"):
            assert "lease_lost" not in cluster.procs[name].log_path.read_text()
    finally:
        cluster.stop_all()
        drop_postgres_database(url)
