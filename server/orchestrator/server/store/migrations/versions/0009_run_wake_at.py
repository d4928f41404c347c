"""runs.wake_at: when a parked run (no owner: it only waits) is due to be claimed

Revision ID: 0009_run_wake_at
Revises: 0008_signals_webhooks
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_run_wake_at"
down_revision = "0008_signals_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("wake_at", sa.Float(), nullable=True))
    # Claims look up unowned due runs and dead owners' runs; heartbeats a replica's own. The
    # index on owner alone is covered by this one.
    op.create_index("ix_runs_owner_status_wake", "runs", ["owner", "status", "wake_at"])
    op.drop_index("ix_runs_owner", table_name="runs")


def downgrade() -> None:
    op.create_index("ix_runs_owner", "runs", ["owner"])
    op.drop_index("ix_runs_owner_status_wake", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("wake_at")
