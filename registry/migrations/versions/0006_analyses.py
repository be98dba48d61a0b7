"""analyses: what interpretability methods compute from a version (LRE, FV, probes, circuits), with
their tensors as content-addressed blobs

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'analyses',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('version_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=32), nullable=False),
        sa.Column('params', sa.JSON(), nullable=False),
        sa.Column('metrics', sa.JSON(), nullable=False),
        sa.Column('input_hash', sa.String(length=64), nullable=False),
        sa.Column('package_version', sa.String(length=32), nullable=False),
        sa.Column('duration_s', sa.Float(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['version_id'], ['versions.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_analyses_version_id'), 'analyses', ['version_id'], unique=False)
    op.create_index(op.f('ix_analyses_kind'), 'analyses', ['kind'], unique=False)
    op.create_table(
        'analysis_tensors',
        sa.Column('analysis_id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=512), nullable=False),
        sa.Column('blob_sha256', sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(['analysis_id'], ['analyses.id']),
        sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256']),
        sa.PrimaryKeyConstraint('analysis_id', 'name'),
    )
    op.create_index(op.f('ix_analysis_tensors_blob_sha256'), 'analysis_tensors', ['blob_sha256'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_analysis_tensors_blob_sha256'), table_name='analysis_tensors')
    op.drop_table('analysis_tensors')
    op.drop_index(op.f('ix_analyses_kind'), table_name='analyses')
    op.drop_index(op.f('ix_analyses_version_id'), table_name='analyses')
    op.drop_table('analyses')
