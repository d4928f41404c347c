"""Run the server until SIGTERM/SIGINT: NOT_SERVING, drain within the grace period, exit 0."""

from __future__ import annotations

import asyncio
import gc
import signal
import sys
from collections.abc import Sequence

import structlog

from orchestrator.server.app import build_server
from orchestrator.server.errors import PortUnavailable
from orchestrator.server.logs import configure_logging
from orchestrator.server.settings import Settings, SettingsError, parse_args
from orchestrator.server.tracing import configure_tracing

log = structlog.get_logger("orchestrator.server")
GC_THRESHOLDS = (50_000, 20, 100)
SWITCH_INTERVAL_SECONDS = 0.001


async def serve(settings: Settings) -> None:
    """Start the server and stop it gracefully on the first signal, at once on the second."""
    server = await build_server(settings)
    await server.start()
    # What is loaded by now lives as long as the process: keep it out of every collection,
    # and collect less often (each young collection walks the per-call garbage).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    # Long Python work runs in threads (large requests, large runs' preparation): the event
    # loop waits at most this long for the interpreter each time it wants it back.
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    loop = asyncio.get_running_loop()
    stopping: asyncio.Task[None] | None = None

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping is None:
            log.info(
                "server.draining",
                signal=signal.Signals(signum).name,
                grace_seconds=settings.shutdown_grace,
            )
            stopping = asyncio.create_task(server.stop())
        else:
            log.warning("server.stopping_now", signal=signal.Signals(signum).name)
            stopping = asyncio.create_task(server.stop(grace=0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await server.wait()
    if stopping is not None:
        await stopping


def run(settings: Settings) -> None:
    asyncio.run(serve(settings))


def main(argv: Sequence[str]) -> None:
    """`orchestrator serve ARGS`: a bad setting is one line on stderr per problem and exit 2."""
    try:
        settings = parse_args(argv)
        configure_logging(settings.log_format, settings.log_level)
        configure_tracing()
    except SettingsError as err:
        for line in str(err).splitlines():
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(settings)
    except PortUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception:
        # The traceback as a log line too: stderr stays one format.
        log.exception("server.crashed")
        raise SystemExit(1) from None
