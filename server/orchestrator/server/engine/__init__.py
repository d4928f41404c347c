"""The execution engine: schedules runs' steps; the store's journal records their progress."""

from orchestrator.server.engine.scheduler import Engine

__all__ = ["Engine"]
