"""Logging: one stream of JSON lines (default) or console lines for the whole process.

structlog renders our own events and, through its `ProcessorFormatter` on the root stdlib
handler, every library's records too (grpc, SQLAlchemy, alembic, asyncpg, httpx, warnings),
so each line parses the same way. Every line carries the contextvars bound by the
interceptors (tenant_id, correlation_id, run_id) and, inside a span, its trace_id and span_id.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from opentelemetry import trace

# Libraries that log at INFO what is noise at our INFO (SQLAlchemy would echo every
# statement); at --log-level debug they log everything, like us.
QUIET_BELOW_DEBUG = {"sqlalchemy": logging.WARNING, "httpx": logging.WARNING}


def add_trace_context(
    logger: object, method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """trace_id and span_id of the current span (W3C hex), when there is one."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event.setdefault("trace_id", format(context.trace_id, "032x"))
        event.setdefault("span_id", format(context.span_id, "016x"))
    return event


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours: configure_logging replaces it, and leaves other handlers (pytest's) alone."""


def configure_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog and the stdlib root logger for the process (stderr by default)."""
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_context,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name, quiet in QUIET_BELOW_DEBUG.items():
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else quiet)
    logging.captureWarnings(True)
