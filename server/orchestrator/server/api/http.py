"""The HTTP listener (`--http-port`): Connect, gRPC-Web and the dashboard, served by uvicorn
in the event loop of the grpc.aio server.

`HttpApp` routes: the service's paths go to the Connect application (`api/connect.py`),
GET of anything else to the dashboard's committed bundle (`dashboard/`, built from `web/` by
`make web`). CORS is off unless origins are named: the dashboard is same-origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import structlog
import uvicorn

from orchestrator.server.errors import PortUnavailable

log = structlog.get_logger("orchestrator.server")
WEB_ROOT = Path(__file__).resolve().parent.parent / "dashboard"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]
# What a browser client of the service may send and read across origins (with --cors-origin).
CORS_ALLOW_HEADERS = (
    "content-type, connect-protocol-version, connect-timeout-ms, connect-accept-encoding, "
    "connect-content-encoding, grpc-timeout, x-grpc-web, x-user-agent, x-tenant-id, "
    "x-correlation-id, authorization"
)
CORS_EXPOSE_HEADERS = (
    "x-correlation-id, grpc-status, grpc-message, grpc-status-details-bin, connect-content-encoding"
)
# Only these leave the bundle's folder; anything else is 404.
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class HttpApp:
    """The ASGI application of the HTTP port."""

    def __init__(self, connect: Asgi, service_path: str, cors_origins: frozenset[str]) -> None:
        self._connect = connect
        self._prefix = service_path + "/"
        self._cors = cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        origin = _header(scope, b"origin")
        if origin and origin in self._cors:
            if scope["method"] == "OPTIONS":
                await _respond(send, 204, b"", self._cors_headers(origin, preflight=True))
                return
            send = self._with_cors(send, origin)
        if scope["path"].startswith(self._prefix):
            await self._connect(scope, receive, send)
        elif scope["method"] in ("GET", "HEAD"):
            await self._static(scope, send)
        else:
            await _respond(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")])

    def _cors_headers(self, origin: str, preflight: bool) -> list[tuple[bytes, bytes]]:
        headers = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"origin")]
        if preflight:
            headers += [
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
                (b"access-control-max-age", b"7200"),
            ]
        else:
            headers.append((b"access-control-expose-headers", CORS_EXPOSE_HEADERS.encode()))
        return headers

    def _with_cors(self, send: Send, origin: str) -> Send:
        extra = self._cors_headers(origin, preflight=False)

        async def cors_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return cors_send

    async def _static(self, scope: Scope, send: Send) -> None:
        """The dashboard: `/` is its page, and the files of its bundle by name."""
        name = scope["path"].lstrip("/") or "index.html"
        path = (WEB_ROOT / name).resolve()
        kind = CONTENT_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
        if path.parent != WEB_ROOT or kind is None or not path.is_file():
            await _respond(send, 404, b"not found\n", [(b"content-type", b"text/plain")])
            return
        body = path.read_bytes() if scope["method"] == "GET" else b""
        await _respond(
            send,
            200,
            body,
            [
                (b"content-type", kind.encode()),
                (b"cache-control", b"no-cache"),
                (b"x-content-type-options", b"nosniff"),
            ],
        )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so a taken port fails the start (no SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
    # without it a chunked response's last write waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise PortUnavailable(f"{host}:{port}") from err
    sock.setblocking(False)
    return sock


class HttpListener:
    """uvicorn on a bound socket, in the running loop, without its signal handling (serve.py
    owns the signals)."""

    def __init__(self, app: Asgi, host: str, port: int) -> None:
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,
                access_log=False,
                ws="none",
                http="h11",
                server_header=False,
            )
        )
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # What uvicorn's `serve` does before `startup`, without its signal handlers.
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[self._socket])
        self._loop = asyncio.create_task(self._server.main_loop(), name="http")

    async def stop(self, grace: float) -> None:
        """Refuse new connections, let requests in flight finish within `grace`, then cancel
        the rest (open watch streams end as on the gRPC port)."""
        if self._loop is None:
            self._socket.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop
        # Annotated int by uvicorn, used as asyncio.wait_for's timeout: a float is right.
        self._server.config.timeout_graceful_shutdown = cast(int, max(grace, 0.01))
        await self._server.shutdown(sockets=[self._socket])
