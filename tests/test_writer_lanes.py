"""Writer lanes on PostgreSQL: group commits side by side, one run's units in order, and
admissions by concurrency key that cannot deadlock."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from orchestrator.server.store.database import Database
from orchestrator.server.store.writer import Tx, Unit, Writer
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.conftest import make_settings, running, sqlite_url
from tests.stores import fetch
from tests.test_concurrency_keys import all_done, submit


def lane_keys(writer: Writer) -> list[str]:
    """A key for each of the writer's lanes."""
    found: dict[int, str] = {}
    while len(found) < writer.lanes:
        key = str(uuid.uuid4())
        found.setdefault(writer.lane_of(key), key)
    return [found[i] for i in range(writer.lanes)]


@pytest.mark.postgres
async def test_lanes_commit_side_by_side_and_one_keys_units_in_order(pg_url: str) -> None:
    db = Database(pg_url)
    await db.migrate()
    writer = Writer(db.writer, lanes=2)
    writer.start()
    first, second = lane_keys(writer)
    done: list[str] = []

    def unit(name: str, seconds: float) -> Unit[str]:
        async def run(tx: Tx) -> str:
            await tx.conn.execute(sa.text("SELECT pg_sleep(:s)"), {"s": seconds})
            return name

        return run

    try:
        assert writer.lanes == 2
        started = time.monotonic()
        futures = [
            writer.submit(unit("slow", 0.6), first),
            writer.submit(unit("after slow", 0.0), first),
            writer.submit(unit("other lane", 0.0), second),
        ]
        for future in futures:
            future.add_done_callback(lambda f: done.append(f.result()))
        await asyncio.gather(*futures)
        # The other lane's unit did not wait for the slow batch; the slow key's next unit
        # committed after it (in its batch or the next).
        assert done[0] == "other lane"
        assert done.index("slow") < done.index("after slow")
        assert time.monotonic() - started < 5
    finally:
        await writer.stop()
        await db.close()


async def test_sqlite_has_one_lane(tmp_path: Path) -> None:
    db = Database(sqlite_url(tmp_path / "one.db"))
    await db.migrate()
    writer = Writer(db.writer, sync_engine=db.sync_writer, direct=db.direct, lanes=4)
    assert writer.lanes == 1
    await db.close()


@pytest.mark.postgres
async def test_runs_of_many_keys_on_four_lanes_all_finish_without_a_deadlock(
    tmp_path: Path, pg_url: str
) -> None:
    """Runs of 16 concurrency keys accepted at once: each admission holds its key's lock until
    it commits. In one group commit, units of different keys in opposite orders on two lanes
    would each hold a key the other waits for; admitted alone, none can."""
    settings = make_settings(tmp_path, pg_url, writer_lanes=4)
    tenant = str(uuid.uuid4())
    async with running(settings) as srv:
        async with grpc.aio.insecure_channel(srv.address) as channel:
            stub = pb_grpc.OrchestratorServiceStub(channel)
            run_ids = await asyncio.gather(
                *(
                    submit(stub, tenant, 0.01, concurrency_key=f"k{i % 16}", max_concurrent=1)
                    for i in range(160)
                )
            )
            runs = await all_done(stub, tenant, list(run_ids))
            assert [r.status for r in runs] == [pb.EXECUTION_STATUS_COMPLETED] * len(runs)
    name = pg_url.rsplit("/", 1)[1]
    stats = fetch(pg_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = $1", name)
    assert stats[0]["deadlocks"] == 0
