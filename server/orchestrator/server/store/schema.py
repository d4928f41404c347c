"""Tables, as SQLAlchemy Core. Alembic migrations create them (store/migrations)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Times are epoch seconds (double precision): one representation on SQLite and PostgreSQL,
# cheap to compare and to sort.
runs = sa.Table(
    "runs",
    metadata,
    # A monotonic key: the newest-first order of ListExecutions and its page tokens.
    sa.Column(
        "pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("run_id", sa.String(36), nullable=False, unique=True),
    sa.Column("tenant_id", sa.String(36), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # Compare-and-set guard: every transition is UPDATE ... WHERE version = :seen.
    sa.Column("version", sa.Integer, nullable=False, server_default="1"),
    sa.Column("plan_hash", sa.String(80), nullable=False),
    sa.Column("plan", sa.LargeBinary, nullable=False),  # serialized ExecutablePlan
    sa.Column("parameters", sa.JSON, nullable=False),
    sa.Column("variables", sa.JSON, nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("triggered_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("correlation_id", sa.String(256), nullable=False, server_default=""),
    sa.Column("timeout_seconds", sa.Float, nullable=False),
    sa.Column("estimated_seconds", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("current_step", sa.String(128), nullable=False, server_default=""),
    sa.Column("error_message", sa.Text, nullable=False, server_default=""),
    sa.Column("error_reason", sa.String(64), nullable=False, server_default=""),
    sa.Column("steps_total", sa.Integer, nullable=False),
    sa.Column("steps_finished", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_sequence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("results", sa.JSON),  # dry run: the execution order
    # The incarnation (replicas.incarnation) executing the run: it owns the run while its
    # heartbeat is fresh, with no per-run renewal. lease_expires_at is no longer written.
    # A run with nothing in flight that only waits (a person, a pause, a timer, a signal)
    # is parked: no owner, and `wake_at` says when any replica claims it at the latest (its
    # next timer, else its deadline); the event that resumes it clears `wake_at` (due now).
    sa.Column("owner", sa.String(160)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("wake_at", sa.Float),
    sa.Column("trace_parent", sa.String(64), nullable=False, server_default=""),
    # How many times RetryExecution sent the run back to RUNNING.
    sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
    # The request's labels as given (the snapshot's); run_labels is what filters use.
    sa.Column("labels", sa.JSON),
    sa.Column("plan_id", sa.Text, nullable=False, server_default=""),
    sa.Column("plan_name", sa.Text, nullable=False, server_default=""),
    sa.Column("plan_version", sa.Text, nullable=False, server_default=""),
    # At most `max_concurrent` of the tenant's runs with a concurrency key run at once; the
    # others wait PENDING in (priority, pk) order, `waiting_reason` saying so.
    sa.Column("concurrency_key", sa.String(128), nullable=False, server_default=""),
    sa.Column("max_concurrent", sa.Integer, nullable=False, server_default="0"),
    sa.Column("priority", sa.Integer, nullable=False, server_default="3"),
    sa.Column("waiting_reason", sa.String(32), nullable=False, server_default=""),
)
sa.Index("ix_runs_tenant_pk", runs.c.tenant_id, runs.c.pk)
sa.Index("ix_runs_tenant_status", runs.c.tenant_id, runs.c.status, runs.c.pk)
sa.Index("ix_runs_status", runs.c.status, runs.c.lease_expires_at)
# Claims (unowned and due, or owned by a dead incarnation) and heartbeats (a replica's own).
sa.Index("ix_runs_owner_status_wake", runs.c.owner, runs.c.status, runs.c.wake_at)
sa.Index("ix_runs_tenant_plan", runs.c.tenant_id, runs.c.plan_hash, runs.c.status, runs.c.pk)
sa.Index("ix_runs_tenant_plan_id", runs.c.tenant_id, runs.c.plan_id, runs.c.pk)
sa.Index(
    "ix_runs_tenant_key_status", runs.c.tenant_id, runs.c.concurrency_key, runs.c.status, runs.c.pk
)

# One row per label of a run: ExecutionFilter.labels is one indexed lookup per pair.
run_labels = sa.Table(
    "run_labels",
    metadata,
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("key", sa.String(320), primary_key=True),
    sa.Column("tenant_id", sa.String(36), nullable=False),
    sa.Column("value", sa.String(64), nullable=False),
)
sa.Index("ix_run_labels_tenant_pair", run_labels.c.tenant_id, run_labels.c.key, run_labels.c.value)

steps = sa.Table(
    "steps",
    metadata,
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("step_id", sa.String(128), primary_key=True),
    sa.Column("flow_id", sa.String(128), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("tool", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    # Attempts made before the run's last retry: a retried step's policy starts afresh.
    sa.Column("attempts_before", sa.Integer, nullable=False, server_default="0"),
    sa.Column("first_started_at", sa.Float),  # durable timers count from here
    sa.Column("started_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("output", sa.JSON),
    sa.Column("error", sa.Text, nullable=False, server_default=""),
    sa.Column("error_reason", sa.String(64), nullable=False, server_default=""),
    # Durable timers (core.wait) and retry back-off keep their deadline across restarts.
    sa.Column("wake_at", sa.Float),
)

events = sa.Table(
    "events",
    metadata,
    # Global commit order: the cursor of WatchExecutions.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("tenant_id", sa.String(36), nullable=False),
    sa.Column("sequence", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("status_changed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("status", sa.String(16), nullable=False),  # the run's status after the event
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),  # serialized ExecutionEvent
    sa.UniqueConstraint("run_id", "sequence", name="uq_events_run_sequence"),
)
sa.Index("ix_events_tenant_status", events.c.tenant_id, events.c.status_changed, events.c.id)

clarifications = sa.Table(
    "clarifications",
    metadata,
    sa.Column("clarification_id", sa.String(36), primary_key=True),
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("step_id", sa.String(128), nullable=False),
    sa.Column("category", sa.String(32), nullable=False),
    sa.Column("prompt", sa.Text, nullable=False, server_default=""),
    sa.Column("options", sa.JSON, nullable=False),
    sa.Column("argument_name", sa.String(128), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("response", sa.JSON),
    sa.Column("responded_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("resolved_at", sa.Float),
)
sa.Index("ix_clarifications_run", clarifications.c.run_id, clarifications.c.status)

# Signals sent to a run, kept in arrival order (pk) until a core.wait_for_signal step takes
# one; the unique key makes a request id deliver once, whatever the race.
signals = sa.Table(
    "signals",
    metadata,
    sa.Column(
        "pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("signal_name", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(256), nullable=False),
    sa.Column("payload", sa.JSON),
    sa.Column("created_at", sa.Float, nullable=False),
    # The step that took it ("" while it waits for one), and when.
    sa.Column("consumed_by", sa.String(128), nullable=False, server_default=""),
    sa.Column("consumed_at", sa.Float),
    sa.UniqueConstraint("run_id", "request_id", name="uq_signals_run_request"),
)
sa.Index("ix_signals_waiting", signals.c.run_id, signals.c.signal_name, signals.c.consumed_by)

# A tenant's webhook subscriptions, and the outbox of their deliveries: a delivery row is
# written in the same transaction as the change it announces (RunStore._insert_events).
webhooks = sa.Table(
    "webhooks",
    metadata,
    sa.Column("webhook_id", sa.String(36), primary_key=True),
    sa.Column("tenant_id", sa.String(36), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event_types", sa.JSON, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("secret", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Index("ix_webhooks_tenant", webhooks.c.tenant_id)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column(
        "pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("delivery_id", sa.String(64), nullable=False, unique=True),
    sa.Column(
        "webhook_id",
        sa.String(36),
        sa.ForeignKey("webhooks.webhook_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("run_id", sa.String(36), nullable=False),
    sa.Column("event_type", sa.String(64), nullable=False),
    # The exact bytes signed and sent on every attempt.
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_status_code", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float),
)
sa.Index(
    "ix_webhook_deliveries_due", webhook_deliveries.c.status, webhook_deliveries.c.next_attempt_at
)
sa.Index("ix_webhook_deliveries_webhook", webhook_deliveries.c.webhook_id, webhook_deliveries.c.pk)

# The unique key is the guarantee: one run per tenant + key, whatever the race.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("tenant_id", sa.String(36), primary_key=True),
    sa.Column("key", sa.String(256), primary_key=True),
    sa.Column("request_digest", sa.String(80), nullable=False),
    sa.Column(
        "run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("created_at", sa.Float, nullable=False),
)

# Server-wide settings kept in the store, e.g. the page-token signing key shared by replicas.
server_settings = sa.Table(
    "server_settings",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

# One row per process incarnation (replica id + boot nonce): its heartbeat is the liveness of
# every run it owns. Fencing is by incarnation, so two processes can never act as one owner.
replicas = sa.Table(
    "replicas",
    metadata,
    sa.Column("incarnation", sa.String(160), primary_key=True),
    sa.Column("replica_id", sa.String(128), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)
sa.Index("ix_replicas_replica_id", replicas.c.replica_id)

# The plan store: every plan a tenant executes, kept once by its content hash.
plans = sa.Table(
    "plans",
    metadata,
    # A monotonic key: the newest-first order of ListPlans and its page tokens.
    sa.Column(
        "pk",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("tenant_id", sa.String(36), nullable=False),
    sa.Column("plan_hash", sa.String(80), nullable=False),
    sa.Column("plan", sa.LargeBinary, nullable=False),  # serialized ExecutablePlan
    sa.Column("plan_id", sa.Text, nullable=False, server_default=""),
    sa.Column("plan_name", sa.Text, nullable=False, server_default=""),
    sa.Column("plan_version", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("last_run_at", sa.Float),
    sa.UniqueConstraint("tenant_id", "plan_hash", name="uq_plans_tenant_hash"),
)

schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("tenant_id", sa.String(36), primary_key=True),
    sa.Column("schedule_id", sa.String(64), primary_key=True),
    # The Schedule message as given (its plan is in `plans`, by plan_hash).
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("plan_hash", sa.String(80), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    # The earliest fire time not yet handled (none while paused).
    sa.Column("next_fire_at", sa.Float),
    # BUFFER_ONE: the fire time waiting for the last run to end.
    sa.Column("buffered_fire_at", sa.Float),
    sa.Column("last_run_id", sa.String(36)),
    sa.Column("started_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("skipped_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("missed_count", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)
sa.Index("ix_schedules_due", schedules.c.paused, schedules.c.next_fire_at)

# One row per fire time a schedule handled. The key is the guarantee: one run per schedule and
# fire time, whichever replica (or restart) fires it, claimed in the run's own transaction.
schedule_fires = sa.Table(
    "schedule_fires",
    metadata,
    sa.Column("tenant_id", sa.String(36), primary_key=True),
    sa.Column("schedule_id", sa.String(64), primary_key=True),
    sa.Column("fire_at", sa.Float, primary_key=True),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(36)),
    sa.Column("message", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)
