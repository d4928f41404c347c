"""Shared bench plumbing: real server subprocesses, a closed-loop load harness, CPU and RSS
readings, percentiles, and the figures every bench reports for the summary table."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.v1 import orchestrator_pb2 as pb

ORCHESTRATOR = str(Path(sys.executable).parent / "orchestrator")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(address) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{address} not serving")


@contextmanager
def process(argv: list[str], port: int, **env: str) -> Iterator[tuple[str, int]]:
    """A server subprocess on 127.0.0.1:`port`, once its health check says SERVING."""
    # Any free HTTP port unless the bench names one (the default 8080 may be taken).
    environment = {
        **os.environ,
        "ORCHESTRATOR_LOG_LEVEL": "warning",
        "ORCHESTRATOR_HTTP_PORT": "0",
        **env,
    }
    proc = subprocess.Popen(
        argv, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_serving(f"127.0.0.1:{port}")
        yield f"127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(database_url: str | None = None, *args: str, **env: str) -> Iterator[tuple[str, int]]:
    """`orchestrator serve` on a free port; yields (address, pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite+aiosqlite:///{tmp}/bench.db"
        argv = [ORCHESTRATOR, "serve", "--port", str(port), "--database-url", url, *args]
        with process(argv, port, **env) as served:
            yield served


@contextmanager
def serve_echo() -> Iterator[tuple[str, int]]:
    """The trivial echo server (bench/echo_server.py), started the same way as ours."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.echo_server", "--port", str(port)]
    with process(argv, port) as served:
        yield served


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy so far (all CPUs, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class Window:
    """CPU used by the server, this bench process and everything else over a window: on a
    shared 2-vCPU machine, "everything else" says when a figure is not to be trusted."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.server0 = thread_cpu(pid) if pid else {}
        self.client0 = time.process_time()
        self.machine0 = machine_busy()

    def describe(self) -> str:
        seconds = time.monotonic() - self.t0
        server = thread_cpu(self.pid) if self.pid else {}
        client = time.process_time() - self.client0
        used = sum(server.values()) - sum(self.server0.values())
        others = machine_busy() - self.machine0 - used - client
        text = cpu_split(self.server0, server, seconds) + ", " if self.pid else ""
        return (
            f"{text}bench client CPU {client / seconds * 100:.0f}%, "
            f"other processes {max(others, 0) / seconds * 100:.0f}%"
        )


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per thread name (digits dropped, so a pool counts as one)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        name = "".join(c for c in comm if not c.isdigit()).strip("-_ ") or "?"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    """ "main 60%, store-writer_ 30%, ..." for the window between two thread_cpu readings."""
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    total = sum(used.values())
    parts = [
        f"{k} {v / seconds * 100:.0f}%"
        for k, v in sorted(used.items(), key=lambda kv: -kv[1])
        if v / seconds >= 0.01
    ]
    split = f" ({', '.join(parts)})" if len(parts) > 1 else ""
    return f"server CPU {total / seconds * 100:.0f}%{split}"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(values: Sequence[float]) -> str:
    if not values:
        return "no samples"
    p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {statistics.fmean(values) * 1000:.1f} ms"


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# ---------------------------------------------------------------- load harness


@dataclass
class Load:
    """What a closed-loop load measured: completed calls, their latencies, failures."""

    calls: int
    seconds: float
    latencies: list[float]
    errors: dict[str, int] = field(default_factory=dict)
    server_cpu: float = float("nan")  # CPU seconds the server used during the window
    threads: str = ""  # the server's CPU by thread over the window

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 0.99)

    def describe(self, unit: str = "calls") -> str:
        text = (
            f"{self.rate:,.0f} {unit}/s ({self.calls} in {self.seconds:.1f} s), "
            f"{summary(self.latencies)}"
        )
        if self.server_cpu == self.server_cpu and self.calls:
            text += (
                f", server CPU {self.server_cpu / self.seconds * 100:.0f}% "
                f"= {self.server_cpu / self.calls * 1000:.2f} ms/call"
            )
        if self.threads:
            text += f"\n    {self.threads}"
        if self.errors:
            text += f", errors {self.errors}"
        return text


