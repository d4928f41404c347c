"""The execution engine: schedules runs' steps and records their progress."""

from orchestrator.server.engine.journal import Journal
from orchestrator.server.engine.scheduler import Engine

__all__ = ["Engine", "Journal"]
