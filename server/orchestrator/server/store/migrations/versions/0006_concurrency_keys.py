"""concurrency keys and priority of runs: runs.concurrency_key/max_concurrent/priority and
why a PENDING run waits (runs.waiting_reason)

Revision ID: 0006_concurrency_keys
Revises: 0005_step_attempts_before
Create Date: 2026-12-01 23:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_concurrency_keys"
down_revision = "0005_step_attempts_before"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column("concurrency_key", sa.String(length=128), server_default="", nullable=False),
    )
    op.add_column(
        "runs", sa.Column("max_concurrent", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("runs", sa.Column("priority", sa.Integer(), server_default="3", nullable=False))
    op.add_column(
        "runs",
        sa.Column("waiting_reason", sa.String(length=32), server_default="", nullable=False),
    )
    op.create_index(
        "ix_runs_tenant_key_status", "runs", ["tenant_id", "concurrency_key", "status", "pk"]
    )


def downgrade() -> None:
    op.drop_index("ix_runs_tenant_key_status", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        for name in ("waiting_reason", "priority", "max_concurrent", "concurrency_key"):
            batch.drop_column(name)
