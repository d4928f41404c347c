"""the plan store and schedules: plans, schedules, schedule_fires

Revision ID: 0007_plans_schedules
Revises: 0006_concurrency_keys
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_plans_schedules"
down_revision = "0006_concurrency_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plans",
        sa.Column(
            "pk",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("plan_hash", sa.String(length=80), nullable=False),
        sa.Column("plan", sa.LargeBinary(), nullable=False),
        sa.Column("plan_id", sa.Text(), server_default="", nullable=False),
        sa.Column("plan_name", sa.Text(), server_default="", nullable=False),
        sa.Column("plan_version", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("last_run_at", sa.Float(), nullable=True),
        sa.UniqueConstraint("tenant_id", "plan_hash", name="uq_plans_tenant_hash"),
    )
    op.create_table(
        "schedules",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("schedule_id", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.LargeBinary(), nullable=False),
        sa.Column("plan_hash", sa.String(length=80), nullable=False),
        sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("next_fire_at", sa.Float(), nullable=True),
        sa.Column("buffered_fire_at", sa.Float(), nullable=True),
        sa.Column("last_run_id", sa.String(length=36), nullable=True),
        sa.Column("started_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("skipped_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("missed_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "schedule_id"),
    )
    op.create_index("ix_schedules_due", "schedules", ["paused", "next_fire_at"])
    op.create_table(
        "schedule_fires",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("schedule_id", sa.String(length=64), nullable=False),
        sa.Column("fire_at", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.String(length=36), nullable=True),
        sa.Column("message", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "schedule_id", "fire_at"),
    )


def downgrade() -> None:
    op.drop_table("schedule_fires")
    op.drop_index("ix_schedules_due", table_name="schedules")
    op.drop_table("schedules")
    op.drop_table("plans")
