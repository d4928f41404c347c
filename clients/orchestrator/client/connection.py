"""Where and as whom a client connects: address, tenant, credentials, channel options."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

SERVICE = "orchestrator.v1.OrchestratorService"
DEFAULT_ADDRESS = "127.0.0.1:50051"

# Reads are safe to repeat: the channel retries them itself when the server is unreachable.
# Execute is retried by the client, and only when it carries an idempotency key.
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG: dict[str, Any] = {
    "methodConfig": [
        {
            "name": [
                {"service": SERVICE, "method": "GetExecution"},
                {"service": SERVICE, "method": "ListExecutions"},
            ],
            "retryPolicy": RETRY_POLICY,
        }
    ]
}

CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    # Watch streams are long-lived: ping so that a dead peer or a dropped NAT entry is noticed
    # (the server accepts pings every 10 s).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC's own reconnect back-off grows to 120 s; a restarted server should be found again
    # within seconds, so cap it (watch adds its own back-off on top).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


@dataclass(frozen=True)
class Connection:
    """How a client reaches the server and who it says it is; fixed for the client's life."""

    address: str
    tenant: str
    correlation_id: str | None = None
    api_key: str | None = None
    tls: bool = False
    root_certificates: str | Path | None = None
    certificate_chain: str | Path | None = None
    private_key: str | Path | None = None
    options: Sequence[tuple[str, Any]] = ()

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("a tenant id is required")
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")

    @property
    def secure(self) -> bool:
        """TLS when asked for, or implied by any certificate given."""
        return self.tls or any(
            p is not None for p in (self.root_certificates, self.certificate_chain)
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent with every call."""
        out = [("x-tenant-id", self.tenant)]
        if self.correlation_id:
            out.append(("x-correlation-id", self.correlation_id))
        if self.api_key:
            out.append(("authorization", f"Bearer {self.api_key}"))
        return tuple(out)

    def channel_options(self) -> list[tuple[str, Any]]:
        """Retries, keepalive and reconnect back-off, then the caller's own options."""
        given = {name for name, _ in self.options}
        return [o for o in CHANNEL_OPTIONS if o[0] not in given] + list(self.options)

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials (system roots unless `root_certificates`; mTLS with a client pair)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.private_key),
            certificate_chain=_read(self.certificate_chain),
        )
