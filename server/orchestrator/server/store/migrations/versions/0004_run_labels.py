"""labels and plan identity of runs: runs.labels/plan_id/plan_name/plan_version, run_labels

Revision ID: 0004_run_labels
Revises: 0003_run_retry
Create Date: 2026-12-01 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_run_labels"
down_revision = "0003_run_retry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("labels", sa.JSON(), nullable=True))
    op.add_column("runs", sa.Column("plan_id", sa.Text(), server_default="", nullable=False))
    op.add_column("runs", sa.Column("plan_name", sa.Text(), server_default="", nullable=False))
    op.add_column("runs", sa.Column("plan_version", sa.Text(), server_default="", nullable=False))
    op.create_index("ix_runs_tenant_plan_id", "runs", ["tenant_id", "plan_id", "pk"])
    op.create_table(
        "run_labels",
        sa.Column("run_id", sa.String(length=36), nullable=False),
        sa.Column("key", sa.String(length=320), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("value", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "key"),
    )
    op.create_index("ix_run_labels_tenant_pair", "run_labels", ["tenant_id", "key", "value"])


def downgrade() -> None:
    op.drop_index("ix_run_labels_tenant_pair", table_name="run_labels")
    op.drop_table("run_labels")
    op.drop_index("ix_runs_tenant_plan_id", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("plan_version")
        batch.drop_column("plan_name")
        batch.drop_column("plan_id")
        batch.drop_column("labels")
