"""Store outages the tests can cause: a TCP proxy they cut and restore, and a PostgreSQL
cluster of their own that they stop and start (never the machine's own on port 5432)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from tests.process import free_port


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target`. `cut()` drops every connection and refuses new
    ones (the port is closed); `restore()` listens on the same port again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._cuts = 0  # a link that was being made across a cut is dropped, not kept

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        self._cuts += 1
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._links):
            writer.transport.abort()  # a reset, as a dropped network or a killed server gives
        self._links.clear()

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cuts = self._cuts
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if cuts != self._cuts:
            # Accepted before a cut, connected after it: the cut drops it too.
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._links.discard(sink)
            sink.transport.abort()


class PostgresCluster:
    """A throwaway PostgreSQL cluster (pg_createcluster, as root) on a free port, trust auth
    on loopback; `stop`/`start` restart the real server, `drop` removes it."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.name = f"orch_test_{uuid.uuid4().hex[:8]}"
        self.port = free_port()

    @staticmethod
    def installed_version() -> str | None:
        versions = sorted(
            (p.name for p in Path("/usr/lib/postgresql").glob("*") if (p / "bin").exists()),
            key=lambda v: int(v) if v.isdigit() else 0,
        )
        return versions[-1] if versions else None

    def _ctl(self, *args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=120)

    def create(self) -> None:
        self._ctl(
            "pg_createcluster",
            self.version,
            self.name,
            "--port",
            str(self.port),
            "--start",
            "--",
            "--auth=trust",
        )

    def stop(self) -> None:
        self._ctl("pg_ctlcluster", self.version, self.name, "stop", "--", "-m", "fast")

    def start(self) -> None:
        self._ctl("pg_ctlcluster", self.version, self.name, "start")

    def drop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ctl("pg_dropcluster", self.version, self.name, "--stop")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    async def create_database(self, database: str) -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database="postgres"
        )
        try:
            await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()


class SmallDisk:
    """A tmpfs of `size` mounted at `path` (root only), that the test fills and frees."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path = path
        self.size = size
        self._filler = path / "filler"

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )

    def fill(self) -> int:
        """Take every byte left, as another program filling the disk would; how many."""
        taken = 0
        with self._filler.open("ab", buffering=0) as out:
            for size in (1 << 20, 65536, 4096, 512):
                while True:
                    try:
                        written = out.write(b"\0" * size) or 0
                    except OSError:  # ENOSPC
                        break
                    taken += written
                    if written < size:
                        break
        return taken

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
