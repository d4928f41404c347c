"""The tool registry: what each tool is called, what it needs and whether it is safe to retry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from orchestrator.server.tools.network import Network

ENTRY_POINT_GROUP = "orchestrator.tools"

JSON = Any


class ToolError(Exception):
    """A tool attempt failed. `retryable=False` fails the step at once; `reason` is reported."""

    def __init__(self, message: str, *, retryable: bool = True, reason: str = "TOOL_ERROR") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.reason = reason


@dataclass(frozen=True)
class ToolContext:
    """What a tool knows of the call it serves."""

    run_id: str
    step_id: str
    attempt: int
    tenant_id: str
    idempotency_key: str
    logger: structlog.typing.FilteringBoundLogger
    # When the step's first attempt started, kept across restarts: durable timers count from it.
    first_started_at: float = 0.0


ToolFunction = Callable[[ToolContext, dict[str, JSON]], Awaitable[JSON]]


@dataclass(frozen=True)
class Tool:
    """A callable tool with its declared needs."""

    name: str
    call: ToolFunction
    capabilities: frozenset[str] = field(default_factory=frozenset)
    retryable: bool = True
    description: str = ""
    # core.set: the output's keys become run variables (`vars.<key>`) for later steps.
    sets_variables: bool = False
    # core.clarify: the engine asks a person instead of calling `call`.
    asks_person: bool = False
    # core.wait_for_signal: `call` checks the parameters; the engine waits for the signal.
    waits_for_signal: bool = False
    # The call returns without waiting on anything and touches nothing outside this process
    # (core.echo, core.set, core.fail): the engine calls it before its start is written, and
    # its outcome is committed with the start, in one write, together with the instant steps
    # made right after it on its output (`Journal.chain`): a crash before that commit loses
    # nothing anyone saw, and the call is made again. A tool that reaches out is called only
    # once its start is committed: a pause committed meanwhile keeps it from being called.
    instant: bool = False
    # core.wait: when the call's deadline is (it raises ToolError for bad parameters). The
    # engine waits until then as a wait it may park the run on.
    sleeps_until: Callable[[ToolContext, dict[str, JSON]], float] | None = None


class ToolRegistry:
    """Tools by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)


def load_entry_point_tools() -> list[Tool]:
    """Third-party tools: each entry point of the group names a `Tool` or a callable making one."""
    found: list[Tool] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        tool = obj() if callable(obj) and not isinstance(obj, Tool) else obj
        if not isinstance(tool, Tool):
            raise TypeError(f"entry point {ep.name!r} of {ENTRY_POINT_GROUP} is not a Tool")
        found.append(tool)
    return found


def default_registry(
    *, load_entry_points: bool = True, http_allow: Sequence[Network] = ()
) -> ToolRegistry:
    """The built-in tools plus every tool registered through the entry-point group."""
    from orchestrator.server.tools.builtin import builtin_tools

    registry = ToolRegistry(builtin_tools(http_allow))
    if load_entry_points:
        for tool in load_entry_point_tools():
            registry.register(tool)
    return registry
