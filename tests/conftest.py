"""Fixtures: a real server on a free port over a fresh store, and a real channel.

Every server-backed test runs twice: on a fresh SQLite file and on a fresh PostgreSQL
database (`ORCHESTRATOR_TEST_POSTGRES_URL`, default the machine's server). PostgreSQL tests
are marked `postgres`; CI runs them, they never skip."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.protobuf import json_format

from orchestrator.server.app import Server, build_server
from orchestrator.server.settings import Settings
from orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from tests.stores import drop_postgres_database, drop_template, postgres_database

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plans"


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def make_settings(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    defaults: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "database_url": database_url or sqlite_url(tmp_path / "orchestrator.db"),
        "shutdown_grace": 0.5,
        "heartbeat_seconds": 15.0,
    }
    return Settings(**{**defaults, **overrides})


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL store for one test (mark the test `postgres`)."""
    url = postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store for one test."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "orchestrator.db")
        return
    url = postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="session", autouse=True)
def _postgres_template() -> Iterator[None]:
    yield
    drop_template()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url)


@asynccontextmanager
async def running(settings: Settings, **kwargs: Any) -> AsyncIterator[Server]:
    """A started server, stopped on exit (build_server's keyword arguments pass through)."""
    srv = await build_server(settings, **kwargs)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.2)


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Server]:
    async with running(settings) as srv:
        yield srv


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.OrchestratorServiceAsyncStub:
    # Given an aio channel, the generated stub's constructor is typed as the async stub.
    return pb_grpc.OrchestratorServiceStub(channel)


@pytest.fixture
def tenant() -> str:
    return str(uuid.uuid4())


ResponseT = TypeVar("ResponseT")


async def read_message(stream: grpc.aio.UnaryStreamCall[Any, ResponseT]) -> ResponseT:
    """The stream's next message, where the test expects one (not EOF). grpc-stubs type
    `read()` as `object`, since their EOF type is `object`."""
    message = await stream.read()
    assert message is not grpc.aio.EOF, "the stream ended"
    return cast(ResponseT, message)


def md(tenant: str, **extra: str) -> tuple[tuple[str, str], ...]:
    """Call metadata for a tenant."""
    return (("x-tenant-id", tenant), *((k.replace("_", "-"), v) for k, v in extra.items()))


def load_plan(name: str) -> pb.ExecutablePlan:
    """An example plan from examples/plans/."""
    data = json.loads((EXAMPLES / name).read_text())
    return json_format.ParseDict(data, pb.ExecutablePlan())


def plan_of(*steps: dict[str, Any], parallel: bool = False, **flow: Any) -> pb.ExecutablePlan:
    """A one-flow plan from step dicts in proto3 JSON form; its security context allows the
    core tools it uses (capability validation is on by default)."""
    tools = sorted({s["tool"] for s in steps if str(s.get("tool", "")).startswith("core.")})
    return json_format.ParseDict(
        {
            "planId": "test",
            "name": "test plan",
            "flows": [
                {"flowId": "main", "steps": list(steps), "parallelExecution": parallel, **flow}
            ],
            "securityContext": {"allowedTools": tools},
        },
        pb.ExecutablePlan(),
    )


def echo_plan(n: int = 3) -> pb.ExecutablePlan:
    return plan_of(
        *({"stepId": f"s{i}", "tool": "core.echo", "parameters": {"i": i}} for i in range(n))
    )


class ThreadedServer:
    """A real server on its own event loop in a thread, for synchronous (hypothesis) tests."""

    def __init__(self, settings: Settings) -> None:
        import asyncio
        import threading

        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self.server: Server | None = None
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("server did not start")

    def _run(self, settings: Settings) -> None:
        import asyncio

        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self.server = await build_server(settings)
            await self.server.start()
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    def stop(self) -> None:
        import asyncio

        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=0.2), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    srv = ThreadedServer(make_settings(tmp_path_factory.mktemp("threaded"), execute=False))
    try:
        yield srv
    finally:
        srv.stop()


async def until(check: Callable[[], bool], within: float, what: str) -> float:
    """Wait until `check()` holds; the monotonic time it did."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic()
