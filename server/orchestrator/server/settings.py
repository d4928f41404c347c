"""Server settings: one field per setting, each with its `--flag` and `ORCHESTRATOR_*` variable.

Every field is said once, here: its type and bounds (checked by pydantic-settings), its
default and its help. `orchestrator serve` makes its flags from these fields (`parse_args`),
so a new setting is a new field and nothing else. A bad value, from a flag or the
environment, is one line naming where it came from, the value and what is allowed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "ORCHESTRATOR_"
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    """Everything `build_server` needs: flags over `ORCHESTRATOR_*` variables over defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind (also for /metrics).")
    port: int = Field(50051, ge=0, le=65535, description="Port to bind (0: any free one).")
    database_url: str = Field(
        "sqlite+aiosqlite:///orchestrator.db",
        description="SQLAlchemy URL of the store (postgresql+asyncpg://user@host/db).",
    )
    log_format: Literal["json", "console"] = Field("json", description="json lines or console.")
    log_level: LogLevel = Field("info", description="Log level.")
    shutdown_grace: float = Field(
        10.0, ge=0, description="Seconds SIGTERM waits for calls and tool calls in flight."
    )
    heartbeat_seconds: float = Field(
        15.0, gt=0, description="Idle watch streams get a HEARTBEAT this often."
    )
    max_steps_in_flight: int = Field(
        256, ge=1, description="Tool calls at once, across all runs of the replica."
    )
    step_slot_reserve: int | None = Field(
        None,
        ge=0,
        description="Step slots no single tenant may take, kept for the others "
        "(default: a sixteenth of --max-steps-in-flight, at least 1).",
    )
    execute: bool = Field(
        True, description="Execute runs; --no-execute serves the API only (runs wait PENDING)."
    )
    max_watchers_per_tenant: int = Field(1000, ge=1, description="Open watch streams per tenant.")
    replica_id: str = Field(
        "",
        max_length=128,
        description="This replica's name (default host:port); each start is a new incarnation "
        "of it, and restarted under the same name it takes its runs back at once.",
    )
    lease_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a replica's heartbeat may lapse before the others take its runs "
        "(it beats every third of this).",
    )
    park_after_seconds: float = Field(
        60.0,
        ge=0,
        description="On PostgreSQL a run with nothing in flight that only waits (a person, a "
        "pause, a timer due later than this) holds no owner: any replica takes it when due.",
    )
    writer_lanes: int = Field(
        1,
        ge=1,
        le=4,
        description="On PostgreSQL, group commits in flight at once, each on its own "
        "connection (a run's writes keep to one); SQLite always has one.",
    )
    retention_seconds: float = Field(
        0.0, ge=0, description="Delete finished runs older than this (0 keeps them)."
    )
    schedule_poll_seconds: float = Field(
        1.0,
        gt=0,
        description="Longest wait between two looks for due schedules (other replicas' new "
        "schedules and finished runs are seen within it; this replica's at once).",
    )
    http_port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="Port of Connect, gRPC-Web and the dashboard (0: any free one).",
    )
    http: bool = Field(True, description="Serve the HTTP port; --no-http serves gRPC only.")
    cors_origin: str = Field(
        "",
        description="Origins whose pages may call the HTTP port, comma-separated (CORS is off "
        "without: the dashboard is same-origin).",
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics (0 is off).")
    max_connection_age_seconds: float = Field(
        300.0,
        ge=0,
        description="Connections are asked to reconnect after this long (GOAWAY), so clients "
        "rebalance behind an L4 load balancer; 0 is never.",
    )
    auth_keys: str = Field("", description="JSON file of API keys bound to tenants.")
    tls_cert: str = Field("", description="PEM server certificate (TLS).")
    tls_key: str = Field("", description="PEM key of --tls-cert.")
    tls_client_ca: str = Field("", description="PEM CA for client certificates (mTLS).")
    tenant_policy: str = Field("", description="JSON file of capabilities per tenant.")
    http_allow: str = Field(
        "",
        description="CIDRs http.request and webhooks may reach though private, comma-separated.",
    )
    webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="One webhook delivery attempt, connect to answer."
    )
    webhook_retry_seconds: float = Field(
        25 * 3600.0,
        gt=0,
        description="How long a webhook delivery is retried (with back-off) before it fails.",
    )
    webhook_max_backoff_seconds: float = Field(
        3600.0, gt=0, description="Longest wait between two attempts of a webhook delivery."
    )
    webhook_poll_seconds: float = Field(
        1.0, gt=0, description="How often due webhook deliveries are looked for."
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request.")
    max_steps_per_plan: int = Field(1000, ge=1, description="Steps in one plan.")
    # A stored Execution (wrappers included) must stay within protobuf's decoding limit of
    # 100 message levels.
    max_struct_depth: int = Field(
        24, ge=1, le=40, description="Nesting of Structs, step outputs and answers."
    )
    max_template_output_bytes: int = Field(
        1024 * 1024, ge=1, description="Resolved parameters of one step."
    )
    max_runs_per_tenant: int = Field(
        10000, ge=0, description="Unfinished runs per tenant (0: no limit)."
    )
    execute_rate: float = Field(
        200.0, ge=0, description="Execute calls per second per tenant and replica (0: no limit)."
    )
    execute_burst: int = Field(400, ge=1, description="Execute calls a tenant may burst.")
    expression_budget_ms: float = Field(
        10.0, gt=0, description='CPU one expression evaluation may take (README "Expressions").'
    )
    max_page_size: int = Field(500, ge=1, description="Largest ListExecutions page.")
    default_page_size: int = Field(50, ge=1, description="ListExecutions page when unset.")
    default_run_timeout: float = Field(
        600.0, gt=0, description="Run timeout when neither the request nor the plan sets one."
    )

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{flag('tls_cert')} and {flag('tls_key')} go together")
        return self


class SettingsError(ValueError):
    """A setting with a bad value, said as one line per problem for a person to fix."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parser(prog: str = "orchestrator serve") -> argparse.ArgumentParser:
    """The `serve` flags, one per Settings field; help and defaults from the field."""
    out = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [FLAGS]",
        description="Run the gRPC server until SIGTERM (SIGHUP re-reads the key and policy "
        "files). Every flag has an ORCHESTRATOR_* variable; a flag wins over its variable.",
        argument_default=argparse.SUPPRESS,
    )
    for name, info in Settings.model_fields.items():
        default = "" if info.default in ("", None) else f", default {info.default}"
        help_text = f"{info.description} [env {ENV_PREFIX}{name.upper()}{default}]"
        if info.annotation is bool:
            out.add_argument(flag(name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
            metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
            out.add_argument(flag(name), metavar=metavar, help=help_text)
    return out


def parse_args(argv: Sequence[str]) -> Settings:
    """Settings from `serve` flags and the environment; SettingsError names each bad value."""
    given: dict[str, Any] = vars(parser().parse_args(list(argv)))
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise SettingsError("\n".join(_problems(exc, given))) from None


def load() -> Settings:
    """Settings from the environment alone."""
    return parse_args(())


def _problems(exc: ValidationError, given: dict[str, Any]) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"]
        if name in given:
            where = f"{flag(name)}={given[name]!r}"
        elif name:
            where = f"{ENV_PREFIX}{name.upper()}={error['input']!r}"
        else:  # a rule across fields
            where, message = "settings", message.removeprefix("Value error, ")
        lines.append(f"{where}: {message[0].lower()}{message[1:]}")
    return lines
