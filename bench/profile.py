"""Profile the server (py-spy, sampling the `orchestrator serve` subprocess) while it accepts,
while it runs a batch end to end, and while it fans out; print where the samples are.

`python -m bench.profile [--quick] [--keep DIR]`. Needs py-spy (the `bench` extra, which
`make bench` installs) and ptrace rights on the server process. Only the thread holding the
GIL is sampled (`--gil`): percentages say where the one usable core goes. `self` is the leaf
frame, `total` any frame.
"""

from __future__ import annotations

import argparse
import asyncio
import linecache
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.accept import accept_load
from bench.common import pg_available, pg_database, serve
from bench.end_to_end import complete_runs
from bench.watch_fanout import fanout

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
PACKAGES = (
    ("orchestrator/server/", "orchestrator"),
    ("/server/orchestrator/", "orchestrator"),
    ("sqlalchemy/", "sqlalchemy"),
    ("aiosqlite/", "aiosqlite"),
    ("asyncpg/", "asyncpg"),
    ("opentelemetry/", "opentelemetry"),
    ("structlog/", "structlog"),
    ("google/protobuf/", "protobuf"),
    ("grpc/", "grpc"),
    ("celpy/", "cel"),
    ("lark/", "cel"),
    ("prometheus_client/", "prometheus"),
    ("asyncio/", "asyncio"),
    ("json/", "json"),
    ("alembic/", "alembic"),
)


@dataclass
class Profile:
    total: int
    threads: Counter[str]
    self_time: Counter[str]
    inclusive: Counter[str]
    packages: Counter[str]
    idle: int


def idle(func: str, path: str, line: str | None) -> bool:
    """Samples py-spy counts as running but that wait in C under a Python leaf: the event
    loop in epoll, a worker thread (aiosqlite's, an executor's) blocked on its queue, grpc's
    poller thread (its C-core work cannot be told from its waiting; it is a few % at most)."""
    if func.endswith("Selector.select"):
        return True
    if func == "Thread.run" and path.endswith("threading.py"):
        return True  # a thread whose target is C (grpc's poller): nothing Python to see
    return bool(line) and ".get(" in linecache.getline(path, int(line or 0))


def package(path: str) -> str:
    for needle, name in PACKAGES:
        if needle in path:
            return name
    return Path(path).name if path else "?"


def short(func: str, path: str) -> str:
    parts = Path(path).parts
    return f"{func} ({'/'.join(parts[-2:])})"


def parse(path: Path) -> Profile:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = FRAME.match(frames[-1])
        if leaf and idle(leaf["func"], leaf["file"], leaf["line"]):
            waiting += count
            continue
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
        thread = re.sub(r"^Thread-\d+ ", "", thread)
        threads[thread] += count
        total += count
        seen: set[str] = set()
        leaf_package = "?"
        for raw in frames[1:]:
            match = FRAME.match(raw)
            if not match:
                continue
            name = short(match["func"], match["file"])
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
            leaf_package = package(match["file"])
        if len(frames) > 1:
            match = FRAME.match(frames[-1])
            if match:
                self_time[short(match["func"], match["file"])] += count
        packages[leaf_package] += count
    return Profile(total, threads, self_time, inclusive, packages, waiting)


def by_work(path: Path) -> Counter[str]:
    """Busy samples by what they serve: each writer unit of work, the SQLite readers' thread
    hops, each RPC's handler, the interceptors alone, each engine step, the rest by leaf."""
    work: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = FRAME.match(frames[-1])
        if leaf and idle(leaf["func"], leaf["file"], leaf["line"]):
            continue
        leaf_name = leaf["func"] if leaf else "?"
        units = re.findall(r"(\w+\.\w+)\.<locals>\.unit", stack)
        handler = re.findall(r"OrchestratorServicer\.(\w+)", stack)
        engine = re.findall(r"((?:Journal|RunTask|Engine)\.\w+) \([^)]*server/engine/", stack)
        if (
            "_connection_worker_thread" in frames[0]
            or "aiosqlite/" in frames[-1]
            or leaf_name
            in (
                "BaseSelectorEventLoop._write_to_self",
                "BaseSelectorEventLoop._read_from_self",
            )
        ):
            work["SQLite reads: aiosqlite thread + loop wake-ups"] += count
        elif units:
            work[f"unit of work {units[-1]}"] += count
        elif handler:
            work[f"RPC {handler[0]} (handler)"] += count
        elif "/api/interceptors.py" in stack or "instrumentation/grpc" in stack:
            work["RPC interceptors (outside handlers)"] += count
        elif engine:
            work[f"engine {engine[-1]}"] += count
        else:
            work[f"other: {leaf_name}"] += count
    return work


