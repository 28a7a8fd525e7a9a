"""records: tenants, classifiers, versions, jobs, uploads, bases

Revision ID: 0001
Revises: 
Create Date: 2026-11-30

The first schema of the records database (replaces the JSON-file store; see rmt_service.legacy).
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('bases',
    sa.Column('base_id', sa.String(length=200), nullable=False),
    sa.Column('backbone', sa.String(length=200), nullable=False),
    sa.Column('pretrained', sa.Text(), nullable=False),
    sa.Column('blob_key', sa.String(length=300), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('base_id', name=op.f('pk_bases'))
    )
    op.create_table('classifiers',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant', sa.String(length=200), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('labels', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('n_images', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('current_version_id', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_classifiers'))
    )
    with op.batch_alter_table('classifiers', schema=None) as batch_op:
        batch_op.create_index('ix_classifiers_tenant_created', ['tenant', 'created_at', 'id'], unique=False)

    op.create_table('job_counts',
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('n', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('status', name=op.f('pk_job_counts'))
    )
    op.create_table('jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('classifier_id', sa.String(length=40), nullable=False),
    sa.Column('tenant', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('warnings', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('error', sa.JSON(none_as_null=True), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('resend_at', sa.Float(), nullable=False),
    sa.Column('lease_owner', sa.String(length=200), nullable=True),
    sa.Column('lease_expires_at', sa.Float(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('enqueued_at', sa.Float(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=True),
    sa.Column('finished_at', sa.Float(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_classifier', ['classifier_id'], unique=False)
        batch_op.create_index('ix_jobs_status_resend', ['status', 'resend_at'], unique=False)
        batch_op.create_index('ix_jobs_status_finished', ['status', 'finished_at'], unique=False)
        batch_op.create_index('ix_jobs_status_lease', ['status', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_jobs_tenant_created', ['tenant', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_jobs_tenant_status', ['tenant', 'status'], unique=False)

    op.create_table('tenants',
    sa.Column('tenant', sa.String(length=200), nullable=False),
    sa.Column('max_active_jobs', sa.Integer(), nullable=True),
    sa.Column('n_classifiers', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('tenant', name=op.f('pk_tenants'))
    )
    op.create_table('classifier_versions',
    sa.Column('version_id', sa.String(length=40), nullable=False),
    sa.Column('classifier_id', sa.String(length=40), nullable=False),
    sa.Column('candidate', sa.String(length=40), nullable=False),
    sa.Column('final', sa.Boolean(), nullable=False),
    sa.Column('blob_key', sa.String(length=300), nullable=False),
    sa.Column('base_id', sa.String(length=200), nullable=True),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('files', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['classifier_id'], ['classifiers.id'], name=op.f('fk_classifier_versions_classifier_id_classifiers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('version_id', name=op.f('pk_classifier_versions'))
    )
    with op.batch_alter_table('classifier_versions', schema=None) as batch_op:
        batch_op.create_index('ix_versions_base', ['base_id'], unique=False)
        batch_op.create_index('ix_versions_classifier', ['classifier_id', 'created_at'], unique=False)

    op.bulk_insert(sa.table('job_counts', sa.column('status', sa.String), sa.column('n', sa.BigInteger)),
                   [{"status": s, "n": 0} for s in ("queued", "running", "succeeded", "failed", "cancelled")])
    op.create_table('uploads',
    sa.Column('classifier_id', sa.String(length=40), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('blob_key', sa.String(length=300), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('original_name', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['classifier_id'], ['classifiers.id'], name=op.f('fk_uploads_classifier_id_classifiers'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('classifier_id', 'idx', name=op.f('pk_uploads'))
    )


def downgrade() -> None:
    op.drop_table('uploads')
    with op.batch_alter_table('classifier_versions', schema=None) as batch_op:
        batch_op.drop_index('ix_versions_classifier')
        batch_op.drop_index('ix_versions_base')

    op.drop_table('classifier_versions')
    op.drop_table('tenants')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_status')
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.drop_index('ix_jobs_status_lease')
        batch_op.drop_index('ix_jobs_status_finished')
        batch_op.drop_index('ix_jobs_status_resend')
        batch_op.drop_index('ix_jobs_classifier')

    op.drop_table('jobs')
    op.drop_table('job_counts')
    with op.batch_alter_table('classifiers', schema=None) as batch_op:
        batch_op.drop_index('ix_classifiers_tenant_created')

    op.drop_table('classifiers')
    op.drop_table('bases')
