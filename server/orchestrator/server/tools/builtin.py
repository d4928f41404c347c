"""The built-in tools of DESIGN §3. Their parameter names are part of the contract."""

from __future__ import annotations

from orchestrator.server.tools.registry import JSON, Tool, ToolContext, ToolError


async def _echo(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    return params


def builtin_tools() -> list[Tool]:
    """Every built-in tool. Until the engine lands, only their declarations matter."""

    async def _not_yet(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
        raise ToolError("tool not implemented yet", retryable=False)

    return [
        Tool("core.echo", _echo, description="returns its parameters"),
        Tool("core.set", _not_yet, description="sets run variables"),
        Tool("core.wait", _not_yet, description="waits, durably"),
        Tool("core.fail", _not_yet, description="fails, for tests"),
        Tool("core.clarify", _not_yet, description="asks a person"),
        Tool(
            "http.request",
            _not_yet,
            capabilities=frozenset({"network.http"}),
            description="calls an HTTP endpoint",
        ),
    ]
