"""derived_tensors: editor caches (MEMIT covariance, AlphaEdit keys) as content-addressed blobs

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('derived_tensors',
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('key', sa.JSON(), nullable=False),
    sa.Column('blob_sha256', sa.String(length=64), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['blob_sha256'], ['blobs.sha256'], ),
    sa.PrimaryKeyConstraint('kind', 'key_hash')
    )
    op.create_index(op.f('ix_derived_tensors_blob_sha256'), 'derived_tensors', ['blob_sha256'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_derived_tensors_blob_sha256'), table_name='derived_tensors')
    op.drop_table('derived_tensors')
