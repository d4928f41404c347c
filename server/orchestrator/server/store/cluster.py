"""Replicas hear each other through PostgreSQL LISTEN/NOTIFY (DESIGN §7).

The writer sends NOTIFY inside each commit (see `encode_notices`); every replica listens on
one dedicated connection and hands the other replicas' messages to a handler. After a lost
connection it reconnects and reports a "resync", since messages may have been missed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import sqlalchemy as sa
import structlog

from orchestrator.server.store.notices import Notice, NoticeKind

log = structlog.get_logger("orchestrator.cluster")

CHANNEL = "orchestrator"
# While the listening connection is down it is tried again this often (messages missed
# meanwhile are made up for by a "resync", so sooner is better), each try cut off after
# RECONNECT_TIMEOUT seconds.
RECONNECT_DELAY = 0.25
RECONNECT_TIMEOUT = 5.0
Handler = Callable[[list[Notice]], None]


def asyncpg_dsn(url: sa.URL) -> str:
    """The libpq-style DSN asyncpg takes, from a SQLAlchemy URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class ClusterBus:
    """Listens for the other replicas' messages."""

    def __init__(self, url: sa.URL, origin: str, handler: Handler) -> None:
        self._dsn = asyncpg_dsn(url)
        self._origin = origin
        self._handler = handler
        self._task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self.listening = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-listener")
        await asyncio.wait_for(self.listening.wait(), 30)

    async def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def _receive(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
            if message.get("o") == self._origin:
                return  # our own commits were handled where they happened
            notices = []
            for m in message["m"]:
                try:
                    notices.append(Notice.from_json(m))
                except ValueError:
                    # A kind from a newer release (a rolling deploy): the rest still counts.
                    log.debug("cluster.unknown_notice", notice=str(m)[:200])
            self._handler(notices)
        except Exception:
            log.exception("cluster.bad_message", payload=payload[:200])

    async def _run(self) -> None:
        first = True
        failing = False  # quiet while the store is away: one line when lost, one when back
        while not self._stopped.is_set():
            lost = asyncio.Event()
            try:
                conn = await asyncio.wait_for(asyncpg.connect(self._dsn), RECONNECT_TIMEOUT)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if not failing:
                    log.warning("cluster.connect_failed")
                    failing = True
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._receive)
                self.listening.set()
                if not first:
                    log.info("cluster.reconnected")
                    self._handler([Notice(NoticeKind.RESYNC)])
                first = False
                failing = False
                waiters = {
                    asyncio.create_task(self._stopped.wait()),
                    asyncio.create_task(lost.wait()),
                }
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pass  # lost while subscribing: connect again
            finally:
                if not conn.is_closed():
                    conn.terminate()
            if not self._stopped.is_set():
                if not failing:
                    log.warning("cluster.connection_lost")
                    failing = True
                await asyncio.sleep(RECONNECT_DELAY)
