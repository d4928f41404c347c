"""`make bench` (`python -m bench`): every benchmark, each printing its figures, then one
table of every figure with its ratio to the ceiling measured in this same run.

Flags: --quick (about 2-3 minutes instead of about 10), --only NAME[,NAME] (ceilings, accept,
end_to_end, dbos, reads, watch_fanout, connect, memory, expressions, fair_share, parked),
--no-postgres, --profile (py-spy the server after the benches; `make bench` installs py-spy, the
`bench` extra).
`make bench BENCH_ARGS=--quick` passes flags through."""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

from bench import (
    accept,
    ceilings,
    connect,
    end_to_end,
    expressions,
    fair_share,
    memory,
    parked,
    reads,
    versus_dbos,
    watch_fanout,
)
from bench.common import summary_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller, ~2-3 minute run")
    parser.add_argument("--only", default="", help="comma-separated benches to run")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--profile", action="store_true", help="py-spy the server afterwards")
    args = parser.parse_args(argv)
    quick = args.quick
    pg = not args.no_postgres
    ceiling_scale = ceilings.Scale.quick() if quick else ceilings.Scale()
    benches: dict[str, Callable[[], None]] = {
        "ceilings": lambda: ceilings.run(ceiling_scale, postgres=pg),
        "accept": lambda: accept.run(accept.Scale.quick() if quick else accept.Scale()),
        "end_to_end": lambda: end_to_end.run(
            end_to_end.Scale.quick() if quick else end_to_end.Scale(), postgres=pg
        ),
        # DBOS Transact's figure beside ours (bench/versus_dbos.py): after end_to_end, whose figures
        # it compares with.
        "dbos": lambda: versus_dbos.run(
            versus_dbos.Scale.quick() if quick else versus_dbos.Scale(),
            end_to_end.Scale.quick() if quick else end_to_end.Scale(),
            postgres=pg,
        ),
        "reads": lambda: reads.run(reads.Scale.quick() if quick else reads.Scale()),
        # The same event cadence as the echo fan-out ceilings.
        "watch_fanout": lambda: watch_fanout.run(
            ceiling_scale.fanout_subscribers,
            ceiling_scale.paced_steps,
            ceiling_scale.burst_steps,
        ),
        "connect": lambda: connect.run(500 if quick else 2000, 200, ceiling_scale.paced_steps),
        "memory": lambda: memory.run(memory.Scale.quick() if quick else memory.Scale()),
        "expressions": lambda: expressions.run(500 if quick else 2000),
        "fair_share": lambda: fair_share.run(
            fair_share.Scale.quick() if quick else fair_share.Scale(), postgres=pg
        ),
        # PostgreSQL only: parking is how replicas share runs that wait.
        "parked": lambda: (
            parked.run(parked.Scale.quick() if quick else parked.Scale()) if pg else None
        ),
    }
    chosen = [b for b in args.only.split(",") if b] or list(benches)
    unknown = set(chosen) - set(benches)
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(sorted(unknown))}")
    started = time.monotonic()
    for name in chosen:
        t0 = time.monotonic()
        try:
            benches[name]()
        except Exception:  # a broken bench must not hide the others' figures
            print(f"!! {name} failed:")
            traceback.print_exc()
        print(f"   ({name}: {time.monotonic() - t0:.0f} s)\n", flush=True)
    print("== summary (ratio = figure / ceiling measured above; for latencies, higher is worse)")
    print(summary_table())
    print(f"\n(benches took {time.monotonic() - started:.0f} s)")
    if args.profile:
        from bench import profile

        profile.run(quick, postgres=pg)


if __name__ == "__main__":
    main()
