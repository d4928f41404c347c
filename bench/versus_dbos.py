"""The peer figure: DBOS Transact running the same 3 trivial steps as a durable workflow, on
SQLite and on PostgreSQL, next to our end to end (bench/end_to_end.py) from the same run.

DBOS is a bench-only extra with its own dependencies (SQLAlchemy 2.1, psycopg): it lives in
its own virtualenv, bench/.dbos-venv, made here on first use and never part of `make install`
or `make test`. If it cannot be installed, the bench says why and the others go on.
The issue's targets (tracker 13): ours on PostgreSQL at least 5x DBOS's best case (sync1 or
sync8) on the same server, and at least 0.6 of our own SQLite figure.

`python -m bench --only dbos [--quick]`; `python -m bench.versus_dbos --seconds S` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import end_to_end
from bench.common import CEILINGS, Figure, pg_available, pg_database, record

HERE = Path(__file__).parent
VENV = HERE / ".dbos-venv"
PEER = HERE / "dbos_peer.py"
# The release measured against; a newer one is a deliberate bump.
REQUIREMENT = "dbos>=3.4,<4"
PIN = [REQUIREMENT]
PG_TARGET = 5.0  # ours on PostgreSQL / DBOS's best on PostgreSQL
SQLITE_SHARE = 0.6  # ours on PostgreSQL / ours on SQLite


@dataclass
class Scale:
    seconds: float = 10.0  # per case (sync1, sync8), after a 1 s warm-up

    @classmethod
    def quick(cls) -> Scale:
        return cls(seconds=4.0)


def python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> str:
    """Make (once) DBOS's virtualenv; '' when it is ready, else why it is not."""
    stamp = VENV / ".installed"
    if stamp.exists() and stamp.read_text() == REQUIREMENT:
        return ""
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PIN],
    ]
    for argv in steps:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(argv[:4])}: {exc}"
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            return f"{' '.join(argv[:4])} exited {done.returncode}: " + " / ".join(lines[-3:])
    stamp.write_text(REQUIREMENT)
    return ""


def peer(database_url: str, seconds: float) -> dict[str, float]:
    """DBOS's workflows/s by case (sync1, sync8) on one system database."""
    argv = [str(python()), str(PEER), "--database-url", database_url, "--seconds", str(seconds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120 + 4 * seconds)
    if done.returncode != 0:
        raise RuntimeError(f"dbos_peer.py exited {done.returncode}: {done.stderr[-2000:]}")
    rates: dict[str, float] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            got = json.loads(line)
            rates[got["case"]] = float(got["rate"])
    return rates


def ours(scale: end_to_end.Scale, postgres: bool) -> dict[str, float]:
    """Our end-to-end runs/s by database: this run's figures when end_to_end ran already,
    else measured now."""
    wanted = {"SQLite", "PostgreSQL"} if postgres else {"SQLite"}
    if not wanted <= set(end_to_end.RATES):
        end_to_end.run(scale, postgres=postgres)
    return dict(end_to_end.RATES)


def _describe(rates: dict[str, float]) -> str:
    return ", ".join(f"{case} {rate:,.1f} workflows/s" for case, rate in sorted(rates.items()))


def run(scale: Scale, e2e: end_to_end.Scale, postgres: bool = True) -> None:
    print(f"== DBOS Transact peer: the same 3 trivial steps, sync1 and sync8, {scale.seconds} s")
    why = ensure_venv()
    if why:
        print(f"  DBOS could not be installed in {VENV}, skipped: {why}")
        return
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rates = peer(f"sqlite:///{tmp}/dbos.sqlite", scale.seconds)
    print(f"  DBOS on SQLite: {_describe(rates)}")
    best["SQLite"] = max(rates.values())
    pg = postgres and pg_available()
    if pg:
        with pg_database() as url:
            rates = peer(url.replace("postgresql+asyncpg://", "postgresql://"), scale.seconds)
        print(f"  DBOS on PostgreSQL: {_describe(rates)}")
        best["PostgreSQL"] = max(rates.values())
    elif postgres:
        print("  PostgreSQL: not reachable, skipped")
    mine = ours(e2e, pg)
    for label, key in (("SQLite", "dbos_sqlite_best"), ("PostgreSQL", "dbos_pg_best")):
        if label in best:
            CEILINGS[key] = Figure(f"DBOS best ({label})", best[label], "wf/s")
    CEILINGS["ours_e2e_sqlite"] = Figure("ours end to end (SQLite)", mine["SQLite"], "runs/s")
    lines = [f"  ours end to end: SQLite {mine['SQLite']:,.0f} runs/s"]
    ratio = mine["SQLite"] / best["SQLite"]
    lines.append(f"    SQLite: ours / DBOS best {ratio:.2f}x")
    _figure("end-to-end vs DBOS (SQLite)", mine["SQLite"], "dbos_sqlite_best")
    if "PostgreSQL" in best and "PostgreSQL" in mine:
        lines[0] += f", PostgreSQL {mine['PostgreSQL']:,.0f} runs/s"
        vs_dbos = mine["PostgreSQL"] / best["PostgreSQL"]
        vs_sqlite = mine["PostgreSQL"] / mine["SQLite"]
        lines.append(
            f"    PostgreSQL: ours / DBOS best {vs_dbos:.2f}x (target ≥ {PG_TARGET:.0f}x); "
            f"ours PostgreSQL / ours SQLite {vs_sqlite:.2f} (target ≥ {SQLITE_SHARE})"
        )
        _figure(
            "end-to-end vs DBOS (PostgreSQL)",
            mine["PostgreSQL"],
            "dbos_pg_best",
            PG_TARGET,
        )
        _figure(
            "end-to-end PostgreSQL vs SQLite",
            mine["PostgreSQL"],
            "ours_e2e_sqlite",
            SQLITE_SHARE,
        )
    print("\n".join(lines))


def _figure(name: str, value: float, ceiling: str, least: float | None = None) -> None:
    """Our runs/s against a peer's figure; with `least`, the ratio the issue asks for."""
    figure = Figure(name, value, "runs/s", ceiling=ceiling, target=f"≥ {least}x" if least else "")
    ratio = figure.ratio()
    if least is not None and ratio is not None:
        figure.met = ratio >= least
    record(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    scale = Scale.quick() if args.quick else Scale()
    if args.seconds:
        scale.seconds = args.seconds
    e2e = end_to_end.Scale.quick() if args.quick else end_to_end.Scale()
    run(scale, e2e, postgres=not args.no_postgres)


if __name__ == "__main__":
    main()
