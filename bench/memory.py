"""Memory: the server's RSS (/proc/<pid>/status) at start, after N finished runs, and after a
watch fan-out on the same server."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path

from bench.common import Figure, record, rss_mb, serve
from bench.end_to_end import complete_runs
from bench.watch_fanout import fanout


@dataclass
class Scale:
    runs: int = 10_000
    watchers: int = 1000
    steps: int = 30

    @classmethod
    def quick(cls) -> Scale:
        return cls(runs=2000, steps=15)


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(scale: Scale) -> None:
    print(f"== memory: server RSS around {scale.runs:,} finished runs and a fan-out")
    env = {"ORCHESTRATOR_MAX_WATCHERS_PER_TENANT": str(scale.watchers + 10)}
    with serve(**env) as (address, pid):
        start = rss_mb(pid)
        print(f"  at start: {start:.1f} MB")
        # In quarters, so the RSS curve shows a plateau or a leak.
        finished = 0
        for _ in range(4):
            batch = asyncio.run(complete_runs(address, scale.runs // 4, 16, 256, 300, pid))
            finished += batch.completed
            after_runs = rss_mb(pid)
            print(f"  {batch.describe()}")
            print(
                f"  after {finished:,} finished runs: {after_runs:.1f} MB "
                f"(+{after_runs - start:.1f} MB, peak {peak_mb(pid):.1f} MB)"
            )
        asyncio.run(fanout(address, scale.watchers, scale.steps))
        after_fanout = rss_mb(pid)
        print(f"  after the fan-out: {after_fanout:.1f} MB (peak {peak_mb(pid):.1f} MB)")
    record(Figure("RSS at start", start, "MB"))
    record(
        Figure(
            f"RSS after {scale.runs // 1000}k runs",
            after_runs,
            "MB",
            target=f"≤ start + 50 MB ({start + 50:.0f})",
            met=after_runs - start <= 50,
        )
    )
    record(Figure("RSS after fan-out", after_fanout, "MB"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int)
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale()
    if args.runs:
        scale.runs = args.runs
    run(scale)


if __name__ == "__main__":
    main()
