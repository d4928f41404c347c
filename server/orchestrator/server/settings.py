"""Server settings: flags and ORCHESTRATOR_* environment variables (README has the table)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(f"ORCHESTRATOR_{name}", default)


@dataclass
class Settings:
    """Everything `build_server` needs. Defaults come from the environment, then constants."""

    host: str = field(default_factory=lambda: _env("HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: int(_env("PORT", "50051")))
    database_url: str = field(
        default_factory=lambda: _env("DATABASE_URL", "sqlite+aiosqlite:///orchestrator.db")
    )
    log_format: str = field(default_factory=lambda: _env("LOG_FORMAT", "json"))
    log_level: str = field(default_factory=lambda: _env("LOG_LEVEL", "info"))
    # Seconds SIGTERM waits for in-flight RPCs and steps before stopping hard.
    shutdown_grace: float = field(default_factory=lambda: float(_env("SHUTDOWN_GRACE", "10")))
    # Idle watch streams get a HEARTBEAT this often.
    heartbeat_seconds: float = field(default_factory=lambda: float(_env("HEARTBEAT_SECONDS", "15")))
    # Steps in flight across all runs of this process.
    max_steps_in_flight: int = field(
        default_factory=lambda: int(_env("MAX_STEPS_IN_FLIGHT", "256"))
    )
    # False: serve the API and store runs but execute none (an API-only replica; runs wait
    # PENDING for a replica that executes).
    execute: bool = field(
        default_factory=lambda: _env("EXECUTE", "true").lower() not in ("0", "false", "no")
    )
    # Watch streams one tenant may hold open at once (RESOURCE_EXHAUSTED, WATCH_LIMIT).
    max_watchers_per_tenant: int = field(
        default_factory=lambda: int(_env("MAX_WATCHERS_PER_TENANT", "1000"))
    )
    # This replica's name in run leases (default: host:port). A replica restarted under the
    # same name takes its runs back at once instead of waiting for their leases to lapse.
    replica_id: str = field(default_factory=lambda: _env("REPLICA_ID", ""))
    # A run's lease lasts this long without a heartbeat; then another replica may take it.
    lease_seconds: float = field(default_factory=lambda: float(_env("LEASE_SECONDS", "10")))
    # Finished runs older than this are deleted with their events (0 = keep forever).
    retention_seconds: float = field(default_factory=lambda: float(_env("RETENTION_SECONDS", "0")))
    # Prometheus metrics on this port (0 = off).
    metrics_port: int = field(default_factory=lambda: int(_env("METRICS_PORT", "0")))
    # Security (README "Security"): API keys bound to tenants, TLS, tenant capability policy.
    auth_keys: str = field(default_factory=lambda: _env("AUTH_KEYS", ""))
    tls_cert: str = field(default_factory=lambda: _env("TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: _env("TLS_KEY", ""))
    tls_client_ca: str = field(default_factory=lambda: _env("TLS_CLIENT_CA", ""))
    tenant_policy: str = field(default_factory=lambda: _env("TENANT_POLICY", ""))
    # Limits (README "Limits").
    max_request_bytes: int = field(
        default_factory=lambda: int(_env("MAX_REQUEST_BYTES", str(4 * 1024 * 1024)))
    )
    max_steps_per_plan: int = field(default_factory=lambda: int(_env("MAX_STEPS_PER_PLAN", "1000")))
    # Nesting of Structs, outputs and answers: a stored Execution (wrappers included) must stay
    # within protobuf's decoding limit of 100 message levels.
    max_struct_depth: int = field(default_factory=lambda: int(_env("MAX_STRUCT_DEPTH", "24")))
    max_template_output_bytes: int = field(
        default_factory=lambda: int(_env("MAX_TEMPLATE_OUTPUT_BYTES", str(1024 * 1024)))
    )
    # Unfinished runs a tenant may have at once (beyond: RESOURCE_EXHAUSTED); 0 = no limit.
    max_runs_per_tenant: int = field(
        default_factory=lambda: int(_env("MAX_RUNS_PER_TENANT", "10000"))
    )
    # Execute calls per second per tenant and replica (token bucket), and the burst allowed.
    execute_rate: float = field(default_factory=lambda: float(_env("EXECUTE_RATE", "200")))
    execute_burst: int = field(default_factory=lambda: int(_env("EXECUTE_BURST", "400")))
    # http.request may reach these networks (CIDRs, comma-separated) despite being private.
    http_allow: str = field(default_factory=lambda: _env("HTTP_ALLOW", ""))
    # CPU one expression evaluation may take (README "Expressions"); past it: "too costly".
    expression_budget_ms: float = field(
        default_factory=lambda: float(_env("EXPRESSION_BUDGET_MS", "10"))
    )
    max_page_size: int = 500
    default_page_size: int = 50
    default_run_timeout: float = 600.0
