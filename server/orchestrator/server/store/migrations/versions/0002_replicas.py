"""replicas: one row per process incarnation, its heartbeat

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('replicas',
    sa.Column('incarnation', sa.String(length=160), nullable=False),
    sa.Column('replica_id', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('heartbeat_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('incarnation')
    )
    with op.batch_alter_table('replicas', schema=None) as batch_op:
        batch_op.create_index('ix_replicas_replica_id', ['replica_id'], unique=False)
    # runs.owner now names an incarnation (replica id + boot nonce). SQLite does not enforce
    # VARCHAR lengths, and rebuilding `runs` there would cascade into its children.
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('runs', 'owner', type_=sa.String(length=160), existing_nullable=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('runs', 'owner', type_=sa.String(length=128), existing_nullable=True)
    with op.batch_alter_table('replicas', schema=None) as batch_op:
        batch_op.drop_index('ix_replicas_replica_id')
    op.drop_table('replicas')
