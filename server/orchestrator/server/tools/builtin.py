"""The built-in tools of DESIGN §3. Their parameter names are part of the contract."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from datetime import datetime

import httpx

from orchestrator.server.tools.network import Network, resolve_allowed
from orchestrator.server.tools.registry import JSON, Tool, ToolContext, ToolError

# http.request reads at most this much of a response body.
MAX_RESPONSE_BYTES = 1024 * 1024
DEFAULT_HTTP_TIMEOUT = 30.0
MAX_HTTP_TIMEOUT = 300.0


async def echo(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.echo: the parameters, as given."""
    return params


async def set_variables(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.set: the parameters; the engine makes each key a run variable."""
    return params


def _number(params: dict[str, JSON], name: str) -> float:
    value = params.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolError(f"{name} must be a number", retryable=False, reason="INVALID_PARAMETERS")
    return float(value)


async def wait(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.wait: sleeps until `seconds` after the first attempt started, or `until` (RFC 3339).
    The deadline counts from the first attempt, so a restart keeps it."""
    deadline = wait_deadline(ctx, params)
    remaining = deadline - time.time()
    if remaining > 0:
        await asyncio.sleep(remaining)
    started = ctx.first_started_at or deadline
    return {"waited_seconds": round(max(0.0, time.time() - started), 6)}


def wait_deadline(ctx: ToolContext, params: dict[str, JSON]) -> float:
    """When core.wait's call ends (epoch seconds)."""
    if "until" in params:
        raw = params["until"]
        if not isinstance(raw, str):
            raise ToolError(
                "until must be an RFC 3339 string", retryable=False, reason="INVALID_PARAMETERS"
            )
        try:
            deadline = datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ToolError(
                f"until is not an RFC 3339 time: {raw!r}",
                retryable=False,
                reason="INVALID_PARAMETERS",
            ) from None
    else:
        seconds = _number(params, "seconds")
        if seconds < 0:
            raise ToolError(
                "seconds must not be negative", retryable=False, reason="INVALID_PARAMETERS"
            )
        deadline = (ctx.first_started_at or time.time()) + seconds
    return deadline


async def fail(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.fail: fails the first `fail_times` attempts (always, when unset), then succeeds."""
    fail_times = params.get("fail_times")
    retryable = params.get("retryable", True)
    message = str(params.get("message", "core.fail failed as asked"))
    if fail_times is None or ctx.attempt <= _number(params, "fail_times"):
        raise ToolError(message, retryable=bool(retryable), reason="TOOL_FAILED")
    return {"attempts": ctx.attempt}


async def clarify(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.clarify is answered by a person; the engine never calls this."""
    raise ToolError("core.clarify is handled by the engine", retryable=False)


# A signal's name, as SignalExecution and core.wait_for_signal spell it.
MAX_SIGNAL_NAME = 128


async def wait_for_signal(ctx: ToolContext, params: dict[str, JSON]) -> JSON:
    """core.wait_for_signal: checks `signal_name` and `timeout_seconds` and returns them as
    {"signal_name", "timeout_seconds" (None: no limit of its own)}; the engine then waits."""
    name = params.get("signal_name")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SIGNAL_NAME:
        raise ToolError(
            f"signal_name must be a string of 1 to {MAX_SIGNAL_NAME} characters",
            retryable=False,
            reason="INVALID_PARAMETERS",
        )
    timeout = None
    if params.get("timeout_seconds") is not None:
        timeout = _number(params, "timeout_seconds")
        if timeout < 0:
            raise ToolError(
                "timeout_seconds must not be negative",
                retryable=False,
                reason="INVALID_PARAMETERS",
            )
    return {"signal_name": name, "timeout_seconds": timeout}


MAX_REDIRECTS = 5


class HttpRequest:
    """http.request: one shared connection pool, timeouts, a response size cap, and only the
    destinations `network.resolve_allowed` permits (redirects followed and checked here)."""

    def __init__(self, allow: Sequence[Network] = ()) -> None:
        self._client: httpx.AsyncClient | None = None
        self.allow = tuple(allow)

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, ctx: ToolContext, params: dict[str, JSON]) -> JSON:
        url = params.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ToolError(
                "url must be an http(s) URL", retryable=False, reason="INVALID_PARAMETERS"
            )
        method = str(params.get("method", "GET")).upper()
        headers = {str(k): str(v) for k, v in dict(params.get("headers") or {}).items()}
        headers["Idempotency-Key"] = ctx.idempotency_key
        timeout = min(
            float(params.get("timeout_seconds") or DEFAULT_HTTP_TIMEOUT), MAX_HTTP_TIMEOUT
        )
        content: bytes | None = None
        if "json" in params:
            content = json.dumps(params["json"]).encode()
            headers.setdefault("Content-Type", "application/json")
        elif "body" in params:
            content = str(params["body"]).encode()
        target = httpx.URL(url)
        for _hop in range(MAX_REDIRECTS + 1):
            response, body = await self._send(method, target, headers, content, timeout)
            location = response.headers.get("location")
            if response.status_code in (301, 302, 303, 307, 308) and location:
                target = target.join(location)
                if response.status_code == 303 or (
                    response.status_code in (301, 302) and method == "POST"
                ):
                    method, content = "GET", None
                continue
            return self._output(method, str(target), response, body, params)
        raise ToolError(
            f"more than {MAX_REDIRECTS} redirects", retryable=False, reason="TOO_MANY_REDIRECTS"
        )

    async def _send(
        self,
        method: str,
        target: httpx.URL,
        headers: dict[str, str],
        content: bytes | None,
        seconds: float,
    ) -> tuple[httpx.Response, bytes]:
        host = target.host
        port = target.port or (443 if target.scheme == "https" else 80)
        address = await resolve_allowed(host, port, self.allow)
        pinned = target.copy_with(host=address)
        extensions = {"sni_hostname": host} if target.scheme == "https" else {}
        request_headers = {**headers, "Host": target.netloc.decode()}
        try:
            request = self.client().build_request(
                method,
                pinned,
                headers=request_headers,
                content=content,
                timeout=seconds,
                extensions=extensions,
            )
            response = await self.client().send(request, stream=True)
            try:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise ToolError(
                            f"response larger than {MAX_RESPONSE_BYTES} bytes",
                            retryable=False,
                            reason="RESPONSE_TOO_LARGE",
                        )
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise ToolError(
                f"{method} {target} timed out after {seconds}s", reason="HTTP_TIMEOUT"
            ) from None
        except httpx.HTTPError as exc:
            raise ToolError(f"{method} {target} failed: {exc}", reason="HTTP_ERROR") from None
        return response, bytes(body)

    @staticmethod
    def _output(
        method: str, url: str, response: httpx.Response, body: bytes, params: dict[str, JSON]
    ) -> JSON:
        status = response.status_code
        expected = params.get("expected_status")
        ok = status == expected if isinstance(expected, int | float) else 200 <= status < 300
        if not ok:
            raise ToolError(
                f"{method} {url} answered {status}",
                retryable=status >= 500 or status == 429,
                reason="HTTP_STATUS",
            )
        output: dict[str, JSON] = {"status": status, "headers": dict(response.headers)}
        text = body.decode(response.encoding or "utf-8", errors="replace")
        if "json" in response.headers.get("content-type", ""):
            try:
                output["json"] = json.loads(body) if body else None
            except ValueError:
                output["text"] = text
        else:
            output["text"] = text
        return output


def builtin_tools(http_allow: Sequence[Network] = ()) -> list[Tool]:
    """Every built-in tool; http.request may reach the `http_allow` networks even when they
    are private or loopback."""
    return [
        Tool("core.echo", echo, instant=True, description="returns its parameters"),
        Tool(
            "core.set",
            set_variables,
            sets_variables=True,
            instant=True,
            description="returns its parameters and makes each key a run variable",
        ),
        Tool(
            "core.wait",
            wait,
            sleeps_until=wait_deadline,
            description="waits `seconds` or `until`, durably",
        ),
        Tool("core.fail", fail, instant=True, description="fails the first `fail_times` attempts"),
        Tool(
            "core.clarify",
            clarify,
            asks_person=True,
            retryable=False,
            description="asks a person and returns the answer",
        ),
        Tool(
            "core.wait_for_signal",
            wait_for_signal,
            waits_for_signal=True,
            description="waits for the next signal of `signal_name` and returns its payload",
        ),
        Tool(
            "http.request",
            HttpRequest(http_allow),
            capabilities=frozenset({"network.http"}),
            description="calls an HTTP endpoint with an Idempotency-Key header",
        ),
    ]
