"""embeddings: per-version sample moments for content-based search

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('embeddings',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('encoder_id', sa.String(length=256), nullable=False),
    sa.Column('encoder_hash', sa.String(length=64), nullable=False),
    sa.Column('spec_hash', sa.String(length=64), nullable=False),
    sa.Column('sample_spec', sa.JSON(), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('mean', sa.LargeBinary(), nullable=False),
    sa.Column('factor', sa.LargeBinary(), nullable=False),
    sa.Column('diag', sa.LargeBinary(), nullable=False),
    sa.Column('thumbnail', sa.String(length=512), nullable=False),
    sa.Column('seconds', sa.Float(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('version_id', 'encoder_hash', 'spec_hash')
    )
    op.create_index(op.f('ix_embeddings_version_id'), 'embeddings', ['version_id'], unique=False)
    op.create_index(op.f('ix_embeddings_encoder_hash'), 'embeddings', ['encoder_hash'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_embeddings_encoder_hash'), table_name='embeddings')
    op.drop_index(op.f('ix_embeddings_version_id'), table_name='embeddings')
    op.drop_table('embeddings')