Call = Callable[[int], Awaitable[object]]


async def closed_loop(
    call: Call, callers: int, seconds: float, *, warmup: float = 1.0, pid: int | None = None
) -> Load:
    """`callers` tasks each call `call(caller)` back to back; warm up, then measure for
    `seconds`. Failed calls are counted by status code and not timed."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + seconds
    calls = 0

    async def caller(i: int) -> None:
        nonlocal calls
        while True:
            t0 = loop.time()
            if t0 >= stop:
                return
            try:
                await call(i)
            except grpc.aio.AioRpcError as exc:
                if t0 >= start:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    await asyncio.sleep(0.01)  # a refusal must not become a busy loop
                continue
            t1 = loop.time()
            if t0 >= start and t1 <= stop:
                latencies.append(t1 - t0)
                calls += 1

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(max(start - loop.time(), 0))
    cpu0 = cpu_seconds(pid) if pid else float("nan")
    window = Window(pid)
    await asyncio.sleep(max(stop - loop.time(), 0))
    cpu1 = cpu_seconds(pid) if pid else float("nan")
    threads = window.describe()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return Load(calls, seconds, latencies, errors, cpu1 - cpu0, threads)


def channels(address: str, n: int) -> list[grpc.aio.Channel]:
    return [grpc.aio.insecure_channel(address) for _ in range(n)]


# ---------------------------------------------------------------- the plan every bench runs


def echo_plan(steps: int = 3) -> pb.ExecutablePlan:
    """A sequential plan of `steps` core.echo steps."""
    plan = pb.ExecutablePlan(plan_id="bench-echo", name="bench")
    flow = plan.flows.add(flow_id="main", name="main")
    for i in range(steps):
        step = flow.steps.add(step_id=f"s{i}", tool="core.echo")
        step.parameters.update({"i": i, "message": f"step {i}"})
    plan.security_context.allowed_tools.append("core.echo")
    return plan


def tenants(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-tenant-id", tenant),)


# ---------------------------------------------------------------- figures for the summary


@dataclass
class Figure:
    """One measured figure, the ceiling it is compared with, and its target."""

    name: str
    value: float
    unit: str
    ceiling: str = ""  # key into CEILINGS
    target: str = ""
    met: bool | None = None

    def ratio(self) -> float | None:
        base = CEILINGS.get(self.ceiling)
        if base is None or not base.value or self.value != self.value:
            return None
        return self.value / base.value


# Ceilings measured in this run (bench/ceilings.py fills it), by key.
CEILINGS: dict[str, Figure] = {}
FIGURES: list[Figure] = []


def record(figure: Figure) -> Figure:
    FIGURES.append(figure)
    return figure


def ceiling(key: str) -> float | None:
    found = CEILINGS.get(key)
    return found.value if found is not None else None


def fmt(value: float, unit: str) -> str:
    if value != value:
        return "n/a"
    if unit == "ms":
        return f"{value * 1000:.1f} ms"
    if unit == "µs":
        return f"{value:,.1f} µs"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}"


def summary_table() -> str:
    rows = [("figure", "value", "ceiling (same run)", "ratio", "target", "met")]
    for f in FIGURES:
        base = CEILINGS.get(f.ceiling)
        ratio = f.ratio()
        rows.append(
            (
                f.name,
                fmt(f.value, f.unit),
                f"{base.name} {fmt(base.value, base.unit)}" if base and f.ceiling else "",
                f"{ratio:.2f}" if ratio is not None else "",
                f.target,
                {True: "yes", False: "NO", None: ""}[f.met],
            )
        )
    return table(rows)


# ---------------------------------------------------------------- PostgreSQL


PG_ADMIN = os.environ.get("BENCH_POSTGRES_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_available() -> bool:
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except Exception:
        return False
    return True


@contextmanager
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database; yields its SQLAlchemy URL and drops it after."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    try:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
