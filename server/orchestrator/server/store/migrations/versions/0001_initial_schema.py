"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-25 20:03:48.119632
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('runs',
    sa.Column('pk', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('version', sa.Integer(), server_default='1', nullable=False),
    sa.Column('plan_hash', sa.String(length=80), nullable=False),
    sa.Column('plan', sa.LargeBinary(), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('variables', sa.JSON(), nullable=False),
    sa.Column('dry_run', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('triggered_by', sa.String(length=256), server_default='', nullable=False),
    sa.Column('correlation_id', sa.String(length=256), server_default='', nullable=False),
    sa.Column('timeout_seconds', sa.Float(), nullable=False),
    sa.Column('estimated_seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('completed_at', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.Column('current_step', sa.String(length=128), server_default='', nullable=False),
    sa.Column('error_message', sa.Text(), server_default='', nullable=False),
    sa.Column('error_reason', sa.String(length=64), server_default='', nullable=False),
    sa.Column('steps_total', sa.Integer(), nullable=False),
    sa.Column('steps_finished', sa.Integer(), server_default='0', nullable=False),
    sa.Column('last_sequence', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('results', sa.JSON(), nullable=True),
    sa.Column('owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.Float(), nullable=True),
    sa.Column('trace_parent', sa.String(length=64), server_default='', nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('run_id')
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index('ix_runs_status', ['status', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_runs_owner', ['owner'], unique=False)
        batch_op.create_index('ix_runs_tenant_plan', ['tenant_id', 'plan_hash', 'status', 'pk'], unique=False)
        batch_op.create_index('ix_runs_tenant_pk', ['tenant_id', 'pk'], unique=False)
        batch_op.create_index('ix_runs_tenant_status', ['tenant_id', 'status', 'pk'], unique=False)

    op.create_table('server_settings',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('clarifications',
    sa.Column('clarification_id', sa.String(length=36), nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('step_id', sa.String(length=128), nullable=False),
    sa.Column('category', sa.String(length=32), nullable=False),
    sa.Column('prompt', sa.Text(), server_default='', nullable=False),
    sa.Column('options', sa.JSON(), nullable=False),
    sa.Column('argument_name', sa.String(length=128), server_default='', nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('response', sa.JSON(), nullable=True),
    sa.Column('responded_by', sa.String(length=256), server_default='', nullable=False),
    sa.Column('resolved_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('clarification_id')
    )
    with op.batch_alter_table('clarifications', schema=None) as batch_op:
        batch_op.create_index('ix_clarifications_run', ['run_id', 'status'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('sequence', sa.BigInteger(), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('status_changed', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'sequence', name='uq_events_run_sequence')
    )
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.create_index('ix_events_tenant_status', ['tenant_id', 'status_changed', 'id'], unique=False)

    op.create_table('idempotency_keys',
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('key', sa.String(length=256), nullable=False),
    sa.Column('request_digest', sa.String(length=80), nullable=False),
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'key')
    )
    op.create_table('steps',
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('step_id', sa.String(length=128), nullable=False),
    sa.Column('flow_id', sa.String(length=128), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('tool', sa.String(length=128), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('first_started_at', sa.Float(), nullable=True),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('completed_at', sa.Float(), nullable=True),
    sa.Column('output', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), server_default='', nullable=False),
    sa.Column('error_reason', sa.String(length=64), server_default='', nullable=False),
    sa.Column('wake_at', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.run_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('run_id', 'step_id')
    )


def downgrade() -> None:
    op.drop_table('steps')
    op.drop_table('idempotency_keys')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_tenant_status')

    op.drop_table('events')
    with op.batch_alter_table('clarifications', schema=None) as batch_op:
        batch_op.drop_index('ix_clarifications_run')

    op.drop_table('clarifications')
    op.drop_table('server_settings')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index('ix_runs_tenant_status')
        batch_op.drop_index('ix_runs_tenant_pk')
        batch_op.drop_index('ix_runs_status')
        batch_op.drop_index('ix_runs_owner')
        batch_op.drop_index('ix_runs_tenant_plan')

    op.drop_table('runs')
