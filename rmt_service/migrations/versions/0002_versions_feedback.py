"""versions the user keeps: version source/parent/samples, job kind/spec, content-addressed uploads, feedback

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Existing rows keep their meaning: versions default to source 'build' with samples NULL (= the classifier's
first n_images uploads), jobs to kind 'build', uploads without a content address.
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('classifier_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source', sa.String(length=20), nullable=False, server_default='build'))
        batch_op.add_column(sa.Column('parent_version_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('samples', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('kind', sa.String(length=20), nullable=False, server_default='build'))
        batch_op.add_column(sa.Column('spec', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sha256', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_uploads_classifier_sha256', ['classifier_id', 'sha256'], unique=False)
    op.create_table('feedback',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('classifier_id', sa.String(length=40), nullable=False),
    sa.Column('blob_key', sa.String(length=300), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('label', sa.Text(), nullable=False),
    sa.Column('prediction', sa.Text(), nullable=True),
    sa.Column('version_id', sa.String(length=40), nullable=True),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['classifier_id'], ['classifiers.id'], name=op.f('fk_feedback_classifier_id_classifiers'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_feedback'))
    )
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.create_index('ix_feedback_classifier_created', ['classifier_id', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('feedback', schema=None) as batch_op:
        batch_op.drop_index('ix_feedback_classifier_created')
    op.drop_table('feedback')
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index('ix_uploads_classifier_sha256')
        batch_op.drop_column('sha256')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('spec')
        batch_op.drop_column('kind')
    with op.batch_alter_table('classifier_versions', schema=None) as batch_op:
        batch_op.drop_column('samples')
        batch_op.drop_column('parent_version_id')
        batch_op.drop_column('source')
