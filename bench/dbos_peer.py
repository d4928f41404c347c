"""DBOS Transact doing what bench/end_to_end.py has us do: a durable workflow of 3 trivial
steps (an echo each), in-process, on its system database. Run by bench/versus_dbos.py in DBOS's own
virtualenv (bench/.dbos-venv): it imports DBOS and the standard library, nothing of ours.

`python bench/dbos_peer.py --database-url URL --seconds S` prints one JSON line per case,
`{"case": "sync1", "workflows": N, "seconds": S, "rate": R}`: sync1 is one submitter calling
the workflow back to back, sync8 eight threads doing so at once (DBOS runs a called workflow
in the caller's thread). Every step's output is checked, so a figure counts only workflows
that really ran their steps.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dbos import DBOS, DBOSConfig

STEPS = 3


@DBOS.step()
def echo(i: int, message: str) -> dict[str, object]:
    return {"i": i, "message": message}


@DBOS.workflow()
def three_steps() -> int:
    done = 0
    for i in range(STEPS):
        out = echo(i, f"step {i}")
        done += out["i"] == i
    return done


def closed_loop(submitters: int, seconds: float, warmup: float) -> tuple[int, float]:
    """`submitters` threads run the workflow back to back; (workflows completed in the
    measured window, its length)."""
    start = time.monotonic() + warmup
    stop = start + seconds
    counted = [0] * submitters
    wrong: list[int] = []
    lock = threading.Lock()

    def submitter(k: int) -> None:
        while True:
            t0 = time.monotonic()
            if t0 >= stop:
                return
            steps = three_steps()
            t1 = time.monotonic()
            if steps != STEPS:
                with lock:
                    wrong.append(steps)
            elif t0 >= start and t1 <= stop:
                counted[k] += 1

    with ThreadPoolExecutor(submitters) as pool:
        list(pool.map(submitter, range(submitters)))
    if wrong:
        raise RuntimeError(f"{len(wrong)} workflows did not run their {STEPS} steps")
    return sum(counted), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--cases", default="1,8", help="submitter counts")
    args = parser.parse_args()
    config: DBOSConfig = {
        "name": "bench-peer",
        "system_database_url": args.database_url,
        "log_level": "WARNING",
        # 8 submitters each hold a connection while a workflow runs, with headroom.
        "sys_db_pool_size": 20,
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        for submitters in (int(c) for c in args.cases.split(",")):
            workflows, seconds = closed_loop(submitters, args.seconds, args.warmup)
            line = {
                "case": f"sync{submitters}",
                "workflows": workflows,
                "seconds": seconds,
                "rate": workflows / seconds,
            }
            print(json.dumps(line), flush=True)
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    main()