def report(title: str, path: Path, top: int = 12) -> None:
    prof = parse(path)
    if not prof.total:
        print(f"-- {title}: no samples (is ptrace allowed?)")
        return
    pct = lambda n: f"{100 * n / prof.total:5.1f}%"  # noqa: E731
    print(
        f"-- {title}: {prof.total} busy samples ({prof.idle} waiting in epoll, on a "
        "worker queue or in grpc's C poller, left out)"
    )
    print("   threads:  " + ", ".join(f"{t} {pct(n)}" for t, n in prof.threads.most_common(4)))
    print(
        "   self time by package: "
        + ", ".join(f"{p} {pct(n).strip()}" for p, n in prof.packages.most_common(10))
    )
    print("   by work (inclusive):")
    for name, n in by_work(path).most_common(top):
        print(f"     {pct(n)}  {name}")
    print("   top self:")
    for name, n in prof.self_time.most_common(top):
        print(f"     {pct(n)}  {name}")
    print("   top total (orchestrator code):")
    ours = [
        (k, v)
        for k, v in prof.inclusive.most_common()
        if "orchestrator/" in k
        or "/server/" in k
        or k.split(" (")[1].startswith(("store/", "engine/", "api/", "server/"))
    ]
    for name, n in ours[:top]:
        print(f"     {pct(n)}  {name}")


class Sampler:
    """py-spy record on a process from start() until stop() (SIGINT makes it write)."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.argv = [
            PY_SPY or "py-spy",
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--threads",
            "--gil",  # only the thread holding the GIL: where the one usable core goes
            "--full-filenames",
            "--format",
            "raw",
            "-o",
            str(out),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert PY_SPY, "py-spy not found: .venv/bin/pip install py-spy"
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def sampling(pid: int, out: Path, rate: int = 100) -> Iterator[None]:
    sampler = Sampler(pid, out, rate)
    sampler.start()
    try:
        yield
    finally:
        sampler.stop()


def run(quick: bool = False, keep: Path | None = None, postgres: bool = True) -> None:
    seconds = 5.0 if quick else 10.0
    runs = 500 if quick else 1500
    print("== profile (py-spy, the server process)")
    with tempfile.TemporaryDirectory() as tmp:
        where = keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        with serve(ORCHESTRATOR_EXECUTE="false") as (address, pid):
            with sampling(pid, where / "accept.txt"):
                load = asyncio.run(accept_load(address, pid, 64, seconds))
        print(f"   accept, API-only, under py-spy: {load.describe('runs')}")
        report("accept (API-only)", where / "accept.txt")
        with serve() as (address, pid):
            with sampling(pid, where / "e2e_sqlite.txt"):
                batch = asyncio.run(complete_runs(address, runs, 8, 256, 300))
        print(f"   end to end, SQLite, under py-spy: {batch.describe()}")
        report("end to end (SQLite)", where / "e2e_sqlite.txt")
        if postgres and pg_available():
            with pg_database() as url, serve(url) as (address, pid):
                with sampling(pid, where / "e2e_pg.txt"):
                    batch = asyncio.run(complete_runs(address, runs, 8, 256, 300))
            print(f"   end to end, PostgreSQL, under py-spy: {batch.describe()}")
            report("end to end (PostgreSQL)", where / "e2e_pg.txt")
        for mode, wait, steps in (
            ("paced", 0.3, 5 if quick else 10),
            ("burst", 0.05, 15 if quick else 30),
        ):
            with serve(ORCHESTRATOR_MAX_WATCHERS_PER_TENANT="1010") as (address, pid):
                sampler = Sampler(pid, where / f"fanout_{mode}.txt")
                try:  # the delivery only: sampling starts once every watcher is connected
                    asyncio.run(fanout(address, 1000, steps, seconds=wait, on_ready=sampler.start))
                finally:
                    sampler.stop()
            report(f"watch fan-out delivery (1,000 watchers, {mode})", where / f"fanout_{mode}.txt")
        if keep:
            print(f"   raw profiles (collapsed stacks) kept in {keep}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the raw profiles in this directory")
    parser.add_argument("--report", type=Path, nargs="*", help="only print these raw profiles")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        for path in args.report:
            report(path.name, path)
        return
    run(args.quick, args.keep, postgres=not args.no_postgres)


if __name__ == "__main__":
    main()
