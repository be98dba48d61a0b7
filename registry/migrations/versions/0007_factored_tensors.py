"""blob_factors: tensors stored as their parent's tensor plus scale * B @ A (LoRA adapters, low-rank edits)

Revision ID: 0007
Revises: 0006

Registries made before it hold no factored blob, so nothing else changes.
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'blob_factors',
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('base_sha256', sa.String(length=64), nullable=False),
        sa.Column('b_sha256', sa.String(length=64), nullable=False),
        sa.Column('a_sha256', sa.String(length=64), nullable=False),
        sa.Column('scale', sa.Float(), nullable=False),
        sa.Column('depth', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['sha256'], ['blobs.sha256']),
        sa.ForeignKeyConstraint(['base_sha256'], ['blobs.sha256']),
        sa.ForeignKeyConstraint(['b_sha256'], ['blobs.sha256']),
        sa.ForeignKeyConstraint(['a_sha256'], ['blobs.sha256']),
        sa.PrimaryKeyConstraint('sha256'),
    )
    op.create_index(op.f('ix_blob_factors_base_sha256'), 'blob_factors', ['base_sha256'], unique=False)
    op.create_index(op.f('ix_blob_factors_b_sha256'), 'blob_factors', ['b_sha256'], unique=False)
    op.create_index(op.f('ix_blob_factors_a_sha256'), 'blob_factors', ['a_sha256'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_blob_factors_a_sha256'), table_name='blob_factors')
    op.drop_index(op.f('ix_blob_factors_b_sha256'), table_name='blob_factors')
    op.drop_index(op.f('ix_blob_factors_base_sha256'), table_name='blob_factors')
    op.drop_table('blob_factors')
