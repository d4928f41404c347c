"""Tools a step can call: built-ins and third-party tools from the `orchestrator.tools` group."""

from orchestrator.server.tools.registry import (
    Tool,
    ToolContext,
    ToolError,
    ToolRegistry,
    default_registry,
)

__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "default_registry"]
